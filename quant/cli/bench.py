"""`quant bench`: speed of every model, backend and precision in one run, side by side with PyTorch eager."""

from __future__ import annotations

import argparse
from pathlib import Path
from dataclasses import replace
from typing import Any

from quant.cli.run import add_selection, command_line, options_from, print_outcome

BENCH_UTTERANCES = 8  # the speed workload is the median-length utterance of these
PROFILE_RUNS = 10  # profiled runs per build (--profile)
INTERLEAVED_RUNS = 30  # FP32/INT8 rounds timed interleaved after the profile


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="latency/RTF/throughput of every build side by side (ORT 1 and 2 threads, TensorRT, eager)",
        description="Time every model x backend x precision in one run: latency min/mean/p50/p90/p99/max after "
        "warm-up (200 runs; 1000 streaming frames), RTF, WeNet throughput at batch 1/4/8/16, with ratios against "
        "FP32 ONNX Runtime and PyTorch eager. Builds what is missing (reusing caches) and writes "
        "engines/bench/results.{json,md,csv} and tradeoff.png; no accuracy evaluation (see quant run).",
    )
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="shipped models (dpcrn, dpcrn-stream, wenet) or "
                        "model spec files (default: the three shipped models)")
    add_selection(parser)
    parser.add_argument("--profile", action="store_true",
                        help="time accounting of MODEL's FP32 and INT8 builds instead (built from the graph the builds use: "
                        "the spec's rewrites, or --rewrites/--no-rewrites): per op type and per node "
                        "(ORT profiler, --runs runs, default 10), the share of FP32 time in ops with integer kernels, "
                        "the ceiling INT8/FP32 ratio, and FP32 vs INT8 timed interleaved (min/median/p10-p90)")
    parser.add_argument("--cache", type=Path, help="with --profile: calibration cache for the INT8 build")
    parser.add_argument("--json", type=Path, help="with --profile: also write {'profile': ..., 'interleaved': ...}")
    parser.set_defaults(handler=run)


def run_profile(args: argparse.Namespace) -> int:
    from quant.errors import QuantError
    from quant.eval.profile import format_profile
    from quant.fileio import atomic_write_json
    from quant.timing import format_interleaved, profile_model, time_interleaved, timing_workload

    if len(args.specs) != 1:
        raise QuantError("quant bench --profile takes one shipped graph: dpcrn, dpcrn-stream, wenet-encoder or "
                         "wenet-decoder")
    model = args.specs[0]
    threads = args.threads[0] if args.threads else 1
    out_dir = args.output / model if args.output else None
    profiled = profile_model(model, args.runs or PROFILE_RUNS, threads, args.cache, out_dir, args.rewrites)
    print(f"profiled graph: {profiled.source}")
    comparison = profiled.comparison
    print(format_profile(comparison))
    paths = {"fp32": profiled.fp32, "int8": profiled.int8}
    if profiled.plain_fp32 is not None:  # the rewrites changed the graph: the plain export's FP32 may be faster
        paths = {"fp32": profiled.fp32, "fp32-plain": profiled.plain_fp32, "int8": profiled.int8}
    # a streaming graph is rolled (states carried frame to frame, real frames) as `quant bench` times it
    timed = time_interleaved(paths, timing_workload(model, paths["fp32"]), args.runs or INTERLEAVED_RUNS, threads)
    base = timed.fastest(["fp32", "fp32-plain"])  # ratios divide by the faster FP32
    print("\n" + format_interleaved(timed, base))
    if base != "fp32":
        print(f"ratios are against {base} (the export without the spec's rewrites), the faster FP32 build here; the "
              "profile's ceiling above is against the rewritten fp32")
    if args.json:
        atomic_write_json(args.json, {"profile": comparison.to_dict(), "interleaved": timed.to_dict(base)})
        print(f"wrote {args.json}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.profile:
        return run_profile(args)
    from quant.pipeline import run_all

    options = options_from(args, command_line())
    options = replace(options, accuracy=False, report_dir=options.out_dir / "bench",
                      se_utterances=BENCH_UTTERANCES, asr_utterances=BENCH_UTTERANCES)
    return print_outcome(run_all(options))
