from __future__ import annotations

from typing import Mapping

import numpy as np
import pytest

from quant.errors import ModelError
from quant.eval import asr
from quant.models.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()
VOCAB = TOKENIZER.vocab_size


def spelled_log_probs(texts: list[str], frames: int) -> tuple[np.ndarray, np.ndarray]:
    """CTC log-probs whose best path spells each text (token, blank, token, blank, ...), padded with blanks."""
    out = np.full((len(texts), frames, VOCAB), np.log(1e-4), dtype=np.float32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for b, text in enumerate(texts):
        ids = TOKENIZER.encode(text)
        path = [tok for i in ids for tok in (i, 0)]
        assert len(path) <= frames
        for t in range(frames):
            out[b, t, path[t] if t < len(path) else 0] = np.log(0.99)
        lengths[b] = len(path)
    return out, lengths


class FakeEncoder:
    """Ignores the audio: utterance i of a batch spells texts[audio[0] as int]."""

    input_names = ["speech", "speech_lengths"]
    output_names = ["encoder_out", "encoder_out_lens", "ctc_log_probs"]

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.ids: list[int] = []  # which text each coming utterance spells, consumed in order
        self.batches: list[int] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        speech = feeds["speech"]
        assert speech.ndim == 3 and speech.shape[2] == 80 and feeds["speech_lengths"].dtype == np.int32
        self.batches.append(speech.shape[0])
        batch = speech.shape[0]
        texts = [self.texts[i] for i in self.ids[:batch]]
        self.ids = self.ids[batch:]
        log_probs, lengths = spelled_log_probs(texts, 60)
        return {
            "encoder_out": np.zeros((len(texts), 60, 4), np.float32),
            "encoder_out_lens": lengths,
            "ctc_log_probs": log_probs,
        }


class FakeDecoder:
    """Always picks beam slot `pick`; checks the WeNet rescoring feeds."""

    input_names = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score"]
    output_names = ["best_index"]

    def __init__(self, pick: int) -> None:
        self.pick = pick

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        hyps = feeds["hyps_pad_sos_eos"]
        assert hyps.dtype == np.int64 and hyps.shape[1] == asr.BEAM
        assert np.all(hyps[:, :, 0] == TOKENIZER.sos_eos)
        assert feeds["ctc_score"].shape == hyps.shape[:2]
        return {"best_index": np.full(hyps.shape[0], self.pick, dtype=np.int64)}


def audios(count: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(8000).astype(np.float32) * 0.1 for i in range(count)]


def test_greedy_and_beam_recover_the_spelled_text() -> None:
    texts = ["hello world", "it's a test", "abc"]
    encoder = FakeEncoder(texts)
    encoder.ids = [0, 1, 2]
    out = asr.transcribe(encoder, FakeDecoder(0), audios(3), TOKENIZER, asr.AsrOptions(batch_size=2))
    assert [t.greedy for t in out] == texts
    assert [t.rescored for t in out] == texts
    assert encoder.batches == [2, 1]


def test_rescoring_uses_the_decoders_choice() -> None:
    encoder = FakeEncoder(["hello"])
    encoder.ids = [0]
    best = asr.transcribe(encoder, FakeDecoder(0), audios(1), TOKENIZER)[0]
    encoder.ids = [0]
    second = asr.transcribe(encoder, FakeDecoder(1), audios(1), TOKENIZER)[0]
    assert best.rescored == "hello"
    assert second.rescored != "hello"  # the second-best CTC prefix differs from the best
    assert second.greedy == "hello"


def test_without_decoder_the_beam_best_is_used() -> None:
    encoder = FakeEncoder(["good morning"])
    encoder.ids = [0]
    out = asr.transcribe(encoder, None, audios(1), TOKENIZER)
    assert out[0].rescored == "good morning"


def test_decoder_missing_input_is_an_error() -> None:
    class NeedsMore(FakeDecoder):
        input_names = [*FakeDecoder.input_names, "r_hyps_pad_sos_eos"]

    encoder = FakeEncoder(["a"])
    encoder.ids = [0]
    with pytest.raises(ModelError, match="r_hyps_pad_sos_eos"):
        asr.transcribe(encoder, NeedsMore(0), audios(1), TOKENIZER)


def test_scores_split_by_source() -> None:
    samples = [
        asr.AsrSample("a", np.zeros(1), "hello world", "espeak-ng synthetic voice m3"),
        asr.AsrSample("b", np.zeros(1), "good day", "LibriVox recording"),
    ]
    transcripts = [asr.Transcript("hello world", "hello word"), asr.Transcript("good bay", "good day")]
    result = asr.score_transcripts(samples, transcripts)
    assert set(result.by_source) == {"synthetic", "real"}
    assert result.by_source["synthetic"].cer == pytest.approx(1 / 11)
    assert result.by_source["real"].cer == 0.0
    assert result.by_source["real"].cer_greedy == pytest.approx(1 / 8)
    assert result.overall.cer == pytest.approx(1 / 19)
    assert result.overall.wer == pytest.approx(1 / 4)
    flat = result.to_dict()
    assert flat["cer_real"] == 0.0 and flat["utterances_synthetic"] == 1


def test_per_utterance_edit_counts_sum_to_the_corpus_rates() -> None:
    samples = [asr.AsrSample("a", np.zeros(1), "hello world", "real"),
               asr.AsrSample("b", np.zeros(1), "good day to you", "real")]
    transcripts = [asr.Transcript("hello word", "hello world"), asr.Transcript("good day", "good bay to you")]
    result = asr.score_transcripts(samples, transcripts)
    columns = result.per_utterance_columns()
    assert columns["ids"] == ["a", "b"]
    assert columns["cer_errors"] == [0, 1] and columns["cer_length"] == [11, 15]
    assert columns["wer_errors"] == [0, 1] and columns["wer_length"] == [2, 4]
    assert columns["cer_greedy_errors"] == [1, 7]  # "good day" drops " to you"
    for rate in asr.RATES:
        corpus = sum(columns[f"{rate}_errors"]) / sum(columns[f"{rate}_length"])  # type: ignore[arg-type]
        assert corpus == pytest.approx(getattr(result.overall, rate))


def test_balanced_subset_takes_every_group() -> None:
    items = ["r1", "r2", "r3", "s1", "s2"]
    subset = asr.balanced_subset(items, 3, lambda item: item[0])
    assert subset == ["r1", "r2", "s1"]
    assert asr.balanced_subset(items, None, lambda item: item[0]) == items
