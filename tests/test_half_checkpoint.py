"""scripts/half_checkpoint.py: a float16 copy of a training checkpoint that --init loads into float32."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from quant.models.conformer import Conformer, ConformerConfig, checkpoint_dict, load_conformer
from quant.models.tokenizer import read_units

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import half_checkpoint  # noqa: E402

TINY = ConformerConfig(d_model=32, heads=2, ffn_dim=64, encoder_blocks=2, decoder_blocks=1, decoder_ffn_dim=64)


def test_half_checkpoint_loads_as_float32_weights_within_float16_rounding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Conformer(TINY)
    model.set_cmvn(torch.randn(80), torch.rand(80) + 0.5)
    torch.save(checkpoint_dict(model, read_units()), tmp_path / "full.pt")
    assert half_checkpoint.main([str(tmp_path / "full.pt"), "-o", str(tmp_path / "half.pt")]) == 0
    saved = torch.load(tmp_path / "half.pt", weights_only=True)
    floats = [t for t in saved["state_dict"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    loaded = load_conformer(tmp_path / "half.pt")
    for name, tensor in loaded.state_dict().items():
        original = model.state_dict()[name]
        assert tensor.dtype == original.dtype, name  # float32 parameters again, integer counters untouched
        if tensor.is_floating_point():
            assert torch.allclose(tensor, original, rtol=2**-10, atol=1e-7), name
        else:
            assert torch.equal(tensor, original), name


def test_half_checkpoint_of_a_non_checkpoint_is_one_line_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert half_checkpoint.main([str(tmp_path / "junk.pt"), "-o", str(tmp_path / "out.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()
