"""Speech-enhancement task runners (offline 9 s segments, streaming frame loop) and per-set evaluation.

Offline: audio -> 9 s segments (zero-padded tail) -> STFT -> batched `mix` (B, 257, 563, 2) -> `enh` -> inverse STFT
per segment -> overlap-free concatenation, cut to the input length.
Streaming: STFT of the utterance, then one frame (256 new samples) at a time: `mix` (1, 257, 1, 2) plus every state
`x`, whose next value is the output `x_out`; states start at zero for each utterance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from quant.backends import Runner
from quant.errors import ModelError
from quant.eval import metrics
from quant.features import HOP, SEGMENT_FRAMES, SEGMENT_SAMPLES, istft, stft

logger = logging.getLogger(__name__)

MIX = "mix"
ENH = "enh"
STATE_SUFFIX = "_out"


def segment(audio: np.ndarray) -> np.ndarray:
    """(samples,) -> (segments, SEGMENT_SAMPLES), the last segment zero-padded; at least one segment."""
    count = max(1, -(-audio.size // SEGMENT_SAMPLES))
    padded = np.zeros(count * SEGMENT_SAMPLES, dtype=np.float32)
    padded[: audio.size] = audio
    return padded.reshape(count, SEGMENT_SAMPLES)


def enhance_offline(runner: Runner, audio: np.ndarray, max_batch: int | None = None) -> np.ndarray:
    """Enhance a whole utterance with the fixed-length (563-frame) offline model; returns audio.size samples."""
    segments = segment(np.asarray(audio, dtype=np.float32))
    batch = max_batch or segments.shape[0]
    pieces = []
    for start in range(0, segments.shape[0], batch):
        spec = stft(segments[start : start + batch]).astype(np.float32)
        if spec.shape[2] != SEGMENT_FRAMES:
            raise ModelError(f"offline DPCRN feed {MIX}: expected {SEGMENT_FRAMES} frames, got {spec.shape[2]}")
        enh = _output(runner.run({MIX: spec}), ENH)
        pieces.append(istft(enh.astype(np.float32), SEGMENT_SAMPLES))
    return np.concatenate(pieces, axis=0).reshape(-1)[: audio.size]


def state_names(runner: Runner) -> list[str]:
    """Inputs other than `mix` that come back as `<name>_out`, in the runner's input order."""
    outputs = set(runner.output_names)
    names = [name for name in runner.input_names if name != MIX]
    missing = [name for name in names if name + STATE_SUFFIX not in outputs]
    if missing:
        raise ModelError(f"streaming model: state inputs {missing} have no matching '<name>_out' outputs")
    return names


