"""`quant run`: the main job: export, calibrate, build every model at fp32/fp16/int8, evaluate, report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from quant.cli.executor_options import add_executor_options, executor_changes
from quant.cli.options import positive_int, positive_int_list
from quant.cli.specs import add_rewrites
from quant.errors import QuantError


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_selection(parser: argparse.ArgumentParser) -> None:
    """Options shared by `quant run` and `quant bench`."""
    parser.add_argument("--quick", action="store_true", help="few utterances and short timing loops (CI smoke run)")
    parser.add_argument("--model", action="append", dest="model_specs", metavar="SPEC",
                        help="a shipped model (dpcrn, dpcrn-stream, wenet) or a model spec file (.toml); repeat for "
                        "several (default the three shipped models)")
    parser.add_argument("--models", type=csv_list, help="comma list of the same (older form of --model)")
    parser.add_argument("--backends", type=csv_list, help="comma list of ort, trt-sim, trt (default ort and trt-sim, "
                        "plus trt when present; trt-sim: TensorRT's fp16/int8 accuracy simulated on the CPU)")
    parser.add_argument("--precisions", type=csv_list, help="comma list of fp32, fp16, int8 (default all)")
    parser.add_argument("--no-eager", action="store_true", help="leave out the PyTorch eager rows")
    parser.add_argument("--threads", type=positive_int_list, help="ORT/PyTorch thread counts to time (default 1,2)")
    parser.add_argument("--runs", type=positive_int, help="timed runs per latency measurement (default 200; --quick 20)")
    parser.add_argument("--stream-runs", type=positive_int, help="timed streaming frames (default 1000; --quick 100)")
    parser.add_argument("--output", type=Path, help="output root: exports, cache store, artifacts, reports (default ./engines)")
    parser.add_argument("--force", action="store_true", help="ignore up-to-date stamps: re-export, rebuild, re-evaluate")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: one while stderr is a terminal)")
    add_rewrites(parser)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run", help="the whole job: export, calibrate, build fp32/fp16/int8, evaluate accuracy and speed, report",
        description="Export every model from the shipped weights, calibrate on calib_data (reusing matching caches), "
        "build FP32/FP16/INT8 for ONNX Runtime (and TensorRT when present), evaluate on the test sets, time every "
        "build side by side with PyTorch eager, and write engines/results.json, results.md, results.csv, "
        "tradeoff.png and report.html (one self-contained page). A second run reuses exports, caches, builds and accuracy results whose inputs are unchanged.",
    )
    add_selection(parser)
    parser.add_argument("--se-utterances", type=positive_int, help="first N utterances of se_test (default all)")
    parser.add_argument("--asr-utterances", type=positive_int, help="first N utterances of asr_test (default all)")
    parser.add_argument("--calib-utterances", type=positive_int, help="first N utterances of each calibration set "
                        "(default 32; --quick 8)")
    parser.add_argument("--search", action="store_true",
                        help="add the int8-searched row even where `quant search` left no rules: run a small search "
                        "(the spec's INT8 budget, 20 builds per graph, 6 with --quick) first; without it the row "
                        "appears only for graphs with engines/search/<graph>/rules.toml")
    add_executor_options(parser)  # calibration and accuracy; timing always stays in this process
    parser.set_defaults(handler=run)


def options_from(args: argparse.Namespace, command: str) -> Any:
    from dataclasses import replace

    from quant.eval.speed import BenchOptions
    from quant.pipeline import RunOptions

    options = RunOptions.quick() if args.quick else RunOptions()
    bench = options.bench
    if args.threads:
        bench = replace(bench, threads=args.threads)
    if args.runs:
        bench = replace(bench, runs=args.runs)
    if args.stream_runs:
        bench = replace(bench, stream_runs=args.stream_runs)
    changes: dict[str, Any] = {"bench": bench, "eager": not args.no_eager, "force": args.force,
                               "progress": not args.no_progress, "command": command, **executor_changes(args)}
    models = (*getattr(args, "specs", ()), *(args.model_specs or ()), *(args.models or ()))
    if models:
        changes["models"] = models
    if args.backends:
        changes["backends"] = args.backends
    if args.precisions:
        bad = [p for p in args.precisions if p not in ("fp32", "fp16", "int8")]
        if bad:
            raise QuantError(f"--precisions: {bad} not among fp32, fp16, int8")
        changes["precisions"] = args.precisions
    if args.output:
        changes["out_dir"] = args.output
    if getattr(args, "search", False):
        changes["search"] = True
    if args.rewrites is not None:
        changes["rewrites"] = args.rewrites
    for name in ("se_utterances", "asr_utterances", "calib_utterances"):
        if getattr(args, name, None):
            changes[name] = getattr(args, name)
    assert isinstance(bench, BenchOptions)
    return replace(options, **changes)


def print_outcome(result: Any) -> int:
    from quant.report import summary_lines

    print()
    for line in summary_lines(result.results):
        print(line)
    print()
    for kind, path in sorted(result.paths.items()):
        print(f"wrote {path}")
    if result.failures:
        print(f"\n{len(result.failures)} step(s) failed:")
        for failure in result.failures:
            print(f"  {failure}")
        return 1
    return 0


def command_line(argv: Sequence[str] | None = None) -> str:
    import sys

    return "quant " + " ".join(argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace) -> int:
    from quant.pipeline import run_all

    return print_outcome(run_all(options_from(args, command_line())))
