"""The compiled |x| counting loop against a plain numpy reference: floor(|x| * scale) in float64, then a bincount."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from quant.calib.counting import count_abs

BINS = 64


def reference_counts(values: np.ndarray, scale: float, bins: int) -> tuple[np.ndarray, int]:
    """Counts of floor(|x| * scale) over the finite x below `bins`, and how many finite x lie at or beyond it."""
    finite = values[np.isfinite(values)].astype(np.float64)
    index = np.floor(np.abs(finite) * scale).astype(np.int64)
    return np.bincount(index[index < bins], minlength=bins), int(np.count_nonzero(index >= bins))


def counted(values: np.ndarray, scale: float, bins: int = BINS) -> tuple[np.ndarray, int]:
    counts = np.zeros(bins, np.int64)
    above = count_abs(values, scale, counts)
    return counts, above


def assert_counts_match(values: np.ndarray, scale: float, bins: int = BINS) -> None:
    counts, above = counted(values, scale, bins)
    expected_counts, expected_above = reference_counts(values, scale, bins)
    np.testing.assert_array_equal(counts, expected_counts)
    assert above == expected_above


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_values_count_as_the_numpy_reference(dtype: type) -> None:
    rng = np.random.default_rng(7)
    values = rng.laplace(scale=0.3, size=20000).astype(dtype)
    for exponent in (-3, 0, 1, 6):  # ranges [0, 2^exponent) too small, right and roomy for the data
        assert_counts_match(values, math.ldexp(BINS, -exponent))


def test_real_speech_stft_counts_as_the_numpy_reference() -> None:
    from quant import features
    from quant.data.audio import load_audio

    clip = sorted((Path(__file__).parent / "data").glob("librivox_*.flac"))[0]
    spec = features.stft(load_audio(clip)[: 2 * features.SAMPLE_RATE]).astype(np.float32)
    exponent = math.frexp(float(np.abs(spec).max()))[1]
    bins = 1 << 15  # the collector's resolution for a 2048-bin search
    counts, above = counted(spec, math.ldexp(bins, -exponent), bins)
    np.testing.assert_array_equal(counts, reference_counts(spec, math.ldexp(bins, -exponent), bins)[0])
    assert above == 0 and counts.sum() == spec.size


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_values_are_skipped_and_values_beyond_the_last_bin_returned(dtype: type) -> None:
    values = np.array([np.nan, -np.inf, np.inf, 0.5, -0.5, 2.0, -3.0, 1.0], dtype)
    counts, above = counted(values, BINS / 2.0)  # range [0, 2): |x| >= 2 is beyond the last bin
    assert above == 2 and counts.sum() == 3
    assert counts[16] == 2 and counts[32] == 1  # |x| = 0.5 twice, |x| = 1 lands on bin 32's lower edge


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_values_exactly_on_bin_edges_count_into_the_bin_above(dtype: type) -> None:
    edges = (np.arange(BINS) / BINS * 4.0).astype(dtype)  # exact edges of 64 bins over [0, 4)
    values = np.concatenate([edges, -edges, np.nextafter(edges[1:], dtype(0.0))])  # and the next value below each
    counts, above = counted(values, BINS / 4.0)
    assert above == 0
    np.testing.assert_array_equal(counts, reference_counts(values, BINS / 4.0, BINS)[0])
    # each edge twice (+-) in its own bin, the largest value below each edge but the first once, in the bin below
    expected = np.full(BINS, 3)
    expected[-1] = 2
    np.testing.assert_array_equal(counts, expected)


def test_zeros_tiny_and_subnormal_values_count_into_bin_zero() -> None:
    tiny = np.array([0.0, -0.0, 1e-45, -1e-40, np.finfo(np.float32).tiny], np.float32)
    assert_counts_match(tiny, BINS / 8.0)
    counts, _ = counted(tiny, BINS / 8.0)
    assert counts[0] == tiny.size


def test_a_zero_scale_counts_every_finite_value_into_bin_zero() -> None:
    counts, above = counted(np.array([0.0, 3.0, np.nan, -np.inf], np.float32), 0.0)
    assert counts[0] == 2 and counts.sum() == 2 and above == 0


def test_a_huge_power_of_two_scale_stays_exact_for_float32() -> None:
    """A range of 2^-130 (float32 subnormals): the scale 2^136 overflows float32 but not the float64 product."""
    values = np.array([2.0**-131, 2.0**-133, 2.0**-140, 2.0**-149], np.float32)
    assert_counts_match(values, math.ldexp(BINS, 130))
    assert counted(values, math.ldexp(BINS, 130))[0][32] == 1


def test_counts_add_to_what_is_there_and_strided_input_is_read_as_it_is() -> None:
    values = np.random.default_rng(3).uniform(-1.0, 1.0, size=(40, 30)).astype(np.float32)
    counts = np.ones(BINS, np.int64)
    count_abs(values[:, ::3], float(BINS), counts)  # not contiguous: copied once, counted the same
    expected, _ = reference_counts(values[:, ::3].reshape(-1), float(BINS), BINS)
    np.testing.assert_array_equal(counts, expected + 1)


def test_without_a_writable_cache_folder_the_loop_is_compiled_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import numba
    import numba.core.caching

    from quant.calib import counting

    # numba finds no folder to cache in (package folder and user cache read-only): cache=True raises on decoration
    caching = numba.core.caching
    monkeypatch.setattr(getattr(caching, "CacheImpl", None) or caching._CacheImpl, "_locator_classes", [])  # renamed
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(reference_counts)
    compiled = counting._compiled(counting._count.py_func)
    counts = np.zeros(4, np.int64)
    assert compiled(np.array([0.5, 1.5, np.nan, 9.0], np.float32), 1.0, counts) == 2  # NaN and 9 skipped
    assert counts.tolist() == [1, 1, 0, 0]
