"""`quant specs check SPEC`: does a spec describe its graphs? What a run needs, tried once: each graph's file and the
names the spec gives it, the first calibration feed through the FP32 graph (front end, layout, streaming states and
chain wiring), both manifests, and the FP32 evaluation of the first test utterance (output kind and layout). A
mistake stops with the one-line error the run itself would give, in seconds instead of minutes into a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from quant.errors import ModelError
from quant.spec import ModelSpec, SpecError
from quant.tasks import task_for
from quant.onnxgraph.graph import graph_interface
from quant.tasks.common import FeedOptions, open_artifact, select, utterances

Shape = tuple[Any, ...]


@dataclass(frozen=True)
class GraphCheck:
    """One graph: its file, declared input shapes, outputs, and the shapes of the first calibration feed it ran."""

    role: str
    path: Path
    opset: int
    inputs: Mapping[str, Shape]
    outputs: tuple[str, ...]
    feed: Mapping[str, Shape]


@dataclass(frozen=True)
class SpecCheck:
    spec: ModelSpec
    graphs: tuple[GraphCheck, ...]
    manifests: Mapping[str, tuple[Path, int]]  # "calibration" / "test" -> (manifest, utterances)
    fp32: Mapping[str, float]  # the spec's metrics of FP32 on the first test utterance

    def lines(self) -> list[str]:
        out = [f"{self.spec.source or self.spec.name}: {self.spec.name} ({self.spec.model.task}), "
               f"{len(self.graphs)} graph(s): ok"]
        for graph in self.graphs:
            out.append(f"  {graph.role}: {graph.path} (opset {graph.opset})")
            out.append(f"    inputs  {_shapes(graph.inputs)}")
            out.append(f"    outputs {', '.join(graph.outputs)}")
            out.append(f"    first calibration feed ran: {_shapes(graph.feed)}")
        for what, (manifest, count) in self.manifests.items():
            out.append(f"  {what} set: {manifest} ({count} utterances)")
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in self.fp32.items())
        out.append(f"  FP32 on the first test utterance: {metrics}")
        return out


def check_spec(spec: ModelSpec, graphs: Mapping[str, Path]) -> SpecCheck:
    """Everything a run of `spec` needs, tried on one utterance; `graphs`: the FP32 ONNX file of each role (as the
    commands resolve them: the spec's files, checked against its names, or quant's exports)."""
    task = task_for(spec)
    options = FeedOptions(limit=1, graphs=dict(graphs))
    checked = tuple(_check_graph(spec, role, Path(path), task.calibration_feeds(role, options=options))
                    for role, path in graphs.items())
    manifests = {what: _manifest(spec, what) for what in ("calibration", "test")}
    result = task.evaluate(dict(graphs), limit=1).task_fields()
    fp32 = {str(name): float(result[name]) for name in spec.task.metrics
            if isinstance(result.get(name), (int, float))}
    return SpecCheck(spec, checked, manifests, fp32)


def _check_graph(spec: ModelSpec, role: str, path: Path, feeds: Any) -> GraphCheck:
    if spec.streaming is not None and role == _streaming_role(spec):
        _check_shapes(spec, role, path, {s.input: np.zeros(s.shape) for s in spec.streaming.states if s.shape})
    try:
        feed = next(iter(feeds), None)
    except ModelError as error:  # a streaming roll or a chain ran the graph on what the spec made: say where to look
        raise SpecError(f"{spec.source or spec.name}: graph {role!r}: the first calibration feed does not fit the "
                        f"graph ({error}); check [frontend] (transform, frame / n_fft, bins, layout)") from None
    if feed is None:
        raise ModelError(f"{spec.source or spec.name}: graph {role!r} got no calibration feed from the first "
                         "utterance of its calibration set; check [frontend] and the manifest")
    _check_shapes(spec, role, path, feed)
    runner = open_artifact(path)
    runner.run(select(runner, feed, role))  # anything else the graph refuses: one line naming the input
    interface = graph_interface(path)
    return GraphCheck(role, path, interface.opset, interface.inputs, interface.outputs,
                      {name: tuple(np.shape(value)) for name, value in feed.items()})


def _check_shapes(spec: ModelSpec, role: str, path: Path, feed: Mapping[str, Any]) -> None:
    """Each fed array against the graph's fixed dimensions, naming the spec table that shaped it."""
    declared = graph_interface(path).inputs
    for name, value in feed.items():
        want, got = declared.get(name), tuple(np.shape(value))
        if want is None:
            continue
        if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got)):
            raise SpecError(f"{spec.source or spec.name}: graph {role!r} input {name!r}: {_shaped_by(spec, role, name)} "
                            f"gives {got}, but {path} expects {want}")


def _streaming_role(spec: ModelSpec) -> str:
    """The graph the streaming frame input belongs to (the first, when no graph declares it)."""
    frame_input = spec.streaming.frame_input if spec.streaming is not None else None
    return next((g.role for g in spec.graphs if frame_input in g.inputs), spec.graphs[0].role)


def _shaped_by(spec: ModelSpec, role: str, name: str) -> str:
    streaming = spec.streaming
    if streaming is not None and name in (streaming.state_pairs() or {}):
        return "[[streaming.states]] shape"
    feed = next((f for f in spec.graph(role).feeds if f.input == name), None)
    if feed is None or feed.source.startswith("frontend"):
        return "[frontend] (transform, frame / n_fft, bins, layout)"
    return f"feeds ({feed.source!r})"


def _manifest(spec: ModelSpec, what: str) -> tuple[Path, int]:
    from quant.spec import resolve_manifest

    default = spec.defaults.calibration_manifest if what == "calibration" else spec.defaults.test_manifest
    path = resolve_manifest(default, f"{what} manifest")
    return path, len(utterances(spec, path, None, what))


def _shapes(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name} ({', '.join(str(d) for d in shape)})" for name, shape in shapes.items())
