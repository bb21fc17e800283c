"""Range statistics in numpy: running min/max, |x| histograms, and the amax searches on them.

Everything here is order independent by construction, in one pass over the data. A calibration keeps exact running
min/max (so amax = max|x|) and counts |x| into a `Pow2Histogram`: `collect_bins(num_bins)` integer bins over
[0, 2^e), the smallest power-of-two range above every value seen so far. When a batch raises amax past 2^e the range
doubles (as often as needed) and bins merge pairwise: with scaling by powers of two exact in floating point,
floor(|x| * bins / 2^(e+1)) == floor(floor(|x| * bins / 2^e) / 2), so the merged counts are exactly those a histogram
over the final range would have had from the start. Integer counts add commutatively, so any batch order (and any
split into shards) gives the same histogram and therefore bit-identical thresholds.

Resolution: 2^(e-1) <= amax < 2^e, so with 16x the search bins over [0, 2^e) a collected bin is at most an eighth
of a search bin (amax / num_bins). Percentile reads the collected bins directly: its threshold is the upper edge of
the bin holding the percentile, so it is within one search bin of the one a fixed [0, amax] histogram gives. Entropy
search runs on `num_bins` bins over [0, amax] regridded from the collected ones (`regrid`: the cumulative counts
interpolated linearly at the search bins' edges). The KL search is not continuous in its histogram, though: where two
candidates' divergences nearly tie, a small change of counts moves the winner far. Measured on the offline DPCRN's 116
tensors (8 utterances) against the former two passes: 112 entropy thresholds within one search bin at 16x (the other
4 moved 4, 14, 14 and 168 bins, where the former histogram's own KL is within 2.8 % of its minimum), 105 at 8x;
assigning whole collected bins to the search bin of their centre instead of interpolating: 74 at 16x (aliasing).

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

import math
import threading
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np

from quant.calib.counting import count_abs
from quant.errors import CalibrationError

NUM_BINS = 2048
NUM_LEVELS = 128
START_BIN = 128
DEFAULT_PERCENTILE = 99.99
COLLECT_BINS_PER_SEARCH_BIN = 16  # bins over [0, 2^e) per search bin over [0, amax]: >= 8 per search bin (module doc)
# what produced the histograms (part of a cache key: a different collector is a different calibration, never a hit)
COLLECTOR = "one-pass-pow2-x16-interp"
# the collector updates min/max, then counts, a chunk at a time, so the count reads what the min/max pass just brought
# into the cache (256 Ki float32 values: 1 MiB)
CHUNK_ELEMENTS = 1 << 18


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

    def add_zeros(self, count: int) -> None:
        """As if `count` zeros were added (a zero Pad's padding), without making them."""
        if count > 0:
            self.minimum, self.maximum = min(self.minimum, 0.0), max(self.maximum, 0.0)
            self.count += count

    @property
    def amax(self) -> float:
        """max |x| over the finite values seen; 0 when nothing finite was seen."""
        if self.count == 0:
            return 0.0
        return max(abs(self.minimum), abs(self.maximum))


class Histogram(Protocol):
    """What the threshold searches read: counts of |x| in equal bins from 0, and the exact max |x|."""

    counts: np.ndarray
    amax: float

    @property
    def bin_width(self) -> float: ...


class AbsHistogram:
    """Counts of |x| in `num_bins` equal bins over [0, amax]; amax is fixed when the histogram is made. Integers when
    filled by `add`; fractional when made by `regrid`.

    Values above amax land in the last bin; non-finite values are skipped (the min/max accumulator counts them). The
    entropy search's input (see `regrid`), and a two-pass reference collection when filled with `add`.
    """

    def __init__(self, amax: float, num_bins: int = NUM_BINS) -> None:
        if not np.isfinite(amax) or amax < 0:
            raise CalibrationError(f"histogram range must be a finite amax >= 0, got {amax}")
        self.amax = float(amax)
        self.num_bins = num_bins
        self.counts: np.ndarray = np.zeros(num_bins, dtype=np.int64)
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
        for start in range(0, flat.size, CHUNK_ELEMENTS):
            chunk = flat[start : start + CHUNK_ELEMENTS]
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


class Pow2Histogram:
    """Integer counts of |x| in `num_bins` (a power of two) equal bins over [0, 2^exponent), the smallest power-of-two
    range above every value seen; `amax` is the largest |x| covered. Call `cover(amax)` with the batch's max |x| before
    `add(batch)`: the range grows by exact pairwise merges (module doc), so the result does not depend on the order."""

    def __init__(self, num_bins: int) -> None:
        if num_bins < 2 or num_bins > 1 << 30 or num_bins & (num_bins - 1):  # int32 bin indices
            raise CalibrationError(f"a power-of-two histogram needs a power-of-two bin count in [2, 2^30], "
                                   f"got {num_bins}")
        self.num_bins = num_bins
        self._bins_exponent = num_bins.bit_length() - 1  # num_bins = 2^_bins_exponent
        self.exponent: int | None = None  # None until a value above 0 is covered; zeros count into bin 0 anyway
        self.amax = 0.0
        self.counts = np.zeros(num_bins, dtype=np.int64)

    @property
    def bin_width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent) / self.num_bins

    def cover(self, amax: float) -> None:
        """Grow the range to the smallest power of two above `amax` (a finite max |x|)."""
        if not np.isfinite(amax) or amax < 0:
            raise CalibrationError(f"histogram range must be a finite amax >= 0, got {amax}")
        self.amax = max(self.amax, float(amax))
        if amax == 0:
            return
        exponent = math.frexp(amax)[1]  # amax = m * 2^exponent with 0.5 <= m < 1, so amax < 2^exponent
        if self.exponent is None:
            self.exponent = exponent
        elif exponent > self.exponent:
            self.counts = _merge_pairs(self.counts, exponent - self.exponent)
            self.exponent = exponent

    def add_zeros(self, count: int) -> None:
        """As if `count` zeros were counted (bin 0 holds zero in every range)."""
        self.counts[0] += max(count, 0)

    def add(self, values: np.ndarray) -> None:
        """Count the finite |x| of `values` (NaN and +-inf are skipped), all of which must lie below the covered
        range."""
        # nothing above 0 covered yet: every finite value is a zero, and a zero scale sends it to bin 0
        scale = 0.0 if self.exponent is None else math.ldexp(1.0, self._bins_exponent - self.exponent)
        above = count_abs(values, scale, self.counts)  # floor(|x| * bins / 2^exponent): exact, power-of-two scale
        if above:
            largest = float(np.max(np.abs(values[np.isfinite(values)])))
            raise CalibrationError(f"{above} values, |x| up to {largest}, lie above the histogram range "
                                   f"[0, {self.bin_width * self.num_bins}): cover() them first")

    @classmethod
    def merged(cls, parts: Iterable["Pow2Histogram"], num_bins: int) -> "Pow2Histogram":
        """One histogram as if it had seen every part's values (exact in any order)."""
        merged = cls(num_bins)
        for part in parts:
            if part.num_bins != num_bins:
                raise CalibrationError(f"cannot merge a {part.num_bins}-bin histogram into a {num_bins}-bin one")
            merged.cover(part.amax)
            counts = part.counts
            if part.exponent is not None and merged.exponent is not None and merged.exponent > part.exponent:
                counts = _merge_pairs(counts, merged.exponent - part.exponent)
            merged.counts = merged.counts + counts
        return merged


