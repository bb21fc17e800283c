"""ONNX artifacts per precision: FP32 (copy, optionally ORT-optimized), FP16 (float16 converter with the rule block
lists), INT8 for ONNX Runtime (Q/DQ, uint8 activations + int8 per-channel weights, LSTM dynamic) and INT8 Q/DQ for
TensorRT explicit mode (int8 symmetric). Each step returns the facts that go into meta.json."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import onnx

from quant.artifacts.calibration import TensorRange
from quant.artifacts.qdq import insert_qdq, sort_topologically, unwrap_float_nodes
from quant.backends import ort as ort_backend
from quant.errors import BuildError, CalibrationError, ModelError
from quant.fileio import atomic_write_bytes, temp_path_beside
from quant.onnxgraph.graph import (GraphIndex, detach_graph_outputs, ensure_node_names, index_graph, remove_identities,
                                   state_pairs)
from quant.precision import (DATA_MOVEMENT_OPS, PrecisionPlan, data_inputs, fp16_block_lists, ort_quant_spec,
                             qdq_sites, trt_layer_precisions)

log = logging.getLogger(__name__)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Atomic save of a model that fits in one protobuf (< 2 GB: all of ours)."""
    return atomic_write_bytes(path, model.SerializeToString())


def save_validated(model: onnx.ModelProto, target: Path) -> Path:
    """Save `model` beside `target`, check it (onnx.checker, then an ONNX Runtime session) and only then rename it
    into place: an invalid model is never left at `target`. A BuildError names the file and the reason."""
    temp = temp_path_beside(target)
    try:
        save_model(model, temp)
        try:
            onnx.checker.check_model(str(temp))
            ort_backend.make_session(temp, optimization="disable")
        except (onnx.checker.ValidationError, ModelError) as error:
            reason = " ".join(str(error).split())[:400] or type(error).__name__
            raise BuildError(f"{target}: the model built is invalid, not written: {reason}") from None
        temp.replace(target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def build_fp32(source: Path, target: Path, optimize: bool = False) -> dict[str, Any]:
    if not optimize:
        shutil.copyfile(source, temp := temp_path_beside(target))
        temp.replace(target)
        return {"optimized": False}
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        optimized = ort_backend.optimized_graph(source, work)
    save_model(optimized, target)
    return {"optimized": True}


def build_fp16(model: onnx.ModelProto, plan: PrecisionPlan, target: Path) -> dict[str, Any]:
    op_blocks, node_blocks = fp16_block_lists(plan)
    named = detach_graph_outputs(remove_identities(ensure_node_names(model)))
    converted = ort_backend.convert_fp16(named, op_blocks, node_blocks)
    changed = [o.name for o, c in zip(named.graph.output, converted.graph.output)
               if o.type.tensor_type.elem_type != c.type.tensor_type.elem_type]
    if changed:
        raise BuildError(f"FP16 conversion changed the element type of outputs {changed}")
    save_model(converted, target)
    return {"op_block_list": op_blocks, "nodes_kept_fp32": len(node_blocks)}


def build_int8_ort(
    model: onnx.ModelProto, plan: PrecisionPlan, ranges: Mapping[str, TensorRange], target: Path,
    activation_uint8: bool = True, per_channel: bool = True, unwrap_kernel_outputs: bool = False,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Static Q/DQ on the plan's int8 nodes with our ranges, float nodes unwrapped, then LSTM dynamic.

    unwrap_kernel_outputs=False keeps the output Q of an int8 node read by a protected float node (ORT needs it
    to fuse an integer kernel); True gives protected nodes the float tensor at the cost of that fusion.
    reduce_range None: 7-bit weights exactly when the CPU lacks VNNI (u8 x s8 products saturate in int16 there)."""
    if reduce_range is None:
        reduce_range = not ort_backend.cpu_has_vnni()
    named = ensure_node_names(model)
    spec = ort_quant_spec(plan)
    _require_ranges(named, spec.nodes_to_quantize, ranges)
    tensors_range = {name: r.ort_range(asymmetric=activation_uint8) for name, r in ranges.items()}
    quantized = named
    rewired = 0
    if spec.nodes_to_quantize:
        quantized = ort_backend.quantize_qdq(named, tensors_range, spec.nodes_to_quantize, spec.op_types_to_quantize,
                                             activation_uint8, per_channel, reduce_range=reduce_range)
        kept = () if unwrap_kernel_outputs else spec.nodes_to_quantize
        # dynamic nodes read the float tensor too: left behind a static consumer's Q/DQ pair, ORT's dynamic
        # quantizer quantized the fake-quantized copy again, and with a dynamic consumer first in graph order that
        # made a cycle; on the float tensor it reuses the static QuantizeLinear (ORT finds it by name), so the
        # tensor is quantized once, at its calibrated scale
        rewired = unwrap_float_nodes(quantized, spec.protected_nodes + spec.dynamic_nodes, kept)
    missed = unquantized_nodes(quantized, spec.nodes_to_quantize)
    if missed:
        log.warning("%d of %d int8 nodes got no Q/DQ input (unknown tensor type or range?), e.g. %s", len(missed),
                    len(spec.nodes_to_quantize), missed[:5])
    if spec.dynamic_nodes:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            static_path = save_model(quantized, Path(work) / "static.onnx")
            ort_backend.quantize_dynamic_nodes(static_path, Path(work) / "dynamic.onnx", spec.dynamic_nodes,
                                               spec.dynamic_op_types)
            quantized = onnx.load(str(Path(work) / "dynamic.onnx"))
    sort_topologically(quantized.graph)
    save_validated(quantized, target)
    return {"activation_type": "uint8" if activation_uint8 else "int8", "weight_type": "int8",
            "per_channel": per_channel, "static_nodes": len(spec.nodes_to_quantize),
            "dynamic_nodes": len(spec.dynamic_nodes), "float_inputs_unwrapped": rewired,
            "unwrap_kernel_outputs": unwrap_kernel_outputs, "reduce_range": reduce_range,
            "planned_int8_not_quantized": missed}


def unquantized_nodes(model: onnx.ModelProto, nodes: tuple[str, ...]) -> list[str]:
    """Planned int8 nodes that read no DequantizeLinear output after quantization."""
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    by_name = {n.name: n for n in model.graph.node}
    return [name for name in nodes if name in by_name and not any(t in dequantized for t in by_name[name].input)]


def _require_ranges(model: onnx.ModelProto, nodes: tuple[str, ...], ranges: Mapping[str, TensorRange]) -> None:
    index = index_graph(model)
    wanted = set(nodes)
    missing = sorted({t for n in index.nodes if n.name in wanted for t in _ranged_inputs(index, n) if t not in ranges})
    if missing:
        raise CalibrationError(f"no calibrated range for {len(missing)} tensors that int8 nodes read, e.g. "
                               f"{missing[:5]}; calibrate this exact export (`quant calibrate`)")


def _ranged_inputs(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """The activations of an int8 node that need a calibrated range: a data-movement node's data inputs (its shape,
    starts or pads are integers), else the first two activation inputs (data, and a second operand)."""
    if node.op_type in DATA_MOVEMENT_OPS:
        return [t for t in data_inputs(node) if not index.is_constant(t)]
    return list(index.activation_inputs(node)[:2])


def build_int8_trt_qdq(
    model: onnx.ModelProto, plan: PrecisionPlan, ranges: Mapping[str, TensorRange], target: Path,
    per_channel: bool = True,
) -> dict[str, Any]:
    """int8 symmetric Q/DQ for TensorRT explicit quantization (weights per tensor unless `per_channel`); the result
    must pass onnx.checker and load in ORT before it is written.

    To simulate it on a CPU run it in ORT with optimization "basic": at "extended"/"all" ORT fuses the Q/DQ into
    its own int8 x int8 kernels, which on CPUs without VNNI saturate (WeNet encoder export: 36 dB vs FP32 at
    "basic", 11 dB at "all"), an ORT CPU artifact that TensorRT does not share."""
    named = ensure_node_names(model)
    sites = qdq_sites(named, plan)
    quantized = insert_qdq(named, sites, {name: r.amax for name, r in ranges.items()}, per_channel)
    save_validated(quantized, target)
    return {"per_channel": per_channel, "activation_sites": sum(not s.is_weight for s in sites),
            "simulate_with_ort_optimization": "basic", "weight_sites": sum(s.is_weight for s in sites),
            "layer_precisions": len(trt_layer_precisions(plan))}


def kernel_report(path: Path) -> dict[str, Any]:
    """Which ops of the built model ORT actually runs, and how many of them are integer kernels."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        optimized = ort_backend.optimized_graph(path, work)
    counts = ort_backend.op_counts(optimized)
    return {"integer_kernels": ort_backend.integer_kernel_counts(optimized), "optimized_op_counts": counts}


def check_int8_kernels(report: Mapping[str, Any], plan: PrecisionPlan) -> None:
    """An int8 plan with quantized nodes must show integer kernels in ORT's optimized graph."""
    wanted = len(plan.names("int8", "int8-dynamic"))
    if wanted and not report["integer_kernels"]:
        raise BuildError(f"{wanted} nodes were quantized but ONNX Runtime's optimized graph has no integer kernel "
                         f"(ops: {report['optimized_op_counts']}); the Q/DQ pattern did not fuse")


def streaming_states(model: onnx.ModelProto) -> dict[str, str]:
    graph = model.graph
    return state_pairs([i.name for i in graph.input], [o.name for o in graph.output])
