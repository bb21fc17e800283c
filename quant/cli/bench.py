"""`quant bench`: speed of every model, backend and precision in one run, side by side with PyTorch eager."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from quant.cli.run import add_selection, command_line, options_from, print_outcome

BENCH_UTTERANCES = 8  # the speed workload is the median-length utterance of these


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
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.pipeline import run_all

    options = options_from(args, command_line())
    options = replace(options, accuracy=False, report_dir=options.out_dir / "bench",
                      se_utterances=BENCH_UTTERANCES, asr_utterances=BENCH_UTTERANCES)
    return print_outcome(run_all(options))
