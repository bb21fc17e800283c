"""The main job (`quant run`): export -> calibrate -> build fp32/fp16/int8 -> evaluate accuracy and speed -> report.

Every step is skipped when its inputs' hashes match what the last run recorded (engines/.pipeline/*.json), so a
second run reuses exports, calibration caches, builds and accuracy results; speed is measured fresh every run, every
timed row of a model in the same interleaved rounds (measure_speed), so no ratio mixes two runs' timings.
A failing step marks its rows failed (with the error) and the run goes on; run_all reports the failures and the
CLI exits non-zero.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from quant import __version__
from quant.backends import Runner, open_runner
from quant.errors import BackendUnavailable, QuantError
from quant.eval.speed import BenchOptions
from quant.fileio import atomic_write_json, ensure_writable_folder, sha256_bytes, sha256_file
from quant.paths import DEFAULT_OUT_ROOT, PACKAGE_DIR
from quant.report.rows import PLAIN_FP32, ResultRow
from quant.spec import HIGHER_IS_BETTER, GraphSpec, ModelSpec, load_spec, resolve_manifest, shipped_specs
from quant.tasks import FeedOptions, task_for
from quant.tasks.common import graph_file

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
STAMP_DIR = ".pipeline"
# backends whose rows predict another runtime's numerics on the CPU: accuracy only, never timed, and only at the
# precisions they simulate (trt-sim: TensorRT explicit mode from the fp16 / int8 ORT builds' ONNX)
SIMULATED = {"trt-sim": ("fp16", "int8")}
# the INT8 build with `quant search`'s rules (engines/search/<graph>/rules.toml), an ONNX Runtime row beside int8
SEARCHED = "int8-searched"
# error vs FP32 is measured on fixed real feeds: the first calibration-style feed of this many test utterances (one
# batch), and for streaming graphs the first STREAM_COMPARE_STEPS steps of the roll over the first utterance
COMPARE_UTTERANCES = {"se": 1, "asr": 4}
STREAM_COMPARE_STEPS = 300


@dataclass(frozen=True)
class RunOptions:
    models: tuple[str, ...] = field(default_factory=shipped_specs)  # shipped model names or spec paths
    backends: tuple[str, ...] | None = None  # None: ort and trt-sim, plus trt when TensorRT is usable here
    precisions: tuple[str, ...] = PRECISIONS
    eager: bool = True  # PyTorch eager rows alongside
    se_utterances: int | None = None  # None: the whole se_test set
    asr_utterances: int | None = None  # None: the whole asr_test set
    # first N utterances of each calibration set (part of the cache key). 32 keeps `quant run` under 30 min on 2
    # cores: the offline reader pads every utterance to a 9 s segment, so 100 utterances cost ~6 min there.
    calib_utterances: int | None = 32
    bench: BenchOptions = field(default_factory=BenchOptions)
    eval_threads: int = 2  # accuracy runs (speed uses bench.threads)
    out_dir: Path = DEFAULT_OUT_ROOT  # exports, the cache store, artifacts and stamps all live here (--output)
    force: bool = False  # ignore stamps: re-export, rebuild, re-evaluate
    accuracy: bool = True  # False: speed only (quant bench)
    report_dir: Path | None = None  # default: the engines folder
    progress: bool = True
    command: str = "quant run"
    executor: str = "local"  # where calibration and accuracy run (quant.executor: local | ray); timing stays here
    ray_address: str | None = None  # with executor ray: None starts a local Ray instance, "auto" joins the cluster
    search: bool = False  # the int8-searched row: a small `quant search` first for every graph without its rules
    search_evals: int = 20  # builds per graph of that small search
    rewrites: tuple[str, ...] | None = None  # graph rewrites of every graph (--rewrites); None: each graph's spec

    @classmethod
    def quick(cls, **overrides: Any) -> RunOptions:
        """CI smoke settings: a few utterances and short timing loops (numbers not for reporting)."""
        base = cls(se_utterances=3, asr_utterances=6, calib_utterances=8, bench=BenchOptions.quick(),
                   search_evals=6, command="quant run --quick")
        return replace(base, **overrides)


@dataclass
class RunResult:
    results: dict[str, Any]
    paths: dict[str, Path]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------------------------------------ stamps


def _stamp_path(root: Path, name: str) -> Path:
    return root / STAMP_DIR / f"{name}.json"


def is_fresh(root: Path, name: str, key: Mapping[str, Any], outputs: Iterable[Path]) -> bool:
    """True when the stamp `name` recorded exactly `key` and exactly these outputs with the content they had when it
    was written (sha256): an output replaced since (by a run killed before it could stamp) means not up to date."""
    import json

    path = _stamp_path(root, name)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(recorded, dict) and recorded.get("key") == _jsonable(key)
            and recorded.get("outputs") == _output_hashes(outputs))


def write_stamp(root: Path, name: str, key: Mapping[str, Any], outputs: Iterable[Path], payload: Any = None) -> None:
    """Record that `outputs` (hashed now) were made from `key`; call it only after every output is in place."""
    atomic_write_json(_stamp_path(root, name), {"key": _jsonable(key), "outputs": _output_hashes(outputs),
                                                "payload": payload})


def _output_hashes(outputs: Iterable[Path]) -> dict[str, str | None]:
    return {str(path): _file_sha(Path(path)) for path in outputs}


def read_stamp_payload(root: Path, name: str) -> Any:
    import json

    try:
        return json.loads(_stamp_path(root, name).read_text()).get("payload")
    except (OSError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _file_sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _sources_sha(*relative: str) -> str:
    """sha256 over quant's own source files that shape a step's output (code changes invalidate stamps)."""
    digest = "".join(sha256_file(PACKAGE_DIR / rel) for rel in relative if (PACKAGE_DIR / rel).is_file())
    return sha256_bytes(digest.encode())


# ------------------------------------------------------------------------------------------------ steps


class Steps:
    """The per-model steps, each a small function returning paths; `root` is the engines folder."""

    def __init__(self, root: Path, options: RunOptions) -> None:
        self.root = root
        self.options = options

    def export(self, spec: ModelSpec) -> dict[str, Path]:
        """The FP32 ONNX file of each graph by role: the spec's own files, or quant's exports of the reference
        graphs under engines/export/<exporter>/ (skipped when weights and code match)."""
        paths = {g.role: graph_file(spec, g) for g in spec.graphs if g.path is not None}
        for exporter in dict.fromkeys(g.exporter for g in spec.graphs if g.exporter):
            graphs = [g for g in spec.graphs if g.exporter == exporter]
            paths.update(self._export(str(exporter), graphs))
        return {g.role: paths[g.role] for g in spec.graphs}

    def rewrite(self, spec: ModelSpec, exported: Mapping[str, Path]) -> dict[str, Path]:
        """The graph every build, calibration and FP32 reference of the run starts from, by role: the export with
        the spec's rewrites (or options.rewrites) applied and checked (quant.tasks.rewriting); reused while its
        record matches."""
        from quant.tasks.rewriting import rewrite_graphs

        done = rewrite_graphs(spec, exported, self.root, self.options.rewrites)
        return {role: graph.path for role, graph in done.items()}

    def graphs(self, spec: ModelSpec) -> dict[str, Path]:
        """export, then rewrite: the FP32 graphs the builds use."""
        return self.rewrite(spec, self.export(spec))

    def _export(self, exporter: str, graphs: Sequence[GraphSpec]) -> dict[str, Path]:
        from quant.artifacts.export import default_weights, export_model

        folder = self.root / "export" / exporter
        paths = {g.role: folder / str(g.export_file) for g in graphs}
        key = {"weights": _file_sha(default_weights(exporter)), "quant": __version__,
               "code": _sources_sha("models/dpcrn.py", "models/conformer.py", "artifacts/export.py",
                                    "artifacts/wenet_export.py")}
        if not self.options.force and is_fresh(self.root, f"export-{exporter}", key, paths.values()):
            logger.info("export %s: up to date (%s)", exporter, folder)
            return paths
        logger.info("export %s -> %s", exporter, folder)
        export_model(exporter, folder)
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise QuantError(f"export of {exporter} did not write {missing}")
        write_stamp(self.root, f"export-{exporter}", key, paths.values())
        return paths

    def calibrate(self, spec: ModelSpec, graph: GraphSpec, exported: Mapping[str, Path]) -> Path:
        """Calibration cache of one graph with the spec's method on (an even subset of) its calibration manifest;
        quant.calib reuses a cache whose key matches."""
        from quant.calib.calibrate import CalibrateOptions
        from quant.tasks.calibration import calibrate_spec
        from quant.calib.ranges import RangeOptions
        from quant.executor import executor_or_none

        ranges = RangeOptions(progress=self.options.progress, threads=self.options.eval_threads)
        committed = resolve_manifest(spec.defaults.calibration_manifest, "calibration manifest")
        manifest = spread_subset(committed, self.options.calib_utterances, self.root / "calib_subsets")
        # a subset manifest lives under the run folder and points back into calib_data/
        feeds = FeedOptions(graphs=dict(exported), allow_outside=manifest != committed)
        entry = calibrate_spec(spec, graph.role, exported[graph.role], manifest,
                               options=CalibrateOptions(ranges=ranges, out_root=self.root), feed_options=feeds,
                               executor=executor_or_none(self.options.executor, self.options.ray_address))
        return Path(entry.path)

    def build(self, graph: str, precision: str, backend: str, source: Path, cache: Path | None,
              rules: Path | None = None, rules_off: tuple[str, ...] = (), label: str | None = None) -> Path:
        """The artifact file (ORT: model.onnx, TensorRT: model.engine) of one graph (by artifact name) at one
        precision; `rules`: precision rules other than the shipped ones (the searched row's: <precision>-searched/);
        `rules_off`: shipped rules left out (the spec graph's rules_off); `label`: the folder's name when one
        precision has builds from several rules (default as above)."""
        from quant.artifacts import build_artifact
        from quant.artifacts.artifact import META_FILE

        label = label or (f"{precision}-searched" if rules is not None else precision)
        folder = self.root / graph / (label if backend == "ort" else f"{label}-{backend}")
        artifact = folder / ("model.onnx" if backend == "ort" else "model.engine")
        key = {"source": _file_sha(source), "cache": _file_sha(cache) if cache else None, "quant": __version__,
               "rules": _file_sha(rules) if rules is not None else None,
               **({"rules_off": list(rules_off)} if rules_off else {}),
               "code": _sources_sha("artifacts/artifact.py", "artifacts/ort_build.py", "artifacts/qdq.py",
                                    "artifacts/calibration.py", "artifacts/trt_build.py", "onnxgraph/graph.py",
                                    "onnxgraph/patterns.py", "precision.py", "precision_default.toml",
                                    "backends/ort.py", "backends/trt.py", "backends/trt_inputs.py")}
        name = f"build-{graph}-{label}-{backend}"
        outputs = [artifact, folder / META_FILE]  # meta.json holds the sha256 of every other file of the folder
        if not self.options.force and is_fresh(self.root, name, key, outputs) and _intact(folder):
            logger.info("build %s %s %s: up to date", graph, label, backend)
            return artifact
        options: dict[str, Any] = {"out_dir": folder, "out_root": self.root}
        if precision == "int8" and cache is not None:
            options["cache"] = cache
        if rules is not None:
            options["rules"] = rules
        if rules_off:
            options["rules_off"] = rules_off
        build_artifact(source, precision, backend, name=graph, **options)
        if not artifact.is_file():
            raise QuantError(f"build of {graph} {precision} ({backend}) wrote no {artifact}")
        write_stamp(self.root, name, key, outputs)
        return artifact


def _intact(folder: Path) -> bool:
    """Whether an artifact folder still holds exactly the files its meta.json describes."""
    from quant.artifacts.artifact import verify_artifact

    try:
        verify_artifact(folder)
    except QuantError as error:
        logger.info("rebuilding: %s", error)
        return False
    return True


def spread_subset(manifest: Path, count: int | None, out_dir: Path) -> Path:
    """A manifest of `count` lines spread evenly over `manifest` (every source and noise of a set ordered by
    source gets its share, unlike the first N lines); the manifest itself when count is None or covers it all."""
    import json
    import os

    lines = [line for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    if count is None or count >= len(lines):
        return manifest
    target = out_dir / f"{manifest.parent.name}-{count}of{len(lines)}.jsonl"
    picked = []
    for index in range(count):
        row = json.loads(lines[index * len(lines) // count])
        for key in ("path", "noise"):
            if row.get(key):
                source = (manifest.parent / row[key]).resolve()
                row[key] = os.path.relpath(source, out_dir.resolve())
        picked.append(json.dumps(row, sort_keys=True))
    text = "\n".join(picked) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        from quant.fileio import atomic_write_text

        atomic_write_text(target, text)
    return target


# ------------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class RowSpec:
    spec: ModelSpec
    backend: str
    precision: str
    artifacts: Mapping[str, Path]  # GraphSpec.stem (dpcrn, dpcrn_stream, encoder, decoder...) -> file
    note: str | None = None  # the plain-export FP32 row's: speed only, and why (ResultRow.note)

    def open(self, stem: str, threads: int) -> Runner:
        return open_runner(self.artifacts[stem], self.backend, threads)

    def runners(self, threads: int) -> dict[str, Runner]:
        """A runner per graph role (what quant.tasks evaluates)."""
        return {g.role: self.open(g.stem, threads) for g in self.spec.graphs}

    def files(self) -> dict[str, Path]:
        """The artifact file per graph role (what a sharded evaluation ships to its workers)."""
        return {g.role: self.artifacts[g.stem] for g in self.spec.graphs}

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return f"{self.model} {self.backend} {self.precision}"

    @property
    def label_in_model(self) -> str:
        return f"{self.backend} {self.precision}"


def failed_row(model: str, backend: str, precision: str, error: BaseException | str) -> ResultRow:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ResultRow.failed(model, backend, precision, message)


# ------------------------------------------------------------------------------------------------ environment


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": _load_average(), "python": platform.python_version(), "quant": __version__,
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    try:
        from quant.backends.trt import require_tensorrt

        env["tensorrt"] = str(require_tensorrt().__version__)
    except (QuantError, ImportError, AttributeError):
        pass
    return env


def _load_average() -> float | None:
    """1-minute load average: other work on the machine inflates every latency, so the report states it."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def resolve_backends(requested: Sequence[str] | None) -> tuple[str, ...]:
    """ort and trt-sim always; trt when asked for (an error if unusable) or, by default, when TensorRT imports."""
    from quant.backends.trt import require_tensorrt

    if requested is not None:
        unknown = [b for b in requested if b not in ("ort", "trt-sim", "trt")]
        if unknown:
            raise BackendUnavailable(f"unknown backends {unknown}; expected some of ort, trt-sim, trt")
        if "trt" in requested:
            require_tensorrt()
        return tuple(requested)
    try:
        require_tensorrt()
    except BackendUnavailable as error:
        logger.info("TensorRT rows skipped: %s", error)
        return ("ort", "trt-sim")
    return ("ort", "trt-sim", "trt")


# ------------------------------------------------------------------------------------------------ test data


@dataclass
class TestData:
    """One model's test set (manifest and utterance limit); `memo` keeps what its task loads and scores once for
    every row (audio, the noisy input's scores)."""

    manifest: Path
    limit: int | None
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> dict[str, Any]:
        return {"manifest": _file_sha(self.manifest), "limit": self.limit}


def load_test_data(spec: ModelSpec, options: RunOptions) -> TestData:
    limit = options.asr_utterances if spec.model.task == "asr" else options.se_utterances
    return TestData(resolve_manifest(spec.defaults.test_manifest, "test manifest"), limit)


# ------------------------------------------------------------------------------------------------ accuracy


def eval_threads(spec: RowSpec, options: RunOptions) -> int:
    """Threads for accuracy runs: one for PyTorch eager and for per-frame streaming (a second intra-op thread only
    adds synchronisation to tiny ops and, on a busy machine, made eager streaming ten times slower); else
    options.eval_threads."""
    if spec.backend == "torch" or spec.spec.streaming is not None:
        return 1
    return options.eval_threads


def evaluate_task(spec: RowSpec, data: TestData, options: RunOptions) -> dict[str, Any]:
    """{"task": mean metrics, "per_utterance": columns} of one row on its test set (quant.tasks); the per-utterance
    columns let the report compare any two rows pairwise (quant.eval.stats). With options.executor ray the
    utterances run in shards on Ray (quant.tasks.sharded: the same numbers), except backends that need this
    machine's GPU."""
    from quant.executor import executor_or_none
    from quant.tasks.sharded import IN_PROCESS_BACKENDS, evaluate_sharded

    threads = eval_threads(spec, options)
    executor = executor_or_none(options.executor, options.ray_address)
    if executor is None or spec.backend in IN_PROCESS_BACKENDS:
        result = task_for(spec.spec).evaluate(spec.runners(threads), str(data.manifest), data.limit, memo=data.memo)
    else:
        result = evaluate_sharded(spec.spec, spec.files(), data.manifest, data.limit, executor, spec.backend, threads)
    return {"task": result.task_fields(), "per_utterance": result.per_utterance_columns()}


# ------------------------------------------------------------------------------------------------ error vs FP32


FeedList = list[dict[str, np.ndarray]]


def comparison_feeds(spec: ModelSpec, data: TestData, exported: Mapping[str, Path]) -> dict[str, FeedList]:
    """Fixed real feeds per graph (by stem) on which every row's outputs are compared with the FP32 reference: the
    task's calibration-style feeds on the first test utterances (streaming: the first steps of the FP32 roll)."""
    from itertools import islice

    task = task_for(spec)
    count = COMPARE_UTTERANCES[spec.model.task]
    feeds: dict[str, FeedList] = {}
    for graph in spec.graphs:
        # the first batch of the utterances evaluation scores (the test subset of data.limit, in its order)
        if spec.streaming is not None:
            options = FeedOptions(limit=data.limit, frame_stride=1, graphs=dict(exported), selection="test")
            steps = STREAM_COMPARE_STEPS
        else:
            options = FeedOptions(limit=data.limit, batch_size=count, graphs=dict(exported), selection="test")
            steps = 1
        source = task.calibration_feeds(graph.role, str(data.manifest), options)
        feeds[graph.stem] = list(islice(iter(source), steps))
    return feeds


def run_all_feeds(runner: Runner, feeds: FeedList) -> dict[str, np.ndarray]:
    """Outputs over a feed list, each output flattened and concatenated (float outputs only)."""
    collected: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for name, value in runner.run({k: feed[k] for k in runner.input_names}).items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                collected.setdefault(name, []).append(np.asarray(value, dtype=np.float32).reshape(-1))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def error_vs_reference(
    spec: RowSpec, feeds: Mapping[str, FeedList], reference_outputs: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    from quant.eval.metrics import compare_outputs

    out: dict[str, dict[str, dict[str, float]]] = {}
    for graph_stem, feed_list in feeds.items():
        outputs = run_all_feeds(spec.open(graph_stem, 1), feed_list)
        reference = reference_outputs[graph_stem]
        names = [n for n in reference if n in outputs]
        out[graph_stem] = {n: e.to_dict() for n, e in compare_outputs(reference, outputs, names).items()}
    return out


# ------------------------------------------------------------------------------------------------ speed


def workloads(spec: ModelSpec, data: TestData, exported: Mapping[str, Path]) -> list[Any]:
    """Speed workloads from real test audio (the median-length utterance), one per graph, keyed by its stem."""
    task = task_for(spec)
    options = FeedOptions(limit=data.limit, graphs=dict(exported), selection="test")
    return [replace(task.speed_workload(g.role, str(data.manifest), options), graph=g.stem) for g in spec.graphs]


@dataclass(frozen=True)
class ModelSpeed:
    """A model's timed rows, measured together: per row label ("ort int8") its speed dict (graph -> measure_graph's
    shape plus the interleaved record and ratios), and per row that could not be timed, why."""

    speed: Mapping[str, Mapping[str, Any]]
    errors: Mapping[str, str]


# results.json key -> the row label(s) it divides by; vs_fp32: the faster, in each timed group, of the FP32 build of
# the graphs the builds use and (where the spec rewrites them) of the plain export, so no rewrite that slows FP32
# flatters INT8 (quant.eval.speed.group_bases; each ratio and group names its base). FP32_ROW: the ORT FP32 row of
# the graphs the builds use (the accuracy reference; profile_rows accounts each INT8 build against it)
FP32_ROW = "ort fp32"
SPEED_BASELINES = {"vs_fp32": (FP32_ROW, f"ort {PLAIN_FP32}"), "vs_eager": ("torch fp32",)}


def measure_speed(specs: Sequence[RowSpec], loads: Sequence[Any], bench: BenchOptions) -> ModelSpeed:
    """Time every row of one model interleaved (quant.eval.speed.measure_interleaved): per graph and thread count the
    rows that run there (thread_counts) rotate round-robin in this process, so each row's latency and its ratio vs
    the FP32 and eager rows come from the same time window; measured afresh every run, never read from a stamp."""
    from quant.eval.speed import measure_interleaved

    counts = tuple(dict.fromkeys(c for spec in specs for c in thread_counts(spec.backend, bench)))
    errors: dict[str, str] = {}
    speed: dict[str, dict[str, Any]] = {spec.label_in_model: {} for spec in specs}
    for load in loads:
        runners_at = _opener(specs, load.graph, bench, errors)
        for label, measured in measure_interleaved(load, runners_at, bench, counts, SPEED_BASELINES).items():
            speed[label][load.graph] = measured
    return ModelSpeed({label: s for label, s in speed.items() if label not in errors}, errors)


def profile_rows(specs: Sequence[RowSpec], loads: Sequence[Any], runs: int) -> dict[str, dict[str, Any]]:
    """Time accounting of each INT8 ORT row against the ORT FP32 row, per graph (quant.eval.profile.profile_pair on
    one run of the graph's speed workload): {row label: {graph: ProfileComparison.to_dict()}}, from which the report
    states the ceiling and what holds the rest. A graph that cannot be profiled is logged and left out: its timing
    stands without it."""
    from quant.eval.profile import profile_pair

    base = next((s for s in specs if s.label_in_model == FP32_ROW), None)
    if base is None or runs < 1:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.backend != "ort" or not spec.precision.startswith("int8"):
            continue
        for load in loads:
            try:
                comparison = profile_pair(base.artifacts[load.graph], spec.artifacts[load.graph], load.first_run(), runs)
            except Exception as error:  # noqa: BLE001 - the profile is an explanation; the row stands without it
                logger.warning("%s %s: not profiled: %s", spec.label, load.graph, error)
                continue
            out.setdefault(spec.label_in_model, {})[load.graph] = comparison.to_dict()
    return out


def with_profiles(speed: ModelSpeed, profiles: Mapping[str, Mapping[str, Any]]) -> ModelSpeed:
    """speed with each profiled graph's entry given its "profile" (profile_rows) and the FP32 it is read against
    (profile_baseline)."""
    def profiled(label: str, graph: str, entry: Mapping[str, Any]) -> Mapping[str, Any]:
        if graph not in profiles.get(label, {}):
            return entry
        profile = profiles[label][graph]
        baseline = profile_baseline(profile, entry, speed.speed.get(FP32_ROW, {}).get(graph, {}))
        return {**entry, "profile": {**profile, **({"baseline": baseline} if baseline else {})}}

    merged = {label: {graph: profiled(label, graph, entry) for graph, entry in graphs.items()}
              for label, graphs in speed.speed.items()}
    return ModelSpeed(merged, speed.errors)


def profile_baseline(profile: Mapping[str, Any], int8_entry: Mapping[str, Any], fp32_entry: Mapping[str, Any]
                     ) -> dict[str, Any] | None:
    """The FP32 the time accounting of one INT8 graph is read against: the base of its measured 1-thread ratio
    ("label": the faster FP32 of the group), the profiled FP32 build's paired ratio to it ("scale", 1 when they are
    the same build) and the profile's ceiling in that base ("ceiling_ratio" = the profiled one x scale: what the plan
    could reach over the fastest FP32). None when the ratios are missing (the row was not timed at 1 thread)."""
    base = _one_thread_ratio(int8_entry).get("base")
    if base is None:
        return None
    scale = 1.0
    if base != FP32_ROW:
        to_base = _one_thread_ratio(fp32_entry)
        if to_base.get("base") != base:
            return None
        paired = float(to_base.get("paired_median", float("nan")))
        scale = paired if paired == paired else float(to_base["median_ratio"])  # nan: no per-round pairs
    return {"label": base, "profiled": FP32_ROW, "scale": scale,
            "ceiling_ratio": float(profile["ceiling_ratio"]) * scale}


def _one_thread_ratio(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    ratio = entry.get("threads", {}).get("1", {}).get("vs_fp32")
    return ratio if isinstance(ratio, Mapping) else {}


def thread_counts(backend: str, bench: BenchOptions) -> tuple[int, ...]:
    """ORT at every configured count; PyTorch eager at the first (the baseline the ratios use); TensorRT once."""
    if backend == "ort":
        return bench.threads
    if backend == "torch":
        return bench.threads[:1]
    return (1,)


def _opener(specs: Sequence[RowSpec], graph: str, bench: BenchOptions, errors: dict[str, str]
            ) -> Callable[[int], dict[str, Runner]]:
    """The runners of `graph` at a thread count, one per row timed there; a row whose runner fails to open is left
    out (its error kept in `errors`) so the others are still timed."""
    def runners_at(count: int) -> dict[str, Runner]:
        runners = {}
        for spec in specs:
            label = spec.label_in_model
            if graph not in spec.artifacts:  # the plain-export row has only the graphs the spec rewrites
                continue
            if count in thread_counts(spec.backend, bench) and label not in errors:
                try:
                    runners[label] = spec.open(graph, count)
                except Exception as error:  # noqa: BLE001 - one row that cannot open must not stop the others
                    errors[label] = f"{type(error).__name__}: {error}"
        if runners:
            logger.info("%s: timing %s at %d thread(s), interleaved: %s", specs[0].model, graph, count,
                        ", ".join(runners))
        return runners

    return runners_at


def primary_numbers(spec: ModelSpec, speed: Mapping[str, Any]) -> tuple[dict[str, float] | None, float | None]:
    """(latency stats of the first graph at 1 thread, RTF of the whole task per audio second: every graph's; each
    None where a graph it needs was not timed, e.g. the plain-export row of a graph the spec does not rewrite)."""
    graphs = [g.stem for g in spec.graphs]
    entries = [speed.get(g, {}).get("threads", {}).get("1") for g in graphs]
    first = entries[0]
    latency = first["latency_ms"] if first is not None else None
    if any(entry is None for entry in entries):
        return latency, None
    return latency, float(sum(entry["rtf"] for entry in entries if entry is not None))


# ------------------------------------------------------------------------------------------------ orchestration


def _eval_code_sha() -> str:
    return _sources_sha("eval/se.py", "eval/asr.py", "eval/metrics.py", "features.py", "decoding.py",
                        "backends/torch.py", "tasks/common.py", "tasks/se.py", "tasks/asr.py", "frontends/__init__.py",
                        "frontends/spectral.py", "frontends/fbank.py", "frontends/framing.py",
                        "frontends/frames.py", "frontends/output.py")


class ModelRun:
    """Everything `quant run` does for one model: export, calibrate, build, then evaluate each row."""

    def __init__(self, spec: ModelSpec, backends: Sequence[str], steps: Steps, options: RunOptions) -> None:
        self.spec, self.backends, self.steps, self.options = spec, tuple(backends), steps, options
        self.model = spec.name
        self.rows: list[ResultRow] = []
        self.failures: list[str] = []

    def _fail(self, backend: str, precision: str, error: BaseException) -> None:
        row = failed_row(self.model, backend, precision, error)
        self.rows.append(row)
        self.failures.append(f"{self.model} {backend} {precision}: {row.error}")
        logger.error("%s %s %s failed: %s", self.model, backend, precision, row.error)
        logger.debug("traceback", exc_info=error)

    @property
    def eager(self) -> bool:
        """PyTorch eager rows: asked for, and every graph is one quant exports (its module is known)."""
        return self.options.eager and all(g.exporter for g in self.spec.graphs)

    def _combos(self) -> list[tuple[str, str]]:
        combos = [("torch", "fp32")] if self.eager else []
        combos += [(b, p) for b in self.backends for p in self.options.precisions if p in SIMULATED.get(b, PRECISIONS)]
        return combos + [(backend, SEARCHED) for backend in ("ort", "trt-sim") if self._searched(backend)]

    def _searched(self, backend: str) -> bool:
        """The int8-searched row of `backend`: its int8 rows asked for, and rules a `quant search` for it left
        (ort: engines/search/<graph>/, trt-sim: engines/search/<graph>-trt-sim/) or, ort only, --search."""
        from quant.search.store import searched_rules

        asked = backend in self.backends and "int8" in self.options.precisions
        found = bool(searched_rules(self.steps.root, self.spec, backend))
        return asked and (found or (backend == "ort" and self.options.search))

    def run(self) -> list[ResultRow]:
        try:
            exported = self.steps.export(self.spec)
            graphs = self.steps.rewrite(self.spec, exported)  # what every ONNX row builds from
        except Exception as error:  # noqa: BLE001 - one failing model must not stop the others
            for backend, precision in self._combos():
                self._fail(backend, precision, error)
            return self.rows
        specs = self._with_plain_fp32(self._build_all(graphs, exported), exported, graphs)
        self._evaluate_all(specs, graphs)
        return self.rows

    def _with_plain_fp32(self, specs: list[RowSpec], exported: Mapping[str, Path], rewritten: Mapping[str, Path]
                         ) -> list[RowSpec]:
        """specs with, right after the ORT FP32 row, the FP32 build of each graph the spec's rewrites changed, as
        exported (the fp32-plain row): timed with the others so every "vs FP32" ratio divides by the faster FP32.
        Speed only: the rewrites are exact (checked against the export on real inputs), so its accuracy is the FP32
        row's. specs as they are when nothing was rewritten or there is no ORT FP32 row."""
        changed = [g for g in self.spec.graphs if rewritten[g.role] != exported[g.role]]
        index = next((i for i, s in enumerate(specs) if s.label_in_model == FP32_ROW), None)
        if not changed or index is None:
            return specs
        try:
            artifacts = {g.stem: self.steps.build(str(g.name), "fp32", "ort", exported[g.role], None,
                                                  rules_off=g.rules_off, label=PLAIN_FP32) for g in changed}
        except Exception as error:  # noqa: BLE001 - the other rows stand; their ratios use the rewritten FP32
            self._fail("ort", PLAIN_FP32, error)
            return specs
        note = plain_note({g.stem: rewritten[g.role] for g in changed})
        plain = RowSpec(self.spec, "ort", PLAIN_FP32, artifacts, note)
        return [*specs[:index + 1], plain, *specs[index + 1:]]

    def _build_all(self, exported: Mapping[str, Path], originals: Mapping[str, Path]) -> list[RowSpec]:
        """Rows built from `exported` (the rewritten graphs); PyTorch eager runs the modules behind `originals`."""
        specs = []
        if self.eager:
            specs.append(RowSpec(self.spec, "torch", "fp32", {g.stem: originals[g.role] for g in self.spec.graphs}))
        caches: dict[str, Path] = {}
        for backend, precision in self._combos():
            if backend == "torch":
                continue
            try:
                if backend == "trt-sim" and precision == SEARCHED:
                    specs.append(trt_sim_spec(self._searched_row(exported, caches, "trt-sim"), exported))
                elif backend == "trt-sim":
                    specs.append(trt_sim_spec(self._ort_spec(specs, precision, exported, caches), exported))
                elif precision == SEARCHED:
                    specs.append(self._searched_row(exported, caches))
                else:
                    specs.append(self._build_row(backend, precision, exported, caches))
            except Exception as error:  # noqa: BLE001
                self._fail(backend, precision, error)
        return specs

    def _ort_spec(self, specs: Sequence[RowSpec], precision: str, exported: Mapping[str, Path],
                  caches: dict[str, Path]) -> RowSpec:
        """The ORT build a trt-sim row reads (it writes what TensorRT builds from): this run's, else built now."""
        built = next((s for s in specs if (s.backend, s.precision) == ("ort", precision)), None)
        if built is not None:
            return built
        if any((row.backend, row.precision) == ("ort", precision) for row in self.rows):  # failed already
            raise QuantError(f"the ONNX Runtime {precision} build it reads failed (see the ort {precision} row)")
        return self._build_row("ort", precision, exported, caches)

    def _build_row(self, backend: str, precision: str, exported: Mapping[str, Path],
                   caches: dict[str, Path]) -> RowSpec:
        artifacts = {}
        for graph in self.spec.graphs:
            cache = None
            if precision == "int8":
                if graph.role not in caches:
                    caches[graph.role] = self.steps.calibrate(self.spec, graph, exported)
                cache = caches[graph.role]
            artifacts[graph.stem] = self.steps.build(str(graph.name), precision, backend, exported[graph.role], cache,
                                                     rules_off=graph.rules_off)
        return RowSpec(self.spec, backend, precision, artifacts)

    def _searched_row(self, exported: Mapping[str, Path], caches: dict[str, Path], target: str = "ort") -> RowSpec:
        """The ONNX Runtime INT8 build with each graph's rules from a `quant search` for `target`, or (ort, --search)
        a small search run now; a graph without any keeps the shipped rules (it is then the int8 row's build). A
        trt-sim search's rules place TensorRT's Q/DQ: the row reads the build's model_trt_qdq.onnx (trt_sim_spec),
        built into its own folder (int8-searched-trt-sim) beside the ORT search's."""
        from quant.search.store import run_small_search, searched_rules

        rules = searched_rules(self.steps.root, self.spec, target)
        label = SEARCHED if target == "ort" else f"{SEARCHED}-{target}"
        artifacts = {}
        for graph in self.spec.graphs:
            if graph.role not in caches:
                caches[graph.role] = self.steps.calibrate(self.spec, graph, exported)
            if str(graph.name) not in rules and self.options.search and target == "ort":
                found = run_small_search(self.spec, graph.role, exported, self.steps.root, caches[graph.role],
                                         search_utterances(self.spec, self.options), self.options.search_evals)
                if found is not None:
                    rules[str(graph.name)] = found
            graph_rules = rules.get(str(graph.name))
            artifacts[graph.stem] = self.steps.build(str(graph.name), "int8", "ort", exported[graph.role],
                                                     caches[graph.role], graph_rules,
                                                     rules_off=graph.rules_off,
                                                     label=label if graph_rules is not None else None)
        return RowSpec(self.spec, "ort", SEARCHED, artifacts)

    def _evaluate_all(self, specs: Sequence[RowSpec], exported: Mapping[str, Path]) -> None:
        reference = next((s for s in specs if (s.backend, s.precision) == ("ort", "fp32")), None)
        reference = reference or next((s for s in specs if s.backend == "torch"), None)
        if reference is None:  # nothing to compare with or to derive feeds from: say so rather than drop the rows
            for spec in specs:
                self._fail(spec.backend, spec.precision, QuantError(
                    "no FP32 reference row (ort fp32 or PyTorch eager); add ort and fp32 or leave out --no-eager"))
            return
        try:
            data = load_test_data(self.spec, self.options)
            feeds = comparison_feeds(self.spec, data, exported) if self.options.accuracy else {}
            ref_outputs = {g: run_all_feeds(reference.open(g, 1), f) for g, f in feeds.items()}
            loads = workloads(self.spec, data, exported)
            timed = [spec for spec in specs if spec.backend not in SIMULATED]  # simulations' speed means nothing
            speed = measure_speed(timed, loads, self.options.bench)
            speed = with_profiles(speed, profile_rows(timed, loads, self.options.bench.profile_runs))
        except Exception as error:  # noqa: BLE001
            for spec in specs:
                self._fail(spec.backend, spec.precision, error)
            return
        context = EvalContext(data, feeds, ref_outputs, loads, _artifact_key(reference), speed)
        for spec in sorted(specs, key=lambda s: s is not reference):
            try:
                self.rows.append(evaluate_row(spec, context, self.steps.root, self.options))
            except Exception as error:  # noqa: BLE001
                self._fail(spec.backend, spec.precision, error)


def plain_note(rewritten: Mapping[str, Path]) -> str:
    """What the fp32-plain row is, naming each graph's rewrites and their check (quant.rewrite's record)."""
    from quant.rewrite import rewrite_meta

    parts = []
    for stem, path in rewritten.items():
        record = rewrite_meta(path) or {}
        check = record.get("check") or {}
        error = (f", outputs within {float(check['relative_error']):.1g} of the output range on "
                 f"{check.get('feeds', '?')} real feed(s)" if "relative_error" in check else "")
        parts.append(f"{stem}: {', '.join(record.get('rewrites') or ['rewrites'])}{error}")
    return ("FP32 build of the graph as exported, without the spec's exact rewrites (" + "; ".join(parts)
            + "); timed beside the other rows so that every ratio vs FP32 divides by the faster FP32 build; speed "
            "only: its accuracy is the ort fp32 row's, the rewrites being checked against this export")


def trt_sim_spec(ort_spec: RowSpec, exported: Mapping[str, Path]) -> RowSpec:
    """The trt-sim row of an ORT fp16/int8 row: per graph, the ONNX TensorRT's explicit mode builds from (int8: the
    symmetric Q/DQ model_trt_qdq.onnx beside ORT's model.onnx; fp16: the FP16 model.onnx itself)."""
    from quant.artifacts.trt_build import engine_onnx

    sources = {graph.stem: exported[graph.role] for graph in ort_spec.spec.graphs}
    built = "int8" if ort_spec.precision == SEARCHED else ort_spec.precision  # searched: INT8 with other rules
    artifacts = {graph_stem: engine_onnx(path.parent, sources[graph_stem], built, "explicit")
                 for graph_stem, path in ort_spec.artifacts.items()}
    return RowSpec(ort_spec.spec, "trt-sim", ort_spec.precision, artifacts)


@dataclass(frozen=True)
class EvalContext:
    data: TestData
    feeds: Mapping[str, FeedList]
    reference_outputs: Mapping[str, Mapping[str, np.ndarray]]
    loads: Sequence[Any]
    reference_key: Mapping[str, Any]
    speed: ModelSpeed = ModelSpeed({}, {})  # every timed row of the model, measured together (measure_speed)


def _artifact_key(spec: RowSpec) -> dict[str, Any]:
    key: dict[str, Any] = {g: _file_sha(p) for g, p in sorted(spec.artifacts.items())}
    if spec.backend == "torch":
        from quant.artifacts.export import default_weights

        exporters = dict.fromkeys(str(g.exporter) for g in spec.spec.graphs)
        key["weights"] = _file_sha(default_weights(next(iter(exporters))))
    return key


def _has_per_utterance(cached: Any) -> bool:
    """A stored accuracy payload is reusable only with per-utterance results (older payloads lack them)."""
    return isinstance(cached, Mapping) and bool(cached.get("per_utterance"))


def evaluate_row(spec: RowSpec, context: EvalContext, root: Path, options: RunOptions) -> ResultRow:
    """Accuracy (cached by artifact + data hashes) and speed (the model's interleaved timing of this run) of one
    row."""
    if spec.label_in_model in context.speed.errors:
        raise QuantError(f"timing: {context.speed.errors[spec.label_in_model]}")
    key = {"artifacts": _artifact_key(spec), "data": context.data.key, "reference": context.reference_key,
           "code": _eval_code_sha()}
    name = f"eval-{spec.model}-{spec.backend}-{spec.precision}"
    cached = read_stamp_payload(root, name)
    if not options.accuracy or spec.precision == PLAIN_FP32:  # the plain export: speed only (plain_note)
        accuracy: dict[str, Any] = {"task": {}, "error_vs_fp32": {}}
    elif not options.force and _has_per_utterance(cached) and is_fresh(root, name, key, spec.artifacts.values()):
        logger.info("%s: accuracy up to date (cached)", spec.label)
        accuracy = cached
    else:
        logger.info("%s: evaluating accuracy", spec.label)
        start = time.perf_counter()
        accuracy = {**evaluate_task(spec, context.data, options),
                    "error_vs_fp32": error_vs_reference(spec, context.feeds, context.reference_outputs)}
        accuracy["eval_seconds"] = time.perf_counter() - start
        write_stamp(root, name, key, spec.artifacts.values(), accuracy)
    speed = dict(context.speed.speed.get(spec.label_in_model, {}))  # simulated rows: none
    latency, rtf = primary_numbers(spec.spec, speed)
    return ResultRow(
        spec.model, spec.backend, spec.precision, "ok", kind=spec.spec.model.task,
        artifacts={g: str(p) for g, p in spec.artifacts.items()}, task=accuracy["task"],
        per_utterance=accuracy.get("per_utterance", {}), error_vs_fp32=accuracy["error_vs_fp32"], speed=speed,
        latency_ms=latency, rtf=rtf, budget=row_budget(spec.spec, spec.precision), primary=row_primary(spec.spec),
        spec=str(spec.spec.source) if spec.spec.source else None, note=spec.note,
    )


def row_primary(spec: ModelSpec) -> dict[str, Any]:
    """What the report times and judges a model by: its first graph (as primary_numbers) and first task metric."""
    metric = spec.task.metrics[0]
    return {"graph": spec.graphs[0].stem, "metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric]}


def search_utterances(spec: ModelSpec, options: RunOptions) -> int | None:
    """Test utterances per half (validation, held-out) of `quant run --search`'s search: the run's own limit
    split in two (None: the whole halves)."""
    limit = options.asr_utterances if spec.model.task == "asr" else options.se_utterances
    return max(1, limit // 2) if limit else None


def row_budget(spec: ModelSpec, precision: str) -> dict[str, Any] | None:
    """The spec's accuracy budget for `precision` as the row carries it (the report judges rows, not specs; the
    searched row is judged by the INT8 budget it was searched to)."""
    budget = spec.defaults.budgets.get("int8" if precision == SEARCHED else precision)
    return budget.to_row() if budget is not None else None


def run_all(options: RunOptions = RunOptions()) -> RunResult:
    """The main job; returns the results, the written report files and the failures (empty when all passed)."""
    specs = [load_spec(model) for model in options.models]  # a wrong name or spec fails before any work
    return _run_models(options, specs, options.out_dir)  # exports, the cache store and builds all live under it


def _run_models(options: RunOptions, specs: Sequence[ModelSpec], root: Path) -> RunResult:
    from quant.report import write_results
    from quant.report.search import search_sections

    for folder in dict.fromkeys((root, options.report_dir or root)):  # an unwritable output stops before any work
        ensure_writable_folder(folder)
    backends = resolve_backends(options.backends)
    if not options.accuracy:  # a speed-only run has nothing to show for simulated rows
        backends = tuple(b for b in backends if b not in SIMULATED)
    steps = Steps(root, options)
    started = time.perf_counter()
    rows: list[ResultRow] = []
    failures: list[str] = []
    for spec in specs:
        logger.info("== %s ==", spec.name)
        model_run = ModelRun(spec, backends, steps, options)
        rows += model_run.run()
        failures += model_run.failures
    results = {
        "schema": 1, "command": options.command, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(), "backends": list(backends), "wall_seconds": time.perf_counter() - started,
        "options": _jsonable({"models": options.models, "precisions": options.precisions,
                              "se_utterances": options.se_utterances, "asr_utterances": options.asr_utterances,
                              "calib_utterances": options.calib_utterances,
                              "bench": asdict(options.bench), "eval_threads": options.eval_threads}),
        "rows": [row.to_json() for row in rows],
        "search": search_sections(root / "search", {s.name: [g.name or s.name for g in s.graphs] for s in specs}),
    }
    paths = write_results(results, options.report_dir or root)
    return RunResult(results, paths, failures)