def zero_states(runner: Runner, shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Zero initial states; shapes default to quant.models.dpcrn.STREAM_STATES."""
    if shapes is None:
        from quant.models.dpcrn import STREAM_STATES

        shapes = dict(STREAM_STATES)
    names = state_names(runner)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ModelError(f"streaming model: no initial shape for states {unknown}; known {sorted(shapes)}")
    return {name: np.zeros(tuple(shapes[name]), dtype=np.float32) for name in names}


def stream_frames(
    runner: Runner, spec: np.ndarray, states: Mapping[str, np.ndarray]
) -> Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Roll over (257, T, 2) frame by frame; yields (feeds, outputs) of each step with the states carried by name."""
    current = dict(states)
    for t in range(spec.shape[1]):
        feeds = {MIX: np.ascontiguousarray(spec[None, :, t : t + 1, :], dtype=np.float32), **current}
        outputs = runner.run(feeds)
        yield feeds, outputs
        current = {name: _state(outputs, name, current[name]) for name in current}


def enhance_streaming(
    runner: Runner, audio: np.ndarray, state_shapes: Mapping[str, Sequence[int]] | None = None
) -> np.ndarray:
    """Enhance with the T=1 streaming model, one 256-sample hop per step; returns audio.size samples."""
    samples = stream_padded(np.asarray(audio, dtype=np.float32))
    spec = stft(samples)
    frames = [_output(out, ENH) for _, out in stream_frames(runner, spec, zero_states(runner, state_shapes))]
    enh = np.concatenate(frames, axis=2)[0]
    return istft(enh.astype(np.float32), samples.size)[: np.asarray(audio).size]


def stream_padded(audio: np.ndarray) -> np.ndarray:
    """Zero-pad to whole hops plus one, so every input sample is covered by two frames (as in the offline
    segment, whose zero tail gives the last samples their second frame); the result is cut back afterwards."""
    hops = -(-audio.size // HOP) + 1
    padded = np.zeros(hops * HOP, dtype=np.float32)
    padded[: audio.size] = audio
    return padded


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in outputs:
        raise ModelError(f"enhancement model has no output {name!r}; it returned {sorted(outputs)}")
    return np.asarray(outputs[name])


def _state(outputs: Mapping[str, np.ndarray], name: str, previous: np.ndarray) -> np.ndarray:
    value = _output(outputs, name + STATE_SUFFIX)
    if value.dtype != previous.dtype or value.shape != previous.shape:
        raise ModelError(
            f"state {name + STATE_SUFFIX}: came back as {value.dtype}{list(value.shape)} but {name} is fed as "
            f"{previous.dtype}{list(previous.shape)}; the streaming model must return states as it takes them"
        )
    return value


# ------------------------------------------------------------------------------------------------ set evaluation


@dataclass(frozen=True)
class SeScores:
    pesq_wb: float
    pesq_nb: float
    stoi: float
    si_sdr: float

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def score(clean: np.ndarray, signal: np.ndarray, name: str = "") -> SeScores:
    return SeScores(
        pesq_wb=metrics.pesq_wb(clean, signal, name=name),
        pesq_nb=metrics.pesq_nb(clean, signal, name=name),
        stoi=metrics.stoi(clean, signal, name=name),
        si_sdr=metrics.si_sdr(clean, signal, name=name),
    )


def mean_scores(scores: Sequence[SeScores]) -> SeScores:
    if not scores:
        raise ModelError("no utterances were scored; the evaluation set is empty")
    return SeScores(*(float(np.mean([getattr(s, field) for s in scores])) for field in SeScores.__dataclass_fields__))


@dataclass(frozen=True)
class SeResult:
    utterances: int
    noisy: SeScores
    enhanced: SeScores
    per_utterance: tuple[tuple[str, SeScores, SeScores], ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "utterances": self.utterances,
            "noisy": self.noisy.to_dict(),
            "enhanced": self.enhanced.to_dict(),
            **{key: value for key, value in self.enhanced.to_dict().items()},
        }

    def task_fields(self) -> dict[str, object]:
        """The row's `task` fields in results.json: enhanced means, the utterance count, noisy means as noisy_*."""
        fields: dict[str, object] = {**self.enhanced.to_dict(), "utterances": self.utterances}
        fields.update({f"noisy_{key}": value for key, value in self.noisy.to_dict().items()})
        return fields

    def per_utterance_columns(self) -> dict[str, list[str] | list[float]]:
        """The enhanced scores per utterance as columns (`ids` plus one list per metric), the layout results.json
        stores so two rows can be compared pairwise (quant.eval.stats.from_columns)."""
        columns: dict[str, list[str] | list[float]] = {"ids": [name for name, _, _ in self.per_utterance]}
        for key in SeScores.__dataclass_fields__:
            columns[key] = [float(getattr(after, key)) for _, _, after in self.per_utterance]
        return columns


NoisyClean = tuple[str, np.ndarray, np.ndarray]


def evaluate_se(
    enhance: Callable[[np.ndarray], np.ndarray],
    pairs: Iterable[NoisyClean],
    noisy_scores: Mapping[str, SeScores] | None = None,
) -> SeResult:
    """Score `enhance(noisy)` and the noisy input against clean for every (name, noisy, clean).

    `noisy_scores` (by name) skips re-scoring the unchanged noisy input when several models share a set.
    """
    return se_result(score_rows(enhance, pairs, noisy_scores))


SeRow = tuple[str, SeScores, SeScores]  # (name, noisy scores, enhanced scores) of one utterance


def score_rows(enhance: Callable[[np.ndarray], np.ndarray], pairs: Iterable[NoisyClean],
               noisy_scores: Mapping[str, SeScores] | None = None) -> list[SeRow]:
    """The per-utterance rows evaluate_se averages (a shard of a set gives its part of them)."""
    rows = []
    for name, noisy, clean in pairs:
        enhanced = enhance(noisy)
        before = noisy_scores[name] if noisy_scores and name in noisy_scores else score(clean, noisy, name)
        rows.append((name, before, score(clean, enhanced, name)))
    return rows


def se_result(rows: Sequence[SeRow]) -> SeResult:
    """The set result of per-utterance (name, noisy, enhanced) rows in set order (also: shards gathered)."""
    return SeResult(
        utterances=len(rows),
        noisy=mean_scores([before for _, before, _ in rows]),
        enhanced=mean_scores([after for _, _, after in rows]),
        per_utterance=tuple(rows),
    )


def load_pairs(manifest: str, limit: int | None = None, part: range | None = None) -> list[NoisyClean]:
    """(name, noisy, clean) of the first `limit` utterances of an SE manifest (quant.data.manifest); `part`: only
    those positions of them (a shard; names keep the set position)."""
    from quant.data.manifest import load_noisy_clean, read_manifest

    utterances = read_manifest(manifest)[:limit] if limit else read_manifest(manifest)
    pairs = []
    for index, utt in enumerate(utterances):
        if part is not None and index not in part:
            continue
        noisy, clean = load_noisy_clean(utt)
        name = f"{index}:{utt.path.name}"
        pairs.append((name, np.asarray(noisy, np.float32), np.asarray(clean, np.float32)))
    return pairs
