"""The searched INT8 build vs the default-rules INT8 build vs FP32, built from the same calibration cache and timed
interleaved round-robin in one process (quant.search.speed.interleaved_latency: every build opened once, then each
round runs each build `--calls` times in turn, so drifts of machine load hit all three alike).

    python scripts/bench_search.py dpcrn --rules engines/search/dpcrn/rules.toml --rounds 20

Prints min and median per call (ms) over the rounds, the ratios to FP32 and to the default rules, and the 1-minute
load average before and after (a shared machine's load moves medians; the min moves least). The rules file is the
one `quant search` wrote; the cache defaults to the spec's (from the store, calibrated on a key miss; `--limit N`
calibrates on the first N utterances, as `quant calibrate --limit N`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.artifacts.artifact import build_artifact  # noqa: E402
from quant.cli.specs import fp32_graphs, select  # noqa: E402
from quant.errors import QuantError  # noqa: E402
from quant.search.core import MODEL_FILE  # noqa: E402
from quant.search.speed import Latency, interleaved_latency  # noqa: E402
from quant.tasks import FeedOptions, task_for  # noqa: E402
from quant.tasks.calibration import calibrate_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a shipped model (dpcrn, dpcrn-stream, wenet) or a model spec file")
    parser.add_argument("--graph", help="the spec's graph (role) the rules were searched for")
    parser.add_argument("--rules", type=Path, required=True, help="rules.toml written by `quant search`")
    parser.add_argument("--cache", type=Path, help="calibration cache (default: the spec's, from the store)")
    parser.add_argument("--limit", type=int, help="calibrate on the first N utterances when no --cache is given")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=3, help="runs per build per round (their mean is one sample)")
    parser.add_argument("-o", "--output", type=Path, default=Path("engines/bench_search"), help="build folder")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        return bench(args)
    except QuantError as error:
        print(f"bench_search: error: {error}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    selection = select(args.spec, args.graph)
    spec, role = selection.spec, selection.single_role()
    graph = spec.graph(role)
    graphs = fp32_graphs(spec)
    options = FeedOptions(graphs=dict(graphs))
    cache = args.cache or Path(calibrate_spec(spec, role, graphs[role], feed_options=FeedOptions(
        graphs=dict(graphs), limit=args.limit)).path)
    out = args.output / graph.name
    source = graphs[role]
    builds = {
        "fp32": build_artifact(source, "fp32", name=graph.name, out_dir=out / "fp32"),
        "default-rules int8": build_artifact(source, "int8", name=graph.name, cache=cache, out_dir=out / "default"),
        "searched int8": build_artifact(source, "int8", name=graph.name, cache=cache, rules=args.rules,
                                        out_dir=out / "searched"),
    }
    feeds = task_for(spec).speed_workload(role, options=options).first_run()
    load_before = os.getloadavg()[0]
    latencies = interleaved_latency([folder / MODEL_FILE for folder in builds.values()], feeds, args.rounds,
                                    args.calls)
    load_after = os.getloadavg()[0]
    timed = dict(zip(builds, latencies))
    report(graph.name, cache, args, timed, load_before, load_after)
    if args.json:
        args.json.write_text(json.dumps({
            "graph": graph.name, "cache": str(cache), "rules": str(args.rules), "rounds": args.rounds,
            "calls": args.calls, "load_before": load_before, "load_after": load_after,
            "latency": {label: lat.to_dict() for label, lat in timed.items()}}, indent=2))
    return 0


def report(name: str, cache: Path, args: argparse.Namespace, timed: dict[str, Latency], load_before: float,
           load_after: float) -> None:
    fp32, default = timed["fp32"], timed["default-rules int8"]
    print(f"{name}: {args.rounds} interleaved rounds x {args.calls} calls, 1 thread; cache {cache}; "
          f"rules {args.rules}")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}")
    print(f"{'build':<20}{'min ms':>10}{'median ms':>11}{'FP32/x min':>12}{'FP32/x med':>12}{'default/x min':>15}")
    for label, lat in timed.items():
        print(f"{label:<20}{lat.min_ms:>10.2f}{lat.median_ms:>11.2f}{fp32.min_ms / lat.min_ms:>12.2f}"
              f"{fp32.median_ms / lat.median_ms:>12.2f}{default.min_ms / lat.min_ms:>15.2f}")


if __name__ == "__main__":
    sys.exit(main())
