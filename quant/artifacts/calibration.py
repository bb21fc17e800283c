"""Ranges for the build: amax per tensor (TensorRT's threshold) plus the observed min/max where known, read from our
calibration cache (quant.calib.cache, with its sidecar) or from a fresh range collection (quant.calib.ranges), then
encoded per target: (rmin, rmax) for ONNX Runtime's uint8 activations, amax / 127 for int8 symmetric Q/DQ."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from quant.errors import CacheMismatch, CalibrationError
from quant.fileio import sha256_file

log = logging.getLogger(__name__)

INT8_MAX = 127.0


@dataclass(frozen=True)
class TensorRange:
    """Symmetric threshold `amax`; `minimum`/`maximum` (observed) let an asymmetric encoding skip unused sign."""

    amax: float
    minimum: float | None = None
    maximum: float | None = None

    def ort_range(self, asymmetric: bool) -> tuple[float, float]:
        """[-amax, amax] symmetric; asymmetric: the observed [min, max] clipped to [-amax, amax], 0 included."""
        if not asymmetric or self.minimum is None or self.maximum is None:
            return -self.amax, self.amax
        low = min(max(self.minimum, -self.amax), 0.0)
        high = max(min(self.maximum, self.amax), 0.0)
        return low, high


def ranges_from_tensors(tensors: Mapping[str, Any]) -> dict[str, TensorRange]:
    """From quant.calib.ranges.TensorRange objects (amax, minimum, maximum). Zero or non-finite amax is left out:
    such a tensor cannot be quantized (ORT would leave it float; a Q/DQ with scale 0 is invalid)."""
    ranges = {}
    for name, item in tensors.items():
        amax = float(item.amax)
        if amax > 0 and math.isfinite(amax):
            ranges[name] = TensorRange(amax, float(item.minimum), float(item.maximum))
        else:
            log.debug("tensor %s has amax %s: left unquantized", name, amax)
    return ranges


def ranges_from_cache(cache: Path, model_path: Path) -> tuple[dict[str, TensorRange], dict[str, Any]]:
    """Ranges of a cache made for exactly this model file (its sidecar key's model sha256), else CacheMismatch.

    read_entry refuses (QuantError, one line) a sidecar that is not quant's, whose ranges are not the cache's scales
    or hold NaN/inf/negative values; it only reads, so a read-only store builds."""
    from quant.calib.cache import read_entry

    entry = read_entry(cache)
    model_sha = sha256_file(model_path)
    if entry.key.model_sha256 != model_sha:
        raise CacheMismatch(f"{cache}: calibrated on model sha256 {entry.key.model_sha256[:12]}, but {model_path} is "
                            f"{model_sha[:12]} -> re-run `quant calibrate` on this export")
    ranges = ranges_from_tensors(entry.ranges)
    if not ranges:
        raise CalibrationError(f"{cache}: holds no usable (finite, non-zero) range")
    meta = {"path": str(cache), "sha256": entry.cache_sha256, "key": entry.key.to_dict(),
            "key_digest": entry.key.digest()}
    return ranges, meta
