"""Kaldi fbank front end (kaldi-native-fbank), with the spec's bins, frame/shift, dither and input scale.

With the reference parameters (80 bins, 25/10 ms, dither 0, scale 2^15, snip edges) this is the computation of
quant.features.fbank, call for call, so WeNet feeds stay bit-for-bit what they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.errors import ModelError
from quant.frontends.framing import as_batch, to_layout
from quant.spec import FrontendSpec


def fbank(audio: np.ndarray, spec: FrontendSpec) -> np.ndarray:
    """(samples,) in [-1, 1] -> (T, bins) float32 log-mel filterbank."""
    import kaldi_native_fbank as knf  # imported here: STFT users need not install it

    params = spec.fbank
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = spec.sample_rate
    opts.frame_opts.frame_length_ms = params.frame_ms
    opts.frame_opts.frame_shift_ms = params.shift_ms
    opts.frame_opts.dither = params.dither
    opts.frame_opts.snip_edges = params.snip_edges
    opts.mel_opts.num_bins = params.bins
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(spec.sample_rate, (np.asarray(audio, dtype=np.float32) * params.scale).tolist())
    computer.input_finished()
    count = computer.num_frames_ready
    if count == 0:
        return np.zeros((0, params.bins), dtype=np.float32)
    return np.stack([computer.get_frame(i) for i in range(count)]).astype(np.float32)


@dataclass(frozen=True)
class FbankFrontend:
    spec: FrontendSpec
    natural: str = "BTF"

    def frames(self, samples: int) -> int:
        return self.spec.frames(samples)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        batch = np.stack([fbank(wave, self.spec) for wave in as_batch(waveform)])
        return to_layout(batch, self.natural, self.spec.axes)

    def inverse(self, values: np.ndarray, length: int, phase: np.ndarray | None = None) -> np.ndarray:
        raise ModelError("Kaldi fbank features cannot be turned back into a waveform")
