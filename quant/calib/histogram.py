"""Range statistics in numpy: running min/max, fixed-range |x| histograms, and the amax searches on them.

Everything here is order independent by construction. Pass 1 of a calibration keeps exact running min/max (and so
amax = max|x|); pass 2 counts |x| into `num_bins` integer bins over the fixed range [0, amax]. Integer counts add
commutatively, so any batch order gives the same histogram and therefore bit-identical thresholds.

Entropy search (TensorRT's IInt8EntropyCalibrator2 algorithm as presented at GTC 2017 and implemented by
pytorch-quantization): for every candidate i in [start_bin, num_bins] keep the first i bins as the reference P with all
outliers (bins >= i) folded into bin i-1; Q quantizes bins [0, i) (outliers not folded) into `num_levels` levels, bin j
going to level floor(j * num_levels / i), and spreads each level's count evenly over its non-empty bins; the candidate
with the smallest KL(P || Q) wins (ties go to the larger threshold, as pytorch-quantization does). A candidate whose
P has mass where Q has none (outliers folded into an empty bin i-1) has infinite divergence.
Threshold convention: amax = i * bin_width, the upper edge of the last kept bin, i.e. exactly the range the 128 levels
cover (pytorch-quantization's `calib_bin_edges[i]`; the GTC slides' (i + 0.5) * bin_width differs by half a bin).

Bin 0: like pytorch-quantization (NVIDIA's Python reference of this calibrator), the search by default replaces the
count of bin 0 with that of bin 1 (`suppress_zero_bin`). Bin 0 holds the spike of (near-)zeros that ReLU/PReLU outputs,
padding and silent STFT bins produce; left in, merging it with its neighbours dominates the divergence and the search
degenerates to the smallest candidate (measured on real speech STFT: 61 % of |x| in bin 0 -> threshold at bin 128,
amax / 16; with the substitution: bin 377). Zeros are exact in symmetric INT8 whatever the threshold.

The KL of all candidates is computed at once from prefix sums (no Python loop over candidates), see `entropy_kl`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from quant.errors import CalibrationError

NUM_BINS = 2048
NUM_LEVELS = 128
START_BIN = 128
DEFAULT_PERCENTILE = 99.99
_CHUNK_ELEMENTS = 1 << 20  # histogram updates work on chunks of 1 Mi elements in reused buffers


@dataclass
class MinMaxAccumulator:
    """Running min/max over finite values; non-finite values are counted, never used."""

    minimum: float = np.inf
    maximum: float = -np.inf
    count: int = 0
    nonfinite: int = 0

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        if np.isfinite(low) and np.isfinite(high):
            finite_count = flat.size
        else:  # NaN propagates through min/max and +-inf shows up in them: only then pay for the mask
            finite = flat[np.isfinite(flat)]
            finite_count = finite.size
            self.nonfinite += flat.size - finite_count
            if finite_count == 0:
                return
            low, high = float(finite.min()), float(finite.max())
        self.count += finite_count
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)

    @property
    def amax(self) -> float:
        """max |x| over the finite values seen; 0 when nothing finite was seen."""
        if self.count == 0:
            return 0.0
        return max(abs(self.minimum), abs(self.maximum))


class AbsHistogram:
    """Integer counts of |x| in `num_bins` equal bins over [0, amax]; amax is fixed when the histogram is made.

    Values above amax land in the last bin (pass 2 sees the same data as pass 1, so there are none unless the
    feeds changed); non-finite values are skipped (pass 1 counted them).
    """

    def __init__(self, amax: float, num_bins: int = NUM_BINS) -> None:
        if not np.isfinite(amax) or amax < 0:
            raise CalibrationError(f"histogram range must be a finite amax >= 0, got {amax}")
        self.amax = float(amax)
        self.num_bins = num_bins
        self.counts = np.zeros(num_bins, dtype=np.int64)
        # float32 scaling keeps the temporaries small; a subnormal amax would overflow it, then use float64
        scale = num_bins / amax if amax > 0 else 0.0
        self._dtype = np.float32 if scale < np.finfo(np.float32).max else np.float64
        self._bins_per_unit = self._dtype(scale)

    @property
    def bin_width(self) -> float:
        return self.amax / self.num_bins

    def add(self, values: np.ndarray) -> None:
        if self.amax == 0:
            return
        flat = values.reshape(-1)
        scaled_buffer, index_buffer = _scratch(self._dtype)
        for start in range(0, flat.size, _CHUNK_ELEMENTS):
            chunk = flat[start : start + _CHUNK_ELEMENTS]
            self._add_chunk(chunk, scaled_buffer[: chunk.size], index_buffer[: chunk.size])

    def _add_chunk(self, chunk: np.ndarray, scaled: np.ndarray, index: np.ndarray) -> None:
        np.abs(chunk, out=scaled, casting="unsafe")  # float16/bfloat16 widen, float64 narrows (bins are coarse)
        scaled *= self._bins_per_unit
        if not np.isfinite(scaled.max(initial=0.0)):  # NaN or inf present (max propagates NaN)
            scaled = scaled[np.isfinite(scaled)]
            index = index[: scaled.size]
        np.copyto(index, scaled, casting="unsafe")  # truncation = floor for values >= 0
        np.minimum(index, self.num_bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.num_bins)


_SCRATCH = threading.local()


def _scratch(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread reusable buffers for one chunk: no allocation (and page faults) per tensor and batch."""
    buffers = getattr(_SCRATCH, "buffers", {})
    if dtype not in buffers:
        buffers[dtype] = (np.empty(_CHUNK_ELEMENTS, dtype), np.empty(_CHUNK_ELEMENTS, np.intp))
        _SCRATCH.buffers = buffers
    return buffers[dtype]


