"""STFT-family front ends: complex STFT (re/im), magnitude, power and log10 power.

The reference STFT (16 kHz, 512/256, periodic sqrt-Hann, centred, zero padding) is quant.features.stft itself, so the
reference models' feeds stay bit-for-bit what they were; every other framing is the numpy STFT below (same definition:
frames of n_fft samples every hop, the frame-long window centred in n_fft, rfft), inverted by least-squares
overlap-add (quant.frontends.framing.overlap_add, as torch.istft).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant import features as reference
from quant.errors import ModelError
from quant.frontends.framing import as_batch, frame_signal, from_layout, overlap_add, to_layout, window
from quant.spec import FrontendSpec


def is_reference(spec: FrontendSpec) -> bool:
    """True when the framing is quant.features' STFT exactly."""
    return (spec.sample_rate, spec.fft_size, spec.frame, spec.hop, spec.window, spec.center, spec.pad_mode) == (
        reference.SAMPLE_RATE, reference.N_FFT, reference.N_FFT, reference.HOP, "sqrt_hann", True, "constant")


def stft(wave: np.ndarray, spec: FrontendSpec) -> np.ndarray:
    """(B, samples) -> complex (B, F, T)."""
    if is_reference(spec):
        pair = reference.stft(wave.astype(np.float32))
        return pair[..., 0] + 1j * pair[..., 1]
    frames = frame_signal(wave, spec.fft_size, spec.hop, spec.center, spec.pad_mode)
    spectrum = np.fft.rfft(frames * window(spec.window, spec.frame, spec.fft_size), axis=-1)
    return np.swapaxes(spectrum, 1, 2)


def istft(spectrum: np.ndarray, spec: FrontendSpec, length: int) -> np.ndarray:
    """complex (B, F, T) -> (B, length) samples."""
    if is_reference(spec):
        pair = np.stack([spectrum.real, spectrum.imag], axis=-1).astype(np.float32)
        return np.asarray(reference.istft(pair, length), dtype=np.float64)
    win = window(spec.window, spec.frame, spec.fft_size)
    frames = np.fft.irfft(np.swapaxes(spectrum, 1, 2), n=spec.fft_size, axis=-1) * win
    return overlap_add(frames, win, spec.hop, spec.center, length)


@dataclass(frozen=True)
class SpectralFrontend:
    """features(): the spec's transform of the STFT, in the spec's layout; inverse() where the transform keeps
    the phase (stft) or, for magnitude-type features, with the phase of a reference waveform (inverse_with_phase)."""

    spec: FrontendSpec

    @property
    def natural(self) -> str:
        return "BFTC" if self.spec.transform == "stft" else "BFT"

    def frames(self, samples: int) -> int:
        return self.spec.frames(samples)

    def complex(self, waveform: np.ndarray) -> np.ndarray:
        return stft(as_batch(waveform), self.spec)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        return to_layout(self.from_complex(self.complex(waveform)).astype(np.float32), self.natural, self.spec.axes)

    def from_complex(self, spectrum: np.ndarray) -> np.ndarray:
        transform = self.spec.transform
        if transform == "stft":
            return np.stack([spectrum.real, spectrum.imag], axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        if transform == "magnitude":
            return np.sqrt(power)
        if transform == "power":
            return power
        return np.log10(power + self.spec.log_floor)

    def to_complex(self, values: np.ndarray, phase: np.ndarray | None = None) -> np.ndarray:
        """Model-layout features -> complex (B, F, T); magnitude-type features take `phase` (B, F, T) radians."""
        natural = from_layout(np.asarray(values, dtype=np.float64), self.natural, self.spec.axes)
        if self.spec.transform == "stft":
            return natural[..., 0] + 1j * natural[..., 1]
        if phase is None:
            raise ModelError(f"{self.spec.transform} features have no phase; invert them with a reference phase")
        return self._magnitude(natural) * np.exp(1j * phase)

    def _magnitude(self, values: np.ndarray) -> np.ndarray:
        if self.spec.transform == "power":
            return np.sqrt(values)
        if self.spec.transform == "log10_power":
            return np.sqrt(np.maximum(10.0**values - self.spec.log_floor, 0.0))
        return values

    def inverse(self, values: np.ndarray, length: int, phase: np.ndarray | None = None) -> np.ndarray:
        """Features (the spec's layout) -> (B, length) float32 waveform."""
        return istft(self.to_complex(values, phase), self.spec, length).astype(np.float32)
