"""CTC + attention-rescoring ASR from a spec (WeNet's conventions, with the spec's ids): calibration feeds,
evaluation and speed workloads.

- encoder (role `encoder`): front-end batches (Kaldi fbank for WeNet) zero-padded along T, plus int32 frame counts.
- decoder (any later graph): the FP32 encoder's outputs on the same audio and the n-best of CTC prefix beam search
  (`[task] beam`, `blank`), laid out as WeNet's rescoring decoder takes them: `hyps_pad_sos_eos` ([sos] hyp [eos],
  padded with eos), `hyps_lens_sos`, `ctc_score`, and for U2++ `r_hyps_pad_sos_eos` (the hyps reversed).
- evaluation: greedy CTC and rescored transcripts. A decoder returning `best_index` chose in-graph; one returning
  token log-probs (`decoder_out` / `score`, U2++ also `r_decoder_out` / `r_score`) is rescored here as WeNet does:
  (1 - reverse_weight) * left-to-right + reverse_weight * right-to-left + ctc_weight * CTC score. Ids become text
  with the spec's units file; English normalization only when `[task] text_normalization = "english"`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from quant.backends import Runner, open_runner
from quant.decoding import (
    DecoderInputs, Hypothesis, attention_log_likelihood, attention_rescoring, best_hypotheses, ctc_greedy,
    ctc_prefix_beam_search, hyps_to_decoder_inputs,
)
from quant.errors import CalibrationError, ModelError
from quant.eval.asr import (
    AsrOptions, AsrResult, AsrSample, Transcript, balanced_subset, load_samples, score_transcripts, source_group,
)
from quant.eval.speed import GraphWorkload
from quant.frontends import Frontend, frontend, pad_batch
from quant.models.tokenizer import UnitsTokenizer, normalize_text, plain_text
from quant.spec import AsrTaskSpec, ModelSpec, resolve_manifest
from quant.tasks.common import (
    Artifact, Audio, Feed, FeedOptions, Reiterable, batched, check_feed, fp32_path, hatch_feeds, input_shapes,
    open_artifact, select, speech_audio, utterances, wire,
)
from quant.tasks.se import representative

log = logging.getLogger(__name__)

ENCODER = "encoder"
# encoder outputs the search reads (the names of WeNet's export_onnx_gpu.py)
CTC_LOG_PROBS = "ctc_log_probs"
ENCODER_LENGTHS = "encoder_out_lens"
# decoder outputs: an in-graph choice, or per-token log-probs (B, beam, L, V) / (B * beam, L, V) rescored here
BEST_INDEX = "best_index"
LOG_PROB_OUTPUTS = ("decoder_out", "score")
REVERSE_LOG_PROB_OUTPUTS = ("r_decoder_out", "r_score")
REVERSED_HYPS = "r_hyps_pad_sos_eos"
NO_AUDIO = np.zeros(0, np.float32)


class AsrTask:
    def __init__(self, spec: ModelSpec) -> None:
        if not isinstance(spec.task, AsrTaskSpec):
            raise ModelError(f"{spec.source or spec.name}: not an ASR spec")
        self.spec = spec
        self.task: AsrTaskSpec = spec.task
        self.fe: Frontend | None = frontend(spec.frontend) if spec.frontend else None
        self._tokenizer: UnitsTokenizer | None = None

    @property
    def tokenizer(self) -> UnitsTokenizer:
        """The spec's units file, read on first use (so a spec loads before its files exist)."""
        if self._tokenizer is None:
            if not self.task.units.is_file():
                raise ModelError(f"{self.task.units}: units file not found ([task] units in the spec)")
            tokenizer = UnitsTokenizer.from_file(self.task.units)
            blank, sos, eos = self.task.token_ids(tokenizer.vocab_size)
            self._tokenizer = UnitsTokenizer(tokenizer.units, blank, sos, eos)
        return self._tokenizer

    @property
    def token_ids(self) -> tuple[int, int, int]:
        """(blank, sos, eos) of the spec's units."""
        return self.task.token_ids(self.tokenizer.vocab_size)

    # -------------------------------------------------------------------------------------------- calibration

    def calibration_feeds(self, role: str, manifest: str | None = None,
                          options: FeedOptions = FeedOptions()) -> Iterable[Feed]:
        """Re-iterable feeds of graph `role` on the speech of the first options.limit utterances."""
        self.spec.graph(role)
        clips = Audio(tuple(self._items(manifest, options)), speech_audio)
        hatch = hatch_feeds(self.spec, role, clips)
        if hatch is not None:
            return hatch
        return Reiterable(lambda: self._feeds(role, self._long_enough(clips, manifest), options))

    def _long_enough(self, clips: Iterable[np.ndarray], manifest: str | None) -> list[np.ndarray]:
        """Clips with at least the front end's min_frames (a shorter one alone in a batch fails inside the encoder's
        first convolution); a set with none is refused naming the manifest."""
        assert self.spec.frontend is not None
        least = self.spec.frontend.min_frames
        clips = list(clips)
        kept = [clip for clip in clips if frontend(self.spec.frontend).frames(len(clip)) >= least]
        where = manifest or self.spec.defaults.calibration_manifest
        if not kept:
            raise CalibrationError(f"{where}: every utterance is shorter than {least} front-end frames, the least "
                                   f"the {self.spec.name} encoder turns into one frame; calibrate on longer speech")
        if len(kept) < len(clips):
            log.warning("%s: skipped %d of %d utterances shorter than %d front-end frames", where,
                        len(clips) - len(kept), len(clips), least)
        return kept

    def _feeds(self, role: str, clips: Iterable[np.ndarray], options: FeedOptions) -> Iterator[Feed]:
        size = options.batch_size or self.spec.defaults.batch_size
        target = self.spec.graph(role)
        path = fp32_path(self.spec, role, options)
        inputs = tuple(input_shapes(path))
        upstream = self._upstream(role, options)
        for batch in batched(clips, size):
            sources = self._run_upstream(upstream, self._sources(batch), inputs)
            yield check_feed(self.spec, role, path, wire(target, sources, inputs))

    def _upstream(self, role: str, options: FeedOptions) -> list[tuple[str, Runner]]:
        roles = [g.role for g in self.spec.graphs]
        return [(r, open_runner(fp32_path(self.spec, r, options), "ort", threads=options.threads))
                for r in roles[: roles.index(role)]]

    def _run_upstream(self, upstream: Sequence[tuple[str, Runner]], sources: dict[str, np.ndarray],
                      target_inputs: Sequence[str]) -> dict[str, np.ndarray]:
        for role, runner in upstream:
            feeds = wire(self.spec.graph(role), sources, runner.input_names)
            outputs = runner.run(select(self.spec, role, runner, feeds))
            sources.update({f"{role}:{name}": value for name, value in outputs.items()})
            if role == ENCODER:
                nbests = self._search(outputs)
                sources.update(self._nbest_sources(nbests, target_inputs).items())
        return sources

    # -------------------------------------------------------------------------------------------- evaluation

    @property
    def shard_unit(self) -> int:
        """Shards of the test set start at multiples of the transcription batch: a batch is zero-padded to its
        longest utterance, and cutting it elsewhere could move the encoder's numbers."""
        return AsrOptions().batch_size

    def evaluate(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                 threads: int = 1, memo: dict[str, Any] | None = None) -> AsrResult:
        """CER/WER (rescored and greedy) per utterance, overall and per source group; `artifacts` gives the encoder's
        (and the decoder's, for rescoring) ONNX file, engine or runner."""
        return self.combine(self.evaluate_rows(artifacts, manifest, limit, threads, memo))

    def evaluate_rows(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                      threads: int = 1, memo: dict[str, Any] | None = None,
                      part: range | None = None) -> list[tuple[AsrSample, Transcript]]:
        """evaluate's per-utterance rows (the sample without its audio, its transcripts) in set order; `part`: only
        those positions of the evaluated selection (a shard, quant.tasks.sharded; a multiple of shard_unit)."""
        if ENCODER not in artifacts:
            raise ModelError(f"{self.spec.name}: evaluation needs the {ENCODER!r} artifact; got {sorted(artifacts)}")
        encoder = open_artifact(artifacts[ENCODER], threads)
        rescorer = self._rescorer_role()
        decoder = open_artifact(artifacts[rescorer], threads) if rescorer and rescorer in artifacts else None
        memo = {} if memo is None else memo  # the caller's, across calls on the same manifest and limit
        if "samples" not in memo:
            path = manifest or str(resolve_manifest(self.spec.defaults.test_manifest, "test manifest"))
            memo["samples"] = load_samples(path, limit, part)
        samples = memo["samples"]
        transcripts = self.transcribe(encoder, decoder, [s.audio for s in samples])
        # scoring needs names, references and sources only: a row from a shard does not carry its audio back
        return [(replace(s, audio=NO_AUDIO), t) for s, t in zip(samples, transcripts)]

    def combine(self, rows: Sequence[tuple[AsrSample, Transcript]]) -> AsrResult:
        """The set result of per-utterance rows in set order (one call's, or every shard's gathered)."""
        return score([sample for sample, _ in rows], [transcript for _, transcript in rows], self.normalizer())

    def normalizer(self) -> Callable[[str], str]:
        return normalize_text if self.task.text_normalization == "english" else plain_text

    def transcribe(self, encoder: Runner, decoder: Runner | None, audios: Sequence[np.ndarray],
                   batch_size: int = AsrOptions().batch_size) -> list[Transcript]:
        """Greedy and rescored transcripts, batch by batch in input order (decoder None: the beam-search best)."""
        out: list[Transcript] = []
        for batch in batched(audios, batch_size):
            out.extend(self._transcribe_batch(encoder, decoder, batch))
        return out

    def _transcribe_batch(self, encoder: Runner, decoder: Runner | None,
                          audios: Sequence[np.ndarray]) -> list[Transcript]:
        sources = self._sources(audios)
        encoded = encoder.run(select(self.spec, ENCODER, encoder,
                                     wire(self.spec.graph(ENCODER), sources, encoder.input_names)))
        log_probs, lengths = self._ctc(encoded)
        blank = self.token_ids[0]
        greedy = [self.tokenizer.decode(ctc_greedy(log_probs[i], int(lengths[i]), blank)) for i in range(len(audios))]
        nbests = self._search(encoded)
        if decoder is None:
            chosen = [list(nbest[0][0]) if nbest else [] for nbest in nbests]
        else:
            sources.update({f"{ENCODER}:{name}": value for name, value in encoded.items()})
            chosen = self._rescore(decoder, sources, nbests)
        return [Transcript(g, self.tokenizer.decode(tokens)) for g, tokens in zip(greedy, chosen)]

    def _rescore(self, decoder: Runner, sources: dict[str, np.ndarray],
                 nbests: Sequence[Sequence[Hypothesis]]) -> list[list[int]]:
        role = self._rescorer_role()
        assert role is not None
        inputs = self._decoder_inputs(nbests, decoder.input_names)
        sources.update({f"nbest:{name}": value for name, value in inputs.feeds().items()})
        feeds = wire(self.spec.graph(role), sources, decoder.input_names)
        outputs = decoder.run(select(self.spec, role, decoder, feeds))
        if BEST_INDEX in outputs:
            return best_hypotheses(nbests, outputs[BEST_INDEX])
        forward = _log_probs(outputs, LOG_PROB_OUTPUTS, self.task.beam)
        if forward is None:
            raise ModelError(f"decoder {role!r} returned neither {BEST_INDEX!r} nor per-token log-probs "
                             f"({' / '.join(LOG_PROB_OUTPUTS)}); it returned {sorted(outputs)}")
        backward = _log_probs(outputs, REVERSE_LOG_PROB_OUTPUTS, self.task.beam)
        l2r = attention_log_likelihood(forward, inputs)
        r2l = attention_log_likelihood(backward, inputs, reverse=True) if backward is not None else None
        best = attention_rescoring(l2r, inputs.ctc_score, self.task.ctc_weight, r2l, self.task.reverse_weight)
        return best_hypotheses(nbests, best)

    # -------------------------------------------------------------------------------------------- speed

    def speed_workload(self, role: str, manifest: str | None = None,
                       options: FeedOptions = FeedOptions()) -> GraphWorkload:
        """One graph's timing input from the median-length test utterance (batch 1; the batch sweep tiles it)."""
        # the median by the audio's real length, not the manifest's `duration` field (which may be rounded or stale)
        clips = [speech_audio(item) for item in self._items(manifest, replace(options, selection="test"))]
        rate = self._fe().spec.sample_rate
        clip = clips[representative([c.size / rate for c in clips])]
        seconds = clip.size / rate
        inputs = tuple(input_shapes(fp32_path(self.spec, role, options)))
        sources = self._run_upstream(self._upstream(role, options), self._sources([clip]), inputs)
        unit = f"{seconds:.2f} s utterance" + ("" if role == ENCODER else f" (n-best {self.task.beam})")
        return GraphWorkload(role, unit, seconds, feeds=wire(self.spec.graph(role), sources, inputs),
                             sweep_batches=True)

    # -------------------------------------------------------------------------------------------- helpers

    def _items(self, manifest: str | None, options: FeedOptions) -> list[Any]:
        """The utterances options.selection names: the first options.limit, or those evaluation scores (load_samples'
        round-robin over sources)."""
        what = "test" if options.selection == "test" else "calibration"
        items = utterances(self.spec, manifest, None if what == "test" else options.limit, what=what,
                           allow_outside=options.allow_outside)
        if what == "test":
            return balanced_subset(items, options.limit, lambda utt: source_group(utt.source or ""))
        return items

    def _fe(self) -> Frontend:
        if self.fe is None:
            raise ModelError(f"{self.spec.source or self.spec.name}: this needs a [frontend] table")
        return self.fe

    def _sources(self, audios: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        features, frames = pad_batch(self._fe(), audios)
        lengths = np.array([a.size for a in audios], dtype=np.int32)
        waves = np.zeros((len(audios), int(lengths.max(initial=0))), dtype=np.float32)
        for row, audio in enumerate(audios):
            waves[row, : audio.size] = audio
        return {"frontend": features, "frontend:lengths": frames, "waveform": waves, "waveform:lengths": lengths}

    def _ctc(self, encoded: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        missing = [name for name in (CTC_LOG_PROBS, ENCODER_LENGTHS) if name not in encoded]
        if missing:
            raise ModelError(f"encoder returned no {missing}; CTC search needs {CTC_LOG_PROBS!r} (B, T, V) and "
                             f"{ENCODER_LENGTHS!r} (B,) as WeNet's export names them (it returned {sorted(encoded)})")
        return np.asarray(encoded[CTC_LOG_PROBS]), np.asarray(encoded[ENCODER_LENGTHS]).reshape(-1)

    def _search(self, encoded: Mapping[str, np.ndarray]) -> list[list[Hypothesis]]:
        log_probs, lengths = self._ctc(encoded)
        blank = self.token_ids[0]
        return [ctc_prefix_beam_search(log_probs[i], int(lengths[i]), self.task.beam, blank)
                for i in range(lengths.size)]

    def _decoder_inputs(self, nbests: Sequence[Sequence[Hypothesis]], decoder_inputs: Sequence[str]) -> DecoderInputs:
        _, sos, eos = self.token_ids
        role = self._rescorer_role()
        wanted = {f.tensor for f in self.spec.graph(role).feeds} if role else set()
        reverse = REVERSED_HYPS in decoder_inputs or REVERSED_HYPS in wanted
        return hyps_to_decoder_inputs(nbests, sos, self.task.beam, eos, reverse=reverse)

    def _nbest_sources(self, nbests: Sequence[Sequence[Hypothesis]],
                       target_inputs: Sequence[str]) -> dict[str, np.ndarray]:
        inputs = self._decoder_inputs(nbests, target_inputs)
        return {f"nbest:{name}": value for name, value in inputs.feeds().items()}

    def _rescorer_role(self) -> str | None:
        """The graph after the encoder (the rescoring decoder), if the spec has one."""
        later = [g.role for g in self.spec.graphs if g.role != ENCODER]
        return later[0] if later else None


def _log_probs(outputs: Mapping[str, np.ndarray], names: Sequence[str], beam: int) -> np.ndarray | None:
    """Per-token decoder log-probs as (B, beam, L, V), from the first of `names` that is there with rank 3 or 4."""
    for name in names:
        value = np.asarray(outputs[name]) if name in outputs else None
        if value is not None and value.ndim == 4:
            return value
        if value is not None and value.ndim == 3:
            return value.reshape(-1, beam, *value.shape[1:])
    return None


def score(samples: Sequence[AsrSample], transcripts: Sequence[Transcript],
          normalize: Callable[[str], str] = normalize_text) -> AsrResult:
    """Corpus CER/WER overall and per source group, and edit counts per utterance, after `normalize` (the
    evaluation's own scoring, quant.eval.asr.score_transcripts)."""
    return score_transcripts(samples, transcripts, normalize)


__all__ = ["AsrTask", "score"]