def _merge_pairs(counts: np.ndarray, doublings: int) -> np.ndarray:
    """Counts over a range 2^doublings times wider: groups of 2^doublings adjacent bins summed, then zeros."""
    group = 1 << min(doublings, int(math.log2(counts.size)))
    merged = np.zeros_like(counts)
    merged[: counts.size // group] = counts.reshape(-1, group).sum(axis=1)
    return merged


def collect_bins(num_bins: int) -> int:
    """Bins of the power-of-two histogram behind a `num_bins` search: 16x, rounded up to a power of two."""
    return 1 << max(1, (COLLECT_BINS_PER_SEARCH_BIN * num_bins - 1).bit_length())


def regrid(histogram: Pow2Histogram, num_bins: int) -> AbsHistogram:
    """`num_bins` bins over [0, histogram.amax]: the collected cumulative counts interpolated linearly at their edges
    (values spread evenly within a collected bin), so the counts are fractional and sum to the collected total."""
    search = AbsHistogram(histogram.amax, num_bins)
    total = histogram.counts.sum(dtype=np.float64)
    if histogram.amax == 0:
        search.counts = np.concatenate(([total], np.zeros(num_bins - 1)))
        return search
    collected_edges = np.arange(histogram.num_bins + 1) * histogram.bin_width
    cumulative = np.concatenate(([0.0], np.cumsum(histogram.counts, dtype=np.float64)))
    at_edges = np.interp(np.linspace(0.0, histogram.amax, num_bins + 1), collected_edges, cumulative)
    at_edges[-1] = total  # the last search edge is amax itself: every value counted lies at or below it
    search.counts = np.diff(at_edges)
    return search


_SCRATCH = threading.local()


def _scratch(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread reusable buffers for one chunk of `AbsHistogram.add`: no allocation (and page faults) per tensor
    and batch. Bin indices are int32: numpy converts float32 to int32 with SIMD, about 10x faster than to int64
    (measured), though np.bincount then copies them to int64."""
    buffers = getattr(_SCRATCH, "buffers", {})
    if dtype not in buffers:
        buffers[dtype] = (np.empty(CHUNK_ELEMENTS, dtype), np.empty(CHUNK_ELEMENTS, np.int32))
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


def percentile_amax(histogram: Histogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Upper edge of the bin holding the `percentile`-th |x|, so at least that share of values lies within amax."""
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    total = int(histogram.counts.sum())
    if histogram.amax == 0 or total == 0:
        return 0.0
    cumulative = np.cumsum(histogram.counts)
    index = int(np.searchsorted(cumulative, percentile / 100.0 * total, side="left"))
    return min(histogram.amax, (index + 1) * histogram.bin_width)
