"""Range collection: histogram math against a direct implementation, known answers, order independence, ORT graphs."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.calib import histogram as hist
from quant.calib.ranges import RangeOptions, _run_pass, augment_model, balanced_groups, collect_ranges, new_stats
from quant.errors import CalibrationError, ModelError

QUIET = RangeOptions(progress=False)


def direct_kl(counts: np.ndarray, levels: int = 128, start: int = 128) -> np.ndarray:
    """The entropy candidates computed one by one, exactly as the algorithm is described."""
    b = counts.astype(np.float64)
    out = []
    for i in range(start, b.size + 1):
        p = b[:i].copy()
        p[-1] += b[i:].sum()
        level = (np.arange(i) * levels) // i
        q = np.zeros(i)
        for k in range(levels):
            members = level == k
            nonzero = members & (b[:i] > 0)
            if nonzero.any():
                q[nonzero] = b[:i][members].sum() / nonzero.sum()
        if q.sum() == 0 or np.any((p > 0) & (q == 0)):
            out.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        keep = p > 0
        out.append(float(np.sum(p[keep] * np.log(p[keep] / q[keep]))))
    return np.array(out)


def histogram_of(values: np.ndarray, num_bins: int = hist.NUM_BINS) -> hist.AbsHistogram:
    accumulator = hist.MinMaxAccumulator()
    accumulator.add(values)
    histogram = hist.AbsHistogram(accumulator.amax, num_bins)
    histogram.add(values)
    return histogram


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorized_kl_equals_direct_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.laplace(size=20000), rng.normal(scale=30, size=5)]).astype(np.float32)
    counts = histogram_of(values, num_bins=512).counts
    fast = hist.entropy_kl(counts)
    slow = direct_kl(counts)
    assert np.array_equal(np.isinf(fast), np.isinf(slow))
    finite = np.isfinite(slow)
    np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)


def test_uniform_entropy_is_near_max() -> None:
    values = np.random.default_rng(2).uniform(-3, 3, size=200_000).astype(np.float32)
    histogram = histogram_of(values)
    amax = hist.entropy_amax(histogram)
    assert amax >= 0.95 * histogram.amax


def test_gaussian_with_rare_outliers_is_well_below_max() -> None:
    rng = np.random.default_rng(3)
    # the body (|x| up to ~5) must reach past the first candidate, start_bin / num_bins * amax = 40 / 16
    values = np.concatenate([rng.normal(size=500_000), [40.0, -31.0, 35.0]]).astype(np.float32)
    histogram = histogram_of(values)
    amax = hist.entropy_amax(histogram)
    assert histogram.amax == pytest.approx(40.0)
    assert 2.5 <= amax < 0.15 * histogram.amax


def test_zero_spike_does_not_collapse_the_search_to_the_first_candidate() -> None:
    rng = np.random.default_rng(6)  # 90 % exact zeros (ReLU / silence) plus a Laplacian body
    values = np.concatenate([np.zeros(2_000_000), rng.laplace(size=200_000)]).astype(np.float32)
    histogram = histogram_of(values)
    first_candidate = hist.START_BIN * histogram.bin_width
    assert hist.entropy_amax(histogram, suppress_zero_bin=False) == pytest.approx(first_candidate)
    assert hist.entropy_amax(histogram) > 4 * first_candidate


def test_percentile_from_histogram() -> None:
    values = np.arange(1, 10001, dtype=np.float32)  # |x| uniform on 1..10000
    histogram = histogram_of(values, num_bins=10000)
    assert 9900.0 <= hist.percentile_amax(histogram, 99.0) <= 9901.0  # at most one bin above the exact value
    assert hist.percentile_amax(histogram, 100.0) == pytest.approx(10000.0)
    with pytest.raises(CalibrationError):
        hist.percentile_amax(histogram, 0.0)


def test_nonfinite_values_are_counted_and_ignored() -> None:
    accumulator = hist.MinMaxAccumulator()
    accumulator.add(np.array([1.0, -np.inf, 2.0, np.nan, -3.0], dtype=np.float32))
    assert (accumulator.minimum, accumulator.maximum, accumulator.amax) == (-3.0, 2.0, 3.0)
    assert (accumulator.count, accumulator.nonfinite) == (3, 2)
    histogram = hist.AbsHistogram(accumulator.amax, 8)
    histogram.add(np.array([1.0, -np.inf, 2.0, np.nan, -3.0], dtype=np.float32))
    assert histogram.counts.sum() == 3


def test_float16_and_float64_tensors_share_the_float32_histogram() -> None:
    values = np.random.default_rng(7).normal(size=5000).astype(np.float16)
    reference = hist.AbsHistogram(4.0, 64)
    reference.add(values.astype(np.float32))
    for dtype in (np.float16, np.float64):
        histogram = hist.AbsHistogram(4.0, 64)
        histogram.add(values.astype(dtype))
        np.testing.assert_array_equal(histogram.counts, reference.counts)


# ------------------------------------------------------------------------------------------------ one-pass histogram


def pow2_histogram_of(batches: list[np.ndarray], num_bins: int = 64) -> hist.Pow2Histogram:
    """What the one-pass collector does per tensor: cover each batch's max |x|, then count it."""
    histogram = hist.Pow2Histogram(num_bins)
    accumulator = hist.MinMaxAccumulator()
    for batch in batches:
        accumulator.add(batch)
        histogram.cover(accumulator.amax)
        histogram.add(batch)
    return histogram


