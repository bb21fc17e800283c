"""Time accounting (quant.eval.profile) on a tiny conv graph built at FP32 and INT8: the profile is attributed to
the export's nodes by name, integer kernels are recognised, the ceilings follow from the attributed times, and node
times never exceed the whole run. No wall-clock values are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.eval.profile import (GraphProfile, NodeRow, NodeTime, ProfileComparison, compare_profiles, format_holdback,
                                format_profile, holdback, profile_graph, profile_pair, source_node)
from quant.fileio import sha256_file

SHAPE = [1, 8, 32, 32]


def conv_model(path: Path) -> Path:
    """x -> first (Conv on the graph input: kept float by the input-layer rule) -> Relu -> second (Conv) -> y."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="second", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32, 32])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(path))
    return path


def feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from quant.artifacts import build_artifact
    from quant.calib import cache
    from quant.calib.ranges import RangeOptions, collect_ranges

    folder = tmp_path_factory.mktemp("profile")
    source = conv_model(folder / "convs.onnx")
    ranges = collect_ranges(source, [feeds(i) for i in range(4)], "minmax", RangeOptions(progress=False))
    entry = cache.write_entry(folder / "convs.cache", cache.CacheKey.create(sha256_file(source), "0" * 64, "minmax",
                                                                              {}), ranges)
    fp32 = build_artifact(source, "fp32", out_dir=folder / "fp32") / "model.onnx"
    int8 = build_artifact(source, "int8", out_dir=folder / "int8", cache=entry.path) / "model.onnx"
    return fp32, int8


def test_profile_graph_attributes_every_node_and_sums_by_op_type(builds: tuple[Path, Path]):
    for path in builds:
        profile = profile_graph(path, feeds(9), runs=3)
        assert profile.runs == 3 and profile.nodes
        assert all(node.op_type != "?" for node in profile.nodes)  # every kernel event named its op type
        assert sum(profile.by_op_type().values()) == pytest.approx(profile.node_ms)


def test_int8_profile_is_attributed_to_the_export_nodes(builds: tuple[Path, Path]):
    comparison = profile_pair(*builds, feeds(9), runs=3)
    rows = {row.node: row for row in comparison.rows}
    assert rows["second"].fp32_op == "Conv" and rows["second"].int8_op == "QLinearConv" and rows["second"].integer
    assert rows["first"].int8_op == "Conv" and not rows["first"].integer  # input-layer rule: float
    assert "QLinearConv" in comparison.int8.by_op_type() and "QLinearConv" not in comparison.fp32.by_op_type()
    # the Q/DQ around the integer conv belong to no export node: every INT8 kernel's time goes to a row or to overhead
    assert {"QuantizeLinear", "DequantizeLinear"} & set(comparison.int8.by_op_type())
    attributed = sum(row.int8_ms for row in comparison.rows)
    assert comparison.overhead_ms == pytest.approx(comparison.int8.node_ms - attributed)
    share = rows["second"].fp32_ms / comparison.fp32.node_ms
    assert comparison.integer_share == pytest.approx(share)
    assert comparison.ceiling_free_ratio == pytest.approx(1 - share)
    expected = (comparison.fp32.node_ms - rows["second"].fp32_ms + rows["second"].int8_ms) / comparison.fp32.node_ms
    assert comparison.ceiling_ratio == pytest.approx(expected)
    assert comparison.ceiling_free_ratio <= comparison.ceiling_ratio
    data = comparison.to_dict()
    assert set(data) >= {"fp32", "int8", "nodes", "ceiling_ratio"}
    assert {node["node"] for node in data["nodes"]} >= {"first", "second"}  # type: ignore[union-attr]
    assert rows["first"].fp32_op == "Conv"  # FP32: ORT fuses first + relu into one NCHWc Conv named after relu's output
    text = format_profile(comparison)
    assert "QLinearConv" in text and "ceiling" in text


def test_comparison_of_a_build_with_itself_has_no_integer_share(builds: tuple[Path, Path]):
    fp32 = profile_graph(builds[0], feeds(9), runs=2)
    comparison = compare_profiles(fp32, fp32, onnx.load(str(builds[0])))
    assert comparison.integer_share == 0 and comparison.ceiling_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("name, op_type, owner", [
    ("/enc/Conv", "Conv", "/enc/Conv"),
    ("/enc/Conv_token_18", "QLinearConv", "/enc/Conv"),
    ("/rnn/LSTM_quant", "DynamicQuantizeLSTM", "/rnn/LSTM"),
    ("/fc/MatMul/MatMulAddFusion", "Gemm", "/fc/MatMul"),  # FP32 MatMul + bias Add on 2-D inputs
    ("/enc/Conv_output_0_nchwc", "Conv", "/enc/Conv"),
    ("/enc/Relu_output_0_nchwc", "Conv", "/enc/Conv"),  # Conv + Relu fused, named after the Relu's output
    ("/enc/Conv_output_0_QuantizeLinear", "QuantizeLinear", None),
    ("ReorderOutput_token_3", "ReorderOutput", None),
    ("Transpose_token_33", "Transpose", None),
])
def test_source_node_names_the_export_node_ort_renamed(name: str, op_type: str, owner: str | None):
    conv = helper.make_node("Conv", ["x", "w"], ["/enc/Conv_output_0"], name="/enc/Conv")
    relu = helper.make_node("Relu", ["/enc/Conv_output_0"], ["/enc/Relu_output_0"], name="/enc/Relu")
    producers = {"/enc/Conv_output_0": conv, "/enc/Relu_output_0": relu}
    assert source_node(name, op_type, {"/enc/Conv", "/enc/Relu", "/rnn/LSTM", "/fc/MatMul"}, producers) == owner


