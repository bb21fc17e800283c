"""Search units and the rules file a configuration becomes.

A unit is what the search turns INT8 or keeps float as one decision. Its candidate nodes come from the ONNX Runtime
INT8 plan of the base rules: every node the plan makes static INT8, every MatMul it makes dynamic INT8 (a Linear
layer as DynamicQuantizeMatMul: INT8 keeps it dynamic, float reverts it), plus the compute and arithmetic nodes a rule
keeps float for a stated reason (candidates the defaults may be too careful with), LeakyRelu included (the shipped
rule leakyrelu-float: QLinearLeakyRelu exists, but all of them INT8 cost the DPCRN its budget). Recurrent cells
(dynamic INT8 or float), layout and state plumbing are never candidates: they have no static integer kernel on ORT
CPU; data movement that a rule makes INT8 follows its producer by itself (quant.precision: DATA_MOVEMENT_OPS).

A unit's INT8 form is the base plan's, not a choice of the search: static Q/DQ against dynamic for a weight MatMul was
measured per node (scripts/bench_matmul_forms.py: ORT profiler, and each MatMul cut out and timed alone; 1 thread).
Dynamic was faster on 91 of the WeNet encoder's 92 at batch 1 and at batch 8 and on the DPCRN's fc MatMuls alone; the
one exception (the encoder's input projection) ran as fast either way alone, and no whole build with MatMuls made
static ran measurably faster (precision_default.toml, rule linear-dynamic-ort), so a third choice would cost
evaluations and buy nothing. On the trt plan there is nothing to choose: TensorRT has no dynamic quantization.

Grouping `group` (the default) makes one unit of the candidates of one structural block (quant.onnxgraph.blocks: a
layer with its bias/activation and the residual or mask arithmetic behind it, an attention block, a recurrent
block's projections, a Linear-act-Linear FFN); `node` makes one unit per candidate node. A group's errors compound
inside the block (Q, K and V all feed one softmax), so it is measured and decided as one; a lone layer's unit is
named after its node either way. An activation candidate (LeakyRelu) is always its own unit: INT8 or float is a
separate choice from its layer's kernel (an INT8 conv with a float activation is the shipped default). `alike`
makes one unit of the `group` units that repeat one another (alike_units: all attention blocks of a stack, all its
FFNs): errors that add up over a stack are seen and decided at once, with fewer, larger units to measure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping

import onnx

from quant.artifacts.ort_build import streaming_states
from quant.onnxgraph.blocks import block_of_nodes
from quant.onnxgraph.graph import ensure_node_names, index_graph
from quant.fileio import atomic_write_text
from quant.precision import DEFAULT_REASON, NodeDecision, Rule, plan

# op types ORT's Q/DQ quantizer turns into integer kernels (QLinearConv/MatMulInteger/QLinearAdd/QLinearMul, ...)
SEARCHABLE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "LeakyRelu"})
OWN_UNIT_OPS = frozenset({"LeakyRelu"})  # activations: decided apart from the layer they follow
# TensorRT fuses a pointwise activation into the conv/GEMM before it (the fused layer's output precision is the
# layer's), so on the trt plan a float activation made INT8 adds a quantization point before it and saves nothing
FUSED_ON_TRT = OWN_UNIT_OPS
NEVER_UNITS = frozenset({"state-plumbing"})  # float because state error feeds back; not a speed lever
RULE_PREFIX = "search:"
GROUPINGS = ("group", "node", "alike")


@dataclass(frozen=True)
class Unit:
    name: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    default: str  # the base rules' precision of its nodes: int8 (static or dynamic) | fp32 | mixed
    rule: str  # the base rule(s) that decided them ("+"-joined when they differ)
    dynamic: tuple[str, ...] = ()  # nodes whose INT8 form is dynamic (the base rules' int8-dynamic MatMuls)
    blocks: int = 1  # structural blocks in the unit (grouping `alike`: the repeats it merged); the untimed speed proxy


Config = frozenset[str]  # names of the units that are INT8


def find_units(model: onnx.ModelProto, rules: Iterable[Rule], backend: str = "ort",
               grouping: str = "group") -> tuple[Unit, ...]:
    """The searchable units of `model` under the base `rules` (the INT8 plan of `backend`: ort, or trt for the
    Q/DQ placement of model_trt_qdq.onnx), in graph order; `grouping` node | group (see the module docstring)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping {grouping!r}: expected one of {GROUPINGS}")
    int8_plan = plan(model, tuple(rules), "int8", backend, streaming_states(model))
    candidates = [d for d in int8_plan.decisions if d.precision == "int8" or (
        d.precision in ("fp32", "int8-dynamic") and d.rule != DEFAULT_REASON and d.rule not in NEVER_UNITS
        and d.op_type in SEARCHABLE_OPS and not (backend == "trt" and d.op_type in FUSED_ON_TRT))]
    named = ensure_node_names(model)  # the names the plan's decisions carry
    blocks = block_of_nodes(index_graph(named)) if grouping != "node" else {}
    members: dict[str, list[NodeDecision]] = {}
    for decision in candidates:
        own = decision.op_type in OWN_UNIT_OPS
        members.setdefault(decision.node if own else blocks.get(decision.node, decision.node), []).append(decision)
    units = tuple(_unit(name, decisions) for name, decisions in members.items())
    return alike_units(named, units) if grouping == "alike" else units