def assert_derived_as_if_fetched(result: Any, name: str, per_batch: list[np.ndarray], method: str
                                  ) -> hist.Pow2Histogram:
    """A derived tensor's min/max/count and amax equal what fetching and counting its values batch by batch gives;
    returns that histogram."""
    values = np.concatenate([batch.reshape(-1) for batch in per_batch])
    derived = result.tensors[name]
    assert (derived.minimum, derived.maximum, derived.count) == (values.min(), values.max(), values.size), name
    collected = pow2_histogram_of(per_batch, hist.collect_bins(QUIET.num_bins))  # as if fetched and counted
    expected = {"minmax": float(np.abs(values).max()),
                "percentile": hist.percentile_amax(collected, QUIET.percentile),
                "entropy": hist.entropy_amax(hist.regrid(collected, QUIET.num_bins))}[method]
    assert derived.amax == expected, name
    return collected


def direct_pow2_counts(values: np.ndarray, exponent: int, num_bins: int) -> np.ndarray:
    """floor(|x| * bins / 2^exponent) in exact (float64) arithmetic over every value at once."""
    index = np.floor(np.abs(values.astype(np.float64)) * num_bins / 2.0**exponent).astype(np.int64)
    return np.bincount(index, minlength=num_bins)


def growing_batches() -> list[np.ndarray]:
    """Batches whose max |x| rises over 2^-3 .. 2^9, hitting bin edges of every range exactly, plus zeros."""
    rng = np.random.default_rng(3)
    batches = [np.zeros(7, np.float32)]
    for exponent in range(-3, 10, 2):
        values = rng.laplace(scale=2.0**exponent / 8, size=500)
        edges = np.arange(0, 65) * 2.0**exponent / 64  # exact bin edges of the range [0, 2^exponent)
        batches.append(np.concatenate([values, edges[:-1], -edges[1:-1]]).astype(np.float32))
    return batches


def test_pow2_merges_equal_the_histogram_over_the_final_range() -> None:
    batches = growing_batches()
    grown = pow2_histogram_of(batches)
    everything = np.concatenate(batches)
    final = hist.Pow2Histogram(64)
    final.cover(float(np.abs(everything).max()))  # the final range from the start: no merge at all
    final.add(everything)
    assert grown.exponent == final.exponent and grown.amax == final.amax
    np.testing.assert_array_equal(grown.counts, final.counts)
    np.testing.assert_array_equal(grown.counts, direct_pow2_counts(everything, final.exponent, 64))
    assert grown.counts.sum() == everything.size


def test_pow2_histogram_is_identical_in_any_batch_order_and_split() -> None:
    batches = growing_batches()
    reference = pow2_histogram_of(batches)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(batches))
        shuffled = pow2_histogram_of([batches[i] for i in order])
        np.testing.assert_array_equal(shuffled.counts, reference.counts)
        parts = [pow2_histogram_of([batches[i] for i in order[:3]]), pow2_histogram_of([batches[i] for i in order[3:]])]
        merged = hist.Pow2Histogram.merged(parts[::-1] if seed % 2 else parts, 64)
        np.testing.assert_array_equal(merged.counts, reference.counts)
        assert (merged.exponent, merged.amax) == (reference.exponent, reference.amax)


