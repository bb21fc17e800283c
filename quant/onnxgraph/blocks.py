"""Blocks of an ONNX graph found from its structure (never from names): which compute nodes act as one layer, one
attention block, one recurrent block or one feed-forward block.

- layer: one compute node (Conv/ConvTranspose/MatMul/Gemm) with what follows it pointwise (bias, scale, activation);
- attention: a Softmax with the activation x activation MatMuls on both sides of it (scores, probabilities x V),
  the constant-weight projections feeding them (Q, K, V) and the projection reading the result (out);
- recurrent: an LSTM/GRU/RNN with the Linear (MatMul/Gemm) feeding its input and the layers reading its output;
- ffn: two constant-weight MatMul/Gemm layers joined by a pointwise path with a nonlinearity (Linear-act-Linear).

Arithmetic nodes (a residual Add, mask arithmetic) join the block of the latest (in graph order) of the nearest
compute or recurrent nodes behind them: for x + f(x), the block computing f.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import onnx

from quant.onnxgraph.graph import LAYOUT_OPS, GraphIndex
from quant.onnxgraph.patterns import COMPUTE_OPS, walk_back

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf",
                            "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Clip", "ThresholdedRelu"})
AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})
ATTENTION_GLUE = LAYOUT_OPS | {"Where", "Dropout"}


def _is_pointwise(index: GraphIndex, node: onnx.NodeProto, reached: set[str]) -> bool:
    """An activation, or affine arithmetic whose other operands are constants or on the path (x * sigmoid(x))."""
    if node.op_type in ACTIVATION_OPS:
        return True
    return node.op_type in AFFINE_OPS and all(
        index.is_constant(t) or t in reached for t in node.input if t)


def _forward(index: GraphIndex, start: str, through: frozenset[str] | None) -> tuple[set[str], list[onnx.NodeProto]]:
    """Tensors reached from `start` through `through` ops (None: pointwise ops), and the nodes passed."""
    reached, passed = {start}, []
    queue = deque([start])
    while queue:
        for node in index.consumers.get(queue.popleft(), ()):
            ok = node.op_type in through if through is not None else _is_pointwise(index, node, reached)
            if ok and node.output[0] not in reached:
                passed.append(node)
                for out in node.output:
                    reached.add(out)
                    queue.append(out)
    return reached, passed


def _producers_behind(index: GraphIndex, tensor: str, through: frozenset[str]) -> Iterator[onnx.NodeProto]:
    """The first producers backwards from `tensor` that are neither `through` ops nor affine ops of one activation
    (a bias, a scale): those are walked through (layout ops on their data input only)."""

    def passes(node: onnx.NodeProto) -> bool:
        return node.op_type in through or (node.op_type in AFFINE_OPS and len(index.activation_inputs(node)) == 1)

    def follow(node: onnx.NodeProto) -> list[str]:
        if not passes(node):
            return []
        inputs = list(index.activation_inputs(node))
        return inputs[:1] if node.op_type in LAYOUT_OPS else inputs

    return (node for node in walk_back(index, tensor, follow) if not passes(node))


def _compute_behind(index: GraphIndex, tensor: str) -> Iterator[onnx.NodeProto]:
    """The nearest compute or recurrent nodes backwards from `tensor`, through anything else (a LayerNorm, masks)."""

    def stops(node: onnx.NodeProto) -> bool:
        return node.op_type in COMPUTE_OPS or node.op_type in RECURRENT_OPS

    def follow(node: onnx.NodeProto) -> list[str]:
        return [] if stops(node) else list(index.activation_inputs(node))

    return (node for node in walk_back(index, tensor, follow) if stops(node))


def _consumers_after(index: GraphIndex, tensor: str, through: frozenset[str]) -> list[onnx.NodeProto]:
    reached, _ = _forward(index, tensor, through)
    return [n for t in reached for n in index.consumers.get(t, ()) if n.op_type not in through]


def is_weighted(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A compute node with a constant weight (a layer), not an activation x activation product."""
    return node.op_type in COMPUTE_OPS and len(node.input) > 1 and index.is_constant(node.input[1])


