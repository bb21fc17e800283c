"""Small read-only views of an ONNX graph: who produces and who consumes each tensor, which tensors are constant,
which graph inputs are recurrent states. Shared by the precision rules, the Q/DQ placement and the readers."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import onnx

from quant.errors import ModelError

STATE_OUTPUT_SUFFIXES = ("_out", "_new")
LAYOUT_OPS = frozenset(
    {"Slice", "Gather", "Split", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Concat", "Identity", "Flatten",
     "Expand", "Cast"}
)


Shape = tuple[int | str, ...]  # declared dimensions; a dynamic one is its symbol, or '?'


@dataclass(frozen=True)
class GraphInterface:
    """What callers see of an ONNX file: its inputs (initializers left out) with their declared shapes, in order, its
    output names and its default-domain opset."""

    inputs: Mapping[str, Shape]
    outputs: tuple[str, ...]
    opset: int


def load_model(path: str | Path, external_data: bool = True) -> onnx.ModelProto:
    """The ONNX model at `path` (`external_data=False`: large weights stored beside it are not read); a file that
    is missing or no ONNX model is a ModelError naming it."""
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as error:  # protobuf's DecodeError, onnx's own errors, OSError: all mean "no model here"
        raise ModelError(f"{path}: not a readable ONNX model: {error}") from None


def graph_interface(path: str | Path) -> GraphInterface:
    """The interface of the ONNX file at `path`, parsed once per version of the file (its mtime and size): tasks
    resolve their graph files several times a run, and parsing a large model each time would cost more than the
    checks that ask. A file that is no ONNX model is a ModelError naming it."""
    status = Path(path).stat()
    return _graph_interface(str(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=32)
def _graph_interface(path: str, mtime_ns: int, size: int) -> GraphInterface:
    model = load_model(path, external_data=False)
    constants = {init.name for init in model.graph.initializer}
    inputs = {value.name: tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                for d in value.type.tensor_type.shape.dim)
              for value in model.graph.input if value.name not in constants}
    return GraphInterface(MappingProxyType(inputs), tuple(v.name for v in model.graph.output), default_opset(model))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset; 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass(frozen=True)
class GraphIndex:
    """Producer/consumer maps of one graph (top level only; subgraphs are treated as opaque nodes)."""

    nodes: tuple[onnx.NodeProto, ...]
    producers: Mapping[str, onnx.NodeProto]
    consumers: Mapping[str, tuple[onnx.NodeProto, ...]]
    constants: frozenset[str]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def activation_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in self.constants]


def index_graph(model: onnx.ModelProto) -> GraphIndex:
    graph = model.graph
    producers: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    constants = {init.name for init in graph.initializer}
    for node in graph.node:
        for name in node.output:
            producers[name] = node
        for name in node.input:
            if name:
                consumers[name].append(node)
        if node.op_type == "Constant":
            constants.update(node.output)
    _propagate_constants(graph.node, constants)
    return GraphIndex(
        nodes=tuple(graph.node),
        producers=producers,
        consumers={k: tuple(v) for k, v in consumers.items()},
        constants=frozenset(constants),
        inputs=tuple(i.name for i in graph.input if i.name not in constants),
        outputs=tuple(o.name for o in graph.output),
    )


def _propagate_constants(nodes: object, constants: set[str]) -> None:
    """Shape-only ops of constants (e.g. Unsqueeze of an initializer) are constants too."""
    for node in nodes:  # type: ignore[attr-defined]
        if node.op_type in LAYOUT_OPS and all(name in constants for name in node.input if name):
            constants.update(node.output)


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique name (rules, ORT exclusion lists and TRT layers key on names)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    seen: set[str] = set()
    for position, node in enumerate(named.graph.node):
        name = node.name or f"{node.op_type}_{position}"
        while name in seen:
            name = f"{name}_{position}"
        node.name = name
        seen.add(name)
    return named


def state_pairs(
    input_names: tuple[str, ...] | list[str],
    output_names: tuple[str, ...] | list[str],
    mapping: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Recurrent states: graph input -> graph output that carries its next value.

    An explicit `mapping` wins; otherwise input `name` pairs with output `name_out` (or `name_new`).
    """
    if mapping is not None:
        return dict(mapping)
    outputs = set(output_names)
    pairs = {}
    for name in input_names:
        for suffix in STATE_OUTPUT_SUFFIXES:
            if name + suffix in outputs:
                pairs[name] = name + suffix
                break
    return pairs


def remove_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without Identity nodes (consumers read the Identity's input), except Identities producing a graph
    output. The FP16 converter mistypes an Identity between an initializer and a node it keeps in float32."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        node.input[:] = [alias.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    dropped = set(alias)
    kept_info = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return result


def detach_graph_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every graph output that nodes also read is produced by its own Identity: nodes read
    `<name>_inner`. The FP16 converter keeps graph outputs float32 (keep_io_types) and would otherwise hand that
    float32 tensor to float16 consumers (WeNet's encoder_out feeding the CTC MatMul)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    read = {name for node in graph.node for name in node.input}
    shared = [o.name for o in graph.output if o.name in read]
    for name in shared:
        inner = f"{name}_inner"
        for node in graph.node:
            node.output[:] = [inner if t == name else t for t in node.output]
            node.input[:] = [inner if t == name else t for t in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}_output"))
    return result
