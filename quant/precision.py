"""Precision rules: which node of an ONNX graph runs in fp32, fp16, int8 or int8-dynamic, and why.

Rules are tiny named objects (op types, a node-name regex, a graph pattern from quant.onnxgraph.patterns) applied in one
loop: the first rule that applies to the build precision and backend and matches the node decides, and its name is the
recorded reason. A node no rule matches gets the build's default (fp16 in fp16 builds, fp32 in int8 builds: INT8 is
opt-in per op type). The shipped rules live in precision_default.toml.

One plan is translated for every backend: ONNX Runtime quantizer arguments, the FP16 converter's block lists, Q/DQ
sites for TensorRT explicit quantization and a TensorRT <= 10 layer-precision list.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import onnx

from quant.errors import BuildError
from quant.onnxgraph.graph import GraphIndex, ensure_node_names, index_graph
from quant.onnxgraph.patterns import PATTERNS
from quant.onnxgraph.shapes import infer_shapes

log = logging.getLogger(__name__)

NODE_PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
BUILD_PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("ort", "trt")
DEFAULT_RULES_PATH = Path(__file__).with_name("precision_default.toml")
DEFAULT_REASON = "default"
# Ops whose weight input (index 1) gets per-channel Q/DQ, with the output-channel axis.
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0}
ORT_DYNAMIC_OPS = frozenset({"LSTM", "MatMul"})  # DynamicQuantizeLSTM, DynamicQuantizeMatMul; nothing for GRU/RNN
# Ops that only move or copy values. In INT8 they run on the uint8/int8 tensor under their input's scale (ONNX
# Runtime drops DequantizeLinear -> op -> QuantizeLinear around them; Concat becomes QLinearConcat; TensorRT runs them
# in int8), which can pay only where the input already is an integer kernel's output: when a rule makes one INT8,
# `plan` keeps it INT8 only then (_settle_data_movement). No shipped rule does (measured no faster on the DPCRNs:
# README); a rules file opts in. Only their first input is data (Concat: every input).
DATA_MOVEMENT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Pad", "Concat"})
FLOAT_INPUT_REASON = "float input"


@dataclass(frozen=True)
class Rule:
    """Match nodes by op type, name regex and/or graph pattern (all given criteria must hold)."""

    name: str
    precision: str
    op_types: tuple[str, ...] = ()
    name_regex: str = ""
    pattern: str = ""
    builds: tuple[str, ...] = ("int8", "fp16")
    backends: tuple[str, ...] = ()
    why: str = ""

    def __post_init__(self) -> None:
        if self.precision not in NODE_PRECISIONS:
            raise BuildError(f"rule {self.name!r}: precision {self.precision!r} is not one of {NODE_PRECISIONS}")
        if not (self.op_types or self.name_regex or self.pattern):
            raise BuildError(f"rule {self.name!r}: give at least one of op_types, name_regex, pattern")
        if self.pattern and self.pattern not in PATTERNS:
            raise BuildError(f"rule {self.name!r}: unknown pattern {self.pattern!r}; known: {sorted(PATTERNS)}")
        unknown = [b for b in self.builds if b not in BUILD_PRECISIONS] + [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise BuildError(f"rule {self.name!r}: unknown build/backend {unknown}; builds {BUILD_PRECISIONS}, "
                             f"backends {BACKENDS}")
        try:
            re.compile(self.name_regex)
        except re.error as error:
            raise BuildError(f"rule {self.name!r}: bad name_regex {self.name_regex!r}: {error}") from None

    def applies(self, build: str, backend: str) -> bool:
        if build not in self.builds or (self.backends and backend not in self.backends):
            return False
        return build == "int8" or self.precision in ("fp32", "fp16")

    def matches(self, node: onnx.NodeProto, pattern_nodes: set[str]) -> bool:
        if self.op_types and node.op_type not in self.op_types:
            return False
        if self.name_regex and not re.search(self.name_regex, node.name):
            return False
        return not self.pattern or node.name in pattern_nodes


@dataclass(frozen=True)
class NodeDecision:
    node: str
    op_type: str
    precision: str
    rule: str


@dataclass(frozen=True)
class PrecisionPlan:
    build: str
    backend: str
    decisions: tuple[NodeDecision, ...]
    rules: tuple[Rule, ...] = field(default=(), repr=False)

    def names(self, *precisions: str) -> list[str]:
        return [d.node for d in self.decisions if d.precision in precisions]

    def decision(self, node: str) -> NodeDecision:
        for d in self.decisions:
            if d.node == node:
                return d
        raise KeyError(node)

    def summary(self) -> dict[str, dict[str, int]]:
        """op type -> 'precision (rule)' -> node count."""
        table: dict[str, Counter[str]] = {}
        for d in self.decisions:
            table.setdefault(d.op_type, Counter())[f"{d.precision} ({d.rule})"] += 1
        return {op: dict(sorted(counts.items())) for op, counts in sorted(table.items())}

    def to_json(self) -> dict[str, Any]:
        return {"build": self.build, "backend": self.backend, "rules": [r.name for r in self.rules],
                "nodes": {d.node: [d.precision, d.rule] for d in self.decisions}}


def load_rules(path: str | Path | None = None) -> tuple[Rule, ...]:
    """Rules from a TOML file of [[rule]] tables (the shipped defaults when path is None)."""
    source = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        document = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{source}: no such rules file") from None
    except tomllib.TOMLDecodeError as error:
        raise BuildError(f"{source}: not valid TOML: {error}") from None
    tables = document.get("rule")
    if not isinstance(tables, list) or not tables:
        raise BuildError(f"{source}: expected one or more [[rule]] tables")
    return tuple(_rule_from_table(source, position, table) for position, table in enumerate(tables, 1))


def without_rules(rules: Iterable[Rule], names: Iterable[str], where: str = "rules_off") -> tuple[Rule, ...]:
    """`rules` less the rules named in `names` (a spec's `rules_off`: shipped rules a model's measurements overrule);
    a name that is no rule of the set is a BuildError naming `where`."""
    rule_list, off = tuple(rules), tuple(names)
    unknown = [n for n in off if n not in {r.name for r in rule_list}]
    if unknown:
        raise BuildError(f"{where}: {unknown} name no precision rule; the rules are {[r.name for r in rule_list]}")
    return tuple(r for r in rule_list if r.name not in off)


def _rule_from_table(source: Path, position: int, table: dict[str, Any]) -> Rule:
    known = {f.name for f in fields(Rule)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BuildError(f"{source}: rule #{position} has unknown keys {unknown}; allowed: {sorted(known)}")
    if "name" not in table or "precision" not in table:
        raise BuildError(f"{source}: rule #{position} needs 'name' and 'precision'")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return Rule(**values)


def plan(
    model: onnx.ModelProto,
    rules: Iterable[Rule] | None = None,
    precision: str = "int8",
    backend: str = "ort",
    states: Mapping[str, str] | None = None,
) -> PrecisionPlan:
    """Decide a precision for every node. Unnamed nodes get the names ensure_node_names gives them."""
    if precision not in BUILD_PRECISIONS:
        raise BuildError(f"build precision {precision!r} is not one of {BUILD_PRECISIONS}")
    if backend not in BACKENDS:
        raise BuildError(f"backend {backend!r} is not one of {BACKENDS}")
    rule_list = tuple(rules) if rules is not None else load_rules()
    named = ensure_node_names(model)
    index = index_graph(named)
    active = [r for r in rule_list if precision != "fp32" and r.applies(precision, backend)]
    pattern_nodes = {r.pattern: PATTERNS[r.pattern](index, named, states) for r in active if r.pattern}
    decisions = tuple(_decide(node, active, pattern_nodes, precision, backend) for node in index.nodes)
    return PrecisionPlan(build=precision, backend=backend, decisions=_settle_data_movement(index, decisions),
                         rules=rule_list)


def data_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs of a data-movement node that carry values (not a shape, axes, starts or pads)."""
    return [t for t in node.input if t] if node.op_type == "Concat" else list(node.input[:1])


