"""What SE and ASR tasks share: feed options, re-iterable feeds, manifest audio, runners for graphs, the spec's
escape hatch (.npz / module:function feeds), graph wiring and the streaming roll over recorded states."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, Union

import numpy as np

from quant.backends import Runner, open_runner
from quant.calib.readers import batched  # noqa: F401  (the tasks' batching is the readers' own)
from quant.errors import ModelError
from quant.onnxgraph.graph import graph_interface
from quant.spec import GraphSpec, ModelSpec, SpecError, StreamingSpec, resolve_manifest

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Artifact = Union[str, "os.PathLike[str]", Runner]  # an ONNX file, a TensorRT engine, or an opened runner
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class FeedOptions:
    """How calibration feeds are made; None = the spec's [defaults]. `graphs` names FP32 ONNX files by role (else
    the spec's paths, or quant's exports under `export_dir`): streaming rolls, chains and ASR n-best run them."""

    limit: int | None = None  # the first N utterances of the manifest
    batch_size: int | None = None
    frame_stride: int | None = None
    threads: int = 1
    graphs: Mapping[str, Path] = field(default_factory=dict)
    export_dir: Path | None = None
    allow_outside: bool = False  # manifest paths may leave the manifest's folder (a run's subset manifests do)
    # "first": the first `limit` utterances (calibration); "test": the utterances evaluation scores with `limit`
    # (ASR: balanced over sources), so the pipeline's error-vs-FP32 feeds and speed workload see the evaluated audio
    selection: Literal["first", "test"] = "first"


@dataclass(frozen=True)
class Reiterable:
    """Feeds that start over on each iter() (the cache key hashes the feeds, then the range collector reads them)."""

    make: Callable[[], Iterator[Feed]]

    def __iter__(self) -> Iterator[Feed]:
        return self.make()


# ------------------------------------------------------------------------------------------------ audio


def utterances(spec: ModelSpec, manifest: str | os.PathLike[str] | None, limit: int | None,
               what: str = "calibration", allow_outside: bool = False) -> list[Any]:
    """The first `limit` utterances of `manifest` (default: the spec's calibration or test manifest)."""
    from quant.data.manifest import read_manifest

    default = spec.defaults.calibration_manifest if what == "calibration" else spec.defaults.test_manifest
    path = Path(manifest) if manifest is not None else resolve_manifest(default, f"{what} manifest")
    items = list(read_manifest(path, allow_outside=allow_outside))
    return items[:limit] if limit else items


@dataclass(frozen=True)
class Audio:
    """What a model hears of each manifest utterance (`load`: noisy_audio for SE, speech_audio for ASR), loaded one
    at a time on each iteration, so a calibration set never sits in memory whole."""

    items: tuple[Any, ...]
    load: Callable[[Any], np.ndarray]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.load(item) for item in self.items)


def speech_audio(utterance: Any) -> np.ndarray:
    """The clean speech of an utterance (what an ASR model hears)."""
    from quant.data.manifest import load_speech

    return load_speech(utterance)


def noisy_audio(utterance: Any) -> np.ndarray:
    """The noisy mixture of an SE utterance, mixed from its manifest recipe (what the model sees at inference)."""
    from quant.data.manifest import load_noisy_clean

    noisy, _clean = load_noisy_clean(utterance)
    return np.asarray(noisy, dtype=np.float32)


