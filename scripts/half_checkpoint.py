#!/usr/bin/env python3
"""Round a training checkpoint's floating-point weights to float16, halving it for the GPU machine's carry limit.

  python scripts/half_checkpoint.py quant/assets/conformer.pt -o .carry/conformer_init_fp16.pt

The result is for `train_conformer.py --init` / `train_dpcrn.py --init` only: loading copies each float16 tensor into
the model's float32 parameter, so training continues in float32 from weights rounded once (relative error <= 2^-11).
Integer tensors (BatchNorm's step counters) and everything beside the state_dict (config, CMVN, vocabulary, metrics)
are kept as they are.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.errors import ModelError  # noqa: E402
from quant.fileio import atomic_write_bytes  # noqa: E402
from quant.models.checkpoint import read_checkpoint  # noqa: E402


def half_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy of `checkpoint` whose state_dict float tensors are float16."""
    state = {name: tensor.half() if tensor.is_floating_point() else tensor
             for name, tensor in checkpoint["state_dict"].items()}
    return {**checkpoint, "state_dict": state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.checkpoint, "model", "scripts/train_conformer.py or scripts/train_dpcrn.py")
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    buffer = io.BytesIO()
    torch.save(half_state(checkpoint), buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB (from {args.checkpoint.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