def test_small_batches_wait_and_give_the_statistics_of_counting_each_at_once() -> None:
    """Streaming frames are counted a chunk at a time: the same min/max, counts and histogram as one update per
    batch, non-finite values included."""
    batches = [*growing_batches(), np.array([np.nan, -np.inf, 2.5], np.float32), np.zeros(0, np.float32)]
    one_by_one, grouped = new_stats(True, QUIET), new_stats(True, QUIET)
    for batch in batches:
        one_by_one.add(batch)
        one_by_one.flush()
        grouped.add(batch)
    assert grouped.pending_size == sum(batch.size for batch in batches)  # nothing counted yet
    grouped.flush()
    assert grouped.minmax == one_by_one.minmax and grouped.pending == []
    assert grouped.histogram is not None and one_by_one.histogram is not None
    assert (grouped.histogram.exponent, grouped.histogram.amax) == (one_by_one.histogram.exponent,
                                                                    one_by_one.histogram.amax)
    np.testing.assert_array_equal(grouped.histogram.counts, one_by_one.histogram.counts)
    big = new_stats(False, QUIET)
    big.add(np.ones(hist.CHUNK_ELEMENTS, np.float32))  # a chunk's worth is counted at once
    assert big.pending == [] and big.minmax.count == hist.CHUNK_ELEMENTS


def test_a_batch_updates_in_one_work_item_per_thread_of_about_equal_size() -> None:
    assert balanced_groups([5, 1, 4, 2, 3], 2) == [[0, 3, 1], [2, 4]]  # 8 and 7 values
    assert balanced_groups([7, 7], 4) == [[0], [1]]  # no empty work items
    assert balanced_groups([], 2) == []


def test_pow2_histogram_refuses_values_above_its_range() -> None:
    histogram = hist.Pow2Histogram(64)
    histogram.cover(1.0)
    with pytest.raises(CalibrationError, match="above the histogram range"):
        histogram.add(np.array([3.0], np.float32))
    with pytest.raises(CalibrationError, match="power-of-two bin count"):
        hist.Pow2Histogram(100)


def test_pow2_histogram_of_float64_values_just_below_a_power_of_two() -> None:
    values = np.array([np.nextafter(4.0, 0.0), 1.0, -0.5])  # rounds to 4.0 in float32: must stay float64
    histogram = pow2_histogram_of([values], num_bins=8)
    assert histogram.exponent == 2
    np.testing.assert_array_equal(histogram.counts, direct_pow2_counts(values, 2, 8))


def test_pow2_histogram_of_float16_values_in_a_tiny_range() -> None:
    """The bin scale (2^(bins - exponent) = 2^20 here) does not fit float16: the product must be formed in float32."""
    values = (np.random.default_rng(8).normal(size=3000) * 1e-3).astype(np.float16)
    histogram = pow2_histogram_of([values], num_bins=64)
    assert histogram.exponent is not None and histogram.exponent < -5
    np.testing.assert_array_equal(histogram.counts, direct_pow2_counts(values, histogram.exponent, 64))


def test_pow2_histogram_counts_only_finite_values_and_negatives_by_their_magnitude() -> None:
    values = np.array([0.5, -0.5, np.nan, -np.inf, np.inf, -0.26, 0.26, -0.0], np.float32)
    histogram = hist.Pow2Histogram(8)
    histogram.cover(0.5)
    histogram.add(values)
    np.testing.assert_array_equal(histogram.counts, direct_pow2_counts(values[np.isfinite(values)], 0, 8))
    assert histogram.counts.sum() == 5 and histogram.counts[2] == 2 and histogram.counts[4] == 2


def real_activations() -> dict[str, list[np.ndarray]]:
    """Per tensor, batches of real-speech activations: STFT of the test clips, its magnitude and log power, and a
    fixed random projection through tanh and ReLU (zero spike), one clip a batch and each clip at its own level."""
    from quant import features
    from quant.data.audio import load_audio

    rng = np.random.default_rng(0)
    weights = rng.normal(scale=0.1, size=(features.FREQ_BINS, 64)).astype(np.float32)
    tensors: dict[str, list[np.ndarray]] = {"stft": [], "magnitude": [], "log_power": [], "tanh": [], "relu": []}
    clips = sorted((Path(__file__).parent / "data").glob("librivox_*.flac"))
    for level, clip in zip((1.0, 0.3, 2.5, 0.7, 1.6), clips):
        spec = features.stft(level * load_audio(clip)[: 4 * features.SAMPLE_RATE]).astype(np.float32)
        magnitude = np.sqrt(spec[..., 0] ** 2 + spec[..., 1] ** 2).reshape(-1, features.FREQ_BINS)
        projected = magnitude @ weights
        for name, value in (("stft", spec), ("magnitude", magnitude), ("log_power", np.log(magnitude**2 + 1e-8)),
                            ("tanh", np.tanh(projected)), ("relu", np.maximum(projected - 0.5, 0.0))):
            tensors[name].append(value.astype(np.float32))
    return tensors


