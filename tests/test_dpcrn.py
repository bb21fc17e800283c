"""DPCRN: size, shapes, causality, and streaming == offline frame by frame on real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quant.errors import ModelError
from quant.features import stft
from quant.data.audio import load_audio
from quant.models.dpcrn import (
    DPCRN,
    STREAM_STATES,
    DPCRNConfig,
    StreamingDPCRN,
    count_parameters,
    load_dpcrn,
)

DATA = Path(__file__).parent / "data"
REFERENCE_PARAMS = 787_150  # REFERENCE section 1: 787.15 k
STREAM_ATOL = 1e-4  # issue 2: streaming == offline within max abs error 1e-4

REFERENCE_STATES = [
    ("en_cache1", (1, 2, 1, 257)),
    ("en_cache2", (1, 32, 1, 129)),
    ("en_cache3", (1, 32, 1, 65)),
    ("en_cache4", (1, 32, 1, 33)),
    ("en_cache5", (1, 64, 1, 33)),
    ("rnn_cache1", (1, 33, 128)),
    ("rnn_cache2", (1, 33, 128)),
    ("rnn_cache3", (1, 33, 128)),
    ("rnn_cache4", (1, 33, 128)),
    ("de_cache1", (1, 256, 1, 33)),
    ("de_cache2", (1, 128, 1, 33)),
    ("de_cache3", (1, 64, 1, 33)),
    ("de_cache4", (1, 64, 1, 65)),
    ("de_cache5", (1, 64, 1, 129)),
]


def speech_spectrum(seconds: float) -> torch.Tensor:
    """(1, 257, T, 2) STFT of real LibriVox speech, concatenated until `seconds` are reached."""
    audio = np.concatenate([load_audio(f) for f in sorted(DATA.glob("librivox_*.flac"))])
    samples = int(seconds * 16000)
    assert audio.shape[0] >= samples
    return torch.from_numpy(stft(audio[:samples]))[None]


def roll_streaming(model: DPCRN, mix: torch.Tensor) -> torch.Tensor:
    stream = StreamingDPCRN.from_offline(model)
    states = stream.initial_states()
    frames = []
    with torch.no_grad():
        for t in range(mix.shape[2]):
            enh, *states = stream(mix[:, :, t : t + 1], *states)
            frames.append(enh)
    return torch.cat(frames, dim=2)


def test_parameter_count_matches_reference() -> None:
    params = count_parameters(DPCRN())
    assert abs(params - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.005, params


def test_stream_states_are_named_and_shaped_as_reference() -> None:
    assert STREAM_STATES == REFERENCE_STATES


def test_offline_keeps_shape_for_any_length_and_batch() -> None:
    model = DPCRN().eval()
    for batch, frames in ((1, 1), (2, 17)):
        with torch.no_grad():
            out = model(torch.randn(batch, 257, frames, 2))
        assert out.shape == (batch, 257, frames, 2)


def test_offline_is_causal() -> None:
    """Changing frames from t onward leaves every output frame before t unchanged."""
    torch.manual_seed(1)
    model = DPCRN().eval()
    mix = torch.randn(1, 257, 20, 2)
    changed = mix.clone()
    changed[:, :, 12:] = torch.randn(1, 257, 8, 2)
    with torch.no_grad():
        a, b = model(mix), model(changed)
    assert torch.equal(a[:, :, :12], b[:, :, :12])
    assert not torch.allclose(a[:, :, 12:], b[:, :, 12:])


def test_streaming_matches_offline_on_real_speech() -> None:
    """>= 5 s of real speech from zero states; holds for whatever weights load_dpcrn() finds."""
    model = load_dpcrn()
    mix = speech_spectrum(6.0)
    assert mix.shape[2] >= 5 * 16000 // 256
    with torch.no_grad():
        offline = model(mix)
    streamed = roll_streaming(model, mix)
    error = (offline - streamed).abs().max().item()
    assert error <= STREAM_ATOL, f"max abs error {error:.3g} (peak |enh| {offline.abs().max().item():.3g})"
    assert offline.abs().max().item() > 1.0  # the comparison is not between near-zero outputs


def test_streaming_matches_offline_with_non_trivial_batch_norm() -> None:
    """BatchNorm running statistics and PReLU slopes away from their init still stream exactly (float64)."""
    torch.manual_seed(2)
    model = DPCRN()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(0.0, 0.5)
    model = model.double().eval()
    mix = speech_spectrum(1.0).double()
    with torch.no_grad():
        offline = model(mix)
    assert (offline - roll_streaming(model, mix)).abs().max().item() < 1e-9


def test_streaming_shares_the_offline_weights() -> None:
    model = DPCRN().eval()
    stream = StreamingDPCRN.from_offline(model)
    assert {id(p) for p in stream.parameters()} == {id(p) for p in model.parameters()}


def test_load_dpcrn_round_trips_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = DPCRN()
    path = tmp_path / "dpcrn.pt"
    torch.save({"state_dict": model.state_dict(), "config": model.config.to_dict()}, path)
    loaded = load_dpcrn(path)
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_load_dpcrn_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such DPCRN checkpoint"):
        load_dpcrn(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable"):
        load_dpcrn(garbage)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "config": {}}, wrong)
    with pytest.raises(ModelError, match="do not fit"):
        load_dpcrn(wrong)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ModelError, match="unknown keys"):
        DPCRNConfig.from_dict({"channelz": [1]})
    assert DPCRNConfig.from_dict(DPCRNConfig().to_dict()) == DPCRNConfig()