class _Groups:
    """Union-find over node names; each group keeps the kind and anchor node of the block that merged it."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.label: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def alone(self, name: str) -> bool:
        return self.size.get(self.find(name), 1) == 1

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def merge(self, names: Iterable[str], label: str) -> None:
        roots = list(dict.fromkeys(self.find(n) for n in names))
        if len(roots) < 2:
            return
        for root in roots[1:]:
            self.parent[root] = roots[0]
            self.size[roots[0]] = self.size.get(roots[0], 1) + self.size.pop(root, 1)
        self.label.setdefault(roots[0], label)


def _attention(index: GraphIndex, softmax: onnx.NodeProto) -> list[str]:
    scores = [n for n in _producers_behind(index, softmax.input[0], ATTENTION_GLUE | {"Add", "Mul", "Div", "Sub"})
              if n.op_type == "MatMul" and not is_weighted(index, n)]
    probs_v = [n for n in _consumers_after(index, softmax.output[0], ATTENTION_GLUE | {"Mul"})
               if n.op_type == "MatMul" and not is_weighted(index, n)]
    if not scores or not probs_v:
        return []
    members = scores + probs_v
    for product in members:
        for tensor in index.activation_inputs(product):
            members += [n for n in _producers_behind(index, tensor, ATTENTION_GLUE) if is_weighted(index, n)]
    for product in probs_v:
        members += [n for n in _consumers_after(index, product.output[0], LAYOUT_OPS) if is_weighted(index, n)]
    return [n.name for n in members]


def _recurrent(index: GraphIndex, cell: onnx.NodeProto) -> list[str]:
    # a Linear feeding the cell is its input projection; a Conv there is a layer of the encoder before it
    inputs = [n for n in _producers_behind(index, cell.input[0], LAYOUT_OPS | ACTIVATION_OPS)
              if is_weighted(index, n) and n.op_type in ("MatMul", "Gemm")]
    outputs = [n for n in _consumers_after(index, cell.output[0], LAYOUT_OPS) if is_weighted(index, n)]
    return [cell.name] + [n.name for n in inputs + outputs]


def _ffn_partner(index: GraphIndex, first: onnx.NodeProto) -> onnx.NodeProto | None:
    """The single constant-weight MatMul/Gemm reading `first`'s output through a pointwise path with a nonlinearity."""
    reached, passed = _forward(index, first.output[0], None)
    if not any(n.op_type in ACTIVATION_OPS for n in passed):
        return None
    after = {n.name: n for t in reached for n in index.consumers.get(t, ()) if n not in passed}
    if len(after) != 1:
        return None
    second = next(iter(after.values()))
    return second if second.op_type in ("MatMul", "Gemm") and is_weighted(index, second) else None


def block_of_nodes(index: GraphIndex) -> dict[str, str]:
    """Block name of every compute node and every arithmetic node behind one: `<node>` for a lone layer,
    `attention:<softmax>`, `recurrent:<cell>`, `ffn:<first MatMul>` for a block of several."""
    groups = _Groups()
    order = {node.name: position for position, node in enumerate(index.nodes)}
    for node in index.nodes:
        if node.op_type == "Softmax":
            groups.merge(_attention(index, node), f"attention:{node.name}")
        elif node.op_type in RECURRENT_OPS:
            groups.merge(_recurrent(index, node), f"recurrent:{node.name}")
    for node in index.nodes:
        if node.op_type in ("MatMul", "Gemm") and is_weighted(index, node) and groups.alone(node.name):
            partner = _ffn_partner(index, node)
            if partner is not None and groups.alone(partner.name):
                groups.merge([node.name, partner.name], f"ffn:{node.name}")
    for node in index.nodes:
        if node.op_type in AFFINE_OPS and node.op_type not in COMPUTE_OPS:
            behind = [p for t in index.activation_inputs(node) for p in _compute_behind(index, t)]
            if behind:
                groups.merge([max(behind, key=lambda p: order[p.name]).name, node.name], "")
    names = {}
    for node in index.nodes:
        if node.op_type in COMPUTE_OPS or node.op_type in AFFINE_OPS or node.op_type in RECURRENT_OPS:
            root = groups.find(node.name)
            names[node.name] = groups.label.get(root) or root
    return names