def segments(audio: np.ndarray, samples: int) -> np.ndarray:
    """(count, samples): the audio cut into fixed-length pieces, the last one zero-padded; at least one."""
    count = max(1, -(-audio.size // samples))
    padded = np.zeros(count * samples, dtype=np.float32)
    padded[: audio.size] = audio
    return padded.reshape(count, samples)


# ------------------------------------------------------------------------------------------------ graphs


def fp32_path(spec: ModelSpec, role: str, options: FeedOptions) -> Path:
    """The FP32 ONNX file of a graph: options.graphs[role], else the spec's path or quant's export (checked
    against the names the spec declares)."""
    if role in options.graphs:
        return Path(options.graphs[role])
    return graph_file(spec, spec.graph(role), options.export_dir)


def graph_file(spec: ModelSpec, graph: GraphSpec, export_dir: Path | None = None) -> Path:
    """The graph's ONNX file, which must have every input and output the spec names for it (`inputs`, `outputs`
    and the `feeds` inputs): a wrong name fails here, in one line naming the spec key and the file's names, instead
    of in the middle of a calibration or, for builds, not at all."""
    path = graph.onnx_path(export_dir)
    file_inputs, file_outputs = io_names(path)
    index = spec.graphs.index(graph) + 1
    wanted = {"inputs": (*graph.inputs, *(f.input for f in graph.feeds)), "outputs": graph.outputs}
    for kind, there in (("inputs", file_inputs), ("outputs", file_outputs)):
        missing = [name for name in dict.fromkeys(wanted[kind]) if name not in there]
        if missing:
            raise SpecError(f"{spec.source or spec.name}: graphs[{index}] ({graph.role!r}) names {kind} {missing} "
                            f"that {path} does not have (its {kind}: {', '.join(there)}); fix the names in the spec")
    return path


def io_names(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """An ONNX file's graph input names (initializers left out) and output names."""
    interface = graph_interface(path)
    return tuple(interface.inputs), interface.outputs


def open_artifact(artifact: Artifact, threads: int = 1) -> Runner:
    """A runner for an ONNX file (ONNX Runtime), a TensorRT engine, or a runner given as is."""
    if isinstance(artifact, (str, os.PathLike)):
        path = Path(artifact)
        return open_runner(path, "trt" if path.suffix in ENGINE_SUFFIXES else "ort", threads=threads)
    return artifact


def input_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Declared shapes of an ONNX file's inputs (a dynamic dimension is its symbol, or '?')."""
    return dict(graph_interface(path).inputs)


def select(spec: ModelSpec, role: str, runner: Runner, feeds: Mapping[str, np.ndarray]) -> Feed:
    """The runner's inputs out of `feeds` (a missing one is an error naming what the task could build), checked
    against the graph's fixed dimensions (check_feed)."""
    missing = [name for name in runner.input_names if name not in feeds]
    if missing:
        raise ModelError(f"graph {role!r}: inputs {missing} have no source; the task built {sorted(feeds)} (name "
                         "them in the spec's [[graphs]] feeds)")
    return check_feed(spec, role, runner, {name: feeds[name] for name in runner.input_names})


Shape = tuple[Any, ...]


def check_feed(spec: ModelSpec, role: str, graph: Path | Runner, feed: Feed) -> Feed:
    """`feed` once each array a task feeds graph `role` fits the fixed dimensions the graph declares (`graph`: its
    ONNX file, or a runner that declares its inputs, as ONNX Runtime's does); a mismatch is a SpecError naming the
    spec table that shaped the array. Every feed a task makes passes here (a streaming roll's first step), so
    calibrate, build, evaluate, run and `quant specs check` all stop on a spec that disagrees with its graph with
    this one line instead of the runtime's."""
    declared, where = _declared_inputs(graph)
    for name, value in feed.items():
        want, got = declared.get(name), tuple(np.shape(value))
        if want is None:
            continue
        if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got)):
            raise SpecError(f"{spec.source or spec.name}: graph {role!r} input {name!r}: "
                            f"{_shaped_by(spec, role, name)} gives {got}, but {where} expects {want}")
    return feed


def _declared_inputs(graph: Path | Runner) -> tuple[Mapping[str, Shape], str]:
    """(input name -> declared shape, the file or graph they come from); a runner that declares none: nothing."""
    if isinstance(graph, Path):
        return graph_interface(graph).inputs, str(graph)
    specs = getattr(graph, "input_specs", ())
    return {s.name: tuple(s.shape) for s in specs}, str(getattr(graph, "path", "the graph"))


def _shaped_by(spec: ModelSpec, role: str, name: str) -> str:
    """The spec table that made input `name` of graph `role`."""
    streaming = spec.streaming
    if streaming is not None and name in (streaming.state_pairs() or {}):
        return "[[streaming.states]] shape"
    feed = next((f for f in spec.graph(role).feeds if f.input == name), None)
    if feed is None or feed.source.startswith("frontend"):
        return "[frontend] (transform, frame / n_fft, bins, layout)"
    return f"feeds ({feed.source!r})"


def wire(graph: GraphSpec, sources: Mapping[str, np.ndarray], inputs: Sequence[str]) -> Feed:
    """Feeds of `graph` from named sources (`frontend`, `<role>:<output>`, `nbest:<field>` ...) as its [[graphs]]
    feeds say; without feeds, an input takes the source of the same name (or the front end, if it is the only one)."""
    if graph.feeds:
        feeds = {}
        for feed in graph.feeds:
            if feed.source not in sources:
                raise ModelError(f"graph {graph.role!r}: input {feed.input!r} is fed from {feed.source!r}, which the "
                                 f"task does not have here (it has {sorted(sources)})")
            feeds[feed.input] = sources[feed.source]
        return feeds
    by_tensor = {name.partition(":")[2] or name: value for name, value in sources.items() if ":" in name}
    feeds = {name: by_tensor[name] for name in inputs if name in by_tensor}
    rest = [name for name in inputs if name not in feeds]
    if len(rest) == 1 and "frontend" in sources:
        feeds[rest[0]] = sources["frontend"]
    return feeds


# ------------------------------------------------------------------------------------------------ escape hatch


def hatch_feeds(spec: ModelSpec, role: str, audio: Iterable[np.ndarray]) -> Iterable[Feed] | None:
    """The spec's [feeds] escape hatch for graph `role` (None when the spec has none)."""
    if spec.feeds is None:
        return None
    if spec.feeds.npz is not None:
        return Reiterable(lambda: _npz_feeds(spec, role))
    function = spec.feeds.load_function()
    graph = spec.graph(role)
    return Reiterable(lambda: iter(function(spec, graph, audio)))


NPZ_HOW = "numpy.savez(path, input_name=array, ...)"


def _open_npz(path: Path) -> Any:
    """The .npz archive at `path` (pickled objects never load): anything else is one line naming the file."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # text, pickle, a truncated zip
        raise ModelError(f"{path}: not a .npz archive of arrays; write it with {NPZ_HOW}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ModelError(f"{path}: one .npy array, not a .npz archive of arrays named by input; write it with "
                         f"{NPZ_HOW}")
    return loaded


def _npz_feeds(spec: ModelSpec, role: str) -> Iterator[Feed]:
    path = spec.feeds.npz if spec.feeds else None
    assert path is not None
    if not path.is_file():
        raise ModelError(f"{path}: feeds .npz not found (spec [feeds] npz)")
    prefix = f"{role}/" if len(spec.graphs) > 1 else ""
    with _open_npz(path) as archive:
        try:
            arrays = {name[len(prefix):]: archive[name] for name in archive.files if name.startswith(prefix)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # a damaged or pickled member
            raise ModelError(f"{path}: an array cannot be read ({error}); write the file again with "
                             f"{NPZ_HOW}") from None
    if not arrays:
        raise ModelError(f"{path}: no arrays for graph {role!r} (name them by input, or '{role}/<input>')")
    counts = {len(value) for value in arrays.values()}
    if len(counts) != 1:
        raise ModelError(f"{path}: arrays for {role!r} hold different numbers of feeds along axis 0: "
                         f"{ {name: len(value) for name, value in arrays.items()} }")
    for index in range(counts.pop()):
        yield {name: value[index] for name, value in arrays.items()}


# ------------------------------------------------------------------------------------------------ streaming


@dataclass(frozen=True)
class StateLayout:
    """A streaming graph's frame input, its state pairs (input -> output) and the states at an utterance start."""

    frame_input: str
    pairs: Mapping[str, str]
    initial: Mapping[str, np.ndarray]

    def fresh(self) -> Feed:
        return {name: value.copy() for name, value in self.initial.items()}


def state_layout(streaming: StreamingSpec, inputs: Sequence[str], outputs: Sequence[str],
                 shapes: Mapping[str, Sequence[int | str]], where: str) -> StateLayout:
    """State pairs from the spec (or the `_out` convention) and their initial values (spec shape/init, else the
    ONNX input's fixed shape, zeros)."""
    from quant.spec import STATE_SUFFIX

    listed = {state.input: state for state in streaming.states}
    pairs = streaming.state_pairs() or {name: name + STATE_SUFFIX for name in inputs
                                        if name != streaming.frame_input and name + STATE_SUFFIX in outputs}
    problems = [f"{i} -> {o}" for i, o in pairs.items() if i not in inputs or o not in outputs]
    unfed = [name for name in inputs if name != streaming.frame_input and name not in pairs]
    if problems or unfed or streaming.frame_input not in inputs:
        raise ModelError(f"{where}: streaming frame input {streaming.frame_input!r} and state pairs {dict(pairs)} do "
                         f"not match the graph (inputs {list(inputs)}, outputs {list(outputs)}; bad pairs "
                         f"{problems}, inputs with no state pair {unfed}); list them in [[streaming.states]]")
    initial = {}
    for name in pairs:
        state = listed.get(name)
        shape = tuple(state.shape) if state and state.shape else tuple(shapes.get(name, ()))
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ModelError(f"{where}: state {name!r} has no fixed shape (ONNX says {list(shape)}); give "
                             "[[streaming.states]] shape in the spec")
        dtype = np.dtype(state.dtype) if state else np.dtype(np.float32)
        initial[name] = np.full(tuple(int(d) for d in shape), state.init if state else 0.0, dtype=dtype)
    return StateLayout(streaming.frame_input, pairs, initial)


def layout_for(spec: ModelSpec, runner: Runner, path: Path | None, where: str) -> StateLayout:
    """The StateLayout of a streaming spec's graph run by `runner` (shapes from the ONNX file when there is one)."""
    assert spec.streaming is not None
    shapes: Mapping[str, Sequence[int | str]] = {}
    if path is not None and path.suffix == ".onnx":
        shapes = input_shapes(path)
    elif hasattr(runner, "input_specs"):
        shapes = {s.name: s.shape for s in runner.input_specs}
    return state_layout(spec.streaming, runner.input_names, runner.output_names, shapes, where)


def time_axis(axes: str) -> int:
    """Where frames run in a front end's layout (T; S for a raw waveform)."""
    return axes.index("T") if "T" in axes else axes.index("S")


def frame_slices(features: np.ndarray, axis: int, step: int) -> Iterator[np.ndarray]:
    """Consecutive `step`-frame slices of batch-1 features along `axis` (a short tail is dropped)."""
    for start in range(0, features.shape[axis] - step + 1, step):
        yield np.ascontiguousarray(np.take(features, np.arange(start, start + step), axis=axis))


def roll(runner: Runner, layout: StateLayout, frames: Iterable[np.ndarray],
         check: Callable[[Feed], object]) -> Iterator[tuple[Feed, dict[str, Any]]]:
    """Run a streaming graph frame by frame from its initial states; yields (feeds, outputs) of every step, each
    next state taken from its paired output. `check` sees the first step's feeds before the graph does (check_feed:
    the frame's and the states' shapes are the same at every step)."""
    states = layout.fresh()
    for step, frame in enumerate(frames):
        feeds = {layout.frame_input: frame, **states}
        if step == 0:
            check(feeds)
        outputs = runner.run(feeds)
        yield feeds, outputs
        states = {name: _next_state(outputs, name, out, states[name]) for name, out in layout.pairs.items()}


def _next_state(outputs: Mapping[str, np.ndarray], name: str, output: str, previous: np.ndarray) -> np.ndarray:
    if output not in outputs:
        raise ModelError(f"streaming graph returned no state output {output!r} (paired with {name!r}); it returned "
                         f"{sorted(outputs)}")
    value = np.asarray(outputs[output])
    if value.dtype != previous.dtype or value.shape != previous.shape:
        raise ModelError(f"state {output}: came back as {value.dtype}{list(value.shape)} but {name} is fed as "
                         f"{previous.dtype}{list(previous.shape)}; the streaming model must return states as it "
                         "takes them")
    return value
