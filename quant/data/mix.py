"""Deterministic speech + noise mixing at a given SNR, loudness-normalized, never clipping.

SNR is the ratio of clean to noise energy over the whole utterance. The clean speech is first brought to
`target_dbfs` RMS; if the mixture would then exceed `peak_limit`, clean and noise are scaled down together, which
keeps the SNR exact.
"""

from __future__ import annotations

import numpy as np

TARGET_DBFS = -25.0
PEAK_LIMIT = 0.99
_EPS = 1e-12


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (1.0); -inf-safe (silence gives about -240 dB)."""
    power = float(np.mean(np.square(samples.astype(np.float64)))) if len(samples) else 0.0
    return 10.0 * np.log10(power + 1e-24)


def loop_noise(noise: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """`length` samples of `noise` starting at `offset` (mod its length), looping as often as needed."""
    if len(noise) == 0:
        raise ValueError("noise clip is empty; expected at least one sample")
    start = offset % len(noise)
    repeats = (start + length) // len(noise) + 1
    return np.tile(noise, repeats)[start : start + length].astype(np.float32)


def snr_db(clean: np.ndarray, noise: np.ndarray) -> float:
    """Measured SNR of two aligned signals, in dB."""
    clean_power = float(np.sum(np.square(clean.astype(np.float64))))
    noise_power = float(np.sum(np.square(noise.astype(np.float64))))
    return 10.0 * np.log10((clean_power + _EPS) / (noise_power + _EPS))


def mix_at_snr(
    clean: np.ndarray,
    noise: np.ndarray,
    snr: float,
    target_dbfs: float = TARGET_DBFS,
    peak_limit: float = PEAK_LIMIT,
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) float32: clean at target_dbfs, noise scaled to `snr` dB below it, jointly limited to peak_limit.

    `noise` must already have the clean signal's length (see loop_noise).
    """
    if len(noise) != len(clean):
        raise ValueError(f"noise has {len(noise)} samples, clean has {len(clean)}; loop or cut the noise first")
    clean64 = clean.astype(np.float64)
    clean64 = clean64 * 10.0 ** ((target_dbfs - rms_dbfs(clean64)) / 20.0)
    noise64 = noise.astype(np.float64)
    noise_gain = np.sqrt(np.sum(clean64**2) / (np.sum(noise64**2) + _EPS) / 10.0 ** (snr / 10.0))
    noise64 = noise64 * noise_gain
    noisy = clean64 + noise64
    peak = float(np.max(np.abs(noisy))) if len(noisy) else 0.0
    if peak > peak_limit:
        scale = peak_limit / peak
        noisy, clean64 = noisy * scale, clean64 * scale
    return noisy.astype(np.float32), clean64.astype(np.float32)
