"""Speed: latency distribution after warm-up, real-time factor and throughput by batch, for any Runner.

RTF = processing time / audio duration (the seed tables' definition): 0.1 means ten times faster than real time.
Timing uses time.perf_counter around one run of the graph only; feeds are prepared before the clock starts. A runner
that can bind its tensors once (BindingRunner: ONNX Runtime) is timed on its bound run, as a deployed loop runs it:
inputs checked once when the step is built, states kept inside the backend from output to input, no per-call Python
in the timed region (a fixed per-call cost added to FP32 and INT8 alike pushes every ratio toward 1). Other runners
(PyTorch eager, TensorRT) are timed around `runner.run`. Compared variants are timed interleaved (round_robin,
measure_interleaved) so their ratio survives a change of machine load.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from quant.backends import BindingRunner, Runner

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class BenchOptions:
    """How many timed runs each measurement gets. `quick` is for CI smoke runs, not for reported numbers."""

    runs: int = 200  # batch-1 latency at the first thread count (the numbers the ratios and goals use)
    stream_runs: int = 1000  # streaming frames, at every thread count
    secondary_runs: int = 50  # stateless graphs at further thread counts and PyTorch eager (keeps a run < 30 min)
    warmup: int = 10
    throughput_runs: int = 20
    batches: tuple[int, ...] = (1, 4, 8, 16)
    threads: tuple[int, ...] = (1, 2)
    profile_runs: int = 10  # ORT-profiled runs of the FP32 and each INT8 build (the ceiling and what holds the rest)

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(runs=20, stream_runs=100, secondary_runs=10, warmup=3, throughput_runs=5, batches=(1, 8),
                   threads=(1, 2), profile_runs=3)


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    p10_ms: float = float("nan")  # with p90 the spread the interleaved ratios are judged by (nan: not recorded)

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> LatencyStats:
        floats = {key: float(values[key]) for key in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
        return cls(int(values["runs"]), **floats, p10_ms=float(values.get("p10_ms", float("nan"))))


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Summary of per-run times (seconds in, milliseconds out); percentiles by linear interpolation."""
    if not len(seconds):
        raise ValueError("latency_stats needs at least one timed run")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
    return LatencyStats(len(ms), float(ms.min()), float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()),
                        float(p10))


def bench_stateful(
    runner: Runner, frames: Sequence[np.ndarray], states: Mapping[str, np.ndarray], runs: int, warmup: int,
    frame_input: str, state_outputs: Mapping[str, str],
) -> LatencyStats:
    """Per-frame latency of a streaming graph, looping over real frames fed to `frame_input` with its states carried
    from output to input (`state_outputs`: state input -> the output that feeds it next step), as a streaming
    application runs it. Only the graph's run is timed (stateful_step)."""
    step = stateful_step(runner, frames, states, frame_input, state_outputs)
    for _ in range(warmup):
        step()
    return latency_stats([step() for _ in range(runs)])


Step = Callable[[], float]  # one timed call of one variant (its own feeds and states), returning seconds


def round_robin(steps: Mapping[str, Step], rounds: int, warmup: int = 3, calls_per_round: int = 1
                ) -> dict[str, list[float]]:
    """Per-call seconds of compared variants timed round-robin in one process: each round makes `calls_per_round`
    calls of every variant in turn, the start rotating by one each round, so a change of machine load between
    rounds hits every variant alike and their ratio survives it. Every variant gets the same number of calls, and
    sample i of every label comes from the same round. Warm-up calls run first, per variant, untimed."""
    if not steps:
        raise ValueError("round_robin needs at least one variant")
    labels = list(steps)
    for label in labels:
        for _ in range(warmup):
            steps[label]()
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            seconds[label].extend(steps[label]() for _ in range(calls_per_round))
    return seconds


def stateless_step(runner: Runner, feeds: Feeds) -> Step:
    """A timed call of `runner` on fixed feeds (the inputs it takes, picked by name and, where the runner can,
    bound once before any timing)."""
    picked = {name: feeds[name] for name in runner.input_names}
    if isinstance(runner, BindingRunner):
        bound = runner.bind(picked)

        def bound_step() -> float:
            start = time.perf_counter()
            bound.run()
            return time.perf_counter() - start

        return bound_step

    def step() -> float:
        start = time.perf_counter()
        runner.run(picked)
        return time.perf_counter() - start

    return step


