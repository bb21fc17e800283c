"""ASR task runner: fbank -> encoder runner -> CTC prefix beam search -> attention rescoring (decoder runner) -> text.

CTC greedy decoding comes out of the same encoder pass. Any backend works: the runners bind tensors by WeNet's names
(encoder: speech, speech_lengths -> encoder_out, encoder_out_lens, ctc_log_probs, ...; decoder: encoder_out,
encoder_out_lens, hyps_pad_sos_eos, hyps_lens_sos, ctc_score -> best_index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeVar

import numpy as np

from quant.backends import Runner
from quant.errors import ModelError
from quant.eval import metrics

if TYPE_CHECKING:
    from quant.models.tokenizer import CharTokenizer

logger = logging.getLogger(__name__)

BEAM = 10
SYNTHETIC_MARKERS = ("synthetic", "synth", "tts", "espeak", "flite", "festival", "piper")


@dataclass(frozen=True)
class AsrOptions:
    beam: int = BEAM
    batch_size: int = 8
    rescore: bool = True


@dataclass(frozen=True)
class Transcript:
    greedy: str
    rescored: str  # equals the beam-search best when rescoring is off


def _require(outputs: Mapping[str, np.ndarray], name: str, graph: str) -> np.ndarray:
    if name not in outputs:
        raise ModelError(f"{graph} returned no {name!r}; outputs were {sorted(outputs)}")
    return np.asarray(outputs[name])


def encoder_feeds(audios: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """(B, T, 80) fbank batch and int32 lengths, named like the WeNet encoder's inputs."""
    from quant.features import batch_fbank

    speech, lengths = batch_fbank(audios)
    return {"speech": speech, "speech_lengths": lengths.astype(np.int32)}


def _select(runner: Runner, feeds: Mapping[str, np.ndarray], graph: str) -> dict[str, np.ndarray]:
    missing = [name for name in runner.input_names if name not in feeds]
    if missing:
        raise ModelError(f"{graph} needs inputs {missing} that the ASR runner does not provide")
    return {name: feeds[name] for name in runner.input_names}


def prefix_beam_search(enc: Mapping[str, np.ndarray], beam: int = BEAM) -> list[list[tuple[tuple[int, ...], float]]]:
    """CTC prefix beam search (n-best of `beam`) of every utterance of an encoder output batch."""
    from quant.decoding import ctc_prefix_beam_search

    log_probs = _require(enc, "ctc_log_probs", "encoder")
    lengths = _require(enc, "encoder_out_lens", "encoder").reshape(-1)
    return [ctc_prefix_beam_search(log_probs[i], int(lengths[i]), beam=beam) for i in range(lengths.size)]


def rescoring_feeds(
    enc: Mapping[str, np.ndarray], nbests: Sequence[Sequence[tuple[tuple[int, ...], float]]], sos_eos: int,
    beam: int = BEAM,
) -> dict[str, np.ndarray]:
    """The rescoring decoder's feeds: encoder_out, encoder_out_lens and the padded n-best (WeNet layout)."""
    from quant.decoding import hyps_to_decoder_inputs

    lengths = _require(enc, "encoder_out_lens", "encoder").reshape(-1).astype(np.int32)
    feeds = {"encoder_out": _require(enc, "encoder_out", "encoder"), "encoder_out_lens": lengths}
    feeds.update(hyps_to_decoder_inputs(nbests, sos_eos, beam).feeds())
    return feeds


