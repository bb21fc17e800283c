"""ONNX Runtime backend: sessions, name-bound runner with clear errors, conversion helpers, on tiny graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.backends import ort as ort_backend
from quant.backends.ort import OrtRunner, make_session
from quant.errors import ModelError

RNG = np.random.default_rng(0)


def weights(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def save(nodes, inputs, outputs, inits, path: Path, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def two_input_model(path: Path) -> Path:
    """y = a @ w + b (b broadcast); a is float (B, 4), b is int64 (3,) cast to float."""
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Cast", ["b"], ["bf"], to=1),
             helper.make_node("Add", ["m", "bf"], ["y"])]
    return save(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 4]),
                        helper.make_tensor_value_info("b", TensorProto.INT64, [3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])], [weights("w", 4, 3)], path)


def conv_model(path: Path) -> Path:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
                [weights("w1", 4, 2, 3, 3), weights("b1", 4), weights("w2", 3, 4, 3, 3), weights("b2", 3)], path)


def test_make_session_errors(tmp_path: Path):
    with pytest.raises(ModelError, match="no such ONNX model"):
        make_session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="junk.onnx"):
        make_session(junk)


def test_session_options(tmp_path: Path):
    session = make_session(two_input_model(tmp_path / "m.onnx"), threads=1, optimization="basic")
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.execution_mode.name == "ORT_SEQUENTIAL"
    assert options.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    quiet = make_session(two_input_model(tmp_path / "m.onnx"), threads=2, spinning=False).get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_runner_binds_by_name(tmp_path: Path):
    runner = OrtRunner(two_input_model(tmp_path / "m.onnx"))
    assert runner.input_names == ("a", "b") and runner.output_names == ("y",)
    assert runner.input_specs[1].dtype == np.int64 and runner.input_specs[0].shape == ("B", 4)
    a = RNG.standard_normal((2, 4)).astype(np.float32)
    b = np.array([1, 2, 3], dtype=np.int64)
    first = runner.run({"a": a, "b": b})["y"]
    second = runner.run({"b": b, "a": a})["y"]  # order of the dict does not matter
    np.testing.assert_array_equal(first, second)
    w = numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0])
    np.testing.assert_allclose(first, a @ w + b, rtol=1e-5)


def test_runner_errors_name_the_tensor(tmp_path: Path):
    runner = OrtRunner(two_input_model(tmp_path / "m.onnx"))
    a = np.zeros((2, 4), np.float32)
    b = np.zeros(3, np.int64)
    with pytest.raises(ModelError, match=r"missing \['b'\]"):
        runner.run({"a": a})
    with pytest.raises(ModelError, match=r"unexpected \['c'\]"):
        runner.run({"a": a, "b": b, "c": b})
    with pytest.raises(ModelError, match="'b' must be int64, got int32"):
        runner.run({"a": a, "b": b.astype(np.int32)})
    with pytest.raises(ModelError, match="'a' must have rank 2"):
        runner.run({"a": a[None], "b": b})
    with pytest.raises(ModelError, match="'a' axis 1 must be 4"):
        runner.run({"a": np.zeros((2, 5), np.float32), "b": b})


def stateful_model(path: Path) -> Path:
    """A streaming step whose outputs depend on its carried states: h_out = tanh(x @ W + h @ R), y = 2 h_out + n,
    n_out = n + 1 (an int64 frame counter: a state of another dtype)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("MatMul", ["h", "R"], ["hr"]),
             helper.make_node("Add", ["xw", "hr"], ["z"]), helper.make_node("Tanh", ["z"], ["h_out"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["h_out", "h_out"], ["h2"]), helper.make_node("Add", ["h2", "nf"], ["y"]),
             helper.make_node("Add", ["n", "one"], ["n_out"])]
    return save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3]),
                        helper.make_tensor_value_info("n", TensorProto.INT64, [1, 1])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
                 helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 3]),
                 helper.make_tensor_value_info("n_out", TensorProto.INT64, [1, 1])],
                [weights("W", 4, 3), weights("R", 3, 3), numpy_helper.from_array(np.ones((1, 1), np.int64), "one")],
                path)


STATES = {"h": np.zeros((1, 3), np.float32), "n": np.zeros((1, 1), np.int64)}
CARRY = {"h": "h_out", "n": "n_out"}