def test_one_pass_thresholds_are_within_one_bin_of_the_two_pass_reference() -> None:
    """Against the former collector: pass 1 amax, pass 2 2048 bins over [0, amax], same searches."""
    options = RangeOptions()
    for name, batches in real_activations().items():
        collected = pow2_histogram_of(batches, hist.collect_bins(options.num_bins))
        reference = histogram_of(np.concatenate([batch.reshape(-1) for batch in batches]), options.num_bins)
        assert collected.amax == reference.amax
        one_bin = reference.bin_width
        percentile = hist.percentile_amax(collected, options.percentile)
        assert abs(percentile - hist.percentile_amax(reference, options.percentile)) <= one_bin, name
        entropy = hist.entropy_amax(hist.regrid(collected, options.num_bins))
        assert abs(entropy - hist.entropy_amax(reference)) <= one_bin, name


def test_regrid_keeps_every_count_and_moves_none_by_more_than_a_search_bin() -> None:
    values = np.abs(np.random.default_rng(1).laplace(size=50000)).astype(np.float32)
    collected = pow2_histogram_of([values], hist.collect_bins(256))
    regridded = hist.regrid(collected, 256)
    reference = histogram_of(values, 256).counts
    assert regridded.counts.sum() == values.size and regridded.amax == float(values.max())
    # interpolation spreads a count within its collected bin (an eighth of a search bin or less), so the cumulative
    # counts at the search edges lag or lead the exact ones by at most one search bin
    cumulative, exact = np.cumsum(regridded.counts), np.cumsum(reference)
    assert np.all(cumulative[1:] >= exact[:-1]) and np.all(cumulative[:-1] <= exact[1:])


def test_all_zero_and_empty_tensors_give_zero() -> None:
    histogram = histogram_of(np.zeros(100, dtype=np.float32))
    assert histogram.amax == 0.0
    assert hist.entropy_amax(histogram) == 0.0
    assert hist.percentile_amax(histogram) == 0.0
    assert hist.MinMaxAccumulator().amax == 0.0


# ---- ONNX Runtime collection on tiny graphs ----------------------------------------------------------------------


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def scale_relu_model(path: Path) -> Path:
    """y = Relu(x * 2) - 1, with an int64 Shape side branch that must be skipped."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["relu"]),
        helper.make_node("Sub", ["relu", "one"], ["y"]),
        helper.make_node("Shape", ["x"], ["shape"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def batches(seed: int = 0, count: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(3, 8)).astype(np.float32) * (1 + i)} for i in range(count)]


def test_minmax_is_exact(tmp_path: Path) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches()
    result = collect_ranges(path, feeds, "minmax", QUIET)
    x = np.concatenate([feed["x"] for feed in feeds])
    assert set(result.tensors) == {"x", "scaled", "relu", "y"}  # no initializers, no int64 "shape"
    assert result.tensors["x"].amax == float(np.abs(x).max())
    assert result.tensors["scaled"].minimum == float((x * 2).min())
    assert result.tensors["y"].maximum == float(np.maximum(x * 2, 0).max() - 1)
    assert result.tensors["x"].count == x.size
    assert result.batches == len(feeds)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_permuted_batches_give_bit_identical_amax(tmp_path: Path, method: str) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches(seed=4, count=8)
    order = np.random.default_rng(5).permutation(len(feeds))
    first = collect_ranges(path, feeds, method, QUIET).amax
    second = collect_ranges(path, [feeds[i] for i in order], method, QUIET).amax
    assert first == second
    assert all(value > 0 for value in first.values())


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_threads_never_change_a_result(tmp_path: Path, method: str) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches(seed=2, count=5)
    assert collect_ranges(path, feeds, method, RangeOptions(progress=False, threads=3)) == collect_ranges(
        path, feeds, method, QUIET)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_overlapped_collection_equals_the_sequential_one(tmp_path: Path, method: str, threads: int) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches(seed=6, count=7)
    sequential = collect_ranges(path, feeds, method, RangeOptions(progress=False, threads=threads, overlap=False))
    overlapped = collect_ranges(path, feeds, method, RangeOptions(progress=False, threads=threads, overlap=True))
    assert overlapped == sequential
    assert overlapped.tensors["x"].count == sum(feed["x"].size for feed in feeds)
    assert overlapped.histograms.keys() == sequential.histograms.keys()
    for name, histogram in overlapped.histograms.items():
        np.testing.assert_array_equal(histogram.counts, sequential.histograms[name].counts)


class RecordingSession:
    """A stand-in for an ONNX Runtime session: run() returns the feed's `x` under every name and logs its batch."""

    def __init__(self, log: list[tuple[str, int]], started: list[threading.Event]) -> None:
        self.log, self.started = log, started

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="x")]

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = int(feed["x"][0])
        self.log.append(("run", batch))
        self.started[batch].set()
        return [feed["x"] for _ in names]


