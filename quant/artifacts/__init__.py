"""Builds: one model at one precision -> engines/<model>/<precision>/ with model.onnx and meta.json.

The implementation lives in quant.artifacts.artifact; this package stays import-light (the CLI's --help imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_artifact(source: str | Path, precision: str, backend: str = "ort", name: str | None = None,
                   **options: Any) -> Path:
    """Build the ONNX file `source` at `precision` (fp32 | fp16 | int8) for `backend` (ort | trt) under the artifact
    name `name` (default the file's stem; a spec graph's GraphSpec.name); options are
    quant.artifacts.artifact.BuildOptions fields (INT8: `cache`, from quant.tasks.calibration.calibrate_spec or
    `quant calibrate`). Returns the artifact folder."""
    from quant.artifacts.artifact import build_artifact as build

    return build(source, precision, backend, name, **options)


__all__ = ["build_artifact"]
