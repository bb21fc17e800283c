"""Builds: one model at one precision -> engines/<model>/<precision>/ with model.onnx and meta.json.

The implementation lives in quant.artifacts.artifact; this package stays import-light (the CLI's --help imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_artifact(model: str | Path, precision: str, backend: str = "ort", **options: Any) -> Path:
    """Build `model` (a known name: dpcrn, dpcrn-stream, wenet-encoder, wenet-decoder; or an .onnx path) at
    `precision` (fp32 | fp16 | int8) for `backend` (ort | trt); options are quant.artifacts.artifact.BuildOptions fields.
    Returns the artifact folder."""
    from quant.artifacts.artifact import build_artifact as build

    return build(model, precision, backend, **options)


__all__ = ["build_artifact"]
