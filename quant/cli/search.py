"""`quant search SPEC [--graph ROLE] [--budget METRIC=VALUE] [--target ort|trt-sim]`: the fastest INT8 mixed-precision
rules within a task-metric budget, for one graph of a model spec."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from quant.cli.executor_options import add_executor_options, executor_from_args
from quant.cli.options import positive_int
from quant.cli.specs import add_spec


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search", help="search per-unit INT8/float precision for the fastest build within a task-metric budget",
        description="Measure each quantizable unit's task-metric sensitivity (add-one-in, leave-one-out; output SNR "
        "ranks first) and its ONNX Runtime kernel time, then revert to float the units with the worst metric cost per "
        "ms saved until the budget holds on the validation half of the test set; final numbers on the held-out half. "
        "Writes rules.toml (for `quant build --rules`), search.json and frontier.png. With --target trt-sim the "
        "accuracy is TensorRT's simulated on the CPU (model_trt_qdq.onnx) and no latency is measured.",
    )
    add_spec(parser)
    parser.add_argument("--budget",
                        help="METRIC=VALUE: pesq_wb=-0.05, stoi=-0.01, cer=+0.3 (percentage points), snr_db=25 "
                        "(floor on output SNR vs FP32); default: the spec's INT8 budget ([defaults.budgets] int8)")
    parser.add_argument("--validation", type=positive_int,
                        help="the first N test utterances validate the search (default: the first half, grown to "
                        "the size that resolves the budget when half cannot)")
    parser.add_argument("--held-out", type=positive_int,
                        help="utterances of the held-out part, after the validation split (default: all of them)")
    parser.add_argument("--max-evals", type=positive_int, default=60, help="candidate builds, all steps together (default 60)")
    parser.add_argument("--top", type=positive_int, default=6,
                        help="units whose sensitivity is measured on the task metric after the SNR ranking (default 6)")
    parser.add_argument("--target", choices=("ort", "trt-sim"), default="ort",
                        help="ort: ONNX Runtime INT8, timed on this CPU (default); trt-sim: TensorRT's Q/DQ model "
                        "simulated by ONNX Runtime, rules for --backend trt, speed proxy = INT8 block count")
    parser.add_argument("--units", choices=("group", "node", "alike"), default="group",
                        help="group: one unit per structural block (a layer with its bias/activation, an attention "
                        "block, a recurrent block's projections, a Linear-act-Linear FFN; default); node: one per "
                        "node; alike: one per kind of repeated block (all attention blocks of a stack, all its FFNs: "
                        "error that adds up over a stack is decided at once)")
    parser.add_argument("--cache", type=Path, help="calibration cache (default: the cache store / a fresh one)")
    parser.add_argument("--rules", type=Path, help="base precision rules (default: shipped rules)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default engines/search/<graph>[-trt-sim])")
    add_executor_options(parser)  # each candidate's evaluation in shards; builds and timing stay in this process
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.cli.specs import fp32_graphs, select
    from quant.paths import DEFAULT_OUT_ROOT
    from quant.report.search import write_search_report
    from quant.search import SearchOptions, parse_budget, write_outputs
    from quant.search.models import Split, search_widening, spec_problem, test_set_size
    from quant.search.store import search_dir, spec_budget

    selection = select(args.spec, args.graph)
    budget = parse_budget(args.budget) if args.budget else spec_budget(selection.spec)
    role = selection.single_role("the search acts on one: give --graph ROLE (the others run FP32 in its evaluation)")
    graph = selection.spec.graph(role)
    out_dir = args.output or search_dir(DEFAULT_OUT_ROOT, str(graph.name), args.target)
    graphs, executor = fp32_graphs(selection.spec), executor_from_args(args)

    def problem_for(split: Split) -> Any:
        return spec_problem(selection.spec, role, graphs, out_dir, split, args.cache, args.rules, args.target,
                            grouping=args.units, executor=executor)

    problem, result = search_widening(problem_for, Split(args.validation, args.held_out),
                                      SearchOptions(budget, args.max_evals, args.top), out_dir,
                                      test_set_size(selection.spec))
    command = "quant search " + " ".join(shlex.quote(a) for a in _argv(args, budget.text()))
    paths = write_outputs(result, problem.base_rules, out_dir, command)
    paths.update(write_search_report(selection.spec.name, str(graph.name), paths["json"], out_dir, command))
    chosen = result.chosen
    print(f"{graph.name}: {len(problem.units)} units, {result.evals} builds, {result.minutes:.1f} min; budget "
          f"{budget.describe()}")
    print(f"speed: {result.speed_basis}")
    fp32 = f"FP32 {result.fp32_latency.min_ms:.2f} ms, " if result.fp32_latency else ""
    if result.resolution:
        found = result.resolution
        print(f"validation: {found['n']} utterances, 95 % interval +-{found['half_width']:.4f} ({found['probe']}) "
              f"against the budget's {found['limit']:.4f}")
    print(f"{fp32}default rules {_row(result.default)}")
    print(f"searched {_row(chosen)}" if chosen else "searched: no measured build meets the budget")
    if result.start:
        print(f"greedy start: {result.start['from']} ({result.start['why']})")
    if result.note:
        print(f"note: {result.note}")
    for label, key in (("default rules", "default-rules"), ("searched", "searched")):
        held = result.held_out.get(key)
        if held:
            print(f"held-out ({held['n']} utterances), {label}: change {held['delta']:+.4f} [{held['ci_low']:+.4f}, "
                  f"{held['ci_high']:+.4f}] -> {held.get('verdict_text', held['verdict'])}")
    print(f"search cost: {result.evals} builds, {result.minutes:.1f} min")
    print(f"rules: {paths['rules']}\nsearch.json: {paths['json']}\nplot: {paths['plot']}")
    print(f"report: {paths['html']} (results.json beside it)")
    return 0


def _row(point: Any) -> str:
    from quant.search.core import units_text

    latency = f"{point.latency.min_ms:.2f} ms (median {point.latency.median_ms:.2f}), " if point.latency else ""
    verdict = point.verdict
    return (f"{latency}{units_text(point)}, validation change {verdict['delta']:+.4f} "
            f"[{verdict['ci_low']:+.4f}, {verdict['ci_high']:+.4f}] {verdict['verdict']}")


def _argv(args: argparse.Namespace, budget: str) -> list[str]:
    argv = [str(args.spec), "--budget", budget]  # the spec's budget spelt out: the command reruns the same search
    for flag, value in (("--graph", args.graph), ("--target", None if args.target == "ort" else args.target),
                        ("--units", None if args.units == "group" else args.units),
                        ("--validation", args.validation), ("--held-out", args.held_out),
                        ("--max-evals", args.max_evals), ("--top", args.top),
                        ("--executor", None if args.executor == "local" else args.executor),
                        ("--ray-address", args.ray_address)):
        if value is not None:
            argv += [flag, str(value)]
    return argv
