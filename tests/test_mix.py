"""SNR mixing: exact SNR, loudness target, no clipping, deterministic looping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.data.mix import loop_noise, mix_at_snr, rms_dbfs, snr_db


def _signals(seed: int, length: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000
    clean = (np.sin(2 * np.pi * 220 * t) * np.hanning(length)).astype(np.float32)
    return clean, rng.standard_normal(length).astype(np.float32) * 0.1


@settings(max_examples=25, deadline=None)
@given(snr=st.floats(-10.0, 30.0), seed=st.integers(0, 1000))
def test_mixture_has_requested_snr(snr: float, seed: int) -> None:
    clean, noise = _signals(seed)
    noisy, clean_out = mix_at_snr(clean, noise, snr)
    assert abs(snr_db(clean_out, noisy - clean_out) - snr) < 0.01
    assert float(np.abs(noisy).max()) <= 0.99 + 1e-6


def test_clean_normalized_to_target_when_no_limiting() -> None:
    clean, noise = _signals(1)
    _noisy, clean_out = mix_at_snr(clean, noise, 20.0, target_dbfs=-30.0)
    assert abs(rms_dbfs(clean_out) - (-30.0)) < 0.01


def test_loud_mixture_scaled_down_together_keeping_snr() -> None:
    clean, noise = _signals(2)
    noisy, clean_out = mix_at_snr(clean, noise, -5.0, target_dbfs=-3.0)
    assert float(np.abs(noisy).max()) == pytest.approx(0.99, abs=1e-5)
    assert abs(snr_db(clean_out, noisy - clean_out) + 5.0) < 0.01
    assert rms_dbfs(clean_out) < -3.0


def test_loop_noise_wraps_from_offset() -> None:
    noise = np.arange(5, dtype=np.float32)
    assert loop_noise(noise, 7, offset=3).tolist() == [3, 4, 0, 1, 2, 3, 4]
    assert loop_noise(noise, 2, offset=12).tolist() == [2, 3]
    with pytest.raises(ValueError, match="empty"):
        loop_noise(np.zeros(0, np.float32), 3)


def test_length_mismatch_rejected() -> None:
    clean, noise = _signals(3)
    with pytest.raises(ValueError, match="loop or cut"):
        mix_at_snr(clean, noise[:-1], 0.0)
