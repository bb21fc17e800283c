"""Time accounting: where a build's latency goes, per node and per op type, from ONNX Runtime's profiler; and, for an
FP32 / INT8 pair of the same export, how much of the FP32 time sits in ops that became integer kernels, so the best
INT8/FP32 ratio the current precision plan could reach.

ORT renames nodes while optimizing; each profiled node is traced back to the export's node it came from:
- the same name (ORT keeps a node's name when it fuses DequantizeLinear -> MatMul -> QuantizeLinear into
  QLinearMatMul), or that name plus `_token_<n>` (ORT's de-duplication suffix, e.g. QLinearConv),
- `<name>_quant` (ORT's dynamic quantizer: LSTM -> DynamicQuantizeLSTM),
- `<name>/<Transformer>Fusion` (a graph transformer's replacement: MatMulAddFusion turns an FP32 MatMul and its bias
  Add on 2-D inputs into one Gemm),
- `<tensor>_nchwc` (the NCHWc layout pass's float Conv, named after its output tensor).
Quantize/Dequantize and layout reorders/transposes inserted by ORT belong to no export node: they are the overhead
the INT8 build pays for moving between float and integer kernels.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from quant.backends.ort import INTEGER_KERNELS, make_session
from quant.errors import ModelError
from quant.onnxgraph.graph import load_model

Feeds = Mapping[str, np.ndarray]
KERNEL_SUFFIX = "_kernel_time"
# ORT nodes named after a tensor: the quantizer's Q/DQ, and the NCHWc layout pass's float Conv (`<output>_nchwc`)
TENSOR_SUFFIXES = ("_QuantizeLinear", "_DequantizeLinear", "_nchwc")
CONVERSION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput",
                            "ReorderOutput"})
_TOKEN = re.compile(r"_token_\d+$")
# a graph transformer's replacement node: `<node>/<Name>Fusion` (MatMulAddFusion: an FP32 MatMul and its bias Add on
# 2-D inputs as one Gemm, e.g. a streaming frame's Linear layer)
_FUSION = re.compile(r"/\w+Fusion$")
DYNAMIC_SUFFIX = "_quant"  # ORT's dynamic quantizer names a node's integer replacement <node>_quant


def export_names(name: str) -> tuple[str, ...]:
    """The export node names an ORT node's name may stand for: itself, or without ORT's de-duplication token, the
    dynamic quantizer's suffix or a fusion's suffix."""
    return name, _TOKEN.sub("", name), name.removesuffix(DYNAMIC_SUFFIX), _FUSION.sub("", name)


@dataclass(frozen=True)
class NodeTime:
    name: str  # the node's name in the graph ORT ran
    op_type: str  # the kernel ORT ran (QLinearConv, DynamicQuantizeLSTM, ...)
    ms: float  # median kernel time per run


@dataclass(frozen=True)
class GraphProfile:
    nodes: tuple[NodeTime, ...]
    total_ms: float  # median wall time of one whole session.run as the profiler saw it
    runs: int

    @property
    def node_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def by_op_type(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            out[node.op_type] = out.get(node.op_type, 0.0) + node.ms
        return dict(sorted(out.items(), key=lambda item: -item[1]))


def profile_graph(model_path: Path, feeds: Feeds, runs: int = 10, threads: int = 1) -> GraphProfile:
    """Median kernel time per run of every node ORT runs (after its fusions), plus the median whole-run time; one
    untimed warm-up run is excluded."""
    return profile_graphs([model_path], feeds, runs, threads)[0]


def profile_graphs(model_paths: Sequence[Path], feeds: Feeds, runs: int = 10, threads: int = 1) -> list[GraphProfile]:
    """profile_graph of several graphs whose runs alternate (one run of each per round), so a change of machine
    load during profiling hits all of them alike and their per-node ratios stay comparable."""
    with tempfile.TemporaryDirectory() as work:
        sessions, bound = [], []
        for index, path in enumerate(model_paths):
            session = make_session(path, threads, profile_prefix=Path(work) / f"profile{index}")
            names = [i.name for i in session.get_inputs()]
            missing = [n for n in names if n not in feeds]
            if missing:
                raise ModelError(f"{path}: profiling feeds lack inputs {missing}")
            sessions.append(session)
            bound.append({n: feeds[n] for n in names})
        for _ in range(runs + 1):
            for session, inputs in zip(sessions, bound):
                session.run(None, inputs)
        return [_read_trace(Path(session.end_profiling()), runs) for session in sessions]


def _read_trace(trace: Path, runs: int) -> GraphProfile:
    events = json.loads(trace.read_text())
    kernels: dict[str, list[float]] = {}
    op_types: dict[str, str] = {}
    whole: list[float] = []
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith(KERNEL_SUFFIX):
            node = name[: -len(KERNEL_SUFFIX)]
            kernels.setdefault(node, []).append(float(event["dur"]) / 1000.0)
            op_types[node] = str(event.get("args", {}).get("op_name", "?"))
        elif event.get("cat") == "Session" and name == "model_run":
            whole.append(float(event["dur"]) / 1000.0)
    # the first event of each node and of the session belongs to the warm-up run; the median over the runs, because
    # on a shared machine one preempted run moves a mean by more than the whole difference being accounted for
    nodes = tuple(NodeTime(node, op_types[node], float(np.median(times[1:])) if len(times) > 1 else times[0])
                  for node, times in kernels.items())
    total = float(np.median(whole[1:])) if len(whole) > 1 else sum(n.ms for n in nodes)
    return GraphProfile(nodes, total, runs)


def node_times_ms(model_path: Path, feeds: Feeds, runs: int = 10, threads: int = 1) -> dict[str, float]:
    """Median kernel time per run (ms) of every node of the graph ORT runs (after its fusions), by node name."""
    return {node.name: node.ms for node in profile_graph(model_path, feeds, runs, threads).nodes}


def source_node(name: str, op_type: str, nodes: set[str], producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """The export's node an ORT node came from, or None for conversions and ORT's own layout nodes. An NCHWc Conv
    is named after the output of what ORT fused into it (Conv -> Relu / Add): walk back to the Conv itself."""
    if op_type in CONVERSION_OPS:
        return None
    for candidate in export_names(name):
        if candidate in nodes:
            return candidate
    if name.endswith("_nchwc"):
        node = producers.get(name[: -len("_nchwc")])
        for _ in range(4):  # Conv -> Add -> Relu is the longest chain ORT fuses
            if node is None or node.op_type == op_type or not node.input:
                break
            node = producers.get(node.input[0])
        return node.name if node is not None and node.op_type == op_type else None
    return None


@dataclass(frozen=True)
class NodeRow:
    """One export node: its FP32 and INT8 kernel time and what ORT ran it as."""

    node: str
    fp32_op: str
    fp32_ms: float
    int8_op: str
    int8_ms: float

    @property
    def integer(self) -> bool:
        return self.int8_op in INTEGER_KERNELS

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "fp32_op": self.fp32_op, "fp32_ms": self.fp32_ms, "int8_op": self.int8_op,
                "int8_ms": self.int8_ms, "integer": self.integer}


@dataclass(frozen=True)
class ProfileComparison:
    """FP32 vs INT8 of one export. The ceilings keep every op that stays float at its FP32 time and count the
    INT8 build's conversions (Q/DQ, reorders) and ORT's extra layout nodes as free:
    - `ceiling_ratio`: integer-kernel ops at their measured INT8 kernel time;
    - `ceiling_free_ratio`: integer-kernel ops free (what no kernel speed-up can beat under this plan)."""

    fp32: GraphProfile
    int8: GraphProfile
    rows: tuple[NodeRow, ...]
    overhead_ms: float  # INT8 kernel time in no export node: Q/DQ, reorders, ORT's layout transposes

    @property
    def integer_fp32_ms(self) -> float:
        return sum(r.fp32_ms for r in self.rows if r.integer)

    @property
    def integer_int8_ms(self) -> float:
        return sum(r.int8_ms for r in self.rows if r.integer)

    @property
    def integer_share(self) -> float:
        """Share of FP32 kernel time in ops that run as integer kernels in the INT8 build."""
        return self.integer_fp32_ms / max(self.fp32.node_ms, 1e-12)

    @property
    def ratio(self) -> float:
        """INT8/FP32 of the profiled whole runs (one profiler run each: not the interleaved benchmark ratio)."""
        return self.int8.total_ms / max(self.fp32.total_ms, 1e-12)

    @property
    def ceiling_ratio(self) -> float:
        base = self.fp32.node_ms
        return (base - self.integer_fp32_ms + self.integer_int8_ms) / max(base, 1e-12)

    @property
    def ceiling_free_ratio(self) -> float:
        return 1.0 - self.integer_share

    def to_dict(self) -> dict[str, object]:
        return {
            "fp32": self.fp32.by_op_type(), "int8": self.int8.by_op_type(),
            "nodes": [r.to_dict() for r in sorted(self.rows, key=lambda r: -r.fp32_ms)],
            "fp32_total_ms": self.fp32.total_ms, "int8_total_ms": self.int8.total_ms,
            "fp32_node_ms": self.fp32.node_ms, "int8_node_ms": self.int8.node_ms,
            "int8_overhead_ms": self.overhead_ms, "integer_share": self.integer_share,
            "profiled_ratio": self.ratio, "ceiling_ratio": self.ceiling_ratio,
            "ceiling_free_ratio": self.ceiling_free_ratio, "runs": self.fp32.runs,
            "holdback": [part.to_dict() for part in holdback(self)],
        }


@dataclass(frozen=True)
class HoldbackPart:
    """One part of an INT8 build's whole-run time that is not an integer kernel, as a share of the FP32 whole run."""

    what: str  # "float <op type>", "Q/DQ and reorders", "outside kernels" (the whole run minus its kernels:
    # ORT's per-run and per-node dispatch, and on a busy machine the waits between kernels)
    ms: float  # per run, in the INT8 build
    share: float  # ms / the FP32 build's whole-run time: the parts and the integer kernels add up to the profiled ratio
    above_ceiling: float  # the part's share the ceiling does not count: conversions and outside kernels whole,
    # float ops only by what they cost beyond their FP32 time

    def to_dict(self) -> dict[str, object]:
        return {"what": self.what, "ms": self.ms, "share": self.share, "above_ceiling": self.above_ceiling}