def test_bench_profile_takes_the_graph_as_its_spec_argument(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`quant bench dpcrn --profile` profiles the graph named like any other bench argument (a second positional
    used to swallow nothing and the command always asked for a MODEL)."""
    from quant import timing
    from quant.cli import main

    seen: list[str] = []

    def stop(model: str, *args: object) -> None:
        seen.append(model)
        raise timing.ModelError("stopped here")

    monkeypatch.setattr(timing, "profile_model", stop)
    assert main(["bench", "dpcrn", "--profile"]) == 2
    assert seen == ["dpcrn"]
    assert main(["bench", "dpcrn", "wenet", "--profile"]) == 2
    assert "takes one shipped graph" in capsys.readouterr().err


def synthetic_comparison() -> ProfileComparison:
    """FP32: a MatMul (3 ms) and a GRU (5 ms), 10 ms a run; INT8: the MatMul as QLinearMatMul (1 ms), the GRU float
    but slower (6 ms), 0.5 ms of Q/DQ, 9 ms a run."""
    fp32 = GraphProfile((NodeTime("mm", "MatMul", 3.0), NodeTime("gru", "GRU", 5.0)), total_ms=10.0, runs=4)
    int8 = GraphProfile((NodeTime("mm", "QLinearMatMul", 1.0), NodeTime("gru", "GRU", 6.0),
                         NodeTime("mm_in_QuantizeLinear", "QuantizeLinear", 0.5)), total_ms=9.0, runs=4)
    rows = (NodeRow("mm", "MatMul", 3.0, "QLinearMatMul", 1.0), NodeRow("gru", "GRU", 5.0, "GRU", 6.0))
    return ProfileComparison(fp32, int8, rows, overhead_ms=0.5)


def test_holdback_splits_the_int8_run_into_float_ops_conversions_and_per_run_cost():
    comparison = synthetic_comparison()
    parts = {part.what: part for part in holdback(comparison)}
    assert list(parts) == ["float GRU", "outside kernels", "Q/DQ and reorders"]  # largest first
    # shares of the FP32 whole run (10 ms); with the integer kernels they add up to the profiled ratio
    assert parts["float GRU"].share == pytest.approx(0.6)
    assert parts["Q/DQ and reorders"].share == pytest.approx(0.05)
    assert parts["outside kernels"].ms == pytest.approx(9.0 - 7.5)
    assert sum(p.ms for p in parts.values()) + comparison.integer_int8_ms == pytest.approx(comparison.int8.total_ms)
    # beyond the ceiling: the GRU's extra 1 ms, all of Q/DQ, the per-run cost beyond FP32's (1.5 - 2.0 < 0: none)
    assert parts["float GRU"].above_ceiling == pytest.approx(0.1)
    assert parts["Q/DQ and reorders"].above_ceiling == pytest.approx(0.05)
    assert parts["outside kernels"].above_ceiling == 0.0
    assert comparison.to_dict()["holdback"][0] == parts["float GRU"].to_dict()
    assert format_holdback(holdback(comparison), top=2) == "float GRU 0.60 (+0.10), outside kernels 0.15"


def test_time_outside_kernels_beyond_the_ceiling_is_at_most_the_int8_runs_own():
    """With medians the FP32 whole run can come out below the sum of its kernels (here by 0.5 ms): the INT8 run's
    1.5 ms outside kernels is then all beyond the ceiling, not 2 ms of it."""
    base = synthetic_comparison()
    fp32 = GraphProfile(base.fp32.nodes, total_ms=7.5, runs=4)
    comparison = ProfileComparison(fp32, base.int8, base.rows, base.overhead_ms)
    outside = next(part for part in holdback(comparison) if part.what == "outside kernels")
    assert outside.ms == pytest.approx(1.5) and outside.above_ceiling == pytest.approx(1.5 / 7.5)


def test_holdback_of_a_real_pair_accounts_for_the_whole_int8_run(builds: tuple[Path, Path]):
    comparison = profile_pair(*builds, feeds(9), runs=3)
    parts = holdback(comparison)
    assert "float Conv" in {part.what for part in parts}  # the input-layer conv stays float
    assert sum(p.ms for p in parts) + comparison.integer_int8_ms == pytest.approx(comparison.int8.total_ms)
    assert "What holds it" in format_profile(comparison)


def test_a_preempted_run_does_not_move_the_profile(tmp_path: Path):
    """Per-node and whole-run times are medians over the profiled runs: one run slowed 100x by the machine (a shared
    box preempting the process) leaves them where the other runs put them."""
    import json

    from quant.eval.profile import _read_trace

    def events(conv_us: float, run_us: float) -> list[dict[str, object]]:
        return [{"cat": "Node", "name": "conv_kernel_time", "dur": conv_us, "args": {"op_name": "Conv"}},
                {"cat": "Session", "name": "model_run", "dur": run_us}]

    trace = tmp_path / "trace.json"
    runs = [(5000.0, 6000.0), (100.0, 120.0), (110.0, 130.0), (10000.0, 11000.0), (105.0, 125.0)]  # warm-up first
    trace.write_text(json.dumps([event for run in runs for event in events(*run)]))
    profile = _read_trace(trace, runs=4)
    assert profile.nodes[0].ms == pytest.approx(0.1075) and profile.total_ms == pytest.approx(0.1275)
