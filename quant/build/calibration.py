"""Ranges for the build: amax (and, where known, the sign) per tensor, read from our calibration cache or computed
by the calibration engine, then encoded per target: (rmin, rmax) for ONNX Runtime, amax / 127 for TensorRT.

The cache module (quant.calib.cache) owns the file format; when it is not importable the TensorRT cache text format
(header line, then `name: <big-endian float32 scale hex>`) is read here so builds do not depend on its presence.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from quant.errors import CalibrationError

log = logging.getLogger(__name__)

INT8_MAX = 127.0


@dataclass(frozen=True)
class TensorRange:
    """Symmetric threshold `amax`; `non_negative` lets an asymmetric uint8 encoding use [0, amax]."""

    amax: float
    non_negative: bool = False

    def ort_range(self, asymmetric: bool) -> tuple[float, float]:
        if asymmetric and self.non_negative:
            return 0.0, self.amax
        return -self.amax, self.amax


def parse_trt_cache_text(text: str, source: str = "cache") -> dict[str, float]:
    """TensorRT calibration cache -> {tensor: amax}."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationError(f"{source}: not a TensorRT calibration cache (first line must be 'TRT-<ver>-<algo>')")
    amax = {}
    for number, line in enumerate(lines[1:], 2):
        name, sep, value = line.rpartition(":")
        if not sep or not name:
            raise CalibrationError(f"{source}: line {number} is not 'tensor: hexscale': {line!r}")
        amax[name.strip()] = _scale_from_hex(value.strip(), source, number) * INT8_MAX
    return amax


def _scale_from_hex(text: str, source: str, number: int) -> float:
    if text == "0":
        return 0.0
    try:
        return float(struct.unpack(">f", bytes.fromhex(text.rjust(8, "0")))[0])
    except ValueError:
        raise CalibrationError(f"{source}: line {number}: {text!r} is not a big-endian float32 hex scale") from None


def read_cache_amax(path: str | Path) -> dict[str, float]:
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"{file}: no such calibration cache; run `quant calibrate` first")
    return parse_trt_cache_text(file.read_text(encoding="utf-8"), str(file))


def ranges_from_amax(amax: Mapping[str, float], non_negative: Iterable[str] = ()) -> dict[str, TensorRange]:
    """Finite, positive amax only; a zero or non-finite threshold cannot quantize anything and is left out."""
    signs = set(non_negative)
    ranges = {}
    for name, value in amax.items():
        if value > 0 and value != float("inf"):
            ranges[name] = TensorRange(float(value), name in signs)
        else:
            log.debug("tensor %s has amax %s: left unquantized", name, value)
    return ranges


def ranges_from_result(result: Any) -> dict[str, TensorRange]:
    """Adapt the calibration engine's RangeResult (amax per tensor, optional min per tensor)."""
    amax = getattr(result, "amax", None)
    if not isinstance(amax, Mapping):
        raise CalibrationError(f"range result {type(result).__name__} has no 'amax' mapping")
    minimum = getattr(result, "min", None) or getattr(result, "minimum", None) or {}
    non_negative = [name for name, low in dict(minimum).items() if low >= 0]
    return ranges_from_amax(amax, non_negative)
