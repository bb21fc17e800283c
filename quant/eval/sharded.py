"""Accuracy evaluation in shards through a quant.executor seam; results equal the in-process evaluation.

Each shard is a contiguous run of the test set's utterances: the worker reads them itself through the manifest's
paths (shared storage), runs the artifact and returns per-utterance rows (SE: noisy and enhanced scores; ASR:
transcripts); the driver gathers them in set order and computes the set result exactly as the in-process
evaluation does (quant.eval.se.se_result, quant.eval.asr.score_transcripts), so means and per-utterance columns
are identical. ASR shards start at multiples of the transcription batch: a batch is padded to its longest
utterance, and cutting it differently could move the encoder's numbers.

The artifacts travel once through the executor's shared context as bytes (not by path): a worker opens its runners
from a private temp copy, once per process, and removes the copy as soon as they are open.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quant.errors import ModelError
from quant.eval.asr import AsrOptions, AsrResult, AsrSample, Transcript, load_samples, score_transcripts, transcribe
from quant.eval.se import SeResult, SeScores, enhance_offline, enhance_streaming, load_pairs, score, se_result
from quant.executor import Executor, Shard, split
from quant.fileio import private_temp_dir

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8


@dataclass(frozen=True)
class Artifacts:
    """Model files by name and content, and how to open them (quant.backends.open_runner)."""

    files: tuple[tuple[str, bytes], ...]
    backend: str = "ort"
    threads: int = 1

    @classmethod
    def read(cls, paths: Sequence[Path], backend: str = "ort", threads: int = 1) -> "Artifacts":
        files = []
        for path in paths:
            if not Path(path).is_file():
                raise ModelError(f"artifact {path} not found: build or export it first")
            files.append((Path(path).name, Path(path).read_bytes()))
        return cls(tuple(files), backend, threads)

    def digest(self) -> str:
        digest = hashlib.sha256(f"{self.backend}/{self.threads}".encode())
        for name, data in self.files:
            digest.update(name.encode() + b"\0" + data)
        return digest.hexdigest()


@dataclass(frozen=True)
class SeContext:
    artifacts: Artifacts
    manifest: str
    limit: int | None
    streaming: bool


@dataclass(frozen=True)
class AsrContext:
    artifacts: Artifacts
    manifest: str
    limit: int | None
    options: AsrOptions


SeRow = tuple[str, SeScores, SeScores]


def evaluate_se_sharded(artifact: Path, streaming: bool, manifest: str | Path, limit: int | None,
                        executor: Executor, backend: str = "ort", threads: int = 1,
                        shards: int = DEFAULT_SHARDS) -> SeResult:
    """quant.eval.se.evaluate_se of the offline (or streaming) SE artifact on `manifest`, in shards on `executor`."""
    context = SeContext(Artifacts.read([artifact], backend, threads), str(manifest), limit, streaming)
    parts = _shards(manifest, limit, shards, unit=1)
    rows = _gather(executor.map(evaluate_se_shard, parts, context), parts)
    return se_result(rows)


def evaluate_asr_sharded(encoder: Path, decoder: Path, manifest: str | Path, limit: int | None,
                         executor: Executor, options: AsrOptions = AsrOptions(), backend: str = "ort",
                         threads: int = 1, shards: int = DEFAULT_SHARDS) -> AsrResult:
    """quant.eval.asr.evaluate_asr of the encoder + decoder on `manifest`, in shards on `executor`."""
    context = AsrContext(Artifacts.read([encoder, decoder], backend, threads), str(manifest), limit, options)
    parts = _shards(manifest, limit, shards, unit=options.batch_size)
    pairs = _gather(executor.map(evaluate_asr_shard, parts, context), parts)
    return score_transcripts([sample for sample, _ in pairs], [transcript for _, transcript in pairs])


def _shards(manifest: str | Path, limit: int | None, count: int, unit: int) -> list[Shard[range]]:
    from quant.data.manifest import read_manifest

    utterances = read_manifest(manifest)
    size = min(limit, len(utterances)) if limit else len(utterances)
    return [Shard(index, part, tuple(f"utterance {i + 1}" for i in part))
            for index, part in enumerate(split(range(size), count, unit))]


def _gather(results: list[list[Any]], parts: Sequence[Shard[range]]) -> list[Any]:
    rows = []
    for shard, result in zip(parts, results):
        if len(result) != len(shard.payload):  # never a silently smaller set
            raise ModelError(f"{shard.label(len(parts))} returned {len(result)} of {len(shard.payload)} utterances")
        rows.extend(result)
    return rows


# ------------------------------------------------------------------------------------------------ worker side


def evaluate_se_shard(shard: Shard[range], context: SeContext) -> list[SeRow]:
    (runner,) = _runners(context.artifacts)
    enhance = enhance_streaming if context.streaming else enhance_offline
    rows = []
    for name, noisy, clean in load_pairs(context.manifest, context.limit, shard.payload):
        rows.append((name, score(clean, noisy, name), score(clean, enhance(runner, noisy), name)))
    return rows


def evaluate_asr_shard(shard: Shard[range], context: AsrContext) -> list[tuple[AsrSample, Transcript]]:
    encoder, decoder = _runners(context.artifacts)
    samples = load_samples(context.manifest, context.limit, shard.payload)
    transcripts = transcribe(encoder, decoder, [sample.audio for sample in samples], options=context.options)
    # the audio stays here: the driver scores from names, references and transcripts
    return [(replace(sample, audio=np.zeros(0, np.float32)), text) for sample, text in zip(samples, transcripts)]


_RUNNERS: dict[str, list[Any]] = {}  # per worker process: further shards of the same artifacts reuse the runners


def _runners(artifacts: Artifacts) -> list[Any]:
    from quant.backends import open_runner

    digest = artifacts.digest()
    if digest not in _RUNNERS:
        _RUNNERS.clear()
        with private_temp_dir("quant-eval-") as tmp:
            runners = []
            for name, data in artifacts.files:
                (tmp / name).write_bytes(data)
                runners.append(open_runner(tmp / name, artifacts.backend, artifacts.threads))
            _RUNNERS[digest] = runners
    return _RUNNERS[digest]
