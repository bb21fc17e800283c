"""Front ends: waveform -> model input features, one implementation per transform of a spec's [frontend].

    fe = frontend(spec.frontend)          # quant.spec.FrontendSpec -> a Frontend
    x = fe.features(waveform)             # (samples,) or (B, samples) -> features in the spec's layout (float32)
    batch, lengths = pad_batch(fe, clips) # utterances of different lengths, zero-padded along T
    wave = fe.inverse(x, length)          # back to (B, length) samples where the transform allows it

Calibration readers and task evaluation both take their features from here, so a model sees the same numbers in
both. The registry is keyed by the spec's transform name (quant.spec.Transform).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from quant.errors import ModelError
from quant.frontends.fbank import FbankFrontend
from quant.frontends.frames import FramesFrontend, WaveformFrontend
from quant.frontends.framing import from_layout, to_layout
from quant.frontends.spectral import SpectralFrontend
from quant.spec import FrontendSpec


class Frontend(Protocol):
    @property
    def spec(self) -> FrontendSpec: ...

    @property
    def natural(self) -> str:
        """The transform's own axis order (letters as in a layout) before the spec's layout is applied."""

    def frames(self, samples: int) -> int: ...

    def features(self, waveform: np.ndarray) -> np.ndarray: ...

    def inverse(self, values: np.ndarray, length: int, phase: np.ndarray | None = None) -> np.ndarray: ...


FRONTENDS: Mapping[str, Callable[[FrontendSpec], Frontend]] = {
    "stft": SpectralFrontend, "magnitude": SpectralFrontend, "power": SpectralFrontend,
    "log10_power": SpectralFrontend, "fbank": FbankFrontend, "waveform_frames": FramesFrontend,
    "waveform": WaveformFrontend,
}


def frontend(spec: FrontendSpec) -> Frontend:
    """The front end of a spec's [frontend] table."""
    if spec.transform not in FRONTENDS:
        raise ModelError(f"no front end for transform {spec.transform!r}; known: {', '.join(FRONTENDS)}")
    return FRONTENDS[spec.transform](spec)


def pad_batch(fe: Frontend, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Features of each utterance, zero-padded along T to the longest (B, ...) in the spec's layout, and the
    int32 frame counts (B,). Each utterance's features do not depend on what else is in the batch."""
    natural = [from_layout(fe.features(clip), fe.natural, fe.spec.axes)[0] for clip in clips]
    time_axis = fe.natural.index("S" if fe.natural == "BS" else "T") - 1
    lengths = np.array([values.shape[time_axis] for values in natural], dtype=np.int32)
    longest = int(lengths.max(initial=0))
    padded = [np.pad(v, [(0, longest - v.shape[a]) if a == time_axis else (0, 0) for a in range(v.ndim)])
              for v in natural]
    return to_layout(np.stack(padded), fe.natural, fe.spec.axes), lengths


__all__ = ["FRONTENDS", "Frontend", "frontend", "pad_batch"]
