from __future__ import annotations

from typing import Mapping

import numpy as np
import pytest

from quant.eval import speed


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


def test_time_calls_counts_warmup_and_runs() -> None:
    calls: list[int] = []
    stats = speed.time_calls(lambda: calls.append(1), runs=7, warmup=3)
    assert len(calls) == 10 and stats.runs == 7
    ordered = [0.0, stats.min_ms, stats.p50_ms, stats.max_ms]
    assert ordered == sorted(ordered)  # statistics are consistent (no bound on how long anything took)


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
    """A load burst slows both graphs of a round: the per-round ratio stays put while the spreads overlap."""
    from quant.eval.speed import latency_ratio, latency_stats

    base = [0.010, 0.030, 0.011, 0.029, 0.012]
    test = [0.005, 0.015, 0.0055, 0.0145, 0.006]
    ratio = latency_ratio(latency_stats(test), latency_stats(base), test, base)
    assert not ratio.reliable
    assert ratio.paired_median == pytest.approx(0.5) and ratio.paired_p10 == pytest.approx(0.5)
    assert ratio.paired_p90 == pytest.approx(0.5)