def transcribe_batch(
    encoder: Runner,
    decoder: Runner | None,
    audios: Sequence[np.ndarray],
    tokenizer: "CharTokenizer",
    beam: int = BEAM,
) -> list[Transcript]:
    """Transcribe one batch of utterances; decoder=None skips attention rescoring (beam-search best is used)."""
    from quant.decoding import best_hypotheses, ctc_greedy

    enc = encoder.run(_select(encoder, encoder_feeds(audios), "encoder"))
    log_probs = _require(enc, "ctc_log_probs", "encoder")
    lengths = _require(enc, "encoder_out_lens", "encoder").reshape(-1)
    greedy = [tokenizer.decode(ctc_greedy(log_probs[i], int(lengths[i]))) for i in range(len(audios))]
    nbests = prefix_beam_search(enc, beam)
    if decoder is None:
        chosen = [list(nbest[0][0]) if nbest else [] for nbest in nbests]
    else:
        feeds = rescoring_feeds(enc, nbests, tokenizer.sos_eos, beam)
        best = _require(decoder.run(_select(decoder, feeds, "decoder")), "best_index", "decoder")
        chosen = best_hypotheses(nbests, best)
    return [Transcript(g, tokenizer.decode(tokens)) for g, tokens in zip(greedy, chosen)]


def transcribe(
    encoder: Runner,
    decoder: Runner | None,
    audios: Sequence[np.ndarray],
    tokenizer: "CharTokenizer | None" = None,
    options: AsrOptions = AsrOptions(),
) -> list[Transcript]:
    """Transcribe utterances in batches of options.batch_size, in input order."""
    if tokenizer is None:
        from quant.models.tokenizer import CharTokenizer

        tokenizer = CharTokenizer()
    rescorer = decoder if options.rescore else None
    out: list[Transcript] = []
    for start in range(0, len(audios), options.batch_size):
        batch = audios[start : start + options.batch_size]
        out.extend(transcribe_batch(encoder, rescorer, batch, tokenizer, options.beam))
    return out


# ------------------------------------------------------------------------------------------------ set evaluation


@dataclass(frozen=True)
class AsrSample:
    name: str
    audio: np.ndarray
    text: str
    source: str


def source_group(source: str) -> str:
    """'synthetic' for synthesized (held-out voice) speech, else 'real' (recorded human speech)."""
    lowered = source.lower()
    return "synthetic" if any(marker in lowered for marker in SYNTHETIC_MARKERS) else "real"


@dataclass(frozen=True)
class AsrScores:
    utterances: int
    cer: float
    wer: float
    cer_greedy: float
    wer_greedy: float

    def to_dict(self) -> dict[str, float]:
        return {
            "utterances": self.utterances,
            "cer": self.cer,
            "wer": self.wer,
            "cer_greedy": self.cer_greedy,
            "wer_greedy": self.wer_greedy,
        }


def _scores(refs: Sequence[str], transcripts: Sequence[Transcript],
            normalize: metrics.Normalizer | None = None) -> AsrScores:
    rescored = [t.rescored for t in transcripts]
    greedy = [t.greedy for t in transcripts]
    return AsrScores(
        utterances=len(refs),
        cer=metrics.character_errors(refs, rescored, normalize).rate,
        wer=metrics.word_errors(refs, rescored, normalize).rate,
        cer_greedy=metrics.character_errors(refs, greedy, normalize).rate,
        wer_greedy=metrics.word_errors(refs, greedy, normalize).rate,
    )


@dataclass(frozen=True)
class UtteranceErrors:
    """Edit counts of one utterance (rescored and greedy), so any two rows can be compared utterance by utterance
    and corpus rates recomputed from sums of counts."""

    name: str
    cer: metrics.ErrorRate
    wer: metrics.ErrorRate
    cer_greedy: metrics.ErrorRate
    wer_greedy: metrics.ErrorRate


RATES = ("cer", "wer", "cer_greedy", "wer_greedy")


def utterance_errors(name: str, reference: str, transcript: Transcript,
                     normalize: metrics.Normalizer | None = None) -> UtteranceErrors:
    return UtteranceErrors(
        name,
        cer=metrics.character_errors([reference], [transcript.rescored], normalize),
        wer=metrics.word_errors([reference], [transcript.rescored], normalize),
        cer_greedy=metrics.character_errors([reference], [transcript.greedy], normalize),
        wer_greedy=metrics.word_errors([reference], [transcript.greedy], normalize),
    )