def test_overlap_runs_the_next_batch_while_one_tensor_at_a_time_updates_in_batch_order() -> None:
    count, names = 4, ["a", "b", "c"]
    log: list[tuple[str, int]] = []
    started = [threading.Event() for _ in range(count)]
    lock = threading.Lock()
    busy: set[str] = set()
    seen: dict[str, list[int]] = {name: [] for name in names}
    overlapped: list[bool] = []

    def update(name: str, value: np.ndarray) -> None:
        batch = int(value[0])
        with lock:
            assert name not in busy, f"two updates of {name} at once"
            busy.add(name)
        if batch + 1 < count:  # batch k's update waits for the graph run of batch k+1: only overlap lets it start
            overlapped.append(started[batch + 1].wait(timeout=10))
        with lock:
            seen[name].append(batch)
            busy.discard(name)

    feeds = [{"x": np.full(3, batch, np.float32)} for batch in range(count)]
    done = _run_pass(RecordingSession(log, started), names, feeds, RangeOptions(progress=False, threads=2), "t",
                     update)
    assert done == count and all(overlapped) and len(overlapped) == len(names) * (count - 1)
    assert all(order == list(range(count)) for order in seen.values())  # every tensor saw the batches in order


def test_an_update_error_stops_the_pass_and_is_raised() -> None:
    def update(name: str, value: np.ndarray) -> None:
        if int(value[0]) == 1:
            raise CalibrationError(f"bad batch for {name}")

    feeds = [{"x": np.full(3, batch, np.float32)} for batch in range(5)]
    log: list[tuple[str, int]] = []
    session = RecordingSession(log, [threading.Event() for _ in range(5)])
    with pytest.raises(CalibrationError, match="bad batch for a"):
        _run_pass(session, ["a"], feeds, RangeOptions(progress=False, threads=1), "t", update)
    assert log == [("run", 0), ("run", 1), ("run", 2)]  # batch 1's error surfaces once batch 2 has run, no later


def test_the_calibration_session_does_not_spin(tmp_path: Path) -> None:
    """Idle ONNX Runtime threads would spin on the CPUs the overlapped statistics updates need."""
    from quant.calib.ranges import _session

    augmented = augment_model(onnx.load(str(scale_relu_model(tmp_path / "m.onnx")))).model
    work = tmp_path / "work"
    work.mkdir()
    options = _session(augmented, work, threads=2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("method", ["entropy", "minmax"])
def test_callable_feed_source_and_one_shot_iterator(tmp_path: Path, method: str) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches()
    reference = collect_ranges(path, feeds, method, QUIET)
    assert collect_ranges(path, lambda: iter(feeds), method, QUIET).amax == reference.amax
    one_shot = collect_ranges(path, iter(feeds), method, QUIET)  # one pass: a generator is enough
    assert one_shot.amax == reference.amax and one_shot.batches == len(feeds)


def test_masked_softmax_input_never_becomes_infinite(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 4])],
    )
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "a.onnx")
    mask = np.array([[0, 0, -np.inf, -np.inf], [0, 0, 0, -np.inf]], np.float32)
    feeds = [{"scores": np.full((2, 4), 1.5, np.float32), "mask": mask}]
    result = collect_ranges(path, feeds, "entropy", QUIET)
    masked = result.tensors["masked"]
    assert masked.nonfinite == 3 and masked.count == 5
    assert masked.amax == pytest.approx(1.5) and np.isfinite(result.tensors["mask"].amax)
    assert result.tensors["mask"].amax == 0.0


def test_max_batch_splits_feeds_without_changing_minmax(tmp_path: Path) -> None:
    path = scale_relu_model(tmp_path / "m.onnx")
    feeds = batches()
    whole = collect_ranges(path, feeds, "minmax", QUIET)
    split = collect_ranges(path, feeds, "minmax", RangeOptions(progress=False, max_batch=1))
    assert split.amax == whole.amax
    assert split.batches == 3 * whole.batches


