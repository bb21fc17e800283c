"""A spec's evaluation in shards through a quant.executor seam (`--executor ray`); results equal the in-process one.

Each shard is a contiguous run of the evaluated utterances (starting at a multiple of the task's `shard_unit`): the
worker runs `task.evaluate_rows(..., part=shard)` (it reads its utterances through the manifest's paths: shared
storage), the driver gathers the rows in set order and scores them with `task.combine`, the very functions the
in-process `task.evaluate` is made of, so means and per-utterance columns are identical for every spec.

The model files travel once per stage through the executor's shared context as bytes (Ray's object store), never by
path: a worker opens its runners from a private temp copy, once per process, and removes the copy as soon as they are
open, so nothing is written outside the worker's temp folder.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from quant.backends import Runner, open_runner
from quant.errors import ModelError, QuantError
from quant.executor import Executor, Shard, split
from quant.fileio import private_temp_dir
from quant.spec import ModelSpec, resolve_manifest
from quant.tasks import TaskResult, task_for

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8
# backends whose runners need this machine's accelerator: a Ray task asks for one CPU, never a GPU
IN_PROCESS_BACKENDS = ("trt",)


@dataclass(frozen=True)
class ArtifactFile:
    """One model file by content, the graph role it serves and the backend that opens it."""

    role: str
    name: str
    data: bytes
    backend: str = "ort"
    beside: tuple[tuple[str, bytes], ...] = ()  # an ONNX file's external data files (relative name, bytes)


@dataclass(frozen=True)
class Artifacts:
    """Model files by graph role, and the threads their runners take (quant.backends.open_runner)."""

    files: tuple[ArtifactFile, ...]
    threads: int = 1

    @classmethod
    def read(cls, paths: Mapping[str, Path], backend: str = "ort", threads: int = 1) -> "Artifacts":
        """Every file read now (a missing one fails here, naming its role), each opened with `backend`."""
        files = []
        for role, path in paths.items():
            if not Path(path).is_file():
                raise ModelError(f"{path}: artifact of graph {role!r} not found; build or export it first")
            beside = tuple((name, (Path(path).parent / name).read_bytes()) for name in external_data(Path(path)))
            files.append(ArtifactFile(role, Path(path).name, Path(path).read_bytes(), backend, beside))
        return cls(tuple(files), threads)

    def digest(self) -> str:
        digest = hashlib.sha256(str(self.threads).encode())
        for item in self.files:
            for name, data in ((item.name, item.data), *item.beside):
                digest.update(f"{item.role}/{name}/{item.backend}\0".encode() + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def open(self) -> dict[str, Runner]:
        """A runner per role from private temp copies (each role in its own folder: builds share `model.onnx`;
        the file name is kept, PyTorch eager reads the graph from it)."""
        runners = {}
        with private_temp_dir("quant-eval-") as tmp:
            for item in self.files:
                for name, data in ((item.name, item.data), *item.beside):
                    (tmp / item.role / name).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / item.role / name).write_bytes(data)
                runners[item.role] = open_runner(tmp / item.role / item.name, item.backend, self.threads)
        return runners


def external_data(path: Path) -> list[str]:
    """The files an ONNX model keeps its external tensors in, relative to its folder (none for other files); one
    that is missing or outside the folder is an error naming it."""
    if path.suffix != ".onnx":
        return []
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(path), load_external_data=False).graph
    names = sorted({entry.value for tensor in _tensors(graph) if uses_external_data(tensor)
                    for entry in tensor.external_data if entry.key == "location"})
    for name in names:
        target = (path.parent / name).resolve()
        if not target.is_file() or not target.is_relative_to(path.parent.resolve()):
            raise ModelError(f"{path}: external data {name!r} not found beside the model; keep it in the model's "
                             "folder")
    return names


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else [])
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


@dataclass(frozen=True)
class EvalContext:
    """What every shard of one evaluation needs (shipped once)."""

    spec: ModelSpec
    artifacts: Artifacts
    manifest: str
    limit: int | None


def evaluate_sharded(spec: ModelSpec, artifacts: Mapping[str, Path], manifest: str | Path | None,
                     limit: int | None, executor: Executor, backend: str = "ort", threads: int = 1,
                     shards: int = DEFAULT_SHARDS) -> TaskResult:
    """task_for(spec).evaluate of the artifact files by role on `manifest` (default: the spec's test manifest),
    its utterances in `shards` shards on `executor`; the same result, `utterances` counting every one evaluated."""
    if backend in IN_PROCESS_BACKENDS and executor.name != "local":
        raise QuantError(f"--backend {backend} runs on this machine's GPU; evaluate it without --executor "
                         f"{executor.name}")
    task = task_for(spec)
    path = str(manifest or resolve_manifest(spec.defaults.test_manifest, "test manifest"))
    context = EvalContext(spec, Artifacts.read(artifacts, backend, threads), path, limit)
    parts = utterance_shards(path, limit, shards, task.shard_unit)
    log.info("%s: %d utterances in %d shards on %s", spec.name, sum(len(p.payload) for p in parts), len(parts),
             executor.name)
    return task.combine(gather(executor.map(evaluate_shard, parts, context), parts))


def utterance_shards(manifest: str, limit: int | None, count: int, unit: int) -> list[Shard[range]]:
    """Contiguous shards over positions of the first `limit` utterances of `manifest`, starting at multiples of
    `unit`."""
    from quant.data.manifest import read_manifest

    total = len(read_manifest(manifest))
    size = min(limit, total) if limit else total
    return [Shard(index, part, tuple(f"utterance {i + 1}" for i in part))
            for index, part in enumerate(split(range(size), count, unit))]


def gather(results: Sequence[Sequence[Any]], parts: Sequence[Shard[Any]]) -> list[Any]:
    """Every shard's rows in shard order; a shard that returned another number of rows than it covers fails the
    stage (never a silently smaller set)."""
    rows: list[Any] = []
    for shard, result in zip(parts, results):
        if len(result) != len(shard.payload):
            raise ModelError(f"{shard.label(len(parts))} returned {len(result)} of {len(shard.payload)} utterances")
        rows.extend(result)
    return rows


# ------------------------------------------------------------------------------------------------ worker side


def evaluate_shard(shard: Shard[range], context: EvalContext) -> Sequence[Any]:
    task = task_for(context.spec)
    return task.evaluate_rows(runners(context.artifacts), context.manifest, context.limit, context.artifacts.threads,
                              part=shard.payload)


_RUNNERS: dict[str, dict[str, Runner]] = {}  # per worker process: further shards of the same artifacts reuse them


def runners(artifacts: Artifacts) -> dict[str, Runner]:
    """The artifacts' runners by role, opened once per process (the last artifacts only: a long search would
    otherwise keep every candidate's session)."""
    digest = artifacts.digest()
    if digest not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[digest] = artifacts.open()
    return _RUNNERS[digest]


__all__ = ["ArtifactFile", "Artifacts", "DEFAULT_SHARDS", "EvalContext", "IN_PROCESS_BACKENDS", "evaluate_shard",
           "evaluate_sharded", "external_data", "gather", "runners", "utterance_shards"]