@dataclass(frozen=True)
class AsrResult:
    overall: AsrScores
    by_source: dict[str, AsrScores]
    transcripts: tuple[tuple[str, str, Transcript], ...]  # (name, reference, transcript)
    per_utterance: tuple[UtteranceErrors, ...] = ()

    def task_fields(self) -> dict[str, object]:
        """The row's `task` fields in results.json."""
        return self.to_dict()

    def per_utterance_columns(self) -> dict[str, list[str] | list[int]]:
        """Edit counts per utterance as columns: `ids`, and `<rate>_errors` / `<rate>_length` for cer, wer,
        cer_greedy, wer_greedy (the layout results.json stores; quant.eval.stats.from_columns reads it)."""
        columns: dict[str, list[str] | list[int]] = {"ids": [u.name for u in self.per_utterance]}
        for rate in RATES:
            counts: list[metrics.ErrorRate] = [getattr(u, rate) for u in self.per_utterance]
            columns[f"{rate}_errors"] = [c.errors for c in counts]
            columns[f"{rate}_length"] = [c.reference_length for c in counts]
        return columns

    def to_dict(self) -> dict[str, object]:
        flat: dict[str, object] = dict(self.overall.to_dict())
        for group, scores in sorted(self.by_source.items()):
            flat[f"cer_{group}"] = scores.cer
            flat[f"wer_{group}"] = scores.wer
            flat[f"utterances_{group}"] = scores.utterances
        return flat


def score_transcripts(samples: Sequence[AsrSample], transcripts: Sequence[Transcript],
                      normalize: metrics.Normalizer | None = None) -> AsrResult:
    """Corpus CER/WER overall and per source group (synthetic / real), and edit counts per utterance, on text
    normalized by `normalize` (default: metrics' English normalization)."""
    if not samples:
        raise ModelError("no utterances were transcribed; the ASR evaluation set is empty")
    refs = [s.text for s in samples]
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(source_group(sample.source), []).append(index)
    by_source = {
        group: _scores([refs[i] for i in idx], [transcripts[i] for i in idx], normalize)
        for group, idx in groups.items()
    }
    rows = tuple((s.name, s.text, t) for s, t in zip(samples, transcripts))
    per_utterance = tuple(utterance_errors(s.name, s.text, t, normalize) for s, t in zip(samples, transcripts))
    return AsrResult(overall=_scores(refs, transcripts, normalize), by_source=by_source, transcripts=rows,
                     per_utterance=per_utterance)


def evaluate_asr(
    encoder: Runner, decoder: Runner | None, samples: Sequence[AsrSample], options: AsrOptions = AsrOptions()
) -> AsrResult:
    transcripts = transcribe(encoder, decoder, [s.audio for s in samples], options=options)
    return score_transcripts(samples, transcripts)


def load_samples(manifest: str, limit: int | None = None, part: range | None = None) -> list[AsrSample]:
    """The first `limit` utterances of an ASR manifest with their audio, reference text and source; `part`: only
    those positions of them (a shard; names keep the set position)."""
    from quant.data.manifest import load_speech, read_manifest

    utterances = read_manifest(manifest)
    chosen = balanced_subset(utterances, limit, lambda utt: source_group(utt.source or ""))
    samples = []
    for index, utt in enumerate(chosen):
        if part is not None and index not in part:
            continue
        if not utt.text:
            raise ModelError(f"{manifest}: utterance {utt.path} has no reference text; ASR sets need transcripts")
        samples.append(AsrSample(f"{index}:{utt.path.name}", load_speech(utt), utt.text, utt.source or ""))
    return samples


T = TypeVar("T")


def balanced_subset(items: Sequence[T], limit: int | None, group: Callable[[T], str]) -> list[T]:
    """The first `limit` items taken round-robin over groups (so a short run still sees every source), in the
    original order; all items when limit is None."""
    if not limit or limit >= len(items):
        return list(items)
    queues: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        queues.setdefault(group(item), []).append(index)
    picked: list[int] = []
    while len(picked) < limit:
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return [items[i] for i in sorted(picked)]
