from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from quant.data.audio import load_audio
from quant.errors import ModelError
from quant.features import fbank, pad_features
from quant.models.conformer import (
    Conformer,
    ConformerConfig,
    WenetDecoder,
    WenetEncoder,
    checkpoint_dict,
    conformer_from_checkpoint,
    load_conformer,
)
from quant.models.tokenizer import CharTokenizer, normalize_text, read_units

DATA = Path(__file__).parent / "data"
TINY = ConformerConfig(d_model=32, heads=2, ffn_dim=64, encoder_blocks=2, decoder_blocks=1, decoder_ffn_dim=64)


def test_normalize_text() -> None:
    assert normalize_text("  Hello, World!  It's  MR. Smith's  'quote' well-known 42 ") == (
        "hello world it's mr smith's quote well known"
    )
    assert normalize_text("¿Qué?") == "qu"


def test_tokenizer_follows_wenet_conventions() -> None:
    tokenizer = CharTokenizer()
    units = read_units()
    assert units[0] == "<blank>" and units[-1] == "<sos/eos>" and tokenizer.vocab_size == 30
    assert tokenizer.blank == 0 and tokenizer.sos_eos == 29
    ids = tokenizer.encode("He isn't here.")
    assert 0 not in ids and tokenizer.sos_eos not in ids
    assert tokenizer.decode(ids) == "he isn't here"
    assert tokenizer.decode([0, *ids, 29]) == "he isn't here"


def test_bad_units_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "units.txt"
    bad.write_text("<blank> 0\na 2\n", encoding="utf-8")
    with pytest.raises(ModelError, match="units.txt:2"):
        read_units(bad)


def test_default_config_size_and_shapes() -> None:
    model = Conformer().eval()
    assert model.parameter_count() <= 8_000_000
    assert model.config.vocab_size == CharTokenizer().vocab_size
    speech, lengths = torch.randn(2, 203, 80), torch.tensor([203, 150])
    with torch.no_grad():
        out, out_lens = model.encode(speech, lengths)
    assert out.shape == (2, 50, 144)
    assert out_lens.tolist() == [50, 36]  # ((T - 1) // 2 - 1) // 2


def test_config_rejects_unknown_and_inconsistent_settings() -> None:
    with pytest.raises(ModelError, match="unknown"):
        ConformerConfig.from_dict({"d_model": 64, "layers": 3})
    with pytest.raises(ModelError, match="divisible"):
        ConformerConfig(d_model=30, heads=4)


def test_padded_batch_matches_single_utterances_on_real_frames() -> None:
    torch.manual_seed(0)
    model = Conformer(TINY).eval()
    audios = [load_audio(DATA / name) for name in ("librivox_0880.flac", "librivox_0890.flac")]
    speech, lengths = pad_features([fbank(a) for a in audios])
    wrapper = WenetEncoder(model, beam=5)
    with torch.no_grad():
        batch = wrapper(torch.from_numpy(speech), torch.from_numpy(lengths))
        for b in range(2):
            alone = wrapper(torch.from_numpy(speech[b : b + 1, : lengths[b]]), torch.from_numpy(lengths[b : b + 1]))
            frames = int(alone[1][0])
            assert int(batch[1][b]) == frames
            assert torch.allclose(batch[0][b, :frames], alone[0][0], atol=1e-5)
            assert torch.allclose(batch[2][b, :frames], alone[2][0], atol=1e-5)
    assert torch.isfinite(batch[0]).all() and torch.isfinite(batch[2]).all()  # padded frames too
    assert batch[1].dtype == torch.int32 and batch[4].shape[-1] == 5


def test_decoder_scores_are_log_likelihood_plus_weighted_ctc() -> None:
    torch.manual_seed(0)
    model = Conformer(TINY).eval()
    memory, memory_lens = torch.randn(1, 12, 32), torch.tensor([12], dtype=torch.int32)
    sos = model.sos_eos
    hyps = torch.tensor([[[sos, 5, 6, sos], [sos, 7, sos, -1]]])  # second hyp padded with ignore_id
    lens = torch.tensor([[3, 2]], dtype=torch.int32)
    ctc = torch.tensor([[-1.0, -2.0]])
    with torch.no_grad():
        best, score = WenetDecoder(model, ctc_weight=0.5)(memory, memory_lens, hyps, lens, ctc)
        for k, tokens in enumerate(([sos, 5, 6, sos], [sos, 7, sos])):
            inp = torch.tensor([tokens[:-1]])
            log_probs = torch.log_softmax(model.decoder(memory, memory_lens.long(), inp, torch.tensor([len(inp[0])])), -1)
            expected = sum(log_probs[0, i, t].item() for i, t in enumerate(tokens[1:])) + 0.5 * ctc[0, k].item()
            assert score[0, k].item() == pytest.approx(expected, abs=1e-4)
    assert best.tolist() == [int(score.argmax())]


def test_checkpoint_round_trip_keeps_weights_and_cmvn(tmp_path: Path) -> None:
    model = Conformer(replace(TINY, encoder_blocks=1))
    model.set_cmvn(torch.full((80,), 3.0), torch.full((80,), 0.5))
    path = tmp_path / "c.pt"
    torch.save(checkpoint_dict(model, CharTokenizer().units), path)
    loaded = load_conformer(path)
    assert loaded.config == model.config
    assert torch.equal(loaded.encoder.global_cmvn.mean, torch.full((80,), 3.0))
    x, lens = torch.randn(1, 50, 80), torch.tensor([50])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode(x, lens)[0], loaded.encode(x, lens)[0])


def test_missing_or_broken_weights_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such conformer checkpoint"):
        load_conformer(tmp_path / "absent.pt")
    with pytest.raises(ModelError, match="not a conformer checkpoint"):
        conformer_from_checkpoint({"state_dict": {}}, "x.pt")
    model = Conformer(replace(TINY, encoder_blocks=1))
    with pytest.raises(ModelError, match="differ from quant/assets/units.txt"):
        conformer_from_checkpoint(checkpoint_dict(model, ["<blank>", "x", "<sos/eos>"]), "y.pt")


def test_masked_frames_never_produce_nan_even_for_length_one_rows() -> None:
    model = Conformer(TINY).eval()
    with torch.no_grad():
        out, lens = model.encode(torch.randn(2, 40, 80), torch.tensor([40, 7]))
    assert lens.tolist() == [9, 1]
    assert np.isfinite(out.numpy()).all()


def test_decoder_with_an_empty_encoder_output_stays_finite() -> None:
    torch.manual_seed(0)
    model = Conformer(TINY).eval()
    sos = model.sos_eos
    hyps = torch.tensor([[[sos, 5, sos], [sos, sos, sos]]])
    with torch.no_grad():
        best, score = WenetDecoder(model)(
            torch.randn(1, 3, 32), torch.tensor([0], dtype=torch.int32), hyps,
            torch.tensor([[2, 1]], dtype=torch.int32), torch.tensor([[-1.0, -2.0]]),
        )
    assert torch.isfinite(score).all()


def test_output_lengths_match_the_subsampling_convolutions() -> None:
    from quant.models.conformer import Conv2dSubsampling4

    embed = Conv2dSubsampling4(80, 8)
    for frames in range(0, 40):
        produced = embed(torch.randn(1, frames, 80)).shape[1] if frames >= 7 else 0
        assert int(Conv2dSubsampling4.output_lengths(torch.tensor([frames]))) == produced