def stateful_step(runner: Runner, frames: Sequence[np.ndarray], states: Mapping[str, np.ndarray], frame_input: str,
                  state_outputs: Mapping[str, str]) -> Step:
    """A timed call of a streaming graph on the next frame, its own states carried from output to input (as
    bench_stateful; each variant of an interleaved roll keeps its own states and frame position)."""
    missing = [name for name in states if name not in state_outputs]
    if missing:
        raise ValueError(f"state inputs {missing} have no output in state_outputs {dict(state_outputs)}")
    if not len(frames):
        raise ValueError("a streaming step needs at least one frame")
    current = dict(states)
    cycle = _cycle(frames)
    uniform = all(frame.shape == frames[0].shape and frame.dtype == frames[0].dtype for frame in frames)
    if isinstance(runner, BindingRunner) and uniform:
        # bound to the first frame's shape; each frame is copied in before the clock starts, the states stay in the
        # backend (its outputs become the next run's inputs without leaving it). Frames of varying shape cannot
        # share one bound buffer: those are timed around runner.run below.
        bound = runner.bind({frame_input: frames[0], **current}, carry={name: state_outputs[name] for name in current})

        def bound_step() -> float:
            bound.set_input(frame_input, next(cycle))
            start = time.perf_counter()
            bound.run()
            return time.perf_counter() - start

        return bound_step

    def step() -> float:
        nonlocal current
        feeds = {frame_input: next(cycle), **current}
        start = time.perf_counter()
        outputs = runner.run(feeds)
        elapsed = time.perf_counter() - start
        current = {name: outputs[state_outputs[name]] for name in current}
        return elapsed

    return step


def interleaved_seconds(runners: Mapping[str, Runner], feeds: Feeds, runs: int, warmup: int = 3
                        ) -> dict[str, list[float]]:
    """Per-run seconds of compared graphs on the same feeds, timed round-robin (round_robin); each runner binds the
    feeds it takes by name."""
    if not runners:
        raise ValueError("bench_interleaved needs at least one runner")
    return round_robin({label: stateless_step(runner, feeds) for label, runner in runners.items()}, runs, warmup)


def bench_interleaved(runners: Mapping[str, Runner], feeds: Feeds, runs: int, warmup: int = 3) -> dict[str, LatencyStats]:
    """Latency of compared graphs timed round-robin (interleaved_seconds), summarised per label."""
    return {label: latency_stats(values) for label, values in interleaved_seconds(runners, feeds, runs, warmup).items()}


@dataclass(frozen=True)
class Ratio:
    """latency of `test` / latency of `base` from one interleaved run. The paired ratio is per round (test and base
    ran back to back), its p10-p90 showing how much the load moved it. `reliable`: the two p10-p90 latency spreads
    do not overlap, or the paired p10-p90 lies wholly on one side of 1 (in 80 % of the rounds the same variant was
    faster, whatever the load did between rounds); otherwise the difference is within this machine's noise now."""

    min_ratio: float
    median_ratio: float
    reliable: bool
    paired_median: float = float("nan")
    paired_p10: float = float("nan")
    paired_p90: float = float("nan")

    def to_dict(self) -> dict[str, object]:
        return {"min_ratio": self.min_ratio, "median_ratio": self.median_ratio, "reliable": self.reliable,
                "paired_median": self.paired_median, "paired_p10": self.paired_p10, "paired_p90": self.paired_p90}


def latency_ratio(test: LatencyStats, base: LatencyStats, test_seconds: Sequence[float] = (),
                  base_seconds: Sequence[float] = ()) -> Ratio:
    """Ratio of two interleaved measurements; with their per-round samples also the paired per-round ratio."""
    overlap = test.p10_ms <= base.p90_ms and base.p10_ms <= test.p90_ms
    paired = (float("nan"),) * 3
    if len(test_seconds) and len(test_seconds) == len(base_seconds):
        per_round = np.asarray(test_seconds, np.float64) / np.asarray(base_seconds, np.float64)
        p10, p50, p90 = np.percentile(per_round, [10, 50, 90])
        paired = (float(p50), float(p10), float(p90))
    one_sided = paired[2] < 1.0 or paired[1] > 1.0  # nan compares False: no pairs, no paired verdict
    return Ratio(test.min_ms / base.min_ms, test.p50_ms / base.p50_ms, not overlap or one_sided, *paired)


