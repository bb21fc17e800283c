"""The |x| histograms of a calibration, kept beside its cache in the store as `<cache>.hist.npz`: derived, optional.

The cache and its sidecar are the entry (quant.calib.cache); this file only lets the report draw what the ranges were
chosen from (2048-bin |x| histograms of entropy and percentile calibrations; minmax makes none). It records the
sha256 of the cache bytes it was written for, so a file left by an earlier cache at the same path (re-calibrated with
--force, or replaced by TensorRT's calibrator) is foreign: `read_histograms` ignores it with a note, as it does a
missing or unreadable file. It is written atomically after the pair is committed, outside the pair protocol: a
failure to write it is a warning, never a failed calibration. `quant cache rm` removes it with the pair.
Loaded with pickle off: names are a unicode array, counts float64 (interpolated from the collector's power-of-two bins, so fractional), ranges float64.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from quant.calib.histogram import AbsHistogram
from quant.errors import QuantError
from quant.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "quant-calibration-histograms/1"
SUFFIX = ".hist.npz"


def histogram_path(cache_path: str | Path) -> Path:
    path = Path(cache_path)
    return path.with_name(path.name + SUFFIX)


@dataclass(frozen=True)
class StoredHistogram:
    """Counts of |x| in equal bins over [0, amax] (amax: the largest |x| seen; the collector's power-of-two bins interpolated onto this range, as the entropy search sees them)."""

    amax: float
    counts: np.ndarray

    @property
    def bin_width(self) -> float:
        return self.amax / self.counts.size

    def share_above(self, threshold: float) -> float:
        """Share of the counted values with |x| beyond `threshold` (the bin holding it counted pro rata)."""
        total = float(self.counts.sum())
        if total == 0 or self.amax <= 0 or threshold >= self.amax:
            return 0.0
        position = max(threshold, 0.0) / self.bin_width
        index = int(position)
        above = float(self.counts[index + 1:].sum()) + float(self.counts[index]) * (index + 1 - position)
        return above / total


@dataclass(frozen=True)
class StoredHistograms:
    """What `read_histograms` found: the histograms by tensor, or none and a note saying why."""

    tensors: Mapping[str, StoredHistogram] = field(default_factory=dict)
    note: str = ""


def write_histograms(cache_path: str | Path, cache_sha256: str, histograms: Mapping[str, AbsHistogram]) -> Path | None:
    """Store `histograms` for the cache whose bytes hash to `cache_sha256`; None (nothing written) when there are none
    or the write fails (a warning: the histograms are for the report only)."""
    target = histogram_path(cache_path)
    if not histograms:
        return None
    names = list(histograms)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps({"format": FORMAT, "cache_sha256": cache_sha256})),
                        names=np.array(names, dtype=str), amax=np.array([histograms[n].amax for n in names]),
                        counts=np.stack([histograms[n].counts for n in names]).astype(np.float64))
    try:
        return atomic_write_bytes(target, buffer.getvalue())
    except QuantError as error:
        log.warning("calibration histograms not stored (the report will show ranges only): %s", error)
        return None


def read_histograms(cache_path: str | Path, cache_sha256: str) -> StoredHistograms:
    """The histograms stored for the cache at `cache_path` whose bytes hash to `cache_sha256`; a missing, unreadable
    or foreign file gives none, with a note (never an error: the file is optional)."""
    target = histogram_path(cache_path)
    try:
        with np.load(target, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            names, amax, counts = data["names"], data["amax"], data["counts"]
    except FileNotFoundError:
        return _note(f"no histograms stored for {Path(cache_path).name} (minmax calibration, or calibrated before "
                     "quant kept them: re-run quant calibrate --force to store them)")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        return _note(f"{target.name} is not readable ({str(error)[:80]}); ignored")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return _note(f"{target.name} is not a {FORMAT} file; ignored")
    if meta.get("cache_sha256") != cache_sha256:
        return _note(f"{target.name} belongs to another cache than {Path(cache_path).name} (written before it was "
                     "replaced); ignored")
    if counts.ndim != 2 or len(names) != counts.shape[0] or amax.shape != (len(names),):
        return _note(f"{target.name}: names, ranges and counts disagree in shape; ignored")
    return StoredHistograms({str(name): StoredHistogram(float(value), row)
                             for name, value, row in zip(names, amax, counts)})


def _note(text: str) -> StoredHistograms:
    log.info("%s", text)
    return StoredHistograms(note=text)
