"""Run a spec's graphs in ONNX Runtime on front-end features: offline (the graph chain, whole utterance) or
streaming (frame by frame, states carried through the spec's state pairs), and the enhanced waveform (SE)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from quant.frontends import frontend
from quant.frontends.output import output_axes, to_waveform
from quant.spec import GraphSpec, ModelSpec


def session(graph: GraphSpec) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(graph.onnx_path()), options, providers=["CPUExecutionProvider"])


def initial_states(spec: ModelSpec) -> dict[str, np.ndarray]:
    assert spec.streaming is not None
    return {s.input: np.full(s.shape, s.init, dtype=s.dtype) for s in spec.streaming.states}


def run_offline(spec: ModelSpec, features: np.ndarray) -> dict[str, np.ndarray]:
    """Every graph once over the whole input, in order, each fed as its spec's feeds say; streaming graphs start
    from their initial states. Returns `<role>:<output>` -> value."""
    values: dict[str, np.ndarray] = {"frontend": features}
    for graph in spec.graphs:
        feeds = graph_feeds(spec, graph, values)
        sess = session(graph)
        names = [o.name for o in sess.get_outputs()]
        values.update({f"{graph.role}:{name}": value for name, value in zip(names, sess.run(names, feeds))})
    return values


def graph_feeds(spec: ModelSpec, graph: GraphSpec, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A graph's feeds from the values so far (`frontend`, `<role>:<output>`) and, streaming, the initial states."""
    feeds = {feed.input: values[feed.source] for feed in graph.feeds}
    if spec.streaming is not None:
        feeds.update({name: value for name, value in initial_states(spec).items() if name in graph.inputs})
    return feeds


def run_streaming(spec: ModelSpec, features: np.ndarray) -> np.ndarray:
    """The streaming graph frame by frame (T axis of the front end's layout), states from the spec's pairs; the
    spec's output concatenated along its T axis."""
    assert spec.streaming is not None and spec.output is not None
    graph = spec.graphs[0]
    sess = session(graph)
    time_axis = spec.frontend.axes.index("T")  # type: ignore[union-attr]
    states = initial_states(spec)
    pairs = {s.input: s.output_name for s in spec.streaming.states}
    names = [o.name for o in sess.get_outputs()]
    outputs = []
    for t in range(features.shape[time_axis]):
        frame = np.take(features, [t], axis=time_axis)
        result = dict(zip(names, sess.run(names, {spec.streaming.frame_input: frame, **states})))
        states = {name: result[output] for name, output in pairs.items()}
        outputs.append(result[spec.output.name])
    fe = frontend(spec.frontend)  # type: ignore[arg-type]
    return np.concatenate(outputs, axis=output_axes(spec.output, fe).index("T"))


def model_output(spec: ModelSpec, features: np.ndarray) -> np.ndarray:
    assert spec.output is not None
    if spec.streaming is not None:
        return run_streaming(spec, features)
    return run_offline(spec, features)[f"{spec.output_graph().role}:{spec.output.name}"]


def enhance(spec: ModelSpec, noisy: np.ndarray) -> np.ndarray:
    """(samples,) noisy -> (samples,) enhanced, through the spec's front end, graphs and [output]."""
    assert spec.frontend is not None and spec.output is not None
    fe = frontend(spec.frontend)
    values = model_output(spec, fe.features(noisy))
    return to_waveform(spec.output, fe, values, noisy)[0]
