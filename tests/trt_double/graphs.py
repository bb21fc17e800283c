"""Tiny ONNX graphs for the TensorRT backend tests (written to a temp dir by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def two_input_model(path: Path) -> Path:
    """y = softmax(2 * zeta + alpha) over (B, 3); graph input order zeta, alpha (not alphabetical)."""
    zeta = helper.make_tensor_value_info("zeta", TensorProto.FLOAT, ["B", 3])
    alpha = helper.make_tensor_value_info("alpha", TensorProto.FLOAT, ["B", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Mul", ["zeta", "two"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "alpha"], ["summed"], name="add"),
        helper.make_node("Softmax", ["summed"], ["y"], name="soft", axis=-1),
    ]
    return _save(helper.make_graph(nodes, "two_inputs", [zeta, alpha], [y], [two]), path)


def reference_two_input(zeta: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    summed = 2 * zeta + alpha
    exp = np.exp(summed - summed.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def streaming_model(path: Path) -> Path:
    """out = frame + h; h_out = 0.5 * h + frame (a recurrence whose state must be carried between frames)."""
    frame = helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 4])
    state = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])
    state_out = helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Add", ["frame", "h"], ["out"], name="emit"),
        helper.make_node("Mul", ["h", "half"], ["decayed"], name="decay"),
        helper.make_node("Add", ["decayed", "frame"], ["h_out"], name="update"),
    ]
    return _save(helper.make_graph(nodes, "streaming", [frame, state], [out, state_out], [half]), path)


def qdq_model(path: Path) -> Path:
    """y = DQ(Q(x)) * 2 with a symmetric int8 scale: what an explicit-quantization ONNX looks like."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
        helper.make_tensor("zero", TensorProto.INT8, [], [0]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"], name="dq"),
        helper.make_node("Mul", ["xd", "two"], ["y"], name="double"),
    ]
    return _save(helper.make_graph(nodes, "qdq", [x], [y], inits), path)


def unsupported_model(path: Path) -> Path:
    """A graph with a node TensorRT's parser has no importer for."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    node = helper.make_node("NotATensorRTOp", ["x"], ["y"], name="mystery", domain="com.example")
    model = helper.make_model(
        helper.make_graph([node], "bad", [x], [y]),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def dynamic_time_model(path: Path) -> Path:
    """An unknown model with a dynamic non-batch dimension (no default profile can be guessed)."""
    x = helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", "T", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 2])
    return _save(helper.make_graph([helper.make_node("Relu", ["feats"], ["y"], name="relu")], "dyn", [x], [y]), path)