def concat_model(path: Path) -> Path:
    """cat = Concat(x, Relu(x), x) (a union of activations), its Transpose, and a Concat with an initializer."""
    table = numpy_helper.from_array(np.full((3, 2), 7.0, np.float32), "table")
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Concat", ["x", "relu", "x"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["cat_t"], perm=[1, 0]),
        helper.make_node("Concat", ["relu", "table"], ["with_table"], axis=1),
        helper.make_node("Add", ["cat_t", "cat_t"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [24, 3]),
                               helper.make_tensor_value_info("with_table", TensorProto.FLOAT, [3, 10])], [table])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_a_concat_of_activations_gets_the_exact_merge_of_their_statistics(tmp_path: Path, method: str) -> None:
    path = concat_model(tmp_path / "m.onnx")
    augmented = augment_model(onnx.load(str(path)))
    assert augmented.unions == {"cat": ("x", "relu", "x")} and augmented.aliases == {"cat_t": "cat"}
    assert augmented.fetched == ["x", "relu", "with_table", "y"]
    levels = (1.0, 9.0, 0.2)  # each batch its own power-of-two range: the merge has to grow histograms
    feeds = [{"x": level * np.random.default_rng(seed).normal(size=(3, 8)).astype(np.float32)}
             for seed, level in enumerate(levels)]
    result = collect_ranges(path, feeds, method, QUIET)
    per_batch = [np.concatenate([f["x"], np.maximum(f["x"], 0), f["x"]], axis=1) for f in feeds]
    values = np.concatenate([batch.reshape(-1) for batch in per_batch])
    cat = result.tensors["cat"]
    assert (cat.minimum, cat.maximum, cat.count) == (values.min(), values.max(), values.size)
    assert result.tensors["cat_t"] == replace(cat, name="cat_t")
    collected = pow2_histogram_of(per_batch, hist.collect_bins(QUIET.num_bins))  # as if fetched and counted
    expected = {"minmax": float(np.abs(values).max()), "percentile": hist.percentile_amax(collected, QUIET.percentile),
                "entropy": hist.entropy_amax(hist.regrid(collected, QUIET.num_bins))}[method]
    assert cat.amax == expected


