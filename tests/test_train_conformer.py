import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quant.models.conformer import load_conformer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_conformer.py"


@pytest.fixture(scope="module")
def train_mod():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_conformer", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_conformer"] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_trains_saves_a_loadable_checkpoint_and_metrics(train_mod, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "conformer.pt"
    assert train_mod.main(["--smoke", "--workers", "1", "--max-epochs", "4", "-o", str(out)]) == 0
    model = load_conformer(out)
    assert model.config.d_model == 32
    assert not torch.equal(model.encoder.global_cmvn.mean, torch.zeros(80))  # CMVN set from training features
    metrics = json.loads(out.with_suffix(".json").read_text())
    losses = [epoch["loss"] for epoch in metrics["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert metrics["train_utterances"] == 3 and metrics["steps"] == 4
    assert set(metrics["final_eval"]["dev"]) == {"ctc_greedy", "ctc_prefix_beam", "attention_rescoring", "utterances"}
    assert "| dev | 3 |" in out.with_suffix(".md").read_text()
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["vocab"][0] == "<blank>" and checkpoint["vocab"][-1] == "<sos/eos>"


def test_add_sos_eos_builds_decoder_input_and_target(train_mod) -> None:  # type: ignore[no-untyped-def]
    ys = torch.tensor([[3, 4, 5], [6, -1, -1]])
    ys_in, ys_out = train_mod.add_sos_eos(ys, 29)
    assert ys_in.tolist() == [[29, 3, 4, 5], [29, 6, 29, 29]]
    assert ys_out.tolist() == [[3, 4, 5, 29], [6, 29, -1, -1]]


def test_batches_respect_the_frame_budget_and_cover_everything(train_mod) -> None:  # type: ignore[no-untyped-def]
    lengths = [random.Random(i).randint(50, 900) for i in range(200)]
    batches = train_mod.make_batches(lengths, 4000, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 4000 for b in batches)


def test_spec_augment_masks_bands_and_spans_inside_each_utterance(train_mod) -> None:  # type: ignore[no-untyped-def]
    opts = train_mod.TrainOptions()
    speech = torch.ones(4, 300, 80)
    lengths = torch.tensor([300, 200, 100, 50])
    masked = train_mod.spec_augment(speech, lengths, opts, torch.Generator().manual_seed(0))
    zero_fraction = float((masked == 0).float().mean())
    assert 0.0 < zero_fraction < 0.5
    full_bands = (masked == 0).all(dim=1).sum(dim=1)  # frequency bins zeroed over all frames
    assert int(full_bands.max()) <= 2 * (opts.spec_freq_width - 1)


def test_speed_perturbation_changes_duration(train_mod) -> None:  # type: ignore[no-untyped-def]
    audio = np.sin(np.arange(16000) / 10).astype(np.float32)
    assert abs(len(train_mod.speed_perturb(audio, 1.1)) - 16000 / 1.1) < 2
    assert abs(len(train_mod.speed_perturb(audio, 0.9)) - 16000 / 0.9) < 2


def test_noise_is_mixed_at_the_requested_snr(train_mod, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    noise = (rng.normal(size=8000) * 3000).astype(np.int16)
    pack = tmp_path / "noise.npz"
    np.savez(pack, noise=noise, noise_offsets=np.array([0, 8000]))
    train_mod.load_noise(pack)
    try:
        speech = 0.1 * np.sin(np.arange(32000) / 7).astype(np.float32)
        mixed = train_mod.add_noise(speech, np.random.default_rng(1), snr_low=10.0, snr_high=10.0)
    finally:
        train_mod._NOISE = None
    snr = 10 * np.log10(np.mean(speech**2) / np.mean((mixed - speech) ** 2))
    assert snr == pytest.approx(10.0, abs=0.2)


def test_cer_counts_character_edits(train_mod) -> None:  # type: ignore[no-untyped-def]
    assert train_mod.cer(["abc d"], ["abd d"]) == pytest.approx(1 / 5)
    assert train_mod.cer(["ab"], [""]) == 1.0


def test_loss_runs_under_bf16_autocast_as_on_the_gpu(train_mod) -> None:  # type: ignore[no-untyped-def]
    from quant.models.conformer import Conformer

    torch.manual_seed(0)
    model = Conformer(train_mod.SMOKE_CONFIG)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 80)).astype(np.float16) for n in (120, 90)]
    tokens = [np.array([3, 4, 1, 5], dtype=np.int64), np.array([6, 7], dtype=np.int64)]
    batch = train_mod.collate(feats, tokens)
    batch["speech"] = batch["speech"].float()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = train_mod.compute_loss(model, batch, train_mod.TrainOptions())
    losses["loss"].backward()
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_featurize_applies_speed_copies_and_gain(train_mod, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = str(Path(__file__).parent / "data" / "librivox_0880.flac")
    plain = train_mod.featurize((path, train_mod.Augment(), 0))
    copies = train_mod.featurize((path, train_mod.Augment((0.9, 1.0, 1.1), 0.0, (-12.0, -12.0)), 0))
    assert [c.shape[0] for c in copies][0] > plain[0].shape[0] > copies[2].shape[0]
    shift = float(np.median(copies[1].astype(np.float32) - plain[0].astype(np.float32)))
    assert shift == pytest.approx(2 * np.log(10 ** (-12 / 20)), abs=0.1)  # log-mel power moves by 2 ln(gain)


def test_rescoring_cer_is_the_same_batched_pooled_or_one_by_one(train_mod) -> None:  # type: ignore[no-untyped-def]
    from quant.models.conformer import Conformer
    from quant.models.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = Conformer(train_mod.SMOKE_CONFIG).eval()
    tokenizer = CharTokenizer()
    utts = train_mod.read_manifest(Path(__file__).parent / "data" / "librivox.jsonl")[:3]
    examples = train_mod.build_examples(utts, tokenizer, train_mod.Augment(), 1, 0)
    cpu = torch.device("cpu")
    one_by_one = train_mod.rescoring_cer(model, examples, tokenizer, cpu, 40000, workers=1, chunk=1)
    batched = train_mod.rescoring_cer(model, examples, tokenizer, cpu, 40000, workers=2, chunk=3)
    assert one_by_one == batched
    assert one_by_one["utterances"] == 3 and 0.0 < one_by_one["ctc_prefix_beam"] <= 1.5