def alike_units(model: onnx.ModelProto, units: Iterable[Unit]) -> tuple[Unit, ...]:
    """Grouping `alike`: the block units that are repeats of one another (same kind, same ops in the same order,
    same weight shapes and attributes: a conformer's attention blocks, its FFNs, its pointwise convs) merged into
    one unit each, named after the first with the count of the others, in graph order.

    Why: quantization error that no single block shows can add up over a stack. On the WeNet encoder's TensorRT Q/DQ
    plan the 64 block units all INT8 cost +0.35 CER points on 450 utterances, only the FFNs INT8 +0.00 and only the
    attention blocks +0.01, all but the attention blocks +0.19 (scripts/probe_alike.py); one block's share is below
    the build-to-build noise of a 225-utterance split (about +-0.15 points), so a search that reverts one block at a
    time steers by noise there, and one that reverts all attention blocks at once sees the effect."""
    units = tuple(units)
    signature = _signatures(model, {node for unit in units for node in unit.nodes})
    merged: dict[tuple[object, ...], list[Unit]] = {}
    for unit in units:
        kind = unit.name.split(":", 1)[0] if ":" in unit.name else ""
        merged.setdefault((kind, *(signature.get(node, ()) for node in unit.nodes)), []).append(unit)
    return tuple(_merge(alike) for alike in merged.values())


def _signatures(model: onnx.ModelProto, nodes: set[str]) -> dict[str, tuple[object, ...]]:
    """Per node of `nodes` (the units' only: a Constant node's attribute can hold a whole weight tensor): op type,
    the shapes of its constant inputs and its attributes, equal for the repeats of a block."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return {node.name: (node.op_type, tuple(shapes.get(name) for name in node.input),
                        tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute)))
            for node in model.graph.node if node.name in nodes}


def _merge(alike: list[Unit]) -> Unit:
    if len(alike) == 1:
        return alike[0]
    first = alike[0]
    defaults = {u.default for u in alike}
    return Unit(f"{first.name} +{len(alike) - 1} alike", tuple(n for u in alike for n in u.nodes),
                tuple(op for u in alike for op in u.op_types), defaults.pop() if len(defaults) == 1 else "mixed",
                "+".join(dict.fromkeys(r for u in alike for r in u.rule.split("+"))),
                tuple(n for u in alike for n in u.dynamic), sum(u.blocks for u in alike))


def int8_blocks(units: Iterable[Unit], config: Config) -> int:
    """Structural blocks INT8 in `config`: the speed proxy of a backend not timed here."""
    return sum(u.blocks for u in units if u.name in config)


def _unit(name: str, decisions: list[NodeDecision]) -> Unit:
    precisions = {"int8" if d.precision in ("int8", "int8-dynamic") else "fp32" for d in decisions}
    default = precisions.pop() if len(precisions) == 1 else "mixed"
    return Unit(name, tuple(d.node for d in decisions), tuple(d.op_type for d in decisions), default,
                "+".join(dict.fromkeys(d.rule for d in decisions)),
                tuple(d.node for d in decisions if d.precision == "int8-dynamic"))


def default_config(units: Iterable[Unit]) -> Config:
    """The units the base rules make wholly INT8 (a `mixed` group is not: the default-rules build is built from
    the base rules themselves, not from a configuration)."""
    return frozenset(u.name for u in units if u.default == "int8")


def all_config(units: Iterable[Unit]) -> Config:
    return frozenset(u.name for u in units)


def config_rules(units: Iterable[Unit], config: Config, why: Mapping[str, str] | None = None,
                 backend: str = "ort", base: Iterable[str] = ()) -> list[Rule]:
    """One exact-name rule per unit node (int8 when the unit is in `config`, else fp32) for the backend the search
    measured (ort: ONNX Runtime's INT8 model; trt: the Q/DQ placement of model_trt_qdq.onnx), placed before the base
    rules so it decides; the other backend, and the units named in `base`, keep the base rules."""
    base = frozenset(base)
    reasons = why or {}
    rules = []
    for unit in units:
        if unit.name in base:
            continue
        for node in unit.nodes:
            precision = ("int8-dynamic" if node in unit.dynamic else "int8") if unit.name in config else "fp32"
            rules.append(Rule(name=f"{RULE_PREFIX}{node}", precision=precision, name_regex=f"^{re.escape(node)}$",
                              builds=("int8",), backends=(backend,),
                              why=reasons.get(unit.name, f"quant search: {precision} in this configuration")))
    return rules


def write_rules(path: Path, rules: Iterable[Rule], header: str = "") -> Path:
    """A rules TOML that quant.precision.load_rules reads back (every Rule field that differs from its default)."""
    defaults = {f.name: f.default for f in fields(Rule)}
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    for rule in rules:
        lines.append("[[rule]]")
        for f in fields(Rule):
            value = getattr(rule, f.name)
            if f.name in ("name", "precision") or value != defaults[f.name]:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return atomic_write_text(path, "\n".join(lines))


def _toml_value(value: object) -> str:
    """TOML basic strings share JSON's escapes; arrays of strings likewise."""
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)
