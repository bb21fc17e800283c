"""The shape of a results.json row and the values derived from one row (latency, task metric, ratios).

A row is one model x backend x precision:
    {"model", "kind": se|asr, "backend", "precision", "status": ok|failed|skipped, "error", "artifacts": {...},
     "task": {metric: value}, "speed": {graph: measure_graph result; quant run's entries also carry "interleaved" and
     their ratios "vs_fp32" / "vs_eager" (docs/architecture.md, results.json keys)}, "latency_ms": {...}, "rtf",
     "error_vs_fp32": {graph: {output: TensorError dict}},
     "per_utterance": {"ids": [...], metric: [...] | "<rate>_errors"/"<rate>_length": [...]},
     "budget": {"metric", "limit", "higher_is_better"} | null (the model spec's, for this precision),
     "primary": {"graph", "metric", "higher_is_better"} (the spec's first graph and first task metric)}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from quant.errors import ReportError

SCHEMA = 1
Row = Mapping[str, Any]

# model -> (primary graph for latency, primary task metric, higher is better, metric label) of the reference models,
# for results.json written before rows carried their "primary" (and the reference models' display order)
MODELS: dict[str, tuple[str, str, bool, str]] = {
    "dpcrn": ("dpcrn", "pesq_wb", True, "PESQ-WB"),
    "dpcrn-stream": ("dpcrn_stream", "pesq_wb", True, "PESQ-WB"),
    "wenet": ("encoder", "cer", False, "CER"),
}
TASK_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {  # key, header, format
    "se": (("pesq_wb", "PESQ-WB", ".3f"), ("pesq_nb", "PESQ-NB", ".3f"), ("stoi", "STOI", ".4f"),
           ("si_sdr", "SI-SDR dB", ".2f")),
    "asr": (("cer", "CER %", "pct"), ("wer", "WER %", "pct"), ("cer_greedy", "CER greedy %", "pct"),
            ("cer_real", "CER real %", "pct"), ("cer_synthetic", "CER synth %", "pct")),
}
# display unit of a metric stored as a fraction (error rates are shown in percentage points)
METRIC_SCALE = {"cer": 100.0, "wer": 100.0, "cer_greedy": 100.0, "wer_greedy": 100.0}
# fp32-plain: the FP32 build of the graph as exported, before the spec's rewrites; speed only (its accuracy is the
# fp32 row's: the rewrites are exact), timed beside the others so each "vs FP32" ratio divides by the faster FP32
PLAIN_FP32 = "fp32-plain"
# int8-searched: the INT8 build with `quant search` rules
PRECISION_ORDER = {"fp32": 0, PLAIN_FP32: 1, "fp16": 2, "int8": 3, "int8-searched": 4}
USUAL_BASES = ("ort fp32", "torch fp32")  # the rows "vs_fp32" / "vs_eager" divide by unless a faster FP32 ran
BACKEND_ORDER = {"torch": 0, "ort": 1, "trt-sim": 2, "trt": 3}


@dataclass(frozen=True)
class ResultRow:
    """One results.json row, typed; the field names are results.json's. The report reads rows as plain mappings
    (ResultRow.to_json()), so results.json written by older versions still renders."""

    model: str
    backend: str
    precision: str
    status: str  # ok | failed
    error: str | None = None
    kind: str | None = None  # se | asr (the spec's task)
    artifacts: Mapping[str, str] = field(default_factory=dict)  # graph stem -> file
    task: Mapping[str, Any] = field(default_factory=dict)  # mean task metrics
    per_utterance: Mapping[str, Any] = field(default_factory=dict)
    error_vs_fp32: Mapping[str, Any] = field(default_factory=dict)  # graph -> output -> TensorError dict
    speed: Mapping[str, Any] = field(default_factory=dict)  # graph -> measure_graph result
    latency_ms: Mapping[str, Any] | None = None  # the first graph's latency stats at 1 thread
    rtf: float | None = None
    budget: Mapping[str, Any] | None = None  # {"metric", "limit", "higher_is_better"} of the spec, this precision
    primary: Mapping[str, Any] | None = None  # {"graph", "metric", "higher_is_better"} of the spec
    spec: str | None = None  # the spec file the row was run from (the report re-runs SE examples through it)
    note: str | None = None  # what the row is when not an ordinary build (fp32-plain: speed only, and why)

    @classmethod
    def failed(cls, model: str, backend: str, precision: str, error: str) -> ResultRow:
        return cls(model, backend, precision, "failed", error)

    def to_json(self) -> dict[str, Any]:
        """The results.json row (a failed row: who failed and why, nothing else)."""
        head = {"model": self.model, "backend": self.backend, "precision": self.precision, "status": self.status,
                "error": self.error}
        if self.status != "ok":
            return head
        return {"model": self.model, "kind": self.kind, "backend": self.backend, "precision": self.precision,
                "status": self.status, "error": self.error, "artifacts": dict(self.artifacts), "task": dict(self.task),
                "per_utterance": dict(self.per_utterance), "error_vs_fp32": dict(self.error_vs_fp32),
                "speed": dict(self.speed), "latency_ms": self.latency_ms, "rtf": self.rtf, "budget": self.budget,
                "primary": self.primary, "spec": self.spec, **({"note": self.note} if self.note else {})}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ResultRow:
        """A row read back from results.json; keys the report derives on writing ("vs_fp32") are dropped."""
        names = {f.name for f in fields(cls)}
        missing = [key for key in ("model", "backend", "precision", "status") if key not in row]
        if missing:
            raise ReportError(f"results.json row {dict(row)!r:.80}: missing {missing}")
        return cls(**{key: value for key, value in row.items() if key in names})


def ok_rows(results: Mapping[str, Any]) -> list[Row]:
    return [row for row in results["rows"] if row.get("status") == "ok"]


def model_order(rows: Iterable[Row]) -> list[str]:
    """The models of `rows`: the reference models first, in their usual order, then the others by name."""
    present = {row["model"] for row in rows}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def timed_graphs(rows: Sequence[Row], model: str) -> tuple[str, ...]:
    """Every graph the model's ok rows timed (each graph of a chain, e.g. WeNet's encoder and decoder): the primary
    graph first, the others by name (stored results.json sorts keys, so their order is no information)."""
    timed = {graph for row in rows if row.get("status") == "ok" and row.get("model") == model
             for graph in row.get("speed") or {}}
    first = primary(rows, model).graph
    return ((first,) if first in timed else ()) + tuple(sorted(timed - {first}))


def sorted_rows(rows: Iterable[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                       BACKEND_ORDER.get(r["backend"], 9), PRECISION_ORDER.get(r["precision"], 9)))


def find_row(rows: Iterable[Row], model: str, backend: str, precision: str) -> Row | None:
    for row in rows:
        if (row["model"], row["backend"], row["precision"]) == (model, backend, precision) and row.get("status") == "ok":
            return row
    return None


def graph_latency(row: Row, graph: str, threads: str = "1", stat: str = "mean_ms") -> float | None:
    try:
        return float(row["speed"][graph]["threads"][threads]["latency_ms"][stat])
    except (KeyError, TypeError):
        return None


def batch_latency(row: Row, graph: str, batch: int) -> float | None:
    try:
        return float(row["speed"][graph]["batches"][str(batch)]["latency_ms"]["mean_ms"])
    except (KeyError, TypeError):
        return None


class Primary(NamedTuple):
    """What a model is timed and judged by: its first graph and its spec's first task metric."""

    graph: str
    metric: str
    higher_is_better: bool
    label: str


