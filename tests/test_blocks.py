"""Structural blocks on tiny graphs whose node names say nothing (n0, n1, ...): the blocks must come from the
wiring alone."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quant.onnxgraph.blocks import block_of_nodes
from quant.onnxgraph.graph import index_graph

D = 8


class Graph:
    """Nodes named n0, n1, ... in creation order; weights as initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, *shape: int) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ones(shape, np.float32), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        name = f"n{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [f"{name}_y"], name=name, **attrs))
        return f"{name}_y"

    def linear(self, x: str) -> str:
        return self.op("Add", self.op("MatMul", x, self.const(D, D)), self.const(D))

    def model(self, output: str, inputs: tuple[str, ...] = ("x",)) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2, D]) for i in inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, D])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def blocks(model: onnx.ModelProto) -> dict[str, list[str]]:
    """block name -> its compute and arithmetic nodes."""
    result: dict[str, list[str]] = {}
    for node, block in block_of_nodes(index_graph(model)).items():
        result.setdefault(block, []).append(node)
    return {block: sorted(nodes, key=lambda n: int(n[1:])) for block, nodes in result.items()}


def test_attention_block_takes_qkv_scores_probs_and_output_projection_with_the_residual():
    g = Graph()
    q, k, v = g.linear("x"), g.linear("x"), g.linear("x")  # n0..n5
    scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[1, 0])), g.const(1))  # n6 T, n7, n8
    probs = g.op("Softmax", scores, axis=-1)  # n9
    context = g.op("MatMul", probs, v)  # n10
    out = g.linear(g.op("Reshape", context, g.const(2)))  # n11 Reshape, n12 MatMul, n13 Add
    y = g.op("Add", "x", out)  # n14: residual
    found = blocks(g.model(y))
    assert found["attention:n9"] == ["n0", "n1", "n2", "n3", "n4", "n5", "n7", "n8", "n10", "n12", "n13",
                                     "n14"]


def test_ffn_joins_two_linears_through_an_activation_and_not_without_one():
    g = Graph()
    hidden = g.op("Relu", g.linear("x"))  # n0 MatMul, n1 Add, n2 Relu
    y = g.linear(hidden)  # n3, n4
    z = g.linear(g.linear(y))  # n5..n8: Linear-Linear with no nonlinearity between: two layers
    found = blocks(g.model(z))
    assert found["ffn:n0"] == ["n0", "n1", "n3", "n4"]
    assert found["n5"] == ["n5", "n6"] and found["n7"] == ["n7", "n8"]


def test_ffn_with_a_decomposed_swish():
    g = Graph()
    h = g.linear("x")  # n0, n1
    swish = g.op("Mul", h, g.op("Sigmoid", h))  # n2 Sigmoid, n3 Mul
    y = g.linear(swish)  # n4, n5
    assert blocks(g.model(y))["ffn:n0"] == ["n0", "n1", "n3", "n4", "n5"]


def test_recurrent_block_takes_its_input_and_output_linears_not_a_conv_before_it():
    g = Graph()
    conv = g.op("Relu", g.op("Conv", "x", g.const(D, 1, 1)))  # n0 Conv, n1 Relu
    seq = g.op("Squeeze", conv, g.const(1))  # n2
    projected = g.op("Relu", g.linear(seq))  # n3 MatMul, n4 Add, n5 Relu
    gru = g.op("GRU", projected, g.const(1, 3 * D, D), g.const(1, 3 * D, D), hidden_size=D)  # n6
    y = g.linear(g.op("Squeeze", gru, g.const(1)))  # n7 Squeeze, n8 MatMul, n9 Add
    found = blocks(g.model(y))
    assert found["recurrent:n6"] == ["n3", "n4", "n6", "n8", "n9"]
    assert found["n0"] == ["n0"]


def test_a_lone_layer_keeps_its_node_name_and_takes_the_residual_add_of_its_branch():
    g = Graph()
    a = g.op("Relu", g.op("Add", g.op("Conv", "x", g.const(D, D, 1)), g.const(D, 1)))  # n0 Conv, n1 Add, n2 Relu
    b = g.op("Conv", a, g.const(D, D, 1))  # n3
    y = g.op("Add", a, b)  # n4: a + f(a), f is n3
    found = blocks(g.model(y))
    assert found["n0"] == ["n0", "n1"] and found["n3"] == ["n3", "n4"]
