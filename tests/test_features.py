import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quant import features as F
from quant.data.audio import load_audio

DATA = Path(__file__).parent / "data"


def _real_speech() -> np.ndarray:
    return np.concatenate([load_audio(DATA / json.loads(line)["path"]) for line in open(DATA / "librivox.jsonl")])


def test_nine_seconds_is_563_frames() -> None:
    assert F.SEGMENT_FRAMES == 563
    assert F.stft(np.zeros(F.SEGMENT_SAMPLES, dtype=np.float32)).shape == (257, 563, 2)


def test_istft_reconstructs_real_speech_above_60_db() -> None:
    speech = _real_speech()
    rebuilt = F.istft(F.stft(speech), len(speech))
    snr_db = 10 * np.log10(np.sum(speech**2) / np.sum((speech - rebuilt) ** 2))
    assert snr_db > 60, snr_db


def test_stft_numpy_and_torch_agree_and_batch() -> None:
    speech = _real_speech()[: 3 * F.SAMPLE_RATE]
    batch = np.stack([speech, speech[::-1].copy()])
    spec_np = F.stft(batch)
    spec_torch = F.stft(torch.from_numpy(batch))
    assert spec_np.shape == (2, 257, F.frames_for(len(speech)), 2)
    np.testing.assert_allclose(spec_np, spec_torch.numpy(), atol=1e-6)
    np.testing.assert_allclose(F.stft(speech), spec_np[0], atol=1e-6)


def test_fbank_shape_and_kaldi_scaling() -> None:
    speech = _real_speech()[: F.SAMPLE_RATE]
    feats = F.fbank(speech)
    # snip_edges: 1 + (16000 - 400) // 160 frames of 80 bins
    assert feats.shape == (1 + (16000 - 400) // 160, 80)
    # 2^15 scaling: a quiet-but-real signal has log-mel energies well above the float-scale level
    assert feats.mean() > F.fbank(speech / F.FBANK_SCALE).mean() + 15


def test_batch_fbank_pads_and_reports_lengths() -> None:
    speech = _real_speech()
    feats, lengths = F.batch_fbank([speech[:8000], speech[:16000]])
    assert feats.shape[0] == 2 and feats.shape[2] == 80
    assert lengths.dtype == np.int32 and list(lengths) == [48, 98]
    assert np.all(feats[0, 48:] == 0)
    np.testing.assert_allclose(feats[1, :98], F.fbank(speech[:16000]))


@pytest.mark.parametrize("samples", [0, 100])
def test_fbank_of_too_short_audio_is_empty(samples: int) -> None:
    assert F.fbank(np.zeros(samples, dtype=np.float32)).shape == (0, 80)
