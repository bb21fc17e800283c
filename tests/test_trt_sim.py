"""trt-sim (quant/backends/ort.py trt_sim_runner): ONNX Runtime's fake quantization of symmetric int8 Q/DQ must equal
the integer arithmetic TensorRT runs (int8 x int8 -> int32 accumulate -> rescale by s_x * s_w), on tiny graphs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.backends import open_runner
from quant.backends.ort import INTEGER_KERNELS, TRT_SIM_OPTIMIZATION, make_session, op_counts
from quant.errors import ModelError

RNG = np.random.default_rng(16)
INT8_MIN, INT8_MAX = -128, 127


def quantize(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """ONNX QuantizeLinear with zero point 0: x / scale in float32, round half to even, saturate to int8."""
    ratio = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(np.rint(ratio), INT8_MIN, INT8_MAX).astype(np.int64)


def conv_acc(x_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """Integer NCHW convolution, stride 1, pad 1: int8 products summed exactly (int64, checked to fit int32)."""
    padded = np.pad(x_q, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, w_q.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, w_q)


@dataclass(frozen=True)
class Case:
    """One int8 layer: the ONNX op reading DQ(Q(x)) and DQ(Q(w)), and the integer accumulation TensorRT runs."""

    op: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    w_axis: int  # the weight's output-channel axis (per-channel scales)
    out_axis: int  # the output's channel axis
    bias: bool
    accumulate: Callable[[np.ndarray, np.ndarray], np.ndarray]
    attributes: tuple[tuple[str, object], ...] = ()


CASES = {
    "conv": Case("Conv", (2, 3, 6, 6), (4, 3, 3, 3), 0, 1, True, conv_acc, (("pads", [1, 1, 1, 1]),)),
    "gemm": Case("Gemm", (5, 16), (6, 16), 0, 1, True, lambda x, w: x @ w.T, (("transB", 1),)),
    "matmul": Case("MatMul", (2, 5, 16), (16, 6), 1, 2, False, lambda x, w: x @ w),
}


@dataclass(frozen=True)
class Layer:
    path: Path
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    s_x: np.float32
    s_w: np.ndarray
    s_y: np.float32


def qdq_nodes(tensor: str, scale: str, zero: str, axis: int | None = None) -> list[onnx.NodeProto]:
    kw = {} if axis is None else {"axis": axis}
    return [helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_q"], name=f"{tensor}_Q", **kw),
            helper.make_node("DequantizeLinear", [f"{tensor}_q", scale, zero], [f"{tensor}_dq"], name=f"{tensor}_DQ",
                             **kw)]


def layer_model(case: Case, path: Path, expose_acc: bool = True) -> Layer:
    """x -> Q/DQ -> op(., Q/DQ(w) per channel [, float bias]) -> acc -> Q/DQ -> y, int8 symmetric as quant writes it;
    the activation threshold clips the largest inputs (saturation is part of what TensorRT computes). expose_acc
    makes acc a graph output too (which stops ORT's own fusion: the op's output has a second reader)."""
    x = RNG.standard_normal(case.x_shape).astype(np.float32)
    w = (RNG.standard_normal(case.w_shape) * 0.3).astype(np.float32)
    channels = case.w_shape[case.w_axis]
    b = (RNG.standard_normal(channels) * 0.2).astype(np.float32)
    s_x = np.float32(0.8 * np.abs(x).max() / INT8_MAX)
    reduce = tuple(a for a in range(w.ndim) if a != case.w_axis)
    s_w = (np.abs(w).max(axis=reduce) / INT8_MAX).astype(np.float32)
    s_y = np.float32(0.05)
    zero, zeros = numpy_helper.from_array(np.int8(0), "zero"), numpy_helper.from_array(np.zeros(channels, np.int8), "zeros")
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(s_x), "s_x"),
             numpy_helper.from_array(s_w, "s_w"), numpy_helper.from_array(np.array(s_y), "s_y"), zero, zeros]
    inputs = ["x_dq", "w_dq"]
    if case.bias:
        inits.append(numpy_helper.from_array(b, "b"))
        inputs.append("b")
    nodes = [*qdq_nodes("x", "s_x", "zero"), *qdq_nodes("w", "s_w", "zeros", case.w_axis),
             helper.make_node(case.op, inputs, ["acc"], name="layer", **dict(case.attributes)),
             *qdq_nodes("acc", "s_y", "zero")]
    nodes.append(helper.make_node("Identity", ["acc_dq"], ["y"], name="out"))
    rank = len(case.x_shape)
    graph = helper.make_graph(nodes, case.op.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, case.x_shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)
                               for name in ("y", "acc")[:1 + expose_acc]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Layer(path, x, w, b, s_x, s_w, s_y)


def along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-channel values shaped to broadcast along `axis` of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_quant_equals_the_integer_reference(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    layer = layer_model(case, tmp_path / f"{name}.onnx")
    got = open_runner(layer.path, "trt-sim").run({"x": layer.x})
    acc = case.accumulate(quantize(layer.x, layer.s_x), quantize(layer.w, along(layer.s_w, case.w_axis, layer.w.ndim)))
    assert np.abs(acc).max() < 2 ** 31  # the int32 accumulator TensorRT uses cannot overflow here
    rescale = along(layer.s_w.astype(np.float64), case.out_axis, acc.ndim) * np.float64(layer.s_x)
    bias = along(layer.b.astype(np.float64), case.out_axis, acc.ndim) if case.bias else 0.0
    # bias quantized to int32 at scale s_x * s_w and added to the accumulator (ONNX QLinearConv's convention; ORT
    # applies it to Conv/Gemm at the trt-sim level), then rescaled: equal up to float32 rounding
    int_bias = np.rint(bias / rescale) if case.bias else 0.0
    reference = (acc + int_bias) * rescale
    tolerance = 1e-5 * np.abs(reference).max()
    np.testing.assert_allclose(got["acc"], reference, rtol=0, atol=tolerance)
    # a kernel adding the float bias after the rescale (acc * s_x * s_w + bias) is at most half a step away
    float_epilogue = acc * rescale + bias
    assert np.all(np.abs(got["acc"] - float_epilogue) <= 0.5 * rescale + tolerance)
    # the output Q/DQ: the same int8 codes, except where the reference sits on a rounding tie within float error
    codes_ref, codes_got = quantize(reference, layer.s_y), np.rint(got["y"] / layer.s_y).astype(np.int64)
    near_tie = np.abs(np.abs(reference / layer.s_y) % 1 - 0.5) < 1e-3
    assert np.array_equal(codes_ref[~near_tie], codes_got[~near_tie])
    assert np.abs(codes_ref - codes_got).max() <= 1 and near_tie.mean() < 0.01


def test_trt_sim_keeps_qdq_unfused_where_ort_would_fuse(tmp_path: Path) -> None:
    layer = layer_model(CASES["conv"], tmp_path / "conv.onnx", expose_acc=False)
    ops = {}
    for level in (TRT_SIM_OPTIMIZATION, "all"):
        optimized = tmp_path / f"optimized_{level}.onnx"
        make_session(layer.path, optimization=level, optimized_model_path=optimized)
        ops[level] = op_counts(onnx.load(str(optimized)))
    assert not set(ops[TRT_SIM_OPTIMIZATION]) & INTEGER_KERNELS, ops[TRT_SIM_OPTIMIZATION]
    assert ops[TRT_SIM_OPTIMIZATION]["Conv"] == 1 and ops[TRT_SIM_OPTIMIZATION]["DequantizeLinear"] >= 2
    assert set(ops["all"]) & {"QLinearConv", "ConvInteger"}  # the control: ORT's own level does fuse this graph
    runner = open_runner(layer.path, "trt-sim")
    level = runner.session.get_session_options().graph_optimization_level  # type: ignore[attr-defined]
    assert level.name == "ORT_ENABLE_BASIC"


def test_trt_sim_refuses_what_tensorrt_would_not_build_the_same_way(tmp_path: Path) -> None:
    layer = layer_model(CASES["gemm"], tmp_path / "gemm.onnx")
    model = onnx.load(str(layer.path))
    asymmetric = onnx.ModelProto()
    asymmetric.CopyFrom(model)
    for init in asymmetric.graph.initializer:
        if init.name == "zero":
            init.CopyFrom(numpy_helper.from_array(np.uint8(128), "zero"))
    onnx.save(asymmetric, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelError, match=r"model\.onnx: QuantizeLinear 'x_Q' is not symmetric int8.*model_trt_qdq"):
        open_runner(tmp_path / "model.onnx", "trt-sim")
    integer = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [2, 2]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])])
    onnx.save(helper.make_model(integer, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "integer.onnx"))
    with pytest.raises(ModelError, match=r"integer\.onnx: it holds ONNX Runtime integer ops \['MatMulInteger'\]"):
        open_runner(tmp_path / "integer.onnx", "trt-sim")
    open_runner(layer.path, "trt-sim")  # the symmetric original is accepted
