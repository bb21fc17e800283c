from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest
import torch

from quant.backends import BindingRunner
from quant.backends.ort import OrtBoundRun, OrtRunner
from quant.backends.torch import TorchRunner
from quant.errors import ModelError
from quant.eval import speed
from test_ort_backend import CARRY, RNG, STATES, stateful_model


def test_latency_stats_of_known_samples() -> None:
    stats = speed.latency_stats([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert stats.runs == 100
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 100.0))
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert speed.LatencyStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError):
        speed.latency_stats([])


def test_rtf_and_throughput() -> None:
    assert speed.rtf(90.0, 9.0) == pytest.approx(0.01)
    stats = speed.latency_stats([0.1, 0.1])
    tp = speed.Throughput(batch=8, latency=stats, audio_seconds=8 * 4.0)
    assert tp.items_per_s == pytest.approx(80.0)
    assert tp.rtf == pytest.approx(0.1 / 32.0)


class CountingStream:
    input_names = ["mix", "h"]
    output_names = ["enh", "h_out"]

    def __init__(self) -> None:
        self.seen: list[float] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append(float(feeds["h"][0]))
        return {"enh": feeds["mix"], "tf_op_layer_stack_2": feeds["h"] + 1}


def test_bench_stateful_carries_states_and_cycles_frames() -> None:
    runner = CountingStream()
    frames = [np.full(2, i, np.float32) for i in range(3)]
    stats = speed.bench_stateful(runner, frames, {"h": np.zeros(1, np.float32)}, runs=10, warmup=2,
                                 frame_input="mix", state_outputs={"h": "tf_op_layer_stack_2"})
    assert stats.runs == 10
    assert runner.seen == list(range(12))


def test_tile_batch_repeats_batch_axis() -> None:
    feeds = {"speech": np.ones((1, 5, 80), np.float32), "speech_lengths": np.array([5], np.int32)}
    tiled = speed.tile_batch(feeds, 4)
    assert tiled["speech"].shape == (4, 5, 80)
    assert tiled["speech_lengths"].tolist() == [5, 5, 5, 5]
    assert tiled["speech_lengths"].dtype == np.int32


class BatchEcho:
    input_names = ["x"]
    output_names = ["y"]

    def __init__(self, threads: int, log: list[tuple[int, int]]) -> None:
        self.threads, self.log = threads, log

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log.append((self.threads, feeds["x"].shape[0]))
        return {"y": feeds["x"]}


def test_measure_graph_covers_threads_and_batches() -> None:
    log: list[tuple[int, int]] = []
    workload = speed.GraphWorkload(
        graph="encoder", unit="2 s utterance", audio_seconds=2.0, feeds={"x": np.zeros((1, 3), np.float32)},
        sweep_batches=True,
    )
    options = speed.BenchOptions(runs=4, secondary_runs=2, warmup=2, throughput_runs=3, batches=(1, 4),
                                 threads=(1, 2))
    result = speed.measure_graph(workload, lambda t: BatchEcho(t, log), options)
    threads = result["threads"]
    assert isinstance(threads, dict) and set(threads) == {"1", "2"}
    assert threads["1"]["latency_ms"]["runs"] == 4
    assert threads["2"]["latency_ms"]["runs"] == 2  # further thread counts get secondary_runs
    batches = result["batches"]
    assert isinstance(batches, dict) and set(batches) == {"1", "4"}
    assert batches["4"]["audio_seconds"] == 8.0
    # the batch sweep runs with the first thread count only
    assert {t for t, b in log if b == 4} == {1}
    assert sum(1 for t, b in log if t == 2) == 4  # 2 warm-up + 2 timed


class _OrderRunner:
    """A runner that records the order of calls in a shared log and the feeds it got."""

    def __init__(self, label: str, log: list[str], inputs: tuple[str, ...]) -> None:
        self.label, self.log, self.input_names, self.output_names = label, log, inputs, ("y",)
        self.feeds: list[set[str]] = []

    def run(self, feeds):
        self.log.append(self.label)
        self.feeds.append(set(feeds))
        return {"y": np.zeros(1, np.float32)}


def test_bench_interleaved_runs_round_robin_with_a_rotating_start():
    from quant.eval.speed import bench_interleaved

    log: list[str] = []
    runners = {"a": _OrderRunner("a", log, ("x",)), "b": _OrderRunner("b", log, ("x", "s")),
               "c": _OrderRunner("c", log, ("x",))}
    stats = bench_interleaved(runners, {"x": np.zeros(1), "s": np.zeros(1)}, runs=4, warmup=1)
    assert {label: s.runs for label, s in stats.items()} == {"a": 4, "b": 4, "c": 4}
    assert log == list("abc" "abc" "bca" "cab" "abc")  # warm-up, then rounds starting one further each time
    assert runners["a"].feeds[0] == {"x"} and runners["b"].feeds[0] == {"x", "s"}  # each binds its own inputs