def entropy_kl(counts: np.ndarray, num_levels: int = NUM_LEVELS, start_bin: int = START_BIN) -> np.ndarray:
    """KL(P || Q) for every candidate i = start_bin .. len(counts) (index 0 is i = start_bin); inf where undefined.

    With T the total count, C(i) = sum(counts[:i]), level k of candidate i holding S_k counts in N_k non-empty bins,
    and P_{i-1} = counts[i-1] + (T - C(i)):
        T * KL = sum_{j<i-1, b_j>0} b_j log b_j - C(i-1) (log T - log C(i))
                 - sum_k S'_k log(S_k / N_k) + P_{i-1} (log P_{i-1} - log T - log(S_last / N_last) + log C(i))
    where S'_k = S_k except for the last level, which excludes bin i-1 (handled by the final term).
    All sums over bins come from prefix sums, so the cost is O(candidates * levels) in vectorized numpy.
    """
    b = np.asarray(counts, dtype=np.float64)
    num_bins = b.size
    if num_bins < start_bin or start_bin < num_levels:
        raise CalibrationError(f"entropy search needs num_levels <= start_bin <= bins, got {num_levels}, "
                               f"{start_bin}, {num_bins}")
    total = b.sum()
    candidates = np.arange(start_bin, num_bins + 1)
    if total == 0:
        return np.zeros(candidates.size)
    nonzero = b > 0
    blogb = np.zeros_like(b)
    blogb[nonzero] = b[nonzero] * np.log(b[nonzero])
    csum = np.concatenate(([0.0], np.cumsum(b)))
    cnz = np.concatenate(([0], np.cumsum(nonzero)))
    cblogb = np.concatenate(([0.0], np.cumsum(blogb)))

    # level boundaries: bin j is in level floor(j * L / i); level k starts at ceil(k * i / L)
    levels = np.arange(num_levels + 1)
    bounds = -((-levels[None, :] * candidates[:, None]) // num_levels)  # (candidates, L+1), ceil division
    level_sum = np.diff(csum[bounds], axis=1)
    level_nonzero = np.diff(cnz[bounds], axis=1)
    filled = level_nonzero > 0
    log_mean = np.zeros_like(level_sum)
    log_mean[filled] = np.log(level_sum[filled] / level_nonzero[filled])

    last = candidates - 1
    kept = csum[candidates]  # C(i)
    kept_before_last = csum[last]  # C(i-1)
    b_last = b[last]
    p_last = b_last + (total - kept)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(total) - np.log(kept)
        body = cblogb[last] - kept_before_last * log_ratio
        level_terms = (level_sum * log_mean).sum(axis=1) - b_last * log_mean[:, -1]
        last_term = np.where(p_last > 0, p_last * (np.log(p_last) - log_ratio - log_mean[:, -1]), 0.0)
        kl = (body - level_terms + last_term) / total
    kl[(p_last > 0) & (b_last == 0)] = np.inf  # outliers folded into a bin Q leaves empty
    kl[kept == 0] = np.inf
    return np.maximum(kl, 0.0)  # rounding can give -1e-17 for a perfect match


def entropy_bin(counts: np.ndarray, num_levels: int = NUM_LEVELS, start_bin: int = START_BIN,
                suppress_zero_bin: bool = True) -> int:
    """The winning candidate i (number of kept bins); ties go to the larger i."""
    if suppress_zero_bin and counts.size > 1:
        counts = counts.copy()
        counts[0] = counts[1]
    kl = entropy_kl(counts, num_levels, start_bin)
    best = kl.size - 1 - int(np.argmin(kl[::-1]))
    return start_bin + best


def entropy_amax(histogram: AbsHistogram, num_levels: int = NUM_LEVELS, start_bin: int = START_BIN,
                 suppress_zero_bin: bool = True) -> float:
    if histogram.amax == 0 or histogram.counts.sum() == 0:
        return 0.0
    return entropy_bin(histogram.counts, num_levels, start_bin, suppress_zero_bin) * histogram.bin_width


def percentile_amax(histogram: AbsHistogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Upper edge of the bin holding the `percentile`-th |x|, so at least that share of values lies within amax."""
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    total = int(histogram.counts.sum())
    if histogram.amax == 0 or total == 0:
        return 0.0
    cumulative = np.cumsum(histogram.counts)
    index = int(np.searchsorted(cumulative, percentile / 100.0 * total, side="left"))
    return min(histogram.amax, (index + 1) * histogram.bin_width)
