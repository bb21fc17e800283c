"""The one implementation of the signal features that training, calibration and evaluation share.

- STFT: 16 kHz, n_fft 512, hop 256, sqrt-Hann window, centered framing, so frames = samples // HOP + 1
  (9 s = 144000 samples -> 563 frames, the offline DPCRN's fixed T). Layout (B, 257, T, 2): real/imag last.
- Kaldi fbank: 80 mel bins, 25 ms / 10 ms, dither 0, waveform scaled by 2^15 (WeNet's convention),
  computed by kaldi-native-fbank.
"""

from __future__ import annotations

from typing import Sequence, overload

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
HOP = N_FFT // 2
FREQ_BINS = N_FFT // 2 + 1  # 257
SEGMENT_SECONDS = 9
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE  # 144000
SEGMENT_FRAMES = SEGMENT_SAMPLES // HOP + 1  # 563
FRAME_MS = 1000 * HOP / SAMPLE_RATE  # 16 ms of new audio per streaming frame

FBANK_BINS = 80
FBANK_FRAME_MS = 25.0
FBANK_SHIFT_MS = 10.0
FBANK_SCALE = 32768.0  # WeNet feeds int16-range samples to Kaldi fbank


def frames_for(samples: int) -> int:
    return samples // HOP + 1


def _window(device: torch.device | str) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, device=device).sqrt()


@overload
def stft(audio: np.ndarray) -> np.ndarray: ...
@overload
def stft(audio: torch.Tensor) -> torch.Tensor: ...
def stft(audio: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(samples,) or (B, samples) -> (257, T, 2) or (B, 257, T, 2), float32, same library as the input."""
    as_numpy = isinstance(audio, np.ndarray)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)) if isinstance(audio, np.ndarray) else audio
    spec = torch.stft(
        wave, N_FFT, HOP, N_FFT, window=_window(wave.device), center=True, pad_mode="constant", return_complex=True
    )
    spec = torch.view_as_real(spec)
    return spec.numpy() if as_numpy else spec


@overload
def istft(spec: np.ndarray, length: int) -> np.ndarray: ...
@overload
def istft(spec: torch.Tensor, length: int) -> torch.Tensor: ...
def istft(spec: np.ndarray | torch.Tensor, length: int) -> np.ndarray | torch.Tensor:
    """Inverse of stft: (..., 257, T, 2) -> (..., length) samples."""
    as_numpy = isinstance(spec, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(spec, dtype=np.float32)) if isinstance(spec, np.ndarray) else spec
    complex_spec = torch.view_as_complex(tensor.contiguous())
    wave = torch.istft(complex_spec, N_FFT, HOP, N_FFT, window=_window(tensor.device), center=True, length=length)
    return wave.numpy() if as_numpy else wave


def fbank(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(samples,) float in [-1, 1] -> (frames, 80) float32 log-mel filterbank, Kaldi-compatible."""
    import kaldi_native_fbank as knf  # imported here so STFT users (GPU training boxes) need not install it

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.frame_length_ms = FBANK_FRAME_MS
    opts.frame_opts.frame_shift_ms = FBANK_SHIFT_MS
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = FBANK_BINS
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(sample_rate, (np.asarray(audio, dtype=np.float32) * FBANK_SCALE).tolist())
    computer.input_finished()
    frames = computer.num_frames_ready
    if frames == 0:
        return np.zeros((0, FBANK_BINS), dtype=np.float32)
    return np.stack([computer.get_frame(i) for i in range(frames)]).astype(np.float32)


def pad_features(features: Sequence[np.ndarray], pad_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Batch variable-length (T_i, D) features into (B, max T, D) plus int32 lengths (B,)."""
    lengths = np.array([f.shape[0] for f in features], dtype=np.int32)
    width = features[0].shape[1]
    batch = np.full((len(features), int(lengths.max(initial=0)), width), pad_value, dtype=np.float32)
    for row, feat in enumerate(features):
        batch[row, : feat.shape[0]] = feat
    return batch, lengths


def batch_fbank(audios: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """fbank of each utterance, padded: (B, T, 80) float32 and lengths (B,) int32."""
    return pad_features([fbank(a, sample_rate) for a in audios])
