"""Explicit Q/DQ editing of ONNX graphs.

- unwrap_float_nodes: after ONNX Runtime's quantizer, a float node sitting between quantized neighbours still reads
  DequantizeLinear(QuantizeLinear(x)); rewire it to read x itself and drop Q/DQ pairs nobody reads any more.
- insert_qdq: TensorRT explicit quantization: symmetric int8 (zero point 0) Q/DQ on exactly the given sites,
  weights per-channel (float weight -> Q -> DQ, the layout TensorRT 8-10 parse), per tensor below opset 13.
- sort_topologically: ONNX Runtime's quantizer appends its Q/DQ after the nodes reading them; ORT sorts on load,
  but onnx.checker (which every built model passes before it is written) and other tools do not.
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quant.artifacts.calibration import INT8_MAX
from quant.calib.opset import MIN_QDQ_OPSET, default_opset
from quant.errors import BuildError, CalibrationError
from quant.precision import QdqSite

log = logging.getLogger(__name__)

MIN_AMAX = 1e-8


def unwrap_float_nodes(model: onnx.ModelProto, protected: Iterable[str], keep_outputs_of: Iterable[str] = ()) -> int:
    """Rewire protected nodes' inputs past activation Q/DQ pairs, in place. Returns the number of inputs rewired.

    Outputs of the nodes in `keep_outputs_of` (int8 kernels) stay quantized: ORT fuses DQ -> Conv -> Q into
    QLinearConv only with that Q, and a float consumer then reads the kernel's real (dequantized) int8 output."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    wanted, kept = set(protected), set(keep_outputs_of)
    rewired = 0
    for node in graph.node:
        if node.name not in wanted:
            continue
        for position, tensor in enumerate(node.input):
            source = _quantized_source(tensor, producers, initializers)
            origin = producers.get(source) if source is not None else None
            if source is not None and (origin is None or origin.name not in kept):
                node.input[position] = source
                rewired += 1
    _prune_dead(graph, ("DequantizeLinear", "QuantizeLinear"))
    return rewired


def _quantized_source(tensor: str, producers: Mapping[str, onnx.NodeProto], initializers: set[str]) -> str | None:
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers:
        return None
    return str(q.input[0])


def _prune_dead(graph: onnx.GraphProto, op_types: tuple[str, ...]) -> None:
    """Remove nodes of op_types whose outputs nobody reads (repeat until stable), and their orphaned initializers."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in op_types and not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def insert_qdq(model: onnx.ModelProto, sites: Iterable[QdqSite], amax: Mapping[str, float],
               per_channel: bool = True) -> onnx.ModelProto:
    """A copy of `model` with symmetric int8 Q/DQ at `sites`. Activation thresholds come from `amax`; weights get
    one scale per output channel, or one per tensor when not `per_channel` (all that opset < 13 can express)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    weights = {i.name: i for i in graph.initializer}
    if per_channel and default_opset(result) < MIN_QDQ_OPSET:
        raise BuildError(f"per-channel Q/DQ needs opset >= {MIN_QDQ_OPSET}, the model has {default_opset(result)}; "
                         f"upgrade it (quant.calib.opset.ensure_opset) or quantize weights per tensor")
    site_list = [s for s in sites if not s.is_weight or s.tensor in weights]
    missing = [s.tensor for s in site_list if not s.is_weight and not amax.get(s.tensor)]
    if missing:
        raise CalibrationError(f"no calibrated range for {len(missing)} tensors that int8 nodes read, e.g. "
                               f"{missing[:5]}; the cache must come from this exact export (`quant calibrate`)")
    new_nodes: list[onnx.NodeProto] = []
    for site in site_list:
        if site.is_weight:
            scale = _weight_scale(numpy_helper.to_array(weights[site.tensor]), site.axis or 0, per_channel)
        else:
            scale = np.array(max(float(amax[site.tensor]), MIN_AMAX) / INT8_MAX, dtype=np.float32)
        new_nodes += _qdq_pair(graph, site, scale)
    _rewire(graph, site_list)
    _insert_before_consumers(graph, new_nodes)
    return result


def _weight_scale(weight: np.ndarray, axis: int, per_channel: bool = True) -> np.ndarray:
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis or not per_channel)
    channel_amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    return (np.maximum(channel_amax, MIN_AMAX) / INT8_MAX).astype(np.float32)


def _qdq_pair(graph: onnx.GraphProto, site: QdqSite, scale: np.ndarray) -> list[onnx.NodeProto]:
    base = site.tensor
    scale_name, zero_name = f"{base}_qdq_scale", f"{base}_qdq_zero_point"
    graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    graph.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zero_name))
    axis: dict[str, Any] = {"axis": site.axis} if site.is_weight and scale.ndim == 1 else {}
    quant = helper.make_node("QuantizeLinear", [base, scale_name, zero_name], [f"{base}_quantized"],
                             name=f"{base}_QuantizeLinear", **axis)
    dequant = helper.make_node("DequantizeLinear", [f"{base}_quantized", scale_name, zero_name],
                               [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", **axis)
    return [quant, dequant]


def _rewire(graph: onnx.GraphProto, sites: list[QdqSite]) -> None:
    by_tensor = {s.tensor: set(s.consumers) for s in sites}
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            if tensor in by_tensor and node.name in by_tensor[tensor] and node.op_type not in (
                "QuantizeLinear", "DequantizeLinear"):
                node.input[position] = f"{tensor}_dequantized"


def _insert_before_consumers(graph: onnx.GraphProto, new_nodes: list[onnx.NodeProto]) -> None:
    """Keep the node list topologically sorted: each Q/DQ pair goes right before the first node reading it."""
    nodes = list(graph.node)
    pending = {n.output[0]: n for n in new_nodes if n.op_type == "DequantizeLinear"}
    quant_of = {n.output[0]: n for n in new_nodes if n.op_type == "QuantizeLinear"}
    ordered: list[onnx.NodeProto] = []
    for node in nodes:
        for tensor in node.input:
            dq = pending.pop(tensor, None)
            if dq is not None:
                ordered += [quant_of[dq.input[0]], dq]
        ordered.append(node)
    for dq in pending.values():
        ordered += [quant_of[dq.input[0]], dq]
    del graph.node[:]
    graph.node.extend(ordered)


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph`'s nodes, in place, so each follows the producers of what it reads (tensors its subgraphs read
    from the outer graph included), keeping the given order wherever it is already valid."""
    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[t] for t in _reads(node) if t in producer} - {index} for index, node in enumerate(nodes)]
    readers: dict[int, list[int]] = defaultdict(list)
    for index, deps in enumerate(needs):
        for dep in deps:
            readers[dep].append(index)
    waiting = [len(deps) for deps in needs]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)  # the earliest ready node first: the given order where it is valid
        order.append(index)
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        stuck = [nodes[i].name for i in range(len(nodes)) if waiting[i]][:5]
        raise BuildError(f"graph {graph.name!r} has a cycle through nodes {stuck}")
    del graph.node[:]
    graph.node.extend(nodes[index] for index in order)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Tensor names `node` reads, those read inside its subgraphs (If/Loop/Scan bodies) included."""
    names = {t for t in node.input if t}
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            names.update(t for inner in body.node for t in _reads(inner))
    return names
