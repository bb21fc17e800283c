"""A model output -> the enhanced waveform, as the spec's [output] says (kind, layout) with the front end's inverse.

- spectrum: the enhanced features themselves (complex STFT; magnitude-type features take the noisy phase)
- mask_magnitude: mask x |noisy STFT|, with the noisy phase
- mask_complex: (re, im) mask x noisy STFT, complex multiplication
- time_frames: frames overlap-added at the front end's hop (least squares, the front end's window)
- waveform: the samples, cut to the input length
"""

from __future__ import annotations

import numpy as np

from quant.errors import ModelError
from quant.frontends import Frontend
from quant.frontends.framing import as_batch, from_layout, overlap_add, window
from quant.frontends.spectral import SpectralFrontend, istft
from quant.spec import SPECTRAL, OutputSpec


def output_axes(output: OutputSpec, fe: Frontend) -> str:
    """The output's layout letters: output.layout, else the front end's (a magnitude mask without C)."""
    if output.layout:
        return "".join(output.layout.split())
    axes = fe.spec.axes
    return axes.replace("C", "") if output.kind == "mask_magnitude" and fe.spec.transform == "stft" else axes


def to_waveform(output: OutputSpec, fe: Frontend, values: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """(B, samples) float32 enhanced audio from the model output `values` and the noisy input it was fed."""
    noisy = as_batch(noisy)
    length = noisy.shape[-1]
    if output.kind == "waveform":
        return from_layout(np.asarray(values, np.float32), "BS", output_axes(output, fe))[:, :length]
    if output.kind == "time_frames":
        spec = fe.spec
        win = window(spec.window, spec.frame, spec.fft_size)
        frames = from_layout(np.asarray(values, np.float64), "BTS", output_axes(output, fe)) * win
        return overlap_add(frames, win, spec.hop, spec.center, length).astype(np.float32)
    if fe.spec.transform not in SPECTRAL or not isinstance(fe, SpectralFrontend):
        raise ModelError(f"output kind {output.kind!r} needs an STFT-family front end, not {fe.spec.transform!r}")
    return _spectral(output, fe, np.asarray(values, np.float64), noisy, length)


def _spectral(output: OutputSpec, fe: SpectralFrontend, values: np.ndarray, noisy: np.ndarray,
              length: int) -> np.ndarray:
    axes = output_axes(output, fe)
    reference = fe.complex(noisy)  # (B, F, T)
    if output.kind == "spectrum":
        if axes != fe.spec.axes:
            raise ModelError(f"output {output.name!r}: a spectrum comes back in the front end's layout {fe.spec.axes}")
        return fe.inverse(values, length, phase=np.angle(reference))
    if output.kind == "mask_magnitude":
        mask = from_layout(values, "BFT", axes)
        enhanced = mask * reference
    else:
        pair = from_layout(values, "BFTC", axes)
        enhanced = (pair[..., 0] + 1j * pair[..., 1]) * reference
    return istft(enhanced, fe.spec, length).astype(np.float32)