def holdback(comparison: ProfileComparison) -> list[HoldbackPart]:
    """What holds an INT8 build's ratio up, largest first: the float ops by the op type ORT ran them as (what keeps
    the ceiling above zero), the conversions between float and integer kernels (Q/DQ, reorders, layout) and the
    run's time outside its kernels beyond the FP32 build's (both of which the ceiling counts free)."""
    base = max(comparison.fp32.total_ms, 1e-12)
    float_int8: dict[str, float] = {}
    float_fp32: dict[str, float] = {}
    for row in comparison.rows:
        if not row.integer:
            float_int8[row.int8_op] = float_int8.get(row.int8_op, 0.0) + row.int8_ms
            float_fp32[row.int8_op] = float_fp32.get(row.int8_op, 0.0) + row.fp32_ms
    parts = [HoldbackPart(f"float {op}", ms, ms / base, max(0.0, ms - float_fp32[op]) / base)
             for op, ms in float_int8.items() if op != "-"]
    parts.append(HoldbackPart("Q/DQ and reorders", comparison.overhead_ms, comparison.overhead_ms / base,
                              comparison.overhead_ms / base))
    run_cost = comparison.int8.total_ms - comparison.int8.node_ms
    # medians: a build's whole run can come out a little below the sum of its kernels; neither side goes below zero
    extra = min(max(run_cost, 0.0), max(0.0, run_cost - max(0.0, comparison.fp32.total_ms - comparison.fp32.node_ms)))
    parts.append(HoldbackPart("outside kernels", run_cost, run_cost / base, extra / base))
    return sorted(parts, key=lambda part: -part.ms)


