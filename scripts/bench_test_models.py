"""INT8 vs FP32 speed of the test models (tests/models: the third-party-style specs of docs/specs/), each graph
built the way `quant run` builds it, timed interleaved and set against the ceiling its profile computes.

    python scripts/bench_test_models.py                       # every test model, test size (7-13 k parameters)
    python scripts/bench_test_models.py gru-logpower --size published --json out.json

Per model: train and export it with the tests' own builder (tests/models `build`, opset 13), calibrate each graph on
its spec's feeds (`--limit` utterances, cache store under --output), build FP32 and INT8 with the default precision
rules, time both round-robin in one process on the spec's speed workload (quant.eval.speed.measure_interleaved,
1 thread; streaming graphs per frame, 10 frames per variant per round), and profile the pair with ONNX Runtime's
profiler (quant.eval.profile.profile_pair). The table gives INT8/FP32 of the median latency with the paired per-round
ratio's p10-p90, the profile's ceiling (integer ops at their INT8 kernel time, everything else at FP32 time,
conversions free), the share of FP32 time in ops that became integer kernels, the 1-minute load average around the
timing, and per graph what holds the INT8 run (quant.eval.profile.holdback).

    python scripts/bench_test_models.py stft-gru-stream --size published --variant plain= \
        --int8-rules static=RULES.toml

also builds each graph with other rewrites (`--variant LABEL=REWRITE[,REWRITE]`, FP32 and INT8, as `--rewrites`;
`LABEL=` as `--no-rewrites`)
and INT8 under other precision rules (`--int8-rules LABEL=RULES.toml`, for the spec's graph and every variant), all
timed in the same rounds. Each INT8 build's row is its ratio against the fastest FP32 build (the honest ratio when a
rewrite also speeds FP32 up), its ceiling that of its own graph's FP32/INT8 profile.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test models' builder (tests/models)

from quant.errors import QuantError  # noqa: E402

SPEC_GRAPH = "spec"  # the graph as the spec names it (its own rewrites), the variant every run has


@dataclass(frozen=True)
class GraphResult:
    """One INT8 build of one graph, against the fastest FP32 build timed in the same rounds."""

    model: str
    graph: str
    parameters: int
    unit: str
    int8: str  # its runner label: "<variant> int8[ <rules label>]"
    timing: dict[str, Any]  # measure_interleaved's entry per runner label at 1 thread
    profile: Any  # ProfileComparison of its variant's FP32 and INT8 builds (default rules)

    @property
    def fp32(self) -> str:
        """The fastest FP32 build's label (median latency)."""
        labels = [label for label in self.timing if label.endswith(" fp32")]
        return min(labels, key=lambda label: self.timing[label]["latency_ms"]["p50_ms"])

    def row(self) -> dict[str, Any]:
        fp32, int8 = self.timing[self.fp32], self.timing[self.int8]
        ratio = int8[_baseline_key(self.fp32)]
        info = int8["interleaved"]
        return {
            "model": self.model, "graph": self.graph, "parameters": self.parameters, "unit": self.unit,
            "int8": self.int8, "fp32": self.fp32,
            "fp32_median_ms": fp32["latency_ms"]["p50_ms"], "int8_median_ms": int8["latency_ms"]["p50_ms"],
            "median_ratio": ratio["median_ratio"], "paired_median": ratio["paired_median"],
            "paired_p10": ratio["paired_p10"], "paired_p90": ratio["paired_p90"], "reliable": ratio["reliable"],
            "ceiling_ratio": self.profile.ceiling_ratio, "ceiling_free_ratio": self.profile.ceiling_free_ratio,
            "integer_share": self.profile.integer_share, "rounds": info["rounds"],
            "calls_per_round": info["calls_per_round"], "load_before": info["load_before"],
            "load_after": info["load_after"],
        }