def test_latency_ratio_is_unreliable_when_spreads_overlap():
    from quant.eval.speed import latency_ratio, latency_stats

    base = latency_stats([0.010, 0.011, 0.012, 0.013, 0.014])
    apart = latency_ratio(latency_stats([0.005, 0.0055, 0.006, 0.0065, 0.007]), base)
    close = latency_ratio(latency_stats([0.009, 0.0105, 0.0115, 0.012, 0.0125]), base)
    assert apart.reliable and apart.min_ratio == pytest.approx(0.5) and apart.median_ratio == pytest.approx(0.5)
    assert not close.reliable


def test_paired_ratio_follows_the_rounds_not_the_spread():
    """A load burst slows both graphs of a round: the per-round ratio stays put while the spreads overlap, and the
    ratio is reliable because every round agrees; rounds that disagree on the direction leave it unreliable."""
    from quant.eval.speed import latency_ratio, latency_stats

    base = [0.010, 0.030, 0.011, 0.029, 0.012]
    test = [0.005, 0.015, 0.0055, 0.0145, 0.006]
    assert latency_ratio(latency_stats(test), latency_stats(base)).reliable is False  # spreads alone: overlap
    ratio = latency_ratio(latency_stats(test), latency_stats(base), test, base)
    assert ratio.reliable
    mixed = [0.009, 0.033, 0.0125, 0.027, 0.0135]  # per round 0.9, 1.1, 1.14, 0.93, 1.13: no consistent side
    assert not latency_ratio(latency_stats(mixed), latency_stats(base), mixed, base).reliable
    assert ratio.paired_median == pytest.approx(0.5) and ratio.paired_p10 == pytest.approx(0.5)
    assert ratio.paired_p90 == pytest.approx(0.5)


def test_round_robin_rotates_the_start_and_gives_every_variant_the_same_calls():
    log: list[str] = []

    def step(label: str):
        def call() -> float:
            log.append(label)
            return 0.0
        return call

    seconds = speed.round_robin({k: step(k) for k in "abc"}, rounds=3, warmup=2, calls_per_round=2)
    assert {label: len(values) for label, values in seconds.items()} == {"a": 6, "b": 6, "c": 6}
    assert log == list("aabbcc" "aabbcc" "bbccaa" "ccaabb")  # warm-up per variant, then rotating rounds


class StateStream:
    """A streaming graph whose state counts its calls: the states each call saw tell whose roll it continued."""

    input_names = ["mix", "h"]
    output_names = ["enh", "h_out"]

    def __init__(self, log: list[str] | None = None, label: str = "", step: float = 1.0) -> None:
        self.seen: list[tuple[float, float]] = []
        self.log, self.label, self.step = log, label, step

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.log is not None:
            self.log.append(self.label)
        self.seen.append((float(feeds["mix"][0]), float(feeds["h"][0])))
        return {"enh": feeds["mix"], "h_out": feeds["h"] + self.step}


def stream_workload() -> speed.GraphWorkload:
    return speed.GraphWorkload(graph="dpcrn_stream", unit="16 ms frame", audio_seconds=0.016,
                               frames=tuple(np.full(2, i, np.float32) for i in range(7)),
                               states={"h": np.zeros(1, np.float32)}, frame_input="mix", state_outputs={"h": "h_out"})


def test_interleaved_streaming_variants_keep_their_own_states_and_frames():
    """Each variant's roll is the one it would make alone (bench_stateful), although rounds alternate variants."""
    workload = stream_workload()
    log: list[str] = []
    runners = {"fp32": StateStream(log, "fp32", 1.0), "int8": StateStream(log, "int8", 10.0)}
    options = speed.BenchOptions(stream_runs=2 * speed.STREAM_ROUND_FRAMES, warmup=3, threads=(1,))
    result = speed.measure_interleaved(workload, lambda count: runners, options, (1,), {"vs_fp32": "fp32"})
    for label, runner in runners.items():
        alone = StateStream(step=runner.step)
        speed.bench_stateful(alone, workload.frames, workload.states or {}, options.stream_runs, options.warmup,
                             "mix", {"h": "h_out"})
        assert runner.seen == alone.seen
    timed = log[2 * options.warmup:]
    n = speed.STREAM_ROUND_FRAMES
    assert timed == ["fp32"] * n + ["int8"] * n + ["int8"] * n + ["fp32"] * n  # a round: N frames of each
    entry = result["int8"]["threads"]["1"]
    assert entry["latency_ms"]["runs"] == result["fp32"]["threads"]["1"]["latency_ms"]["runs"] == 2 * n
    assert entry["interleaved"]["rounds"] == 2 and entry["interleaved"]["calls_per_round"] == n
    assert set(entry["vs_fp32"]) >= {"min_ratio", "median_ratio", "paired_p10", "paired_p90", "reliable"}
    assert "vs_fp32" not in result["fp32"]["threads"]["1"]  # no ratio of the baseline against itself


