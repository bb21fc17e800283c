"""Speed for the search: per-node kernel time from ONNX Runtime's profiler, attributed to units, and candidate
builds timed interleaved round-robin in one process (so machine load drifts hit every candidate alike)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from quant.backends.ort import OrtRunner
from quant.onnxgraph.graph import ensure_node_names
from quant.errors import ModelError
from quant.eval.profile import TENSOR_SUFFIXES, Feeds, export_names, node_times_ms
from quant.eval.speed import round_robin, stateless_step
from quant.search.units import Unit


__all__ = ["Feeds", "Latency", "interleaved_latency", "node_times_ms", "unit_times_ms"]

NCHWC_SUFFIX = "_nchwc"
QDQ_SUFFIXES = tuple(suffix for suffix in TENSOR_SUFFIXES if suffix != NCHWC_SUFFIX)
FUSED_CHAIN = 4  # Conv -> Add -> Relu is the longest chain ORT's NCHWc pass fuses (eval.profile.source_node)


@dataclass(frozen=True)
class Latency:
    min_ms: float
    median_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"min_ms": self.min_ms, "median_ms": self.median_ms, "runs": self.runs}


def unit_times_ms(times: Mapping[str, float], units: Iterable[Unit], model: onnx.ModelProto) -> dict[str, float]:
    """Kernel time per unit: its nodes by name (ORT keeps the name when it fuses DQ -> MatMul -> Q into an integer
    kernel, or adds to it: eval.profile.export_names, e.g. QLinearConv `<node>_token_<n>`, the dynamic quantizer's
    `<node>_quant`, an FP32 MatMul fused with its bias Add `<node>/MatMulAddFusion`), plus the nodes ORT names after a
    tensor the unit reads or writes (a tensor between two units counts for the first): the quantizer's
    `<tensor>_QuantizeLinear` / `_DequantizeLinear`. The NCHWc pass's float Conv is `<output>_nchwc` after the last op
    it fused (Conv -> Relu: the Relu's output, which the next unit reads): it counts for the unit found walking back
    from that output's producer through ops no unit owns (the WeNet encoder's embed conv.2 lost its 4.8 ms FP32
    kernel to nobody that way, and the profile's start kept it float: a build 3 ms slower). Anything else (layout
    reorders, float ops) is not a unit's."""
    unit_list = list(units)
    owners = {node: unit.name for unit in unit_list for node in unit.nodes}
    graph = ensure_node_names(model).graph
    producers = {tensor: node for node in graph.node for tensor in node.output}
    tensors: dict[str, str] = {}
    for node in graph.node:
        if node.name in owners:
            for tensor in list(node.input) + list(node.output):
                tensors.setdefault(tensor, owners[node.name])
    result = {unit.name: 0.0 for unit in unit_list}
    for name, ms in times.items():
        owner = next((owners[n] for n in export_names(name) if n in owners), None)
        if owner is None and name.endswith(NCHWC_SUFFIX):
            owner = _fused_owner(name.removesuffix(NCHWC_SUFFIX), owners, producers)
        for suffix in QDQ_SUFFIXES:
            if owner is None and name.endswith(suffix):
                owner = tensors.get(name[: -len(suffix)])
        if owner is not None:
            result[owner] += ms
    return result


def _fused_owner(tensor: str, owners: Mapping[str, str], producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """The unit of the nearest unit node behind `tensor`, through at most FUSED_CHAIN ops no unit owns (first
    inputs: ORT fuses a Conv's output into the activation / Add after it)."""
    node = producers.get(tensor)
    for _ in range(FUSED_CHAIN):
        if node is None:
            return None
        if node.name in owners:
            return owners[node.name]
        node = producers.get(node.input[0]) if node.input else None
    return None


def interleaved_latency(model_paths: Sequence[Path], feeds: Feeds, rounds: int = 20, calls: int = 3,
                        threads: int = 1) -> list[Latency]:
    """Open every model once and bind it to the feeds (eval.speed.stateless_step: checked once, only the graph's run
    timed), then time them round-robin (eval.speed.round_robin): in each round each model runs `calls` times (the
    round's mean is one sample); min and median over rounds, in the order given."""
    runners = [OrtRunner(path, threads=threads) for path in model_paths]
    for runner in runners:
        _missing = [n for n in runner.input_names if n not in feeds]
        if _missing:
            raise ModelError(f"{runner.path}: timing feeds lack inputs {_missing}")
    # keyed by position (two paths may name one file); binding runs each model once: the warm-up
    steps = {str(position): stateless_step(runner, feeds) for position, runner in enumerate(runners)}
    seconds = round_robin(steps, rounds, warmup=0, calls_per_round=calls)
    samples = [[sum(per_call[i : i + calls]) * 1000.0 / calls for i in range(0, len(per_call), calls)]
               for per_call in (seconds[str(position)] for position in range(len(runners)))]
    return [Latency(min(s), statistics.median(s), rounds) for s in samples]