def primary(rows: Iterable[Row], model: str) -> Primary:
    """The "primary" a model's rows carry (from its spec); else the reference models' table (older results.json);
    else the model name as graph and no metric."""
    for row in rows:
        value = row.get("primary")
        if row.get("model") == model and isinstance(value, Mapping):
            metric = str(value["metric"])
            return Primary(str(value["graph"]), metric, bool(value["higher_is_better"]),
                           metric.upper().replace("_", "-"))
    return Primary(*MODELS[model]) if model in MODELS else Primary(model, "", True, "metric")


def primary_latency(row: Row, stat: str = "mean_ms") -> float | None:
    return graph_latency(row, primary([row], row["model"]).graph, "1", stat)


def interleaved_entry(row: Row | None, graph: str | None = None, threads: str = "1", batch: int | None = None
                      ) -> Mapping[str, Any] | None:
    """A timing entry of a row (the primary graph's at `threads`, or the batch sweep's at `batch`) when it was timed
    interleaved with the model's other rows: it then carries "interleaved" and its ratios ("vs_fp32", "vs_eager")."""
    if row is None:
        return None
    try:
        timing = row["speed"][graph or primary([row], row["model"]).graph]
        entry = timing["batches"][str(batch)] if batch is not None else timing["threads"][threads]
    except (KeyError, TypeError):
        return None
    return entry if isinstance(entry, Mapping) and isinstance(entry.get("interleaved"), Mapping) else None