def test_measure_interleaved_times_each_thread_count_and_batch_as_one_group():
    log: list[tuple[str, int, int]] = []

    class Labelled(BatchEcho):
        def __init__(self, label: str, threads: int) -> None:
            super().__init__(threads, [])
            self.label = label

        def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            log.append((self.label, self.threads, feeds["x"].shape[0]))
            return {"y": feeds["x"]}

    def runners_at(count: int) -> dict[str, Labelled]:  # eager runs at the first thread count only
        return {label: Labelled(label, count) for label in (["eager"] if count == 1 else []) + ["fp32", "int8"]}

    workload = speed.GraphWorkload(graph="encoder", unit="2 s utterance", audio_seconds=2.0,
                                   feeds={"x": np.zeros((1, 3), np.float32)}, sweep_batches=True)
    options = speed.BenchOptions(runs=4, secondary_runs=2, warmup=2, throughput_runs=3, batches=(1, 4),
                                 threads=(1, 2))
    result = speed.measure_interleaved(workload, runners_at, options, (1, 2),
                                       {"vs_fp32": "fp32", "vs_eager": "eager"})
    assert set(result) == {"eager", "fp32", "int8"}
    assert set(result["eager"]["threads"]) == {"1"} and set(result["int8"]["threads"]) == {"1", "2"}
    assert [result[k]["threads"]["1"]["latency_ms"]["runs"] for k in result] == [4, 4, 4]
    assert result["int8"]["threads"]["2"]["latency_ms"]["runs"] == 2  # further counts: secondary_runs
    # at 2 threads eager is not there to divide by; at 1 thread both baselines are
    assert set(result["int8"]["threads"]["1"]) >= {"vs_fp32", "vs_eager"}
    assert "vs_fp32" in result["int8"]["threads"]["2"] and "vs_eager" not in result["int8"]["threads"]["2"]
    assert result["fp32"]["threads"]["2"]["interleaved"]["variants"] == ["fp32", "int8"]
    # the batch-4 sweep: one warm-up call each, then 3 rotating rounds of all three variants
    batch4 = [label for label, _, batch in log if batch == 4]
    assert batch4 == ["eager", "fp32", "int8"] + ["eager", "fp32", "int8", "fp32", "int8", "eager", "int8", "eager",
                                                  "fp32"]
    sweep = result["int8"]["batches"]["4"]
    assert sweep["latency_ms"]["runs"] == 3 and sweep["audio_seconds"] == 8.0 and "vs_fp32" in sweep
    assert {t for _, t, batch in log if batch == 4} == {1}  # the sweep runs at the first thread count


def test_streaming_timing_runs_whole_rounds_of_frames():
    options = speed.BenchOptions(stream_runs=speed.STREAM_ROUND_FRAMES * 2 + 5, warmup=1, threads=(1,))
    runner = StateStream()
    result = speed.measure_graph(stream_workload(), lambda count: runner, options)
    assert result["threads"]["1"]["latency_ms"]["runs"] == speed.STREAM_ROUND_FRAMES * 3  # at least stream_runs
    assert len(runner.seen) == 1 + speed.STREAM_ROUND_FRAMES * 3


def test_streaming_ratio_is_paired_per_round_not_per_frame():
    """Within a round one variant's frames alternate 1 and 3 units while the other's are always 2: frame by frame
    the ratio swings between 0.5 and 1.5, round by round it is exactly 1."""
    def steady() -> float:
        return 0.002

    times = iter([0.001, 0.003] * 100)
    groups = speed.time_group({"fp32": steady, "int8": lambda: next(times)}, rounds=4, warmup=0, calls=10,
                              baselines={"vs_fp32": "fp32"})
    stats, extra = groups["int8"]
    assert stats.runs == 40 and extra["interleaved"]["calls_per_round"] == 10
    ratio = extra["vs_fp32"]
    assert ratio["paired_p10"] == pytest.approx(1.0) and ratio["paired_p90"] == pytest.approx(1.0)


