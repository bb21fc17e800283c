"""Speech enhancement from a spec: calibration feeds, evaluation and speed workloads for offline, streaming and
chained graphs.

- Offline, fixed T (`frontend.segment_samples` / `fixed_frames`): each utterance cut into segments, the tail
  zero-padded (as at inference); calibration batches segments across utterances.
- Offline, variable T: whole utterances, batched and zero-padded along T (`frontend:lengths` gives the frames).
- Streaming ([streaming]): the FP32 graph rolled frame by frame over each whole utterance from the spec's initial
  states (reset per utterance), each state fed from its paired output; calibration keeps every k-th step's feeds
  (`defaults.frame_stride`) so states are the ones the model really has, never zeros only.
- Chains: a later graph's inputs come from earlier graphs' FP32 outputs (`from = "<role>:<output>"`).

Calibration and evaluation both feed the NOISY mixture built from the manifest recipe (quant.data.manifest), and the
enhanced waveform comes from quant.frontends.output.to_waveform as the spec's [output] says; metrics are
quant.eval.se's (PESQ-WB/NB, STOI, SI-SDR against the clean speech).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from quant.backends import Runner, open_runner
from quant.errors import ModelError
from quant.eval.se import SeResult, SeRow, load_pairs, score_rows, se_result
from quant.eval.speed import GraphWorkload
from quant.frontends import Frontend, frontend, pad_batch
from quant.frontends.output import output_axes, to_waveform
from quant.spec import FrontendSpec, ModelSpec, OutputSpec, resolve_manifest
from quant.tasks.common import (
    Artifact, Audio, Feed, FeedOptions, Reiterable, StateLayout, batched, check_feed, fp32_path, frame_slices,
    hatch_feeds, input_shapes, layout_for, noisy_audio, open_artifact, roll, segments, select, time_axis, utterances,
    wire,
)

log = logging.getLogger(__name__)


def segment_samples(spec: FrontendSpec) -> int | None:
    """Samples per fixed-length segment: segment_samples, else what gives exactly fixed_frames frames."""
    if spec.segment_samples or not spec.fixed_frames:
        return spec.segment_samples
    if spec.center:
        return (spec.fixed_frames - 1) * spec.hop
    return (spec.fixed_frames - 1) * spec.hop + spec.fft_size


def stream_padded(audio: np.ndarray, hop: int) -> np.ndarray:
    """Zero-padded to whole hops plus one, so the last samples get their second frame in a streaming roll (cut back
    after enhancement)."""
    padded = np.zeros((-(-audio.size // hop) + 1) * hop, dtype=np.float32)
    padded[: audio.size] = audio
    return padded


class SeTask:
    def __init__(self, spec: ModelSpec) -> None:
        if spec.output is None:
            raise ModelError(f"{spec.source or spec.name}: an SE spec needs an [output] table")
        self.spec = spec
        self.output: OutputSpec = spec.output
        self.fe: Frontend | None = frontend(spec.frontend) if spec.frontend else None

    # -------------------------------------------------------------------------------------------- calibration

    def calibration_feeds(self, role: str, manifest: str | None = None,
                          options: FeedOptions = FeedOptions()) -> Iterable[Feed]:
        """Re-iterable feeds of graph `role` on the noisy mixtures of the first options.limit utterances."""
        self.spec.graph(role)
        clips = Audio(tuple(utterances(self.spec, manifest, options.limit, allow_outside=options.allow_outside)),
                      noisy_audio)
        hatch = hatch_feeds(self.spec, role, clips)
        if hatch is not None:
            return hatch
        if self.spec.streaming is not None:
            return Reiterable(lambda: self._streaming_feeds(role, clips, options))
        return Reiterable(lambda: self._offline_feeds(role, clips, options))

    def _offline_feeds(self, role: str, clips: Iterable[np.ndarray], options: FeedOptions) -> Iterator[Feed]:
        size = options.batch_size or self.spec.defaults.batch_size
        target = self.spec.graph(role)
        path = fp32_path(self.spec, role, options)
        inputs = tuple(input_shapes(path))
        checked = partial(check_feed, self.spec, role, path)
        upstream = self._upstream(role, options)
        seg = segment_samples(self._fe().spec)
        if seg:
            pieces: Iterable[np.ndarray] = (piece for clip in clips for piece in segments(clip, seg))
            for batch in batched(pieces, size):
                yield checked(wire(target, self._chain(upstream, self._fixed_sources(np.stack(batch))), inputs))
        else:
            for batch in batched(clips, size):
                yield checked(wire(target, self._chain(upstream, self._variable_sources(batch)), inputs))

    def _streaming_feeds(self, role: str, clips: Iterable[np.ndarray], options: FeedOptions) -> Iterator[Feed]:
        self._single_streaming_graph(role)
        path = fp32_path(self.spec, role, options)
        runner = open_runner(path, "ort", threads=options.threads)
        layout = layout_for(self.spec, runner, path, str(path))
        check = partial(check_feed, self.spec, role, path)
        stride = options.frame_stride or self.spec.defaults.frame_stride
        for clip in clips:
            for step, (feeds, _) in enumerate(roll(runner, layout, self._frames(clip), check)):
                if step % stride == 0:
                    yield feeds

    # -------------------------------------------------------------------------------------------- evaluation

    # shards of the test set may start at any utterance: each utterance is enhanced on its own
    shard_unit = 1

    def evaluate(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                 threads: int = 1, memo: dict[str, Any] | None = None) -> SeResult:
        """PESQ-WB/NB, STOI and SI-SDR of the enhanced noisy mixtures against clean speech (and of the noisy input),
        per utterance and on average; `artifacts` gives each graph role's ONNX file, engine or runner. `memo`, kept
        by the caller across calls on the same manifest and limit, holds the loaded pairs and the noisy scores (the
        same for every artifact) so they are computed once."""
        return self.combine(self.evaluate_rows(artifacts, manifest, limit, threads, memo))

    def evaluate_rows(self, artifacts: Mapping[str, Artifact], manifest: str | None = None, limit: int | None = None,
                      threads: int = 1, memo: dict[str, Any] | None = None, part: range | None = None) -> list[SeRow]:
        """evaluate's per-utterance rows (name, noisy scores, enhanced scores) in set order; `part`: only those
        positions of the first `limit` utterances (a shard, quant.tasks.sharded)."""
        runners = self.runners(artifacts, threads)
        memo = {} if memo is None else memo
        if "pairs" not in memo:
            path = manifest or str(resolve_manifest(self.spec.defaults.test_manifest, "test manifest"))
            memo["pairs"] = load_pairs(path, limit, part)
        rows = score_rows(self.enhancer(runners), memo["pairs"], memo.get("noisy"))
        memo.setdefault("noisy", {name: before for name, before, _ in rows})
        return rows

    @staticmethod
    def combine(rows: Sequence[SeRow]) -> SeResult:
        """The set result of per-utterance rows in set order (one call's, or every shard's gathered)."""
        return se_result(rows)

    def runners(self, artifacts: Mapping[str, Artifact], threads: int = 1) -> dict[str, Runner]:
        missing = [g.role for g in self.spec.graphs if g.role not in artifacts]
        if missing:
            raise ModelError(f"{self.spec.name}: no artifact for graphs {missing}; give one per role "
                             f"({[g.role for g in self.spec.graphs]})")
        return {g.role: open_artifact(artifacts[g.role], threads) for g in self.spec.graphs}

    def enhancer(self, runners: Mapping[str, Runner]) -> Callable[[np.ndarray], np.ndarray]:
        """noisy (samples,) -> enhanced (samples,) float32 with the given runners."""
        if self.spec.streaming is not None:
            role = self.spec.output_graph().role
            self._single_streaming_graph(role)
            layout = layout_for(self.spec, runners[role], None, role)
            return lambda audio: self._enhance_streaming(role, runners[role], layout, audio)
        return lambda audio: self._enhance_offline(runners, audio)

    def _enhance_offline(self, runners: Mapping[str, Runner], audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        seg = segment_samples(self._fe().spec)
        sources = self._fixed_sources(segments(audio, seg)) if seg else self._variable_sources([audio])
        waves = sources["waveform"]
        for graph in self.spec.graphs:
            runner = runners[graph.role]
            outputs = runner.run(select(self.spec, graph.role, runner, wire(graph, sources, runner.input_names)))
            sources.update({f"{graph.role}:{name}": value for name, value in outputs.items()})
        values = self._output_value(sources)
        return to_waveform(self.output, self._fe(), values, waves).reshape(-1)[: audio.size]

    def _enhance_streaming(self, role: str, runner: Runner, layout: StateLayout, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        padded = stream_padded(audio, self._fe().spec.hop)
        axis = time_axis(output_axes(self.output, self._fe()))
        rolled = roll(runner, layout, self._frames(padded), partial(check_feed, self.spec, role, runner))
        steps = [self._named(outputs, self.output.name) for _, outputs in rolled]
        return to_waveform(self.output, self._fe(), np.concatenate(steps, axis=axis), padded)[0, : audio.size]

    # -------------------------------------------------------------------------------------------- speed

    def speed_workload(self, role: str, manifest: str | None = None,
                       options: FeedOptions = FeedOptions()) -> GraphWorkload:
        """One graph's timing input from the median-length test utterance: its first fixed-length segment (or the
        whole utterance), or every streaming frame with the initial states."""
        items = utterances(self.spec, manifest, options.limit, what="test")
        clip = noisy_audio(items[representative([u.duration for u in items])])
        rate = self._fe().spec.sample_rate
        if self.spec.streaming is not None:
            self._single_streaming_graph(role)
            path = fp32_path(self.spec, role, options)
            layout = layout_for(self.spec, open_runner(path, "ort"), path, str(path))
            hop = self._fe().spec.hop * self.spec.streaming.frames_per_step
            frames = tuple(self._frames(stream_padded(clip, self._fe().spec.hop)))
            return GraphWorkload(role, f"{1000 * hop / rate:g} ms frame", hop / rate, frames=frames,
                                 states=layout.initial, frame_input=layout.frame_input, state_outputs=layout.pairs)
        seg = segment_samples(self._fe().spec)
        wave = segments(clip, seg)[:1] if seg else clip[None]
        sources = self._chain(self._upstream(role, options), self._fixed_sources(wave) if seg
                              else self._variable_sources([clip]))
        inputs = tuple(input_shapes(fp32_path(self.spec, role, options)))
        seconds = wave.shape[-1] / rate
        unit = f"{seconds:g} s segment" if seg else f"{seconds:.2f} s utterance"
        return GraphWorkload(role, unit, seconds, feeds=wire(self.spec.graph(role), sources, inputs))

    # -------------------------------------------------------------------------------------------- helpers

    def _fe(self) -> Frontend:
        if self.fe is None:
            raise ModelError(f"{self.spec.source or self.spec.name}: this needs a [frontend] table (the spec has "
                             "only a [feeds] escape hatch)")
        return self.fe

    def _fixed_sources(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        fe = self._fe()
        lengths = np.full(len(waves), waves.shape[-1], dtype=np.int32)
        return {"waveform": waves, "waveform:lengths": lengths, "frontend": fe.features(waves),
                "frontend:lengths": np.full(len(waves), fe.frames(waves.shape[-1]), dtype=np.int32)}

    def _variable_sources(self, clips: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        features, frames = pad_batch(self._fe(), clips)
        lengths = np.array([clip.size for clip in clips], dtype=np.int32)
        waves = np.zeros((len(clips), int(lengths.max(initial=0))), dtype=np.float32)
        for row, clip in enumerate(clips):
            waves[row, : clip.size] = clip
        return {"waveform": waves, "waveform:lengths": lengths, "frontend": features, "frontend:lengths": frames}

    def _upstream(self, role: str, options: FeedOptions) -> list[tuple[str, Runner]]:
        """FP32 runners of the graphs before `role` (a chain's earlier stages), in run order."""
        roles = [g.role for g in self.spec.graphs]
        earlier = roles[: roles.index(role)]
        return [(r, open_runner(fp32_path(self.spec, r, options), "ort", threads=options.threads)) for r in earlier]

    def _chain(self, upstream: Sequence[tuple[str, Runner]], sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for role, runner in upstream:
            feeds = select(self.spec, role, runner, wire(self.spec.graph(role), sources, runner.input_names))
            sources.update({f"{role}:{name}": value for name, value in runner.run(feeds).items()})
        return sources

    def _output_value(self, sources: Mapping[str, np.ndarray]) -> np.ndarray:
        key = f"{self.spec.output_graph().role}:{self.output.name}"
        if key not in sources:
            raise ModelError(f"graph {self.spec.output_graph().role!r} returned no output {self.output.name!r} "
                             "(spec [output] name)")
        return np.asarray(sources[key])

    def _frames(self, clip: np.ndarray) -> Iterator[np.ndarray]:
        assert self.spec.streaming is not None
        fe = self._fe()
        features = fe.features(clip)
        return frame_slices(features, time_axis(fe.spec.axes), self.spec.streaming.frames_per_step)

    def _single_streaming_graph(self, role: str) -> None:
        if len(self.spec.graphs) != 1:
            raise ModelError(f"{self.spec.source or self.spec.name}: streaming specs with several graphs are not "
                             f"supported yet (graphs {[g.role for g in self.spec.graphs]}, asked for {role!r})")

    @staticmethod
    def _named(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        if name not in outputs:
            raise ModelError(f"enhancement graph has no output {name!r} (spec [output] name); it returned "
                             f"{sorted(outputs)}")
        return np.asarray(outputs[name])


def representative(durations: Sequence[float]) -> int:
    """Index of the utterance closest to the median duration (the speed workload)."""
    median = float(np.median(durations))
    return int(np.argmin([abs(d - median) for d in durations]))


__all__ = ["SeTask", "representative", "segment_samples", "stream_padded"]
