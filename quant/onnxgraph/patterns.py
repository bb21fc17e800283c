"""Graph patterns the precision rules can name: each finder returns the names of the nodes that form the pattern.

- layernorm: a LayerNorm written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) (pre-opset-17 exports).
- residual_add: an Add of two activations where one is an ancestor of the other (x + f(x)): the skip connection.
- state_io: layout ops (Concat/Slice/...) that carry a streaming model's recurrent state from input to output.
- mask_math: Mul/Sub/Add/Div that sit on an input -> output path made only of arithmetic and layout ops
  (the complex mask applied to the noisy spectrum at the end of an SE model).
- depthwise_conv: a grouped Conv with one group per output channel.
- skip_concat: compute ops reading (through layout ops) a Concat of two or more activations that are not recurrent
  states: a U-Net skip joined to the decoder path, two distributions forced under one INT8 scale.
- attention_probs: compute ops reading a Softmax output through layout ops and masking (Where/Mul): the
  attention-probability x V product, whose near-uniform probabilities calibration clips.
- input_layer: the compute ops (Conv/ConvTranspose/MatMul/Gemm) that read a float graph input (not a recurrent
  state) through layout, padding and arithmetic ops only: the layer that sees the raw feature (an STFT spans far
  more than 8 bits of dynamic range).
- weight_matmul: a MatMul by a constant matrix (a Linear layer's projection), not a product of two activations
  (attention scores, probabilities x V): what ONNX Runtime's dynamic quantizer turns into DynamicQuantizeMatMul.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Mapping

import onnx

from quant.onnxgraph.graph import LAYOUT_OPS, GraphIndex, state_pairs

ARITHMETIC_OPS = frozenset({"Mul", "Sub", "Add", "Div", "Neg"})
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def _consumer(index: GraphIndex, tensor: str, op_types: Iterable[str]) -> onnx.NodeProto | None:
    wanted = set(op_types)
    for node in index.consumers.get(tensor, ()):
        if node.op_type in wanted:
            return node
    return None


def _layernorm_at(index: GraphIndex, mean: onnx.NodeProto) -> list[onnx.NodeProto]:
    x = mean.input[0]
    sub = next((n for n in index.consumers.get(mean.output[0], ()) if n.op_type == "Sub" and n.input[0] == x), None)
    if sub is None:
        return []
    centered = sub.output[0]
    square = next(
        (n for n in index.consumers.get(centered, ())
         if n.op_type == "Pow" or (n.op_type == "Mul" and n.input[0] == n.input[1] == centered)),
        None,
    )
    var = _consumer(index, square.output[0], ["ReduceMean"]) if square is not None else None
    add_eps = _consumer(index, var.output[0], ["Add"]) if var is not None else None
    sqrt = _consumer(index, add_eps.output[0], ["Sqrt"]) if add_eps is not None else None
    div = _consumer(index, sqrt.output[0], ["Div"]) if sqrt is not None else None
    if square is None or var is None or add_eps is None or sqrt is None or div is None or centered not in div.input:
        return []
    group = [mean, sub, square, var, add_eps, sqrt, div]
    scale = _consumer(index, div.output[0], ["Mul"])
    if scale is not None and any(index.is_constant(t) for t in scale.input):
        group.append(scale)
        shift = _consumer(index, scale.output[0], ["Add"])
        if shift is not None and any(index.is_constant(t) for t in shift.input):
            group.append(shift)
    return group


def find_layernorm(index: GraphIndex) -> set[str]:
    found: set[str] = set()
    for node in index.nodes:
        if node.op_type == "ReduceMean":
            found.update(n.name for n in _layernorm_at(index, node))
    return found


def _is_ancestor(index: GraphIndex, candidate: str, tensor: str) -> bool:
    """True when `candidate` is used (transitively) to compute `tensor`."""
    seen = {tensor}
    queue = deque([tensor])
    while queue:
        producer = index.producers.get(queue.popleft())
        if producer is None:
            continue
        for name in producer.input:
            if name == candidate:
                return True
            if name and name not in seen and name not in index.constants:
                seen.add(name)
                queue.append(name)
    return False


def find_residual_add(index: GraphIndex) -> set[str]:
    found = set()
    for node in index.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        if index.is_constant(a) or index.is_constant(b) or a == b:
            continue
        if _is_ancestor(index, a, b) or _is_ancestor(index, b, a):
            found.add(node.name)
    return found


def _forward_closure(index: GraphIndex, start: Iterable[str], through: frozenset[str]) -> set[str]:
    reached = set(start)
    queue = deque(reached)
    while queue:
        for node in index.consumers.get(queue.popleft(), ()):
            if node.op_type in through:
                for out in node.output:
                    if out not in reached:
                        reached.add(out)
                        queue.append(out)
    return reached


def _backward_closure(index: GraphIndex, start: Iterable[str], through: frozenset[str]) -> set[str]:
    reached = set(start)
    queue = deque(reached)
    while queue:
        node = index.producers.get(queue.popleft())
        if node is not None and node.op_type in through:
            for name in node.input:
                if name and name not in reached:
                    reached.add(name)
                    queue.append(name)
    return reached


def find_state_io(index: GraphIndex, mapping: Mapping[str, str] | None = None) -> set[str]:
    pairs = state_pairs(index.inputs, index.outputs, mapping)
    if not pairs:
        return set()
    from_states = _forward_closure(index, pairs.keys(), LAYOUT_OPS)
    to_states = _backward_closure(index, pairs.values(), LAYOUT_OPS)
    found = set()
    for node in index.nodes:
        if node.op_type not in LAYOUT_OPS:
            continue
        if any(t in from_states for t in node.input) or any(t in to_states for t in node.output):
            found.add(node.name)
    return found


def find_mask_math(index: GraphIndex) -> set[str]:
    through = LAYOUT_OPS | ARITHMETIC_OPS
    from_inputs = _forward_closure(index, index.inputs, through)
    to_outputs = _backward_closure(index, index.outputs, through)
    return {
        node.name
        for node in index.nodes
        if node.op_type in ARITHMETIC_OPS
        and any(t in from_inputs for t in node.input)
        and any(t in to_outputs for t in node.output)
    }


def _initializer_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    for init in model.graph.initializer:
        if init.name == name:
            return tuple(init.dims)
    return None


def find_depthwise_conv(index: GraphIndex, model: onnx.ModelProto) -> set[str]:
    found = set()
    for node in index.nodes:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = _initializer_shape(model, node.input[1]) if len(node.input) > 1 else None
        if group > 1 and shape is not None and shape[0] == group:
            found.add(node.name)
    return found


def find_input_layer(index: GraphIndex, model: onnx.ModelProto, mapping: Mapping[str, str] | None = None) -> set[str]:
    states = state_pairs(index.inputs, index.outputs, mapping)
    float_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in FLOAT_TYPES}
    sources = [name for name in index.inputs if name in float_inputs and name not in states]
    reached = _forward_closure(index, sources, LAYOUT_OPS | ARITHMETIC_OPS | {"Pad"})
    return {node.name for node in index.nodes
            if node.op_type in COMPUTE_OPS and any(t in reached for t in index.activation_inputs(node))}


def walk_back(
    index: GraphIndex, tensor: str, follow: Callable[[onnx.NodeProto], Iterable[str]]
) -> Iterator[onnx.NodeProto]:
    """Producer nodes reachable backwards from `tensor`, each once; `follow(node)` names the inputs to go on through."""
    queue, seen = [tensor], set()
    while queue:
        name = queue.pop()
        node = index.producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        yield node
        queue.extend(follow(node))


def _concats_behind(index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """Concat nodes reachable backwards from `tensor` along the data path: the first input of layout ops (never
    their shape inputs) and every input of a Concat (nested joins)."""

    def follow(node: onnx.NodeProto) -> Iterable[str]:
        if node.op_type == "Concat":
            return node.input
        return node.input[:1] if node.op_type in LAYOUT_OPS else ()

    return [node for node in walk_back(index, tensor, follow) if node.op_type == "Concat"]


def find_skip_concat(index: GraphIndex, mapping: Mapping[str, str] | None = None) -> set[str]:
    states = set(state_pairs(index.inputs, index.outputs, mapping))
    found = set()
    for node in index.nodes:
        if node.op_type not in COMPUTE_OPS or not node.input:
            continue
        for concat in _concats_behind(index, node.input[0]):
            joined = [t for t in index.activation_inputs(concat) if t not in states]
            if len(joined) >= 2:
                found.add(node.name)
    return found


def _reads_softmax(index: GraphIndex, tensor: str) -> bool:
    through = LAYOUT_OPS | {"Where", "Mul", "Dropout"}

    def follow(node: onnx.NodeProto) -> Iterable[str]:
        if node.op_type not in through:
            return ()
        data = node.input[1:] if node.op_type == "Where" else node.input[:1] if node.op_type in LAYOUT_OPS \
            else node.input
        return [t for t in data if t and not index.is_constant(t)]

    return any(node.op_type == "Softmax" for node in walk_back(index, tensor, follow))


def find_attention_probs(index: GraphIndex) -> set[str]:
    return {node.name for node in index.nodes
            if node.op_type in COMPUTE_OPS and any(_reads_softmax(index, t) for t in index.activation_inputs(node))}


def find_weight_matmul(index: GraphIndex) -> set[str]:
    return {node.name for node in index.nodes
            if node.op_type == "MatMul" and len(node.input) == 2 and index.is_constant(node.input[1])}


PatternFinder = Callable[[GraphIndex, onnx.ModelProto, "Mapping[str, str] | None"], set[str]]
PATTERNS: dict[str, PatternFinder] = {
    "layernorm": lambda index, model, states: find_layernorm(index),
    "residual_add": lambda index, model, states: find_residual_add(index),
    "state_io": lambda index, model, states: find_state_io(index, states),
    "mask_math": lambda index, model, states: find_mask_math(index),
    "depthwise_conv": lambda index, model, states: find_depthwise_conv(index, model),
    "input_layer": find_input_layer,
    "skip_concat": lambda index, model, states: find_skip_concat(index, states),
    "attention_probs": lambda index, model, states: find_attention_probs(index),
    "weight_matmul": lambda index, model, states: find_weight_matmul(index),
}
