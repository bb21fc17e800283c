"""Every graph rewrite of quant.rewrite against the original graph in ONNX Runtime on tiny graphs: max abs error
below 1e-5 of the output range across strides, pads, dilations, output padding, bias and 1-D/2-D kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.errors import BuildError
from quant.rewrite import apply_rewrites, check_rewrite, convtranspose_to_conv, gru_step_to_matmul, split_concat_conv

OPSET = 13


def _any_shape(name: str, rank: int = 4) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_{i}" for i in range(rank)])


def _model(nodes, inputs, output, inits, rank: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [_any_shape(output, rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def deconv_model(c_in: int, c_out: int, kernel: tuple[int, ...], bias: bool, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(len(kernel) + sum(kernel))
    weight = rng.standard_normal((c_in, c_out, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        inputs.append("b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in] + [f"l{i}" for i in range(len(kernel))])
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="deconv", **attrs)
    return _model([node], [x], "y", inits, rank=2 + len(kernel))


def feeds(model: onnx.ModelProto, shape: tuple[int, ...], count: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


DECONV_CASES = [
    # DPCRN's decoder: time stride 1, frequency stride 1 or 2, time kernel 2
    dict(kernel=(2, 3), strides=[1, 1]),
    dict(kernel=(2, 3), strides=[1, 2]),
    dict(kernel=(2, 5), strides=[1, 2]),
    dict(kernel=(2, 3), strides=[1, 2], pads=[0, 1, 0, 1]),
    dict(kernel=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    dict(kernel=(3, 4), strides=[1, 3], dilations=[2, 1]),
    dict(kernel=(3, 3), strides=[1, 2], dilations=[1, 2], pads=[2, 0, 1, 3]),
    dict(kernel=(2, 2), strides=[1, 1], pads=[2, 0, 1, 1]),  # pads beyond the span: a crop after the Conv
    dict(kernel=(4,), strides=[4]),
    dict(kernel=(5,), strides=[2], dilations=[3], pads=[1, 2], output_padding=[1]),
    dict(kernel=(3,), strides=[3], pads=[0, 0], output_padding=[2]),
    dict(kernel=(3,), strides=[1], output_padding=[0]),
]


@pytest.mark.parametrize("case", DECONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [True, False])
def test_convtranspose_to_conv_matches_the_original(case: dict, bias: bool):
    case = dict(case)
    kernel = case.pop("kernel")
    model = deconv_model(3, 4, kernel, bias, **case)
    result = convtranspose_to_conv(model)
    assert result.rewritten == ("deconv",)
    ops = [n.op_type for n in result.model.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 1
    onnx.checker.check_model(result.model)
    shape = (2, 3, 7, 6)[: 2 + len(kernel)]
    check = check_rewrite(model, result.model, feeds(model, shape))
    assert check.relative_error < 1e-5 and check.output_range > 0


def test_convtranspose_to_conv_runs_on_other_lengths_than_checked():
    """The phase interleave takes its lengths from the tensor: one rewritten graph serves every time length."""
    model = deconv_model(2, 2, (2, 3), True, strides=[1, 2])
    rewritten = convtranspose_to_conv(model).model
    for frames in (1, 5, 64):
        check_rewrite(model, rewritten, feeds(model, (1, 2, frames, 9), count=1))


def _moves_one_axis(perm: list[int]) -> bool:
    """ONNX Runtime's fast Transpose path: taking one axis out of `perm` leaves the others in order."""
    return any(sorted(rest := perm[:i] + perm[i + 1:]) == rest for i in range(len(perm)))


@pytest.mark.parametrize("strides", [[1, 2], [2, 1], [1, 3]])
def test_convtranspose_to_conv_interleaves_one_strided_axis_by_moving_one_axis(strides: list[int]):
    """A size-1 phase axis for the stride-1 axis made ORT's Transpose take its element-wise path (10x slower on
    the DPCRN decoder); with one strided axis the interleave must be a single-axis move of a rank-5 tensor."""
    model = deconv_model(3, 4, (2, 3), True, strides=strides)
    rewritten = convtranspose_to_conv(model).model
    (move,) = [n for n in rewritten.graph.node if n.op_type == "Transpose"]
    perm = list(helper.get_attribute_value(move.attribute[0]))
    assert len(perm) == 5 and _moves_one_axis(perm)
    check = check_rewrite(model, rewritten, feeds(model, (2, 3, 7, 6)))
    assert check.relative_error < 1e-5