def format_holdback(parts: Sequence[HoldbackPart], top: int = 4) -> str:
    """One line: the largest parts as shares of the FP32 run, e.g. `float GRU 0.41, Q/DQ and reorders 0.22 (+0.22)`
    (in brackets: the share above the ceiling)."""
    shown = [f"{part.what} {part.share:.2f}" + (f" (+{part.above_ceiling:.2f})" if part.above_ceiling >= 0.005 else "")
             for part in parts[:top]]
    return ", ".join(shown)


def compare_profiles(fp32: GraphProfile, int8: GraphProfile, source: onnx.ModelProto) -> ProfileComparison:
    """Attribute both profiles to the export's nodes (`source`: the FP32 graph both builds come from)."""
    names = {n.name for n in source.graph.node if n.name}
    producers = {out: n for n in source.graph.node for out in n.output}
    table: dict[str, dict[str, list[tuple[str, float]]]] = {}
    overhead = 0.0
    for label, profile in (("fp32", fp32), ("int8", int8)):
        for node in profile.nodes:
            owner = source_node(node.name, node.op_type, names, producers)
            if owner is None:
                if label == "int8":
                    overhead += node.ms
                continue
            table.setdefault(owner, {"fp32": [], "int8": []})[label].append((node.op_type, node.ms))
    rows = []
    for owner, parts in table.items():
        rows.append(NodeRow(owner, _main_op(parts["fp32"]), sum(ms for _, ms in parts["fp32"]),
                            _main_op(parts["int8"]), sum(ms for _, ms in parts["int8"])))
    return ProfileComparison(fp32, int8, tuple(rows), overhead)


