"""Tasks: what a model spec's graphs are fed and how they are judged, so every command works from a spec.

    task = task_for(load_spec("dpcrn-stream"))
    feeds = task.calibration_feeds("enhancer", manifest, FeedOptions(export_dir=exports))  # re-iterable feeds
    result = task.evaluate({"enhancer": "int8.onnx"}, test_manifest, limit=10)          # SeResult / AsrResult
    result = evaluate_sharded(spec, {"enhancer": Path("int8.onnx")}, test_manifest, 10, executor)  # the same, in
                                                                        # shards on Ray (quant.tasks.sharded)
    load = task.speed_workload("enhancer", test_manifest, FeedOptions(export_dir=exports)) # GraphWorkload

A Task reads everything model-specific from the spec (front end, state pairs, chain wiring, output kind, token ids);
quant.tasks.se covers speech enhancement (offline, streaming, chained graphs), quant.tasks.asr CTC + attention
rescoring ASR. Graph runners come from quant.backends (sessions are made only there).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, Sequence

from quant.backends import Runner
from quant.eval.speed import GraphWorkload
from quant.spec import ModelSpec
from quant.tasks.common import Artifact, Feed, FeedOptions


class TaskResult(Protocol):
    """What a Task's evaluation gives the pipeline: mean metrics and per-utterance columns (results.json)."""

    def task_fields(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...

    def per_utterance_columns(self) -> Mapping[str, Any]: ...


class Task(Protocol):
    spec: ModelSpec

    def calibration_feeds(self, role: str, manifest: str | None = None,
                          options: FeedOptions = FeedOptions()) -> Iterable[Feed]: ...

    @property
    def shard_unit(self) -> int:
        """Utterances that must stay together in one evaluation shard (ASR: a transcription batch)."""
        ...

    def evaluate(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                 threads: int = 1, memo: dict[str, Any] | None = None) -> TaskResult:
        """combine(evaluate_rows(...)): the in-process evaluation."""
        ...

    def evaluate_rows(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                      threads: int = 1, memo: dict[str, Any] | None = None,
                      part: range | None = None) -> Sequence[Any]:
        """Per-utterance rows in set order, only the positions in `part` when given (one shard's share)."""
        ...

    def combine(self, rows: Sequence[Any]) -> TaskResult:
        """The set result of every row in set order, exactly as evaluate scores it."""
        ...

    def speed_workload(self, role: str, manifest: str | None = None,
                       options: FeedOptions = FeedOptions()) -> GraphWorkload: ...


def task_for(spec: ModelSpec) -> Task:
    """The Task of a spec's [model] task (se or asr)."""
    if spec.model.task == "asr":
        from quant.tasks.asr import AsrTask

        return AsrTask(spec)
    from quant.tasks.se import SeTask

    return SeTask(spec)


__all__ = ["Artifact", "Feed", "FeedOptions", "Runner", "Task", "TaskResult", "task_for"]