def test_bound_run_carries_states_like_the_runner_loop(tmp_path: Path):
    """Frame by frame, the bound loop (states ping-ponging inside ORT) gives exactly the outputs of a loop that feeds
    each output state back through runner.run."""
    runner = OrtRunner(stateful_model(tmp_path / "s.onnx"))
    frames = [RNG.standard_normal((1, 4)).astype(np.float32) for _ in range(5)]
    bound = runner.bind({"x": frames[0], **STATES}, CARRY)
    states = dict(STATES)
    for step in range(7):
        frame = frames[step % len(frames)]
        expected = runner.run({"x": frame, **states})
        states = {name: expected[output] for name, output in CARRY.items()}
        bound.set_input("x", frame)
        bound.run()
        got = bound.outputs()
        assert set(got) == {"y", "h_out", "n_out"}
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)
    assert int(got["n_out"][0, 0]) == 7  # the counter went round the loop: the states were carried, not reset
    zero_state = runner.run({"x": frames[1], **STATES})["y"]
    assert not np.array_equal(zero_state, runner.run({"x": frames[1], **states})["y"])  # y depends on the state


def test_bound_run_of_a_stateless_graph_equals_run(tmp_path: Path):
    runner = OrtRunner(two_input_model(tmp_path / "m.onnx"))
    feeds = {"a": RNG.standard_normal((2, 4)).astype(np.float32), "b": np.array([1, 2, 3], np.int64)}
    expected = runner.run(feeds)["y"]
    bound = runner.bind(feeds)
    feeds["a"][:] = 0.0  # bind copied the feeds: what the caller does to its arrays afterwards does not leak in
    for _ in range(2):
        bound.run()
        np.testing.assert_array_equal(bound.outputs()["y"], expected)


def test_bind_checks_once_and_names_the_tensor(tmp_path: Path):
    runner = OrtRunner(stateful_model(tmp_path / "s.onnx"))
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(ModelError, match="'n' must be int64, got int32"):  # the runner's own check, at bind time
        runner.bind({"x": x, "h": STATES["h"], "n": STATES["n"].astype(np.int32)}, CARRY)
    with pytest.raises(ModelError, match=r"carried state 'h' -> 'h_new'"):
        runner.bind({"x": x, **STATES}, {"h": "h_new"})
    with pytest.raises(ModelError, match="output 'y' is float32 \\[1, 3\\], but feeds input 'n'"):
        runner.bind({"x": x, **STATES}, {"n": "y"})
    with pytest.raises(ModelError, match="output 'h_out' feeds both 'h' and 'x'"):
        runner.bind({"x": x, **STATES}, {"h": "h_out", "x": "h_out"})
    bound = runner.bind({"x": x, **STATES}, CARRY)
    with pytest.raises(ModelError, match=r"'x' is bound as float32 \[1, 4\], got float32 \[2, 4\]"):
        bound.set_input("x", np.zeros((2, 4), np.float32))
    with pytest.raises(ModelError, match="'h' is a carried state"):
        bound.set_input("h", STATES["h"])
    with pytest.raises(ModelError, match="no input 'z'"):
        bound.set_input("z", x)


def test_quantize_qdq_fuses_integer_kernels(tmp_path: Path):
    path = conv_model(tmp_path / "conv.onnx")
    x = RNG.standard_normal((1, 2, 8, 8)).astype(np.float32)
    reference = OrtRunner(path).run({"x": x})
    augmented_ranges = _minmax(path, x)
    quantized = ort_backend.quantize_qdq(onnx.load(str(path)), augmented_ranges, ["conv1", "conv2"], ["Conv"],
                                         activation_uint8=True)
    out = tmp_path / "q.onnx"
    onnx.save(quantized, str(out))
    kernels = ort_backend.integer_kernel_counts(ort_backend.optimized_graph(out, tmp_path))
    assert kernels == {"QLinearConv": 2}
    got = OrtRunner(out).run({"x": x})["y"]
    want = reference["y"]
    snr_db = 10 * np.log10((want ** 2).sum() / ((want - got) ** 2).sum())
    assert snr_db > 18  # a wrong scale or zero point gives < 5 dB
    assert not list(tmp_path.glob("*.ort_optimized*"))  # optimized_graph cleans up after itself


