"""Timing jobs beside the pipeline: real timing feeds for a model, the FP32/INT8 time accounting behind
`quant bench MODEL --profile`, and compared ONNX files timed interleaved (scripts/bench_int8.py).

Sits on the tasks/search floor, above artifacts and eval (it builds artifacts and asks a model's task for its speed workload); nothing
below imports it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from quant.errors import ModelError
from quant.paths import DEFAULT_OUT_ROOT
from quant.eval.profile import Feeds, ProfileComparison, profile_pair
from quant.eval.speed import (GraphWorkload, LatencyStats, Ratio, group_bases, interleaved_seconds, latency_ratio,
                              latency_stats, STREAM_ROUND_FRAMES, load_average, rolled_seconds)

log = logging.getLogger(__name__)

TIMING_UTTERANCES = 8  # the workload is the median-length test utterance of these (as `quant bench`)


def reference_graph(name: str) -> tuple[Any, Any]:
    """(spec, graph) of the shipped spec graph whose artifact name is `name` (dpcrn, dpcrn-stream, wenet-encoder,
    wenet-decoder)."""
    from quant.spec import load_spec, shipped_specs

    graphs = {str(g.name): (spec, g) for spec in map(load_spec, shipped_specs()) for g in spec.graphs if g.exporter}
    if name not in graphs:
        raise ModelError(f"{name}: profiles and timing feeds exist for the shipped graphs {sorted(graphs)}; time "
                         "another ONNX file with scripts/bench_int8.py --feeds FILE.npz")
    return graphs[name]


def reference_export(name: str, out_root: Path = DEFAULT_OUT_ROOT) -> Path:
    """The FP32 export of a shipped graph under out_root/export/ (exported now when missing)."""
    from quant.artifacts.export import export_model

    _spec, graph = reference_graph(name)
    target = Path(out_root) / "export" / str(graph.exporter) / str(graph.export_file)
    if not target.is_file():
        export_model(str(graph.exporter), target.parent)
    return target


def timing_workload(model: str, fp32_onnx: Path, utterances: int = TIMING_UTTERANCES) -> GraphWorkload:
    """What a reference model is timed on, from real test audio (the task's speed workload, as `quant bench`): the
    first 9 s segment (offline), every frame of the utterance with the initial states (streaming), the
    median-length utterance (ASR)."""
    from quant.tasks import FeedOptions, task_for

    spec, graph = reference_graph(model)  # the shipped spec whose graph has this artifact name
    return task_for(spec).speed_workload(graph.role, options=FeedOptions(limit=utterances, graphs={graph.role: fp32_onnx}))


def timing_feeds(model: str, fp32_onnx: Path, utterances: int = TIMING_UTTERANCES) -> dict[str, np.ndarray]:
    """One run's inputs for a reference model, from real test audio: the first 9 s segment (offline), the first
    frame with the initial states (streaming: what the profiler runs), the median-length utterance (ASR)."""
    load = timing_workload(model, fp32_onnx, utterances)
    try:
        return load.first_run()
    except ValueError as error:
        raise ModelError(f"{fp32_onnx}: {error}") from None


@dataclass(frozen=True)
class ModelProfile:
    fp32: Path  # the FP32 artifact's ONNX file
    int8: Path
    comparison: ProfileComparison
    source: Path  # the graph both were built from: the export with the spec's rewrites (or the override) applied
    plain_fp32: Path | None = None  # the FP32 build of the export as it is, where the rewrites changed it (timed
    # beside the others: the INT8 ratio divides by the faster FP32)


def build_graphs(model: str, rewrites: Sequence[str] | None = None, out_root: Path = DEFAULT_OUT_ROOT
                 ) -> dict[str, Path]:
    """The FP32 graphs, by role, that the builds of a shipped graph's spec start from: the exports with the spec's
    rewrites (`rewrites` instead when given; () for the exports as they are) applied and checked
    (quant.tasks.rewriting), as `quant build` and `quant run` make them. Every exported graph of the spec is there:
    a chained graph's feeds run its upstream graph (the WeNet decoder's, the encoder)."""
    from quant.tasks.rewriting import rewrite_graphs

    spec, _graph = reference_graph(model)
    exports = {g.role: reference_export(str(g.name), out_root) for g in spec.graphs if g.exporter}
    return {role: done.path for role, done in rewrite_graphs(spec, exports, out_root, rewrites).items()}


def profile_model(model: str, runs: int = 10, threads: int = 1, cache: Path | None = None,
                  out_dir: Path | None = None, rewrites: Sequence[str] | None = None) -> ModelProfile:
    """Build (or rebuild) the model's FP32 and INT8 ORT artifacts under out_dir (default engines/<model>/) from the
    graph the builds use (build_graphs: the spec's rewrites, or `rewrites`) and account their time per node and op
    type on real feeds."""
    from quant.artifacts import build_artifact
    from quant.artifacts.artifact import MODEL_FILE
    from quant.tasks import FeedOptions
    from quant.tasks.calibration import calibrate_spec

    spec, graph = reference_graph(model)
    graphs = build_graphs(model, rewrites)
    source = graphs[graph.role]
    folder = {p: (out_dir / p if out_dir else None) for p in ("fp32", "int8")}
    fp32 = build_artifact(source, "fp32", name=graph.name, out_dir=folder["fp32"]) / MODEL_FILE
    if cache is None:  # calibrated on the graph built from (its sha256 keys the cache), upstream graphs as built
        cache = Path(calibrate_spec(spec, graph.role, source, feed_options=FeedOptions(graphs=graphs)).path)
    int8 = build_artifact(source, "int8", name=graph.name, out_dir=folder["int8"], cache=cache,
                          rules_off=graph.rules_off) / MODEL_FILE
    export = reference_export(str(graph.name))
    plain = None if source == export else build_artifact(  # beside fp32, as `quant run` names it
        export, "fp32", name=graph.name, out_dir=(out_dir or DEFAULT_OUT_ROOT / str(graph.name)) / "fp32-plain"
    ) / MODEL_FILE
    return ModelProfile(fp32, int8, profile_pair(fp32, int8, timing_feeds(model, fp32), runs, threads), source, plain)


@dataclass(frozen=True)
class InterleavedResult:
    """Compared graphs timed round-robin in one process, with the machine's load around the timing."""

    seconds: Mapping[str, Sequence[float]]  # per round, the same round index across labels
    load_before: float
    load_after: float
    frames_per_round: int = 1  # streaming: each value is the mean frame time of this many consecutive frames

    @property
    def stats(self) -> dict[str, LatencyStats]:
        return {label: latency_stats(values) for label, values in self.seconds.items()}

    def fastest(self, labels: Sequence[str]) -> str:
        """Of `labels` (e.g. the FP32 builds with and without rewrites), the one with the lowest median latency: the
        base an honest ratio divides by."""
        return group_bases({"base": tuple(labels)}, self.stats)["base"]

    def ratios(self, base: str) -> dict[str, Ratio]:
        stats = self.stats
        return {label: latency_ratio(stats[label], stats[base], self.seconds[label], self.seconds[base])
                for label in stats if label != base}

    def to_dict(self, base: str) -> dict[str, object]:
        return {"load_before": self.load_before, "load_after": self.load_after, "frames_per_round": self.frames_per_round,
                "latency_ms": {label: s.to_dict() for label, s in self.stats.items()},
                "ratios_vs": base, "ratios": {label: r.to_dict() for label, r in self.ratios(base).items()}}


def time_interleaved(models: Mapping[str, Path], feeds: Feeds | GraphWorkload, runs: int, threads: int = 1,
                     warmup: int = 3) -> InterleavedResult:
    """Open every ONNX file once (ORT, `threads` intra-op threads) and time them round-robin on `feeds`; a streaming
    workload is rolled instead, each graph carrying its own states from frame to frame (`runs` rounds of
    STREAM_ROUND_FRAMES frames each; one value per round, its mean frame time)."""
    from quant.backends.ort import OrtRunner

    runners = {label: OrtRunner(path, threads=threads) for label, path in models.items()}
    before = load_average()
    if isinstance(feeds, GraphWorkload) and feeds.streaming:
        seconds = rolled_seconds(runners, feeds, runs, warmup)
        return InterleavedResult(seconds, before, load_average(), STREAM_ROUND_FRAMES)
    fixed = (feeds.feeds or {}) if isinstance(feeds, GraphWorkload) else feeds
    return InterleavedResult(interleaved_seconds(runners, fixed, runs, warmup), before, load_average())


def format_interleaved(result: InterleavedResult, base: str, labels: Sequence[str] | None = None) -> str:
    lines = [f"{'build':<22}{'min ms':>9}{'median':>9}{'p10':>9}{'p90':>9}{'ratio min':>11}{'ratio med':>11}"
             f"{'paired (p10-p90)':>24}"]
    ratios = result.ratios(base)
    stats = result.stats
    for label in labels or list(stats):
        s = stats[label]
        r = ratios.get(label)
        tail = (f"{r.min_ratio:>11.3f}{r.median_ratio:>11.3f}{r.paired_median:>10.3f} ({r.paired_p10:.3f}-"
                f"{r.paired_p90:.3f}){'' if r.reliable else '  unreliable: spreads overlap'}"
                if r else f"{'(base)':>11}")
        lines.append(f"{label:<22}{s.min_ms:>9.2f}{s.p50_ms:>9.2f}{s.p10_ms:>9.2f}{s.p90_ms:>9.2f}{tail}")
    lines.append(f"load average (1 min) before {result.load_before:.2f}, after {result.load_after:.2f}; "
                 f"{len(next(iter(result.seconds.values())))} interleaved rounds"
                 + (f" of {result.frames_per_round} streaming frames (states carried; ms per frame)"
                    if result.frames_per_round > 1 else ""))
    return "\n".join(lines)
