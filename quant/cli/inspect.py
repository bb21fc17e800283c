"""`quant inspect SPEC|MODEL_ONNX [--graph ROLE]`: which nodes run in which precision and why; for a quantized model,
which ops really became integer kernels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quant.cli.specs import add_spec, fp32_graphs, is_onnx, select


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show the precision plan of an ONNX model (per op type, with the deciding rule)",
        description="Apply the precision rules to each graph of SPEC (or an ONNX file) and print, per op type, how many nodes run in which "
        "precision and which rule decided it. For a quantized model also list the ops that read Q/DQ tensors and "
        "the integer kernels in ONNX Runtime's optimized graph.",
    )
    add_spec(parser, onnx=True)
    parser.add_argument("--precision", choices=("int8", "fp16"), default="int8")
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--rules", type=Path, help="rules TOML (default: the shipped precision_default.toml)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.artifacts.inspect import inspect_model

    if is_onnx(args.spec):
        paths = {Path(args.spec).stem: Path(args.spec)}
    else:
        selection = select(args.spec, args.graph)
        graphs = fp32_graphs(selection.spec)
        paths = {str(g.name): graphs[g.role] for g in selection.graphs}
    for name, path in paths.items():
        if len(paths) > 1:
            print(f"== {name} ({path}) ==")
        report = inspect_model(path, args.precision, args.rules, args.backend)
        print("\n".join(report.lines()))
    return 0
