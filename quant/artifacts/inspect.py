"""What `quant inspect` reports: per op type, how many nodes the rules put in which precision and why; for an
already quantized model, which ops read Q/DQ tensors and which became integer kernels in ORT's optimized graph."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import onnx

from quant.backends import ort as ort_backend
from quant.onnxgraph.graph import load_model, state_pairs
from quant.precision import PrecisionPlan, load_rules, plan

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class InspectReport:
    path: Path
    plan: PrecisionPlan
    quantized: bool
    qdq_inputs_by_op: Mapping[str, int]  # op type -> nodes reading at least one DequantizeLinear output
    integer_kernels: Mapping[str, int]
    float_ops_after_optimization: Mapping[str, int]

    def lines(self) -> list[str]:
        out = [f"{self.path}: {len(self.plan.decisions)} nodes, {self.plan.build} plan for {self.plan.backend}"]
        for op_type, counts in self.plan.summary().items():
            if op_type in QDQ_OPS:
                continue
            detail = ", ".join(f"{n} {label}" for label, n in counts.items())
            out.append(f"  {op_type:<24} {detail}")
        if self.quantized:
            out.append("quantized model:")
            out.append("  ops reading Q/DQ tensors: " + (_join(self.qdq_inputs_by_op) or "none"))
            out.append("  integer kernels after ORT optimization: " + (_join(self.integer_kernels) or "none"))
            out.append("  float compute ops after ORT optimization: "
                       + (_join(self.float_ops_after_optimization) or "none"))
        return out


def _join(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))


def inspect_model(path: str | Path, precision: str = "int8", rules: str | Path | None = None,
                  backend: str = "ort") -> InspectReport:
    file = Path(path)
    model = load_model(file)
    graph = model.graph
    states = state_pairs([i.name for i in graph.input], [o.name for o in graph.output])
    the_plan = plan(model, load_rules(rules), precision, backend, states or None)
    quantized = any(n.op_type in QDQ_OPS or n.op_type in ort_backend.INTEGER_KERNELS for n in graph.node)
    kernels: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    if quantized:
        with tempfile.TemporaryDirectory(prefix="quant-inspect-") as work:
            optimized = ort_backend.optimized_graph(file, work)
        counts = ort_backend.op_counts(optimized)
        kernels = ort_backend.integer_kernel_counts(optimized)
        float_ops = {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS}
    return InspectReport(file, the_plan, quantized, _qdq_readers(model), kernels, float_ops)


FLOAT_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "FusedConv", "FusedMatMul",
                               "FusedGemm", "Attention", "MultiHeadAttention"})


def _qdq_readers(model: onnx.ModelProto) -> dict[str, int]:
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    counts = Counter(n.op_type for n in model.graph.node
                     if n.op_type not in QDQ_OPS and any(t in dequantized for t in n.input))
    return dict(counts)