def _minmax(path: Path, x: np.ndarray) -> dict[str, tuple[float, float]]:
    model = onnx.load(str(path))
    names = ["x"] + [o for n in model.graph.node for o in n.output]
    del model.graph.output[:]
    model.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in names])
    values = _run_bytes(model, names, x)
    return {n: (float(v.min()), float(v.max())) for n, v in zip(names, values)}


def _run_bytes(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(names, {"x": x}))


def test_quantize_dynamic_lstm(tmp_path: Path):
    hidden = 8
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hidden)]
    path = save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 16])],
                [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, 1, 1, hidden])],
                [weights("W", 1, 4 * hidden, 16), weights("R", 1, 4 * hidden, hidden), weights("B", 1, 8 * hidden)],
                tmp_path / "lstm.onnx")
    out = tmp_path / "dyn.onnx"
    ort_backend.quantize_dynamic_nodes(path, out, ["lstm"], ["LSTM"])
    assert ort_backend.op_counts(onnx.load(str(out))) == {"DynamicQuantizeLSTM": 1}
    x = RNG.standard_normal((5, 1, 16)).astype(np.float32)
    want, got = OrtRunner(path).run({"x": x})["Y"], OrtRunner(out).run({"x": x})["Y"]
    assert 10 * np.log10((want ** 2).sum() / ((want - got) ** 2).sum()) > 30


def test_convert_fp16_keeps_io_and_blocks(tmp_path: Path):
    path = conv_model(tmp_path / "conv.onnx")
    converted = ort_backend.convert_fp16(onnx.load(str(path)), [], ["conv2"])
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    by_name = {i.name: i.data_type for i in converted.graph.initializer}
    assert by_name["w1"] == TensorProto.FLOAT16 and by_name["w2"] == TensorProto.FLOAT
    out = tmp_path / "fp16.onnx"
    onnx.save(converted, str(out))
    x = RNG.standard_normal((1, 2, 8, 8)).astype(np.float32)
    want, got = OrtRunner(path).run({"x": x})["y"], OrtRunner(out).run({"x": x})["y"]
    np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max())
    producer = next(n for n in converted.graph.node if "y" in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT  # no float16 round trip


def test_float16_transpose_matmul_loads(tmp_path: Path):
    """ORT 1.31 crashed (SIGSEGV) optimizing this graph; make_session must turn the fusion off for FP16 models."""
    import subprocess
    import sys

    path = save([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
                 helper.make_node("MatMul", ["t", "w"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 3, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, 4, 8])],
                [numpy_helper.from_array(np.eye(8, dtype=np.float16), "w")], tmp_path / "t16.onnx")
    code = ("import numpy as np; from quant.backends.ort import OrtRunner; "
            f"r = OrtRunner({str(path)!r}); x = np.arange(96, dtype=np.float16).reshape(4, 3, 8); "
            "assert (r.run({'x': x})['y'] == x.transpose(1, 0, 2)).all()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-500:]


def test_convert_fp16_retypes_exported_casts(tmp_path: Path):
    """Cast(int mask -> float) feeding float16 math: the converter retypes the value but not the Cast's `to`."""
    nodes = [helper.make_node("Cast", ["mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mask_f"], ["masked"], name="apply"),
             helper.make_node("MatMul", ["masked", "w"], ["y"], name="mm")]
    path = save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                        helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [weights("w", 4, 3)],
                tmp_path / "mask.onnx")
    converted = ort_backend.convert_fp16(onnx.shape_inference.infer_shapes(onnx.load(str(path))), [], [])
    cast = next(n for n in converted.graph.node if n.name == "mask_cast")
    assert cast.attribute[0].i == TensorProto.FLOAT16
    out = tmp_path / "fp16.onnx"
    onnx.save(converted, str(out))
    feed = {"x": RNG.standard_normal((2, 4)).astype(np.float32), "mask": np.array([[1, 1, 0, 0]] * 2, np.int64)}
    np.testing.assert_allclose(OrtRunner(out).run(feed)["y"], OrtRunner(path).run(feed)["y"], atol=2e-2)


def test_untyped_inputs_get_symbolic_types():
    """A graph whose intermediate value_info is absent: ONNX inference types it, so nothing is untyped; stripping
    the types shows the detector works and the symbolic pass restores them."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], [weights("w", 4, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert ort_backend._untyped_inputs(model, ["mm2"]) == ["h"]
    assert ort_backend._untyped_inputs(ort_backend._symbolic_types(model), ["mm2"]) == []