def main(argv: list[str] | None = None) -> int:
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", default=list(models.KINDS), help=f"test models (default: {models.KINDS})")
    parser.add_argument("--size", choices=sorted(models.SIZES), default="test",
                        help="test: what the tests build; published: the SE models at published widths")
    parser.add_argument("--limit", type=int, default=4, help="calibration utterances (as `quant calibrate --limit`)")
    parser.add_argument("--runs", type=int, default=200, help="interleaved rounds of a stateless graph")
    parser.add_argument("--stream-runs", type=int, default=1000, help="frames per variant of a streaming graph")
    parser.add_argument("--profile-runs", type=int, default=20, help="profiled runs per build")
    parser.add_argument("--rules", type=Path, help="precision rules for the INT8 build (e.g. `quant search`'s)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="LABEL=REWRITE[,REWRITE]",
                        help="also FP32 and INT8 of the graph with these rewrites (as --rewrites; LABEL= as "
                        "--no-rewrites), same rounds")
    parser.add_argument("--int8-rules", type=_rules, action="append", default=[], metavar="LABEL=RULES.toml",
                        help="also INT8 under these precision rules, for every variant, same rounds")
    parser.add_argument("-o", "--output", type=Path, help="models, caches and builds (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the rows and profiles here")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.kinds if kind not in models.KINDS]
    unsized = [kind for kind in args.kinds if args.size != "test" and kind not in models.SIZES[args.size]]
    if unknown or unsized:
        parser.error(f"unknown test models {unknown}" if unknown else f"{unsized} have no {args.size!r} size")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.output is not None:
            return bench(args, args.output)
        with tempfile.TemporaryDirectory(prefix="bench_test_models") as work:
            return bench(args, Path(work))
    except QuantError as error:
        print(f"bench_test_models: error: {error}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace, root: Path) -> int:
    results = [result for kind in args.kinds for result in bench_model(kind, args, root)]
    print(format_table(results, args.size, args.rules))
    if args.json:
        from quant.fileio import atomic_write_json

        atomic_write_json(args.json, {"size": args.size, "rows": [r.row() for r in results],
                                      "profiles": {f"{r.model}/{r.graph}/{r.int8}": r.profile.to_dict()
                                                   for r in results}})
        print(f"wrote {args.json}")
    return 0


def bench_model(kind: str, args: argparse.Namespace, root: Path) -> list[GraphResult]:
    import models

    from quant.artifacts import build_artifact
    from quant.artifacts.artifact import MODEL_FILE
    from quant.backends.ort import OrtRunner
    from quant.calib.calibrate import CalibrateOptions
    from quant.calib.ranges import RangeOptions
    from quant.eval.profile import profile_pair
    from quant.eval.speed import BenchOptions, measure_interleaved
    from quant.pipeline import RunOptions, Steps
    from quant.spec import load_spec
    from quant.tasks import FeedOptions, task_for
    from quant.tasks.calibration import calibrate_spec

    built = models.build(kind, root / "models" / args.size / kind, opsets=(13,), size=args.size)
    spec = load_spec(built.specs[13])
    # the spec's rewrites applied, as `quant run` does; each variant's rewrites instead, as `--rewrites` does
    variants = {SPEC_GRAPH: Steps(root, RunOptions()).graphs(spec)}
    for label, rewrites in args.variant:
        variants[label] = Steps(root, RunOptions(rewrites=rewrites)).graphs(spec)
    rules = {"": args.rules, **dict(args.int8_rules)}
    feed_options = FeedOptions(graphs=dict(variants[SPEC_GRAPH]))
    options = BenchOptions(runs=args.runs, stream_runs=args.stream_runs, threads=(1,), batches=())
    out: list[GraphResult] = []
    for graph in spec.graphs:
        role = graph.role
        builds: dict[str, Path] = {}
        for variant, graphs in variants.items():
            calibrate = CalibrateOptions(RangeOptions(progress=False), out_root=root)
            cache = calibrate_spec(spec, role, graphs[role], options=calibrate,
                                   feed_options=FeedOptions(graphs=dict(graphs), limit=args.limit)).path
            folder = root / "builds" / args.size / kind / str(graph.name) / variant
            builds[f"{variant} fp32"] = build_artifact(graphs[role], "fp32", name=graph.name,
                                                       out_dir=folder / "fp32") / MODEL_FILE
            for label, path in rules.items():
                builds[f"{variant} int8 {label}".strip()] = build_artifact(
                    graphs[role], "int8", name=graph.name, out_dir=folder / f"int8{label}", cache=cache,
                    **({"rules": path} if path else {})) / MODEL_FILE
        workload = task_for(spec).speed_workload(role, options=feed_options)
        runners = {label: OrtRunner(path, threads=1) for label, path in builds.items()}
        baselines = {_baseline_key(label): label for label in builds if label.endswith(" fp32")}
        timed = measure_interleaved(workload, lambda _count: runners, options, (1,), baselines)
        timing = {label: entry["threads"]["1"] for label, entry in timed.items()}
        for variant in variants:
            profile = profile_pair(builds[f"{variant} fp32"], builds[f"{variant} int8"], workload.first_run(),
                                   args.profile_runs)
            out += [GraphResult(kind, str(graph.name), built.parameters, workload.unit, label, timing, profile)
                    for label in builds if label.startswith(f"{variant} int8")]
    return out


def _variant(text: str) -> tuple[str, tuple[str, ...]]:
    label, equals, names = text.partition("=")
    if not label or not equals or " " in label or label == SPEC_GRAPH:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=REWRITE[,REWRITE] (LABEL= for none; a "
                                         f"label without spaces, not {SPEC_GRAPH!r})")
    return label, tuple(n.strip() for n in names.split(",") if n.strip())


def _rules(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    if not label or " " in label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--int8-rules {text!r}: expected LABEL=RULES.toml of an existing file")
    return label, Path(path)


def _baseline_key(fp32_label: str) -> str:
    return f"vs {fp32_label}"


def format_table(results: list[GraphResult], size: str, rules: Path | None = None) -> str:
    from quant.eval.profile import format_holdback, holdback

    built = f"precision rules {rules}" if rules else "default precision rules"
    lines = [f"size {size}; ONNX Runtime CPU, 1 thread; INT8 = {built}; ratio = INT8/FP32 median latency, "
             "paired = per-round ratio median (p10-p90)",
             f"{'model/graph: INT8 build':<44}{'params':>8}{'FP32 ms':>9}{'INT8 ms':>9}{'ratio':>7}"
             f"{'paired (p10-p90)':>20}{'ceiling':>9}{'int share':>10}{'load':>12}"]
    for result in results:
        r = result.row()
        name = f"{r['model']}/{r['graph']}: {r['int8']}"
        paired = f"{r['paired_median']:.2f} ({r['paired_p10']:.2f}-{r['paired_p90']:.2f})"
        flag = "" if r["reliable"] else " ?"
        lines.append(f"{name:<44}{r['parameters']:>8}{r['fp32_median_ms']:>9.3f}{r['int8_median_ms']:>9.3f}"
                     f"{r['median_ratio']:>7.2f}{paired:>20}{r['ceiling_ratio']:>9.2f}"
                     f"{100 * r['integer_share']:>9.0f}%{r['load_before']:>6.2f}-{r['load_after']:<5.2f}{flag}")
    fp32 = {f"{r.model}/{r.graph} {label}": r.timing[label]["latency_ms"]["p50_ms"]
            for r in results for label in r.timing if label.endswith(" fp32")}
    lines.append("FP32 builds, median ms (each INT8 row is against the fastest of its graph's): "
                 + ", ".join(f"{label} {ms:.4f}" for label, ms in sorted(fp32.items())))
    lines.append("? = unreliable: the p10-p90 spreads overlap and the paired ratio straddles 1")
    lines.append("")
    lines.append("What holds each INT8 run, as shares of the FP32 run (in brackets: the part beyond the ceiling):")
    for result in results:
        lines.append(f"  {result.model}/{result.graph}: {result.int8} ({result.unit}): "
                     f"{format_holdback(holdback(result.profile), top=5)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