def test_grouped_convtranspose_is_left_alone():
    weight = numpy_helper.from_array(np.ones((4, 1, 2, 2), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    model = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="d", group=4)], [x], "y", [weight])
    result = convtranspose_to_conv(model)
    assert result.rewritten == () and result.model.graph.node[0].op_type == "ConvTranspose"


def concat_conv_model(op: str, axis: int = 1, extra_reader: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 7, 2, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3, "t", 8]),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 4, "t", 8])]
    nodes = [helper.make_node("Relu", ["a"], ["a1"], name="relu"),
             helper.make_node("Concat", ["a1", "s"], ["cat"], name="cat", axis=axis)]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["cat", "w", "b"], ["y0"], name="conv", pads=[1, 1, 0, 1],
                                      strides=[1, 2]))
    else:
        w = np.transpose(numpy_helper.to_array(inits[0]), (1, 0, 2, 3)).copy()
        inits[0] = numpy_helper.from_array(w, "w")
        nodes.append(helper.make_node("ConvTranspose", ["cat", "w", "b"], ["y0"], name="conv", strides=[1, 2]))
    nodes.append(helper.make_node("Add", ["y0", "y0"] if not extra_reader else ["y0", "y0"], ["y"], name="out"))
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["cat"], ["cat_copy"], name="copy"))
    model = _model(nodes, inputs, "y", inits)
    if extra_reader:
        model.graph.output.append(_any_shape("cat_copy"))
    return model


def concat_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"a": rng.standard_normal((2, 3, 6, 8)).astype(np.float32),
             "s": 50 * rng.standard_normal((2, 4, 6, 8)).astype(np.float32)} for _ in range(2)]


def test_split_concat_conv_matches_the_original():
    model = concat_conv_model("Conv")
    result = split_concat_conv(model)
    assert result.rewritten == ("conv",)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Concat" not in ops and ops.count("Conv") == 2
    assert check_rewrite(model, result.model, concat_feeds()).relative_error < 1e-5


@pytest.mark.parametrize("axis, dropped", [(2, True), (1, False)])
def test_split_concat_conv_drops_a_concat_read_only_for_its_length(axis: int, dropped: bool):
    """DPCRN reads the frame count of the concatenated tensor (Shape -> Gather 2): the first part has the same
    length, so the Concat can go; a Gather of the channel axis keeps it."""
    model = concat_conv_model("Conv")
    model.graph.initializer.append(numpy_helper.from_array(np.array(axis, np.int64), "axis_index"))
    model.graph.node.extend([helper.make_node("Shape", ["cat"], ["cat_shape"], name="shape"),
                             helper.make_node("Gather", ["cat_shape", "axis_index"], ["length"], name="length")])
    model.graph.output.append(helper.make_tensor_value_info("length", TensorProto.INT64, []))
    result = split_concat_conv(model)
    assert result.rewritten == ("conv",)
    assert ("Concat" not in [n.op_type for n in result.model.graph.node]) == dropped
    assert check_rewrite(model, result.model, concat_feeds()).relative_error < 1e-5


def test_deconv_then_split_turns_a_skip_deconv_into_two_plain_convs():
    model = concat_conv_model("ConvTranspose")
    result, check = apply_rewrites(model, ["deconv-to-conv", "split-concat-conv"], concat_feeds())
    ops = [n.op_type for n in result.model.graph.node]
    assert "ConvTranspose" not in ops and "Concat" not in [n.op_type for n in result.model.graph.node
                                                           if n.name == "cat"] and ops.count("Conv") == 2
    assert check.relative_error < 1e-5


def test_split_concat_conv_leaves_other_concats_alone():
    assert split_concat_conv(concat_conv_model("Conv", axis=2)).rewritten == ()


def test_split_concat_conv_keeps_a_concat_other_nodes_read():
    model = concat_conv_model("Conv", extra_reader=True)
    result = split_concat_conv(model)
    assert result.rewritten == ("conv",) and [n.op_type for n in result.model.graph.node].count("Concat") == 1
    assert check_rewrite(model, result.model, concat_feeds()).relative_error < 1e-5


