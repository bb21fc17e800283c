"""Enhanced examples for the report: one short test utterance run through a speech-enhancement model's FP32 and INT8
ONNX Runtime artifacts at report time (results.json stores no audio), for spectrograms of noisy vs FP32 vs INT8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from quant.errors import QuantError
from quant.report.rows import Row, find_row

logger = logging.getLogger(__name__)

EXAMPLE_SECONDS = 4.0  # a few seconds keep the report cheap (the offline model pads to one 9 s segment anyway)
ENHANCE = {"dpcrn": "offline", "dpcrn-stream": "streaming"}  # SE models and how their graph is run


@dataclass(frozen=True)
class Example:
    model: str
    utterance: str
    sample_rate: int
    signals: tuple[tuple[str, np.ndarray], ...]  # (label, audio): noisy, clean, then one per precision


def test_manifest() -> Path:
    """The SE test set `quant run` evaluates on."""
    from quant.paths import calib_data_dir

    return calib_data_dir() / "se_test" / "manifest.jsonl"


def enhanced_example(model: str, rows: Sequence[Row], manifest: Path | None = None) -> Example | str:
    """The example, or a one-line note saying why there is none (not an SE model, artifact or test set missing)."""
    if model not in ENHANCE:
        return f"{model} is not a speech-enhancement model"
    artifacts = {}
    for precision in ("fp32", "int8"):
        row = find_row(rows, model, "ort", precision)
        path = Path(next(iter((row or {}).get("artifacts", {}).values()), "")) if row else None
        if path is None or not path.is_file():
            return f"no ONNX Runtime {precision} artifact of {model} on this machine (run `quant run` to build it)"
        artifacts[precision] = path
    source = manifest or test_manifest()
    if not source.is_file():
        return f"{source}: no SE test set to take an example from"
    try:
        return _run_example(model, artifacts, source)
    except QuantError as error:
        return f"example not rendered: {error}"


def _run_example(model: str, artifacts: dict[str, Path], manifest: Path) -> Example:
    from quant.backends import open_runner
    from quant.eval import se
    from quant.features import SAMPLE_RATE

    name, noisy, clean = se.load_pairs(str(manifest), 1)[0]
    keep = int(EXAMPLE_SECONDS * SAMPLE_RATE)
    noisy, clean = np.asarray(noisy[:keep], np.float32), np.asarray(clean[:keep], np.float32)
    enhance = se.enhance_offline if ENHANCE[model] == "offline" else se.enhance_streaming
    signals = [("noisy input", noisy), ("clean reference", clean)]
    for precision, path in artifacts.items():
        logger.info("report: enhancing %s with %s %s", name, model, precision)
        signals.append((f"ORT {precision.upper()}", enhance(open_runner(path, "ort", 1), noisy)))
    return Example(model, name, SAMPLE_RATE, tuple(signals))
