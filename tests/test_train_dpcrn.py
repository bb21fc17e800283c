"""scripts/train_dpcrn.py: pack checks, on-the-fly mixing, loss, one learning check, and a CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from quant.data.audio import load_audio
from quant.models.dpcrn import load_dpcrn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_dpcrn.py"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def train_dpcrn() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_dpcrn", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_dpcrn"] = module
    spec.loader.exec_module(module)
    return module


def _concat(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0, *(len(c) for c in clips)]).astype(np.int64)
    return np.concatenate(clips).astype(np.int16), offsets


def write_tiny_pack(path: Path) -> Path:
    """Real LibriVox speech (2 train clips, 1 val clip) and synthetic noise (seeded), in the pack's layout."""
    rng = np.random.default_rng(0)
    speech = [(load_audio(f) * 32767).astype(np.int16) for f in sorted(DATA.glob("librivox_*.flac"))[:3]]
    noise = [(rng.standard_normal(8000) * 3000).astype(np.int16) for _ in range(3)]
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({"kind": "tiny test pack"}))}
    parts = {"speech": speech[:2], "noise": noise[:2], "val_speech": speech[2:], "val_noise": noise[2:]}
    for name, clips in parts.items():
        arrays[name], arrays[f"{name}_offsets"] = _concat(clips)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_mixing_hits_the_asked_snr_and_level(train_dpcrn: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    speech = torch.randn(4, 16000, generator=generator) * 0.1
    noise = torch.randn(4, 16000, generator=generator) * 0.3
    snr = torch.tensor([-5.0, 0.0, 10.0, 20.0])
    level = torch.tensor([-35.0, -25.0, -20.0, -15.0])
    mixture, clean = train_dpcrn.mix_at(speech, noise, snr, level)
    measured_snr = 10 * torch.log10(clean.pow(2).sum(-1) / (mixture - clean).pow(2).sum(-1))
    measured_level = 20 * torch.log10(clean.pow(2).mean(-1).sqrt())
    assert torch.allclose(measured_snr, snr, atol=0.01)
    assert torch.allclose(measured_level, level, atol=0.01)


def test_mixing_scales_down_instead_of_clipping(train_dpcrn: ModuleType) -> None:
    speech = torch.ones(1, 1000) * 0.9
    mixture, clean = train_dpcrn.mix_at(speech, torch.ones(1, 1000), torch.tensor([0.0]), torch.tensor([0.0]))
    assert mixture.abs().max() <= 0.99 + 1e-6
    assert torch.allclose(mixture, 2 * clean)


def test_loss_is_zero_only_for_the_target_and_si_sdr_matches_snr(train_dpcrn: ModuleType) -> None:
    generator = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 257, 10, 2, generator=generator)
    assert train_dpcrn.compressed_spectral_loss(ref, ref).item() < 1e-10
    assert train_dpcrn.compressed_spectral_loss(ref * 0.5, ref).item() > 0.1
    clean = torch.randn(1, 16000, generator=generator)
    noise = torch.randn(1, 16000, generator=generator)
    noise = noise - (noise * clean).sum() / clean.pow(2).sum() * clean  # orthogonal to the clean signal
    noise = noise * clean.norm() / noise.norm() / 10 ** (10 / 20)  # 10 dB below
    assert abs(train_dpcrn.si_sdr_db(3 * (clean + noise), clean).item() - 10.0) < 0.05


def test_pack_errors_name_the_problem(train_dpcrn: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such pack"):
        train_dpcrn.load_pack(tmp_path / "none.npz", torch.device("cpu"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, speech=np.zeros(1000, np.int16), speech_offsets=np.array([0, 1000]))
    with pytest.raises(SystemExit, match="missing arrays"):
        train_dpcrn.load_pack(bad, torch.device("cpu"))
    pack = write_tiny_pack(tmp_path / "tiny.npz")
    arrays = dict(np.load(pack))
    arrays["noise_offsets"] = arrays["noise_offsets"][::-1]
    np.savez(bad, **arrays)
    with pytest.raises(SystemExit, match="noise_offsets"):
        train_dpcrn.load_pack(bad, torch.device("cpu"))


def test_pack_arrays_may_be_stored_as_ogg_vorbis(train_dpcrn: ModuleType, tmp_path: Path) -> None:
    import io

    import soundfile

    arrays = dict(np.load(write_tiny_pack(tmp_path / "tiny.npz")))
    buffer = io.BytesIO()
    soundfile.write(buffer, arrays.pop("speech"), 16000, format="OGG", subtype="VORBIS")
    arrays["speech_ogg"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    np.savez(tmp_path / "ogg.npz", **arrays)  # type: ignore[arg-type]
    pack = train_dpcrn.load_pack(tmp_path / "ogg.npz", torch.device("cpu"))
    assert pack.speech.dtype == torch.int16 and pack.speech.numel() == arrays["speech_offsets"][-1]
    assert torch.equal(pack.noise, torch.from_numpy(arrays["noise"]))


def test_training_steps_reduce_the_loss_on_a_fixed_batch(train_dpcrn: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    opts = train_dpcrn.TrainOptions(crop_seconds=0.25, batch=2, device="cpu")
    pack = train_dpcrn.load_pack(write_tiny_pack(tmp_path / "tiny.npz"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batch = train_dpcrn.Batch(*train_dpcrn.mixtures(pack.speech, pack.noise, 2, opts, generator))
    trainer = train_dpcrn.Trainer(train_dpcrn.DPCRN(), opts)
    losses = [trainer.step(batch, lr=1e-3) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


def test_cosine_schedule_runs_from_lr_to_the_floor(train_dpcrn: ModuleType) -> None:
    opts = train_dpcrn.TrainOptions(lr=1e-3, lr_floor=0.05)
    assert train_dpcrn.cosine_lr(opts, 0.0) == pytest.approx(1e-3)
    assert train_dpcrn.cosine_lr(opts, 1.0) == pytest.approx(5e-5)
    assert train_dpcrn.cosine_lr(opts, 0.3) > train_dpcrn.cosine_lr(opts, 0.6)


def test_smoke_run_writes_a_loadable_checkpoint_and_its_numbers(train_dpcrn: ModuleType, tmp_path: Path) -> None:
    pack = write_tiny_pack(tmp_path / "tiny.npz")
    out = tmp_path / "assets" / "dpcrn.pt"
    assert train_dpcrn.main(["--pack", str(pack), "--smoke", "--out", str(out)]) == 0
    model = load_dpcrn(out)
    assert not model.training
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["config"] == model.config.to_dict()
    summary = json.loads((tmp_path / "assets" / "dpcrn_train.json").read_text())
    assert summary["epochs_run"] == 2 and summary["steps"] == 4 and len(summary["history"]) == 2
    for record in summary["history"]:
        for key in ("train_loss", "val_spectral_loss", "val_si_sdr_noisy_db", "val_si_sdri_db", "lr"):
            assert np.isfinite(record[key]), key
    assert summary["best"]["val_si_sdri_db"] == max(r["val_si_sdri_db"] for r in summary["history"])
    assert summary["train_speech_hours"] > 0 and summary["pack_meta"] == {"kind": "tiny test pack"}
    assert checkpoint["summary"]["best"] == summary["best"]