def load_average() -> float:
    """The 1-minute load average (nan where the platform has none): recorded around every timing."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def _cycle(frames: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    while True:
        yield from frames


def rtf(latency_ms: float, audio_seconds: float) -> float:
    """Real-time factor: processing time / audio duration."""
    return (latency_ms / 1000.0) / audio_seconds


@dataclass(frozen=True)
class Throughput:
    batch: int
    latency: LatencyStats
    audio_seconds: float  # audio in one batch

    @property
    def items_per_s(self) -> float:
        return self.batch / (self.latency.mean_ms / 1000.0)

    @property
    def rtf(self) -> float:
        return rtf(self.latency.mean_ms, self.audio_seconds)

    def to_dict(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "latency_ms": self.latency.to_dict(),
            "items_per_s": self.items_per_s,
            "audio_seconds": self.audio_seconds,
            "rtf": self.rtf,
        }


def tile_batch(feeds: Feeds, batch: int) -> dict[str, np.ndarray]:
    """Repeat batch-1 feeds along axis 0 (every input of a batch-first graph)."""
    return {name: np.ascontiguousarray(np.repeat(value, batch, axis=0)) for name, value in feeds.items()}


# ------------------------------------------------------------------------------------------- per-graph workloads


@dataclass(frozen=True)
class GraphWorkload:
    """What one graph is timed on: real batch-1 feeds (stateless graphs) or real frames plus zero states
    (streaming graphs); `sweep_batches` adds the throughput sweep over BenchOptions.batches."""

    graph: str  # the ONNX file stem: dpcrn, dpcrn_stream, encoder, decoder
    unit: str  # what one run processes, for the report ("9 s segment", "16 ms frame", "4.2 s utterance")
    audio_seconds: float  # audio processed by one batch-1 run
    feeds: Mapping[str, np.ndarray] | None = None
    frames: tuple[np.ndarray, ...] = ()
    states: Mapping[str, np.ndarray] | None = None  # streaming: the initial states, by state input
    frame_input: str = ""  # streaming: the input each frame feeds
    state_outputs: Mapping[str, str] = field(default_factory=dict)  # streaming: state input -> output feeding it
    sweep_batches: bool = False

    @property
    def streaming(self) -> bool:
        return self.states is not None

    def first_run(self) -> dict[str, np.ndarray]:
        """The feeds of one run: the batch-1 feeds, or a streaming graph's first frame with the initial states (what
        a profiler or a one-shot comparison runs)."""
        if self.feeds is not None:
            return dict(self.feeds)
        if not self.frames or not self.frame_input:
            raise ValueError(f"{self.graph}: a streaming workload without frames or a frame input")
        return {self.frame_input: self.frames[0], **dict(self.states or {})}


def measure_graph(
    workload: GraphWorkload, make_runner: Callable[[int], Runner], options: BenchOptions,
    threads: Sequence[int] | None = None,
) -> dict[str, object]:
    """Latency + RTF for each thread count (a fresh runner per count), and the batch sweep at the first count: one
    graph measured alone (measure_interleaved with a single variant)."""
    counts = tuple(threads if threads is not None else options.threads)
    return measure_interleaved(workload, lambda count: {workload.graph: make_runner(count)}, options, counts)[
        workload.graph]


# ------------------------------------------------------------------------------------------- compared variants

STREAM_ROUND_FRAMES = 10  # streaming: consecutive frames per variant per round (a stretch of the roll, as a stream
# runs it; short, so a load change lands inside few rounds and hits every variant alike)


Baselines = Mapping[str, str | Sequence[str]]  # results key ("vs_fp32") -> the variant it divides by, or candidates
# of which the group's fastest (median latency) is the base: an FP32 build with and without graph rewrites


def measure_interleaved(
    workload: GraphWorkload, runners_at: Callable[[int], Mapping[str, Runner]], options: BenchOptions,
    threads: Sequence[int], baselines: Baselines | None = None,
) -> dict[str, dict[str, object]]:
    """measure_graph for compared variants of one graph (FP32/FP16/INT8 builds, PyTorch eager) timed interleaved:
    at each thread count the variants `runners_at(count)` opens run round-robin (round_robin; streaming: a round is
    STREAM_ROUND_FRAMES frames of each variant's own roll), and at the first count so does the batch sweep, per batch
    size. Returns measure_graph's dict per variant label; every timing entry also carries "interleaved" (rounds,
    calls per round, the variants, the 1-minute load average before and after, and the base of each ratio) and, for
    each `baselines` key whose variant ran in the same rounds (e.g. {"vs_fp32": "ort fp32"}; with candidates, the
    fastest of them there: {"vs_fp32": ("ort fp32", "ort fp32-plain")}), the latency_ratio against it."""
    by_threads: dict[str, dict[str, object]] = {}  # label -> thread count -> entry
    sweeps: dict[str, dict[str, object]] = {}  # label -> batch -> entry
    for index, count in enumerate(threads):
        runners = dict(runners_at(count))
        if not runners:
            continue
        if workload.streaming:
            calls = max(1, min(STREAM_ROUND_FRAMES, options.stream_runs))
            rounds = -(-options.stream_runs // calls)  # whole rounds: at least stream_runs frames each
            steps = {label: _stream_step(runner, workload) for label, runner in runners.items()}
        else:
            calls, rounds = 1, options.runs if index == 0 else options.secondary_runs
            steps = {label: stateless_step(runner, _feeds(workload)) for label, runner in runners.items()}
        for label, (stats, extra) in time_group(steps, rounds, options.warmup, calls, baselines or {}).items():
            by_threads.setdefault(label, {})[str(count)] = {
                "latency_ms": stats.to_dict(), "rtf": rtf(stats.mean_ms, workload.audio_seconds), **extra}
        if index == 0 and workload.sweep_batches and workload.feeds is not None:
            for batch in options.batches:
                tiled = tile_batch(workload.feeds, batch)
                steps = {label: stateless_step(runner, tiled) for label, runner in runners.items()}
                timed = time_group(steps, options.throughput_runs, max(1, options.warmup // 2), 1, baselines or {})
                for label, (stats, extra) in timed.items():
                    sweeps.setdefault(label, {})[str(batch)] = {
                        **Throughput(batch, stats, batch * workload.audio_seconds).to_dict(), **extra}
    return {label: {"unit": workload.unit, "audio_seconds": workload.audio_seconds, "threads": entries,
                    **({"batches": sweeps[label]} if label in sweeps else {})}
            for label, entries in by_threads.items()}


def _feeds(workload: GraphWorkload) -> Feeds:
    if workload.feeds is None:
        raise ValueError(f"workload {workload.graph} has neither feeds nor streaming frames")
    return workload.feeds


def _stream_step(runner: Runner, workload: GraphWorkload) -> Step:
    assert workload.states is not None
    return stateful_step(runner, workload.frames, workload.states, workload.frame_input, workload.state_outputs)


def rolled_seconds(runners: Mapping[str, Runner], workload: GraphWorkload, rounds: int, warmup: int = 3
                   ) -> dict[str, list[float]]:
    """Per-frame seconds of compared streaming graphs, each rolling its own states over the workload's real frames
    as an application runs it (stateful_step), timed round-robin: a round is STREAM_ROUND_FRAMES consecutive frames
    of each variant in turn (as measure_interleaved). One value per round and label, the round's mean frame time, so
    value i of every label comes from the same round (a single frame's time is mostly scheduling noise)."""
    if not runners:
        raise ValueError("rolled_seconds needs at least one runner")
    steps = {label: _stream_step(runner, workload) for label, runner in runners.items()}
    seconds = round_robin(steps, rounds, warmup * STREAM_ROUND_FRAMES, STREAM_ROUND_FRAMES)
    starts = np.arange(0, rounds * STREAM_ROUND_FRAMES, STREAM_ROUND_FRAMES)
    return {label: (np.add.reduceat(np.asarray(values), starts) / STREAM_ROUND_FRAMES).tolist()
            for label, values in seconds.items()}


def time_group(steps: Mapping[str, Step], rounds: int, warmup: int, calls: int, baselines: Baselines
               ) -> dict[str, tuple[LatencyStats, dict[str, object]]]:
    """round_robin with the load average around it; per label its stats and the entry's additions (the paired ratio
    per round: the sum of the round's `calls` calls of each variant; "base": the variant it divides by)."""
    before = load_average()
    seconds = round_robin(steps, rounds, warmup, calls)
    after = load_average()
    stats = {label: latency_stats(values) for label, values in seconds.items()}
    bases = group_bases(baselines, stats)
    info = {"rounds": rounds, "calls_per_round": calls, "variants": list(steps), "load_before": before,
            "load_after": after, "baselines": bases}
    out: dict[str, tuple[LatencyStats, dict[str, object]]] = {}
    # the paired ratio compares a round's stretch of calls (a single frame's time is mostly scheduling noise)
    per_round = {label: np.add.reduceat(np.asarray(values), np.arange(0, len(values), calls)).tolist()
                 for label, values in seconds.items()}
    for label in steps:
        extra: dict[str, object] = {"interleaved": info}
        for key, base in bases.items():
            if base != label:
                ratio = latency_ratio(stats[label], stats[base], per_round[label], per_round[base])
                extra[key] = {**ratio.to_dict(), "base": base}
        out[label] = (stats[label], extra)
    return out


def group_bases(baselines: Baselines, stats: Mapping[str, LatencyStats]) -> dict[str, str]:
    """The variant each ratio of one timed group divides by: of a key's candidates that ran in the group, the one
    with the lowest median latency (a ratio is honest only against the best baseline: a graph rewrite that slows the
    FP32 build would flatter INT8); keys none of whose candidates ran are left out."""
    bases = {}
    for key, wanted in baselines.items():
        present = [label for label in ((wanted,) if isinstance(wanted, str) else wanted) if label in stats]
        if present:
            bases[key] = min(present, key=lambda label: stats[label].p50_ms)
    return bases
