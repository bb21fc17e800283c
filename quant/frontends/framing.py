"""Framing, windows, overlap-add and axis layouts shared by every front end (numpy/scipy only)."""

from __future__ import annotations

import numpy as np
import scipy.signal

from quant.errors import ModelError


def window(kind: str, frame: int, size: int | None = None) -> np.ndarray:
    """Analysis window of `frame` samples (float64), zero-padded to `size` on both sides as torch.stft does.

    hann: periodic Hann; sqrt_hann: its square root (analysis x synthesis = Hann); sine: sin(pi (n + 1/2) / frame),
    the MDCT window (sine^2 overlaps to 1 at half overlap); none: rectangular.
    """
    if kind == "none":
        values = np.ones(frame)
    elif kind in ("hann", "sqrt_hann"):
        values = scipy.signal.get_window("hann", frame, fftbins=True)
        values = np.sqrt(values) if kind == "sqrt_hann" else values
    elif kind == "sine":
        values = scipy.signal.get_window("cosine", frame, fftbins=False)
    else:
        raise ModelError(f"unknown window {kind!r}; expected none, hann, sqrt_hann or sine")
    total = size or frame
    left = (total - frame) // 2
    return np.pad(values, (left, total - frame - left))


def frame_signal(wave: np.ndarray, length: int, hop: int, center: bool, pad_mode: str) -> np.ndarray:
    """(B, samples) -> (B, T, length) frames every `hop` samples; center pads length // 2 on both sides first."""
    if center:
        mode = "constant" if pad_mode == "constant" else "reflect"
        wave = np.pad(wave, ((0, 0), (length // 2, length // 2)), mode=mode)  # type: ignore[call-overload]
    if wave.shape[-1] < length:
        raise ModelError(f"audio of {wave.shape[-1]} samples is shorter than one frame ({length} samples)")
    frames = np.lib.stride_tricks.sliding_window_view(wave, length, axis=-1)[:, ::hop, :]
    return np.asarray(frames)


def overlap_add(frames: np.ndarray, window_values: np.ndarray, hop: int, center: bool, length: int) -> np.ndarray:
    """Least-squares inverse of windowed framing: (B, T, L) frames (already multiplied by the synthesis window)
    -> (B, length) samples, divided by the summed squared window (as torch.istft does). Samples no window reaches (the
    tail past the last uncentred frame, a Hann window's zero at the very start) come back as zeros."""
    batch, count, size = frames.shape
    total = size + hop * (count - 1)
    signal = np.zeros((batch, total))
    weight = np.zeros(total)
    for index in range(count):
        signal[:, index * hop : index * hop + size] += frames[:, index]
        weight[index * hop : index * hop + size] += window_values**2
    covered = weight > 1e-10
    if not np.all(covered[size:-size]):  # away from the ends every sample must be covered (NOLA)
        raise ModelError(f"overlap-add cannot invert these frames: windows of {size} samples every {hop} leave "
                         "samples with zero weight (choose a hop/window pair that satisfies NOLA)")
    signal = np.where(covered, signal / np.where(covered, weight, 1.0), 0.0)  # uncovered ends (window zeros): 0
    offset = size // 2 if center else 0
    out = np.zeros((batch, length))
    kept = signal[:, offset : offset + length]
    out[:, : kept.shape[-1]] = kept
    return out


def to_layout(values: np.ndarray, natural: str, axes: str) -> np.ndarray:
    """Transpose from the transform's natural axis order to the spec's layout; a C the transform lacks is size 1."""
    if "C" in axes and "C" not in natural:
        values, natural = values[..., None], natural + "C"
    return np.ascontiguousarray(values.transpose([natural.index(axis) for axis in axes]))


def from_layout(values: np.ndarray, natural: str, axes: str) -> np.ndarray:
    """The inverse of to_layout."""
    order = natural + "C" if "C" in axes and "C" not in natural else natural
    values = values.transpose([axes.index(axis) for axis in order])
    return values[..., 0] if order != natural else values


def as_batch(waveform: np.ndarray) -> np.ndarray:
    """(samples,) or (B, samples) -> (B, samples) float64."""
    wave = np.asarray(waveform, dtype=np.float64)
    if wave.ndim not in (1, 2):
        raise ModelError(f"expected a waveform (samples,) or a batch (B, samples), got shape {list(wave.shape)}")
    return wave[None] if wave.ndim == 1 else wave