def stored_ratio(row: Row | None, key: str, graph: str | None = None, threads: str = "1", batch: int | None = None
                 ) -> Mapping[str, Any] | None:
    """The interleaved ratio `key` ("vs_fp32", "vs_eager") a timing entry carries: min_ratio, median_ratio, the paired
    per-round ratio's paired_median / paired_p10 / paired_p90, and `reliable` (False: the p10-p90 spreads overlap and the paired p10-p90 straddles 1)."""
    entry = interleaved_entry(row, graph, threads, batch)
    value = entry.get(key) if entry is not None else None
    return value if isinstance(value, Mapping) else None


def ratio_text(stored: Mapping[str, Any], invert: bool = False) -> str:
    """"0.82x (min 0.80x; paired 0.78-0.86)" with "unreliable" appended when the spreads overlap and the base named
    when it is not the usual row (ratio_base); `invert`: the speed-up base / row instead."""
    def value(key: str) -> float:
        number = float(stored[key])
        return 1.0 / number if invert and number else number

    low, high = sorted((value("paired_p10"), value("paired_p90")))
    text = f"{value('median_ratio'):.2f}x (min {value('min_ratio'):.2f}x; paired {low:.2f}-{high:.2f})"
    text = text if stored.get("reliable") else f"{text} unreliable"
    base = ratio_base(stored)
    return f"{text} vs {base}" if base else text


def ratio_base(stored: Mapping[str, Any] | None) -> str | None:
    """The row a stored ratio divides by when it is not the usual one (USUAL_BASES): the plain export's FP32 where
    it was faster than the rewritten graph's; None otherwise (and for results.json that does not say)."""
    base = stored.get("base") if stored is not None else None
    return str(base) if base and base not in USUAL_BASES else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def task_value(row: Row, key: str) -> float | None:
    value = row.get("task", {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value is not None else None


def min_snr_db(row: Row) -> float | None:
    """Worst output SNR vs FP32 over every graph and output (None when no comparison or no error at all)."""
    values = [
        float(err["snr_db"])
        for outputs in (row.get("error_vs_fp32") or {}).values()
        for err in outputs.values()
        if isinstance(err, Mapping) and isinstance(err.get("snr_db"), (int, float))
    ]
    return min(values) if values else None


RowKey = tuple[str, str, str]


def row_key(row: Row) -> RowKey:
    return (row["model"], row["backend"], row["precision"])


def task_kind(rows: Iterable[Row]) -> str:
    """"se" or "asr": the "kind" a model's rows carry (its spec's task); results.json written before rows carried it
    knew only the reference models, where wenet was the ASR one."""
    for row in rows:
        if row.get("kind") in ("se", "asr"):
            return str(row["kind"])
        if row.get("model") == "wenet":
            return "asr"
    return "se"


def simulation_note(backend: str) -> str:
    """What a simulated backend's numbers are (empty for measured backends): the label results.md and .csv carry."""
    if backend != "trt-sim":
        return ""
    return ("a simulation of TensorRT's numerics, not a TensorRT measurement: ONNX Runtime on the CPU runs the ONNX "
            "TensorRT's explicit mode builds from (int8: model_trt_qdq.onnx, symmetric int8 Q/DQ kept as fake "
            "quantization; fp16: the FP16 model.onnx); accuracy and error vs FP32 only, no latency")