def _main_op(parts: Sequence[tuple[str, float]]) -> str:
    """The op an export node ran as: its integer kernel if any, else its slowest kernel ('-' if it was fused away)."""
    for op, _ in parts:
        if op in INTEGER_KERNELS:
            return op
    return max(parts, key=lambda p: p[1])[0] if parts else "-"


def profile_pair(fp32_model: Path, int8_model: Path, feeds: Feeds, runs: int = 10,
                 threads: int = 1) -> ProfileComparison:
    """Profile an FP32 build and the INT8 build of the same export on the same feeds, their runs alternating."""
    source = load_model(fp32_model, external_data=False)
    fp32, int8 = profile_graphs([fp32_model, int8_model], feeds, runs, threads)
    return compare_profiles(fp32, int8, source)


def format_profile(comparison: ProfileComparison, top: int = 15) -> str:
    """Plain-text tables: per op type, the slowest export nodes, and the ceiling."""
    fp32, int8 = comparison.fp32.by_op_type(), comparison.int8.by_op_type()
    lines = [f"{'op type':<26}{'FP32 ms':>10}{'INT8 ms':>10}"]
    for op in sorted(set(fp32) | set(int8), key=lambda o: -max(fp32.get(o, 0.0), int8.get(o, 0.0))):
        lines.append(f"{op:<26}{_ms(fp32.get(op)):>10}{_ms(int8.get(op)):>10}")
    lines.append(f"{'sum of kernels':<26}{comparison.fp32.node_ms:>10.2f}{comparison.int8.node_ms:>10.2f}")
    lines.append(f"{'whole run':<26}{comparison.fp32.total_ms:>10.2f}{comparison.int8.total_ms:>10.2f}")
    lines.append("")
    lines.append(f"{'node':<44}{'FP32 op':<14}{'FP32 ms':>9}  {'INT8 op':<20}{'INT8 ms':>9}")
    for row in sorted(comparison.rows, key=lambda r: -r.fp32_ms)[:top]:
        lines.append(f"{row.node[-43:]:<44}{row.fp32_op:<14}{row.fp32_ms:>9.2f}  {row.int8_op:<20}{row.int8_ms:>9.2f}")
    lines.append(f"{'(INT8 conversions: Q/DQ, reorders, layout)':<44}{'':<14}{'':>9}  {'':<20}"
                 f"{comparison.overhead_ms:>9.2f}")
    lines.append("")
    lines.append(f"FP32 time in ops with integer kernels in the INT8 build: {100 * comparison.integer_share:.1f} %")
    lines.append(f"INT8/FP32 under the profiler {comparison.ratio:.2f} (it adds a cost per node, more nodes in INT8: the "
                 f"interleaved timing is the real ratio); ceiling {comparison.ceiling_ratio:.2f} (integer ops at "
                 f"their INT8 kernel time, other ops at FP32 time, conversions free); "
                 f"{comparison.ceiling_free_ratio:.2f} if integer ops were free")
    lines.append("What holds it, as shares of the FP32 run (in brackets: beyond the ceiling): "
                 + format_holdback(holdback(comparison), top=6))
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