def _settle_data_movement(index: GraphIndex, decisions: tuple[NodeDecision, ...]) -> tuple[NodeDecision, ...]:
    """A data-movement node a rule made INT8 stays INT8 only when every data input it reads is the output of a node
    that is static INT8 itself (an integer kernel, or data movement already on the integer tensor); otherwise it
    would add a QuantizeLinear in front of a float copy, and it becomes fp32 with the reason `<rule>: float input`.
    Decided in graph order, so a chain of data movement behind an integer kernel stays INT8 as a whole."""
    settled = {d.node: d for d in decisions}
    for node in index.nodes:
        decision = settled[node.name]
        if decision.precision != "int8" or node.op_type not in DATA_MOVEMENT_OPS:
            continue
        producers = [index.producers.get(t) for t in data_inputs(node)]
        if not producers or any(p is None or settled[p.name].precision != "int8" for p in producers):
            settled[node.name] = replace(decision, precision="fp32", rule=f"{decision.rule}: {FLOAT_INPUT_REASON}")
    return tuple(settled[d.node] for d in decisions)


def _decide(
    node: onnx.NodeProto, rules: list[Rule], pattern_nodes: dict[str, set[str]], build: str, backend: str
) -> NodeDecision:
    for rule in rules:
        if rule.matches(node, pattern_nodes.get(rule.pattern, set())):
            chosen = rule.precision
            if chosen == "int8-dynamic" and backend == "ort" and node.op_type not in ORT_DYNAMIC_OPS:
                chosen = "fp32"
            return NodeDecision(node.name, node.op_type, chosen, rule.name)
    default = "fp16" if build == "fp16" else "fp32"
    return NodeDecision(node.name, node.op_type, default, DEFAULT_REASON)