def pad_model(path: Path) -> Path:
    """padded = Pad(Relu(x)) with zeros (a constant 0 given), x_padded = Pad(x) (value left out: 0, pads computed
    from constants as torch exports them); Pads of Relu(x) with 1.5, in reflect mode, cropping (a negative pad) and
    with pads computed from x's shape, none of which holds just its input's values and zeros."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 2], np.int64), "pads")
    crop = numpy_helper.from_array(np.array([0, -1, 0, 4], np.int64), "crop")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    one_and_half = numpy_helper.from_array(np.array(1.5, np.float32), "one_and_half")
    two = numpy_helper.from_array(np.array([2], np.int64), "two")
    nodes = [
        helper.make_node("Constant", [], ["begin"], value=numpy_helper.from_array(np.array([0, 1], np.int64))),
        helper.make_node("Concat", ["begin", "begin", "two"], ["folded"], axis=0),  # [0, 1, 0, 1, 2]
        helper.make_node("Slice", ["folded", "one", "five"], ["folded_pads"]),  # [1, 0, 1, 2]: a row, 3 columns
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Concat", ["begin", "shape"], ["from_shape"], axis=0),  # [0, 1, B, 8]: not a constant
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Pad", ["relu", "pads", "zero"], ["padded"]),
        helper.make_node("Pad", ["x", "folded_pads"], ["x_padded"]),
        helper.make_node("Pad", ["relu", "pads", "one_and_half"], ["padded_one"]),
        helper.make_node("Pad", ["relu", "pads"], ["reflected"], mode="reflect"),
        helper.make_node("Pad", ["relu", "crop"], ["cropped"]),
        helper.make_node("Pad", ["relu", "from_shape"], ["shape_padded"]),
        helper.make_node("Add", ["relu", "relu"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "W"])
               for name in ("y", "padded_one", "reflected", "cropped", "shape_padded")]
    ends = [numpy_helper.from_array(np.array([value], np.int64), name) for value, name in ((1, "one"), (5, "five"))]
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])], outputs,
                              [pads, crop, zero, one_and_half, two, *ends])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_a_zero_pad_gets_its_inputs_statistics_and_the_zeros_it_added(tmp_path: Path, method: str) -> None:
    from quant.calib.ranges import ZERO_COUNT_SUFFIX
    from quant.calib.sharded import collect_ranges_sharded
    from quant.executor import LocalExecutor

    path = pad_model(tmp_path / "m.onnx")
    augmented = augment_model(onnx.load(str(path)))
    counts = ("padded" + ZERO_COUNT_SUFFIX, "x_padded" + ZERO_COUNT_SUFFIX)
    assert augmented.unions == {"padded": ("relu", counts[0]), "x_padded": ("x", counts[1])}
    assert augmented.extra_outputs == counts
    assert augmented.fetched == ["x", "relu", "padded_one", "reflected", "cropped", "shape_padded", "y", *counts]
    levels = (1.0, 9.0, 0.2, -1.0)  # each batch its own power-of-two range; the last has no value above 0 in relu
    feeds = [{"x": level * np.abs(np.random.default_rng(seed).normal(size=(3, 8))).astype(np.float32)}
             for seed, level in enumerate(levels)]
    result = collect_ranges(path, feeds, method, QUIET)
    assert collect_ranges_sharded(path, feeds[::-1], method, QUIET, LocalExecutor(), shards=2) == result
    for name, source, widths in (("padded", lambda x: np.maximum(x, 0), ((0, 0), (1, 2))),
                                 ("x_padded", lambda x: x, ((1, 1), (0, 2)))):
        per_batch = [np.pad(source(feed["x"]), widths) for feed in feeds]  # what the Pad outputs
        collected = assert_derived_as_if_fetched(result, name, per_batch, method)
        if method != "minmax":
            np.testing.assert_array_equal(result.histograms[name].counts, hist.regrid(collected, QUIET.num_bins).counts)
    assert set(result.tensors) == {"x", "relu", "padded", "x_padded", "padded_one", "reflected", "cropped",
                                   "shape_padded", "y"}


def slice_model(path: Path) -> Path:
    """Slices along one axis, step 1: of x (empty: start 6 > end 3), of Relu(x) (negative end) and of that slice
    (a chain, on the batch axis), of Neg(x) (int32 indices, negative start and axis); a second slice of x and a
    step-2 slice of Abs(x), which derive nothing."""
    def indices(name: str, values: list[int], dtype: type = np.int64) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, dtype), name)

    constants = [indices("six", [6]), indices("three", [3]), indices("one", [1]), indices("two", [2]),
                 indices("minus_one", [-1]), indices("zero", [0]), indices("ten", [10]),
                 indices("minus_four32", [-4], np.int32), indices("hundred32", [100], np.int32),
                 indices("minus_one32", [-1], np.int32)]
    nodes = [
        helper.make_node("Slice", ["x", "six", "three", "one"], ["empty"]),
        helper.make_node("Slice", ["x", "two", "ten", "one"], ["x_again"]),
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Slice", ["relu", "two", "minus_one", "one"], ["relu_cut"]),
        helper.make_node("Slice", ["relu_cut", "zero", "one", "zero"], ["relu_cut_row"]),
        helper.make_node("Neg", ["x"], ["neg"]),
        helper.make_node("Slice", ["neg", "minus_four32", "hundred32", "minus_one32"], ["neg_tail"]),
        helper.make_node("Abs", ["x"], ["abs"]),
        helper.make_node("Slice", ["abs", "zero", "ten", "one", "two"], ["abs_even"]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "W"])
               for name in ("empty", "x_again", "relu_cut_row", "neg_tail", "abs_even")]
    graph = helper.make_graph(nodes, "slice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 10])],
                              outputs, constants)
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_a_sliced_activation_gets_the_statistics_of_its_slice_and_the_parts_left_out(tmp_path: Path,
                                                                                     method: str) -> None:
    from quant.calib.sharded import collect_ranges_sharded
    from quant.executor import LocalExecutor

    path = slice_model(tmp_path / "m.onnx")
    augmented = augment_model(onnx.load(str(path)))
    assert {name: parts[0] for name, parts in augmented.unions.items()} == {
        "x": "empty", "relu": "relu_cut", "relu_cut": "relu_cut_row", "neg": "neg_tail"}
    assert augmented.fetched[:6] == ["empty", "x_again", "relu_cut_row", "neg_tail", "abs", "abs_even"]
    assert len(augmented.extra_outputs) == 8  # before and after each of the 4 slices
    levels = (1.0, 9.0, 0.2)  # each batch its own power-of-two range
    feeds = [{"x": level * np.random.default_rng(seed).normal(size=(3, 10)).astype(np.float32)}
             for seed, level in enumerate(levels)]
    result = collect_ranges(path, feeds, method, QUIET)
    assert collect_ranges_sharded(path, feeds[::-1], method, QUIET, LocalExecutor(), shards=2) == result
    expected_values = {"x": lambda x: x, "relu": lambda x: np.maximum(x, 0),
                       "relu_cut": lambda x: np.maximum(x, 0)[:, 2:-1], "neg": lambda x: -x}
    for name, values_of in expected_values.items():
        assert_derived_as_if_fetched(result, name, [values_of(feed["x"]) for feed in feeds], method)
    assert result.tensors["empty"].count == 0


def test_augment_uses_inferred_types_and_skips_non_float(tmp_path: Path) -> None:
    model = onnx.load(str(scale_relu_model(tmp_path / "m.onnx")))
    augmented = augment_model(model)
    assert augmented.names == ["x", "scaled", "relu", "y"] and augmented.skipped == [] and augmented.aliases == {}
    assert [output.name for output in augmented.model.graph.output] == ["y", "shape", "x", "scaled", "relu"]
    assert len(model.graph.output) == 2  # the original is untouched


def rearranging_model(path: Path) -> Path:
    """x -> Transpose -> Reshape -> Relu -> Identity (graph output); a Reshape of an initializer; a Transpose of a
    Relu output that is a graph output too."""
    shape = numpy_helper.from_array(np.array([4, 6], np.int64), "shape")
    table = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(2, 12), "table")
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
        helper.make_node("Reshape", ["xt", "shape"], ["xr"]),
        helper.make_node("Relu", ["xr"], ["relu"]),
        helper.make_node("Identity", ["relu"], ["y"]),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[1, 0]),
        helper.make_node("Reshape", ["table", "shape"], ["table_r"]),
        helper.make_node("Add", ["yt", "yt"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "rearrange", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [6, 4]),
                               helper.make_tensor_value_info("table_r", TensorProto.FLOAT, [4, 6])], [shape, table])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_rearranged_tensors_share_their_source_statistics_without_being_fetched(tmp_path: Path, method: str) -> None:
    path = rearranging_model(tmp_path / "m.onnx")
    augmented = augment_model(onnx.load(str(path)))
    assert augmented.aliases == {"xt": "x", "xr": "x", "y": "relu", "yt": "relu"}  # the initializer's is fetched
    outputs = [output.name for output in augmented.model.graph.output]
    assert "xt" not in outputs and "xr" not in outputs and "yt" not in outputs and "y" in outputs  # y: graph output
    feeds = [{"x": np.random.default_rng(seed).normal(size=(3, 8)).astype(np.float32)} for seed in range(3)]
    result = collect_ranges(path, feeds, method, QUIET)
    assert list(result.tensors) == ["x", "xt", "xr", "relu", "y", "yt", "table_r", "z"]
    x = np.concatenate([feed["x"] for feed in feeds])
    for name, values in (("xt", x), ("yt", np.maximum(x, 0)), ("table_r", np.arange(24.0))):
        source = result.tensors[augmented.aliases.get(name, name)]
        assert result.tensors[name] == replace(source, name=name)
        assert (result.tensors[name].minimum, result.tensors[name].maximum) == (values.min(), values.max())


def test_missing_model_and_missing_input_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        collect_ranges(tmp_path / "none.onnx", [], "minmax", QUIET)
    path = scale_relu_model(tmp_path / "m.onnx")
    with pytest.raises(CalibrationError, match="lacks model input"):
        collect_ranges(path, [{"z": np.zeros((1, 8), np.float32)}], "minmax", QUIET)
    with pytest.raises(CalibrationError, match="ONNX Runtime rejected a calibration feed.*'x': \\(2, 5\\)"):
        collect_ranges(path, [{"x": np.zeros((2, 5), np.float32)}], "minmax", QUIET)
    with pytest.raises(CalibrationError, match="yielded nothing"):
        collect_ranges(path, [], "minmax", QUIET)
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        collect_ranges(path, batches(), "kl", QUIET)


def test_no_temp_folder_outlives_the_session_and_dead_runs_folders_go(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill -9 during the (long) pass leaves nothing in the temp dir, and what an earlier kill left is removed."""
    import subprocess
    import sys
    import tempfile

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now names a dead process, like a killed calibration's
    left = system_tmp / f"quant-ranges-{child.pid}-k1ll3d"
    left.mkdir()
    (left / "augmented.onnx").write_bytes(b"partial")
    path = scale_relu_model(tmp_path / "m.onnx")
    seen_during_pass: list[list[str]] = []

    def feeds() -> list[dict[str, np.ndarray]]:
        seen_during_pass.append(sorted(p.name for p in system_tmp.iterdir()))
        return batches()

    collect_ranges(path, feeds, "entropy", QUIET)
    assert seen_during_pass == [[]] and not any(system_tmp.iterdir())


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws only on one when disable=None)."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal, progress, drawn", [(False, True, False), (True, True, True),
                                                       (True, False, False)])
def test_progress_bar_only_on_a_terminal(terminal: bool, progress: bool, drawn: bool, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """By default a bar while stderr is a terminal and no bar text in a redirected stderr (a log file, a pipe);
    progress=False (--no-progress) never draws one."""
    screen = _Terminal()
    if terminal:
        monkeypatch.setattr("sys.stderr", screen)
    collect_ranges(scale_relu_model(tmp_path / "m.onnx"), batches(), "minmax", RangeOptions(progress=progress))
    stderr = screen.text if terminal else capsys.readouterr().err
    assert ("batch" in stderr) == drawn, stderr
