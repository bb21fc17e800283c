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

from quant.eval.profile import compare_profiles, format_profile, profile_graph, profile_pair, source_node
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
        assert all(node.ms >= 0 for node in profile.nodes)
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
    assert source_node(name, op_type, {"/enc/Conv", "/enc/Relu", "/rnn/LSTM"}, producers) == owner


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


def test_a_run_preempted_mid_kernel_does_not_move_the_node_time(tmp_path: Path):
    """A busy machine's spike in one run (50 ms against 1 ms) leaves the node's time and the whole run's at their
    typical values: the per-run median, not the mean; the first (warm-up) run is left out."""
    from quant.eval.profile import _read_trace

    def event(cat: str, name: str, ms: float) -> dict[str, object]:
        return {"cat": cat, "name": name, "dur": ms * 1000.0, "args": {"op_name": "MatMul"}}

    runs = [(9.0, 12.0), (1.0, 2.0), (1.0, 2.0), (50.0, 51.0), (1.2, 2.2)]  # (kernel, whole run) per run
    events = [e for kernel, whole in runs for e in (event("Node", "mm_kernel_time", kernel),
                                                    event("Session", "model_run", whole))]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events))
    profile = _read_trace(trace, runs=4)
    assert [(n.name, n.op_type) for n in profile.nodes] == [("mm", "MatMul")]
    assert profile.nodes[0].ms == pytest.approx(1.1)
    assert profile.total_ms == pytest.approx(2.1)
