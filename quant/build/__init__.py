"""Builds: one model at one precision -> engines/<model>/<precision>/ with model.onnx and meta.json.

The implementation lives in quant.build.artifact; this package stays import-light because quant.precision uses
its graph helpers (quant.build.graph, quant.build.patterns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_artifact(model: str | Path, precision: str, backend: str = "ort", **options: Any) -> Path:
    """Build `model` (a known name: dpcrn, dpcrn-stream, wenet-encoder, wenet-decoder; or an .onnx path) at
    `precision` (fp32 | fp16 | int8) for `backend` (ort | trt); options are quant.build.artifact.BuildOptions fields.
    Returns the artifact folder."""
    from quant.build.artifact import build_artifact as build

    return build(model, precision, backend, **options)


__all__ = ["build_artifact"]
