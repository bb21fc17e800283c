"""Time-domain front ends: raw frames (B, T, frame), windowed by the spec's window, and the plain waveform (B, S)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.frontends.framing import as_batch, frame_signal, from_layout, overlap_add, to_layout, window
from quant.spec import FrontendSpec


@dataclass(frozen=True)
class FramesFrontend:
    """waveform_frames: `frame` samples every `hop`, times the window; inverse = least-squares overlap-add."""

    spec: FrontendSpec
    natural: str = "BTS"

    def frames(self, samples: int) -> int:
        return self.spec.frames(samples)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        spec = self.spec
        frames = frame_signal(as_batch(waveform), spec.fft_size, spec.hop, spec.center, spec.pad_mode)
        windowed = frames * window(spec.window, spec.frame, spec.fft_size)
        return to_layout(windowed.astype(np.float32), self.natural, spec.axes)

    def inverse(self, values: np.ndarray, length: int, phase: np.ndarray | None = None) -> np.ndarray:
        spec = self.spec
        win = window(spec.window, spec.frame, spec.fft_size)
        frames = from_layout(np.asarray(values, dtype=np.float64), self.natural, spec.axes) * win
        return overlap_add(frames, win, spec.hop, spec.center, length).astype(np.float32)


@dataclass(frozen=True)
class WaveformFrontend:
    """waveform: the samples themselves, (B, S)."""

    spec: FrontendSpec
    natural: str = "BS"

    def frames(self, samples: int) -> int:
        return samples

    def features(self, waveform: np.ndarray) -> np.ndarray:
        return to_layout(as_batch(waveform).astype(np.float32), self.natural, self.spec.axes)

    def inverse(self, values: np.ndarray, length: int, phase: np.ndarray | None = None) -> np.ndarray:
        wave = from_layout(np.asarray(values, dtype=np.float32), self.natural, self.spec.axes)
        return np.ascontiguousarray(wave[:, :length])
