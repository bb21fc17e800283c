"""`quant export {dpcrn,dpcrn-stream,wenet} -o DIR [--opset 13|17] [--weights PATH]`: argument parsing only."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_CHOICES = ("dpcrn", "dpcrn-stream", "wenet")
OPSET_CHOICES = (13, 17)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to a checked, verified ONNX file",
        description="Export a model to ONNX (one self-contained file at the opset asked for), verify it against "
        "PyTorch with ONNX Runtime on real speech, and write DIR/meta.json.",
    )
    parser.add_argument("model", choices=MODEL_CHOICES, help="dpcrn (offline, T=563), dpcrn-stream (T=1), wenet")
    parser.add_argument("-o", "--out-dir", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--opset",
        type=int,
        choices=OPSET_CHOICES,
        default=17,
        help="17 keeps LayerNormalization as one op; 13 gives the decomposed pattern (default 17)",
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="checkpoint (default: the weights shipped in quant/assets/)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quant.artifacts.export import export_model

    paths = export_model(args.model, args.out_dir, opset=args.opset, weights=args.weights)
    for path in paths:
        log.info("wrote %s", path)
    return 0