def test_check_rewrite_refuses_a_changed_graph():
    model = deconv_model(2, 2, (2, 3), True, strides=[1, 2])
    broken = convtranspose_to_conv(model).model
    for init in broken.graph.initializer:
        if init.name.endswith("/weight"):
            value = numpy_helper.to_array(init).copy()
            value.flat[0] += 0.01
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    with pytest.raises(BuildError, match="changed the outputs"):
        check_rewrite(model, broken, feeds(model, (1, 2, 5, 6)))


def test_unknown_rewrite_is_a_build_error(tmp_path: Path):
    with pytest.raises(BuildError, match="unknown graph rewrite"):
        apply_rewrites(deconv_model(2, 2, (2,), False), ["nope"], [])


def test_split_concat_conv_traces_channels_behind_a_computed_crop():
    """A causal crop (Slice with ends computed from Shape) hides the channel count from ONNX shape inference; the
    trace back to the producing conv's weight finds it, as in DPCRN's decoder."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((5, 7, 1, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([2], np.int64), "axes"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([0.1], np.float32), "slope")]
    nodes = [helper.make_node("Conv", ["a", "w0"], ["a0"], name="pre"),
             helper.make_node("Shape", ["a"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "two"], ["frames"], name="frames", axis=0),
             helper.make_node("Slice", ["a0", "zero", "frames", "axes"], ["crop"], name="crop"),
             helper.make_node("PRelu", ["crop", "slope"], ["act"], name="act"),
             helper.make_node("Concat", ["act", "s"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w"], ["y"], name="conv", pads=[0, 1, 0, 1])]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2, "t", 8]),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 4, "t", 8])]
    model = _model(nodes, inputs, "y", inits)
    result = split_concat_conv(model)
    assert result.rewritten == ("conv",)
    rng2 = np.random.default_rng(1)
    feed = {"a": rng2.standard_normal((1, 2, 5, 8)).astype(np.float32),
            "s": rng2.standard_normal((1, 4, 5, 8)).astype(np.float32)}
    assert check_rewrite(model, result.model, [feed]).relative_error < 1e-5


@pytest.mark.parametrize("slope, rewritten", [(np.array([0.25], np.float32), True),
                                              (np.full((4, 1, 1), 0.1, np.float32), True),
                                              (np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(4, 1, 1), False)])
def test_prelu_to_leakyrelu_only_for_a_single_slope(slope: np.ndarray, rewritten: bool):
    from quant.rewrite import prelu_to_leakyrelu

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 6])
    model = _model([helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")], [x], "y",
                   [numpy_helper.from_array(slope, "slope")])
    result = prelu_to_leakyrelu(model)
    assert result.rewritten == (("act",) if rewritten else ())
    assert result.model.graph.node[0].op_type == ("LeakyRelu" if rewritten else "PRelu")
    assert check_rewrite(model, result.model, feeds(model, (2, 4, 5, 6))).relative_error < 1e-6


# ------------------------------------------------------------------------------------- rewrite_file: the build's graph


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_rewrite_file_writes_a_checked_recorded_copy_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from quant import rewrite

    model = deconv_model(2, 3, (2, 3), True, strides=[1, 2])
    source = _saved(model, tmp_path / "m.onnx")
    calls = []

    def check_feeds():
        calls.append(1)
        return feeds(model, (1, 2, 5, 6), count=3)

    made = rewrite.rewrite_file(source, ["deconv-to-conv"], check_feeds, tmp_path / "out")
    assert made.path == tmp_path / "out" / "m.deconv-to-conv.onnx" and made.nodes == {"deconv-to-conv": 1}
    assert made.check is not None and made.check.feeds == rewrite.CHECK_FEEDS and calls == [1]
    recorded = rewrite.rewrite_meta(made.path)
    assert recorded is not None and recorded["rewrites"] == ["deconv-to-conv"] and recorded["source"] == str(source)
    # reused without a check (the feeds are not even made) while the record matches
    monkeypatch.setattr(rewrite, "measure_rewrite", lambda *a: pytest.fail("checked again"))
    again = rewrite.rewrite_file(source, ["deconv-to-conv"], check_feeds, tmp_path / "out")
    assert again == made and calls == [1]
    # a changed file beside its record is not described by it
    made.path.write_bytes(made.path.read_bytes() + b"\0")
    assert rewrite.rewrite_meta(made.path) is None


def test_rewrite_file_leaves_a_graph_with_nothing_to_rewrite_alone(tmp_path: Path):
    from quant.rewrite import rewrite_file

    model = concat_conv_model("Conv")  # no ConvTranspose, no PRelu
    source = _saved(model, tmp_path / "m.onnx")
    done = rewrite_file(source, ["deconv-to-conv", "prelu-to-leakyrelu"], lambda: pytest.fail("no check needed"),
                        tmp_path / "out")
    assert done.path == source and not done.rewritten and not (tmp_path / "out").exists()
    assert rewrite_file(source, [], lambda: [], tmp_path / "out").path == source


def test_rewrite_file_names_the_rewrite_that_changed_the_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from quant import rewrite

    def broken(model: onnx.ModelProto) -> rewrite.RewriteResult:
        result = convtranspose_to_conv(model)
        for init in result.model.graph.initializer:
            if init.name.endswith("/weight"):
                value = numpy_helper.to_array(init).copy()
                value.flat[0] += 0.01
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        return result

    monkeypatch.setitem(rewrite.REWRITES, "deconv-to-conv", broken)
    model = deconv_model(2, 2, (2, 3), True, strides=[1, 2])
    source = _saved(model, tmp_path / "m.onnx")
    with pytest.raises(BuildError, match=r"m\.onnx: graph rewrite 'deconv-to-conv' changed the outputs"):
        rewrite.rewrite_file(source, ["deconv-to-conv", "prelu-to-leakyrelu"],
                             lambda: feeds(model, (1, 2, 5, 6)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a graph that failed its check


# ------------------------------------------------------------------------------------------- gru-step-to-matmul


def gru_model(batch: int | str = 3, steps: int | str = 1, bias: bool = True, initial_h: bool = True,
              opset: int = OPSET, outputs: tuple[str, str] = ("y", "y_h"), **attrs) -> onnx.ModelProto:
    """One GRU (input 5, hidden 4) on x (steps, batch, 5), weights random and large enough that every gate works."""
    hidden, size = 4, 5
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, size)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32), "r")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal((1, 6 * hidden)).astype(np.float32), "b"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, size])]
    if initial_h:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, batch, hidden]))
    node = helper.make_node("GRU", ["x", "w", "r", "b" if bias else "", "", "h0" if initial_h else ""],
                            list(outputs), name="gru", hidden_size=hidden, **attrs)
    declared = [_any_shape(name, rank) for name, rank in zip(outputs, (4, 3)) if name]
    graph = helper.make_graph([node], "g", inputs, declared, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def gru_feeds(model: onnx.ModelProto, batch: int = 3, count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    names = {i.name for i in model.graph.input}
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in
             (("x", (1, batch, 5)), ("h0", (1, batch, 4))) if name in names} for _ in range(count)]


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("initial_h", [True, False])
def test_gru_step_to_matmul_matches_onnx_runtimes_gru(linear_before_reset: int, bias: bool, initial_h: bool):
    model = gru_model(bias=bias, initial_h=initial_h, linear_before_reset=linear_before_reset)
    result = gru_step_to_matmul(model)
    assert result.rewritten == ("gru",)
    ops = [n.op_type for n in result.model.graph.node]
    # x W^T; with a state also h R^T, which without linear_before_reset is two: h R_zr^T and (r h) R_h^T
    assert "GRU" not in ops and ops.count("MatMul") == (3 - linear_before_reset if initial_h else 1)
    onnx.checker.check_model(result.model)
    check = check_rewrite(model, result.model, gru_feeds(model))
    assert check.relative_error < 1e-5 and check.output_range > 0


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("outputs", [("y", "y_h"), ("", "y_h"), ("y",)])
def test_gru_step_to_matmul_writes_the_outputs_the_gru_had(opset: int, outputs: tuple[str, ...]):
    model = gru_model(batch="n", opset=opset, outputs=outputs, linear_before_reset=1)
    result = gru_step_to_matmul(model)
    assert result.rewritten == ("gru",)
    produced = {t for n in result.model.graph.node for t in n.output}
    assert {name for name in outputs if name} <= produced
    for batch in (1, 4):  # a dynamic batch: the step runs at any batch size
        check = check_rewrite(model, result.model, gru_feeds(model, batch=batch))
        assert check.relative_error < 1e-5


def test_gru_step_to_matmul_runs_a_reverse_gru_as_the_same_single_step():
    model = gru_model(direction="reverse", linear_before_reset=0)
    result = gru_step_to_matmul(model)
    assert result.rewritten == ("gru",)
    assert check_rewrite(model, result.model, gru_feeds(model)).relative_error < 1e-5


def test_gru_step_to_matmul_leaves_weight_matmuls_the_precision_rules_quantize():
    from quant.precision import plan

    model = gru_model(linear_before_reset=0)
    model.graph.node[0].input[0] = "features"  # behind a Relu: not the input layer (a rule keeps that float)
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["features"], name="relu"))
    result = gru_step_to_matmul(model)
    decisions = {d.node: d for d in plan(result.model, states={"h0": "y_h"}).decisions}
    matmuls = [n.name for n in result.model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 3  # x W^T, h R_zr^T, (r h) R_h^T
    assert {decisions[m].rule for m in matmuls} == {"linear-dynamic-ort"}
    assert {decisions[m].precision for m in matmuls} == {"int8-dynamic"}


@pytest.mark.parametrize("change, reason", [
    (dict(steps=2), "sequence length 2, not a static 1"),
    (dict(steps="t"), "sequence length unknown, not a static 1"),
    (dict(direction="bidirectional"), "direction is bidirectional"),
    (dict(activations=["Relu", "Tanh"]), "activations ['Relu', 'Tanh'] are not the default"),
    (dict(clip=3.0), "clip is set"),
    (dict(opset=14, layout=1), "layout is 1 (batch first)"),
])
def test_gru_step_to_matmul_refuses_what_it_cannot_write_exactly(change: dict, reason: str,
                                                                 caplog: pytest.LogCaptureFixture):
    model = gru_model(**change)
    with caplog.at_level("INFO", logger="quant.rewrite"):
        result = gru_step_to_matmul(model)
    assert result.rewritten == ()
    assert [n.op_type for n in result.model.graph.node] == ["GRU"]
    assert f"gru-step-to-matmul leaves gru alone: " in caplog.text and reason in caplog.text


def test_gru_step_to_matmul_refuses_sequence_lens_and_computed_weights(caplog: pytest.LogCaptureFixture):
    model = gru_model()
    model.graph.node[0].input[4] = "lens"
    model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [3]))
    weights = gru_model()
    weights.graph.initializer.pop(0)  # W becomes a graph input
    weights.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 12, 5]))
    with caplog.at_level("INFO", logger="quant.rewrite"):
        assert gru_step_to_matmul(model).rewritten == () and gru_step_to_matmul(weights).rewritten == ()
    assert "sequence_lens is given" in caplog.text and "W, R or B is not a constant" in caplog.text


def test_gru_step_to_matmul_follows_a_computed_reshape_to_the_sequence_length():
    """A torch export reshapes with a shape computed from Shape: ONNX's inference loses the length there, ONNX
    Runtime's symbolic inference follows it."""
    base = gru_model(batch=3)
    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, [3, 5])
    nodes = [helper.make_node("Shape", ["frames"], ["shape"], name="shape"),
             helper.make_node("Concat", ["one", "shape"], ["x_shape"], name="x_shape", axis=0),
             helper.make_node("Reshape", ["frames", "x_shape"], ["x"], name="reshape"),
             *base.graph.node]
    inits = [*base.graph.initializer, numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "g", [x, base.graph.input[1]], list(base.graph.output), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=7)
    result = gru_step_to_matmul(model)
    assert result.rewritten == ("gru",)
    rng = np.random.default_rng(2)
    feeds = [{"frames": rng.standard_normal((3, 5)).astype(np.float32),
              "h0": rng.standard_normal((1, 3, 4)).astype(np.float32)}]
    assert check_rewrite(model, result.model, feeds).relative_error < 1e-5

