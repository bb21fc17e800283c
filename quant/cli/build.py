"""`quant build MODEL --precision fp32|fp16|int8 --backend ort|trt`: one artifact under engines/<model>/<precision>/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MODEL_HELP = "dpcrn, dpcrn-stream, wenet-encoder, wenet-decoder, or a path to an .onnx file"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build", help="build an FP32/FP16/INT8 artifact (ONNX for ONNX Runtime, or a TensorRT engine)",
        description="Build MODEL at one precision into engines/<model>/<precision>/ (model.onnx + meta.json; INT8 "
        "also model_trt_qdq.onnx, the int8-symmetric Q/DQ model for TensorRT explicit mode). INT8 ranges come from "
        "--cache (a `quant calibrate` cache of this exact export) or from the cache store / a fresh calibration.",
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="explicit",
                        help="TensorRT INT8: explicit Q/DQ (default) or implicit calibration cache (TensorRT <= 10)")
    parser.add_argument("--cache", type=Path, help="calibration cache from `quant calibrate` (INT8)")
    parser.add_argument("--method", choices=("entropy", "minmax", "percentile"),
                        help="INT8 without --cache: calibration method of the cache made or reused (default: the "
                        "model's measured best, quant.calib.calibrate.DEFAULT_METHODS; percentile for other models)")
    parser.add_argument("--constraints", choices=("obey", "prefer"), default="obey",
                        help="TensorRT implicit mode: obey (fail if impossible) or prefer the rules' layer precisions")
    parser.add_argument("--rules", type=Path, help="precision rules TOML (default: shipped rules)")
    parser.add_argument("-o", "--output", type=Path, help="artifact folder (default engines/<model>/<precision>)")
    parser.add_argument("--optimize", action="store_true", help="FP32: store ORT's optimized graph instead of a copy")
    parser.add_argument("--int8-activations", action="store_true",
                        help="ORT INT8: int8 instead of uint8 activations (uint8 is what x86 CPU kernels run fast)")
    parser.add_argument("--unwrap-kernel-outputs", action="store_true",
                        help="ORT INT8: float nodes protected by a rule read un-quantized inputs even where that "
                        "prevents an integer-kernel fusion")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.artifacts import build_artifact

    out_dir = build_artifact(
        args.model, args.precision, args.backend, mode=args.mode, cache=args.cache, rules=args.rules,
        out_dir=args.output, optimize_fp32=args.optimize, activation_uint8=not args.int8_activations,
        unwrap_kernel_outputs=args.unwrap_kernel_outputs, method=args.method, constraints=args.constraints,
    )
    meta = json.loads((out_dir / "meta.json").read_text())
    kernels = meta.get("integer_kernels")
    print(f"{out_dir}: {meta['model']} {meta['precision']} for {meta['backend']}"
          + (f", integer kernels {kernels}" if kernels is not None else ""))
    return 0