# ----------------------------------------------------------------------------------------------- translations


@dataclass(frozen=True)
class OrtQuantSpec:
    """Arguments for ONNX Runtime's static (QDQ) and dynamic quantizers derived from a plan."""

    op_types_to_quantize: tuple[str, ...]
    nodes_to_quantize: tuple[str, ...]
    nodes_to_exclude: tuple[str, ...]
    dynamic_nodes: tuple[str, ...]
    dynamic_op_types: tuple[str, ...]
    protected_nodes: tuple[str, ...]


def ort_quant_spec(plan_: PrecisionPlan) -> OrtQuantSpec:
    """nodes_to_quantize is the exact int8 set (op_types alone would let ORT quantize every Add/Mul); the float nodes a
    rule protects are listed so the build can unwrap Q/DQ pairs on their inputs (nodes_to_exclude alone does not)."""
    static = [d for d in plan_.decisions if d.precision == "int8"]
    dynamic = [d for d in plan_.decisions if d.precision == "int8-dynamic"]
    floating = [d for d in plan_.decisions if d.precision in ("fp32", "fp16")]
    return OrtQuantSpec(
        op_types_to_quantize=tuple(sorted({d.op_type for d in static})),
        nodes_to_quantize=tuple(d.node for d in static),
        nodes_to_exclude=tuple(d.node for d in floating + dynamic),
        dynamic_nodes=tuple(d.node for d in dynamic),
        dynamic_op_types=tuple(sorted({d.op_type for d in dynamic})),
        protected_nodes=tuple(d.node for d in floating if d.rule != DEFAULT_REASON),
    )


def fp16_block_lists(plan_: PrecisionPlan) -> tuple[list[str], list[str]]:
    """(op_block_list, node_block_list) for onnxconverter_common.float16.convert_float_to_float16.

    op_block_list replaces the converter's default list, so the default ops it cannot convert are kept in it."""
    from onnxconverter_common import float16

    op_blocks = set(float16.DEFAULT_OP_BLOCK_LIST)
    by_op: dict[str, set[str]] = {}
    for d in plan_.decisions:
        by_op.setdefault(d.op_type, set()).add(d.precision)
    op_blocks.update(op for op, precisions in by_op.items() if precisions == {"fp32"} and op != "Constant")
    return sorted(op_blocks), plan_.names("fp32")


@dataclass(frozen=True)
class QdqSite:
    """One Q/DQ pair to insert: `tensor` as read by `consumers` (activations), or a weight with its channel axis."""

    tensor: str
    consumers: tuple[str, ...]
    is_weight: bool
    axis: int | None


def qdq_sites(model: onnx.ModelProto, plan_: PrecisionPlan) -> list[QdqSite]:
    """Explicit-quantization placement (TensorRT style): Q/DQ only on the float inputs of int8 nodes, weights
    per-channel; float nodes between int8 neighbours read the un-quantized tensor."""
    named = ensure_node_names(model)
    index = index_graph(named)
    float_tensors = _float_tensors(named)
    int8 = set(plan_.names("int8"))
    activation_consumers: dict[str, list[str]] = {}
    weights: dict[str, int] = {}
    for node in index.nodes:
        if node.name not in int8:
            continue
        for position, tensor in enumerate(node.input[:2] if node.op_type in WEIGHT_AXIS else node.input):
            if not tensor or tensor not in float_tensors:
                continue
            if index.is_constant(tensor):
                if position == 1 and node.op_type in WEIGHT_AXIS:
                    weights[tensor] = _weight_axis(node)
            else:
                activation_consumers.setdefault(tensor, []).append(node.name)
    sites = [QdqSite(t, tuple(c), False, None) for t, c in activation_consumers.items()]
    sites += [QdqSite(t, tuple(n.name for n in index.consumers.get(t, ())), True, a) for t, a in weights.items()]
    return sites


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return WEIGHT_AXIS[node.op_type]


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors (initializers, inputs and inferred values)."""
    inferred = infer_shapes(model, consequence="only typed tensors get Q/DQ") or model
    graph = inferred.graph
    names = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names.add(info.name)
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == onnx.TensorProto.FLOAT:
                names.update(node.output)
    return names


def trt_layer_precisions(plan_: PrecisionPlan) -> list[tuple[str, str]]:
    """(ONNX node name, precision) for TensorRT <= 10 layer.precision; the TRT backend maps names to layers.

    Only decisions a rule made are listed: a node no rule matched carries the build's default, which means "let
    TensorRT choose" (pinning it would force hundreds of layers to FP32 under OBEY_PRECISION_CONSTRAINTS and undo the
    INT8/FP16 build). int8-dynamic has no TensorRT meaning and is reported as fp32."""
    return [(d.node, "fp32" if d.precision == "int8-dynamic" else d.precision)
            for d in plan_.decisions if d.rule != DEFAULT_REASON]