@pytest.mark.parametrize("plain_s, base", [(0.010, "fp32-plain"), (0.0110, "fp32")])
def test_a_ratio_with_two_fp32_candidates_divides_by_the_faster_and_names_it(plain_s: float, base: str) -> None:
    """The FP32 of the rewritten graph (10.5 ms) and of the plain export: vs_fp32 is against whichever has the lower
    median in the group, for INT8 and for the slower FP32 alike; the faster FP32 itself carries no ratio."""
    seconds = {"fp32": 0.0105, "fp32-plain": plain_s, "int8": 0.008}
    steps = {label: (lambda value=value: value) for label, value in seconds.items()}
    groups = speed.time_group(steps, rounds=5, warmup=0, calls=1, baselines={"vs_fp32": ("fp32", "fp32-plain"),
                                                                              "vs_eager": "torch fp32"})
    other = "fp32" if base == "fp32-plain" else "fp32-plain"
    for label, (_stats, extra) in groups.items():
        assert extra["interleaved"]["baselines"] == {"vs_fp32": base}  # no eager ran: no vs_eager base
        assert "vs_eager" not in extra
    int8 = groups["int8"][1]["vs_fp32"]
    assert int8["base"] == base and int8["median_ratio"] == pytest.approx(0.008 / seconds[base])
    assert groups[other][1]["vs_fp32"]["base"] == base
    assert groups[other][1]["vs_fp32"]["median_ratio"] == pytest.approx(seconds[other] / seconds[base])
    assert "vs_fp32" not in groups[base][1]


class SpyOrt(OrtRunner):
    """An OrtRunner that counts its unbound runs and keeps the last BoundRun it made."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.runs = 0
        self.bound: OrtBoundRun | None = None

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.runs += 1
        return super().run(feeds, outputs)

    def bind(self, feeds: Mapping[str, np.ndarray], carry: Mapping[str, str] | None = None) -> OrtBoundRun:
        self.bound = super().bind(feeds, carry)
        return self.bound


def test_ort_streaming_step_is_bound_once_and_rolls_states_like_the_unbound_loop(tmp_path: Path) -> None:
    """The timed calls run the bound graph only (the one unbound run is bind's, for the output shapes), and after 8
    frames cycling over 3 the bound outputs are those of feeding each state back through runner.run."""
    runner = SpyOrt(stateful_model(tmp_path / "s.onnx"))
    frames = [RNG.standard_normal((1, 4)).astype(np.float32) for _ in range(3)]
    step = speed.stateful_step(runner, frames, STATES, "x", {**CARRY, "unused": "y"})
    seconds = [step() for _ in range(8)]
    assert runner.runs == 1 and runner.bound is not None and all(value >= 0.0 for value in seconds)
    states = dict(STATES)
    for index in range(8):
        expected = runner.run({"x": frames[index % 3], **states})
        states = {name: expected[output] for name, output in CARRY.items()}
    got = runner.bound.outputs()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_ort_stateless_step_is_bound_once(tmp_path: Path) -> None:
    runner = SpyOrt(stateful_model(tmp_path / "s.onnx"))
    feeds = {"x": np.ones((1, 4), np.float32), **STATES, "other": np.zeros(1)}  # inputs it does not take: left out
    step = speed.stateless_step(runner, feeds)
    for _ in range(5):
        step()
    assert runner.runs == 1 and runner.bound is not None
    np.testing.assert_array_equal(runner.bound.outputs()["n_out"], [[1]])  # no carry: every run from the feeds


class CountingCell(torch.nn.Module):
    """PyTorch eager streaming step: enh = 2 mix, h_out = h + 1; records the states it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def forward(self, mix: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(float(h[0]))
        return mix * 2, h + 1


def test_a_runner_without_binding_is_timed_around_run() -> None:
    """PyTorch eager has no bound run: the step feeds numpy states through runner.run, carried as before."""
    cell = CountingCell()
    runner = TorchRunner(cell, ["mix", "h"], ["enh", "h_out"])
    assert not isinstance(runner, BindingRunner)
    frames = [np.full(2, i, np.float32) for i in range(3)]
    stats = speed.bench_stateful(runner, frames, {"h": np.zeros(1, np.float32)}, runs=4, warmup=1,
                                 frame_input="mix", state_outputs={"h": "h_out"})
    assert stats.runs == 4 and cell.seen == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ort_frames_of_varying_shape_are_timed_around_run(tmp_path: Path) -> None:
    """Frames that differ in shape cannot share one bound input buffer: such a roll runs unbound (runner.run per
    frame, checked as before), not bound to the first frame's shape."""
    runner = SpyOrt(stateful_model(tmp_path / "s.onnx"))
    frames = [np.ones((1, 4), np.float32), np.ones((1, 1, 4), np.float32)]
    step = speed.stateful_step(runner, frames, STATES, "x", CARRY)
    step()
    assert runner.bound is None and runner.runs == 1
    with pytest.raises(ModelError, match="'x' must have rank 2"):  # the second frame meets the runner's own check
        step()
