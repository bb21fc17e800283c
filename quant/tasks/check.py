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
from quant.tasks.common import FeedOptions, Shape, open_artifact, select, utterances


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
    """The first feed of `feeds` run through the graph at `path`; the task checks each feed's shapes as it makes it
    (tasks.common.check_feed), so a spec table the graph disagrees with is named before the graph runs."""
    try:
        feed = next(iter(feeds), None)
    except SpecError:
        raise
    except ModelError as error:  # a streaming roll or a chain ran the graph on what the spec made: say where to look
        raise SpecError(f"{spec.source or spec.name}: graph {role!r}: the first calibration feed does not fit the "
                        f"graph ({error}); check [frontend] (transform, frame / n_fft, bins, layout)") from None
    if feed is None:
        raise ModelError(f"{spec.source or spec.name}: graph {role!r} got no calibration feed from the first "
                         "utterance of its calibration set; check [frontend] and the manifest")
    runner = open_artifact(path)
    runner.run(select(spec, role, runner, feed))  # select checks the shapes (an escape hatch's feeds too)
    interface = graph_interface(path)
    return GraphCheck(role, path, interface.opset, interface.inputs, interface.outputs,
                      {name: tuple(np.shape(value)) for name, value in feed.items()})


def _manifest(spec: ModelSpec, what: str) -> tuple[Path, int]:
    from quant.spec import resolve_manifest

    default = spec.defaults.calibration_manifest if what == "calibration" else spec.defaults.test_manifest
    path = resolve_manifest(default, f"{what} manifest")
    return path, len(utterances(spec, path, None, what))


def _shapes(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name} ({', '.join(str(d) for d in shape)})" for name, shape in shapes.items())
