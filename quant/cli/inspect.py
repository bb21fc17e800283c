"""`quant inspect MODEL_ONNX`: which nodes run in which precision and why; for a quantized model, which ops
really became integer kernels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show the precision plan of an ONNX model (per op type, with the deciding rule)",
        description="Apply the precision rules to MODEL_ONNX and print, per op type, how many nodes run in which "
        "precision and which rule decided it. For a quantized model also list the ops that read Q/DQ tensors and "
        "the integer kernels in ONNX Runtime's optimized graph.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL_ONNX")
    parser.add_argument("--precision", choices=("int8", "fp16"), default="int8")
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--rules", type=Path, help="rules TOML (default: the shipped precision_default.toml)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.artifacts.inspect import inspect_model

    report = inspect_model(args.model, args.precision, args.rules, args.backend)
    print("\n".join(report.lines()))
    return 0
