"""results.json is the single source; results.md, results.csv and tradeoff.png are rendered from it.

A row is one model x backend x precision:
    {"model", "backend", "precision", "status": ok|failed|skipped, "error", "artifacts": [...],
     "task": {metric: value}, "speed": {graph: measure_graph result}, "latency_ms": {...}, "rtf",
     "error_vs_fp32": {graph: {output: TensorError dict}},
     "per_utterance": {"ids": [...], metric: [...] | "<rate>_errors"/"<rate>_length": [...]}}
Ratios (vs FP32 ONNX Runtime, vs PyTorch eager) and the issue's goals are derived here. Each row's accuracy change
against its FP32 reference (paired over utterances, 95 % bootstrap interval: quant.eval.stats) is derived here too;
write_results stores it in results.json as the row's "vs_fp32" for other tools, but rendering always recomputes it
from the per-utterance columns (seeded, so identical).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from quant.errors import ReportError
from quant.eval import stats
from quant.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA = 1
Row = Mapping[str, Any]

# model -> (primary graph for latency, primary task metric, higher is better, metric label)
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
# How much a precision may lose against FP32, in the primary metric's display units (PESQ-WB, CER points).
ACCURACY_BUDGETS: dict[tuple[str, str], float] = {
    ("dpcrn", "int8"): 0.05, ("dpcrn", "fp16"): 0.01, ("dpcrn-stream", "int8"): 0.05,
    ("dpcrn-stream", "fp16"): 0.01, ("wenet", "int8"): 0.3, ("wenet", "fp16"): 0.05,
}
# display unit of a metric stored as a fraction (error rates are shown in percentage points)
METRIC_SCALE = {"cer": 100.0, "wer": 100.0, "cer_greedy": 100.0, "wer_greedy": 100.0}
CHANGE_METRICS: dict[str, tuple[tuple[str, str, bool, str], ...]] = {  # key, label, higher is better, format
    "se": (("pesq_wb", "PESQ-WB", True, "+.3f"), ("pesq_nb", "PESQ-NB", True, "+.3f"),
           ("stoi", "STOI", True, "+.4f"), ("si_sdr", "SI-SDR dB", True, "+.2f")),
    "asr": (("cer", "CER pts", False, "+.2f"), ("wer", "WER pts", False, "+.2f"),
            ("cer_greedy", "CER greedy pts", False, "+.2f")),
}
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
BACKEND_ORDER = {"torch": 0, "ort": 1, "trt-sim": 2, "trt": 3}


# ------------------------------------------------------------------------------------------------ read / write


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{file}: no results file; run `quant run` first") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{file}: not valid JSON ({error}); delete it and run `quant run` again") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ReportError(f"{file}: expected an object with a 'rows' list (schema {SCHEMA})")
    return results


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json and render results.md, results.csv and tradeoff.png beside it (all atomically)."""
    folder = Path(out_dir)
    clean = _finite(with_comparisons(results))
    paths = {"json": atomic_write_json(folder / "results.json", clean)}
    paths.update(render(clean, folder))
    return paths


def render(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    folder = Path(out_dir)
    return {
        "md": atomic_write_text(folder / "results.md", render_markdown(results)),
        "csv": atomic_write_text(folder / "results.csv", render_csv(results)),
        "png": atomic_write_bytes(folder / "tradeoff.png", render_plot(results)),
    }


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as null (a perfect SNR is reported as null = no error)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ derived values


def ok_rows(results: Mapping[str, Any]) -> list[Row]:
    return [row for row in results["rows"] if row.get("status") == "ok"]


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


def primary_latency(row: Row, stat: str = "mean_ms") -> float | None:
    graph = MODELS.get(row["model"], (row["model"],))[0]
    return graph_latency(row, graph, "1", stat)


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


# ------------------------------------------------------------------------------------------------ paired changes

RowKey = tuple[str, str, str]


def row_key(row: Row) -> RowKey:
    return (row["model"], row["backend"], row["precision"])


def reference_row(row: Row, rows: Sequence[Row]) -> Row | None:
    """The FP32 row a row's accuracy is compared with: the same backend's FP32 row, else ONNX Runtime's, else
    PyTorch eager's (so a backend without FP32 rows, added later, is still compared); FP32 rows are references."""
    if row["precision"] == "fp32":
        return None
    for backend in (row["backend"], "ort", "torch"):
        reference = find_row(rows, row["model"], backend, "fp32")
        if reference is not None:
            return reference
    return None


def budget_for(model: str, precision: str) -> stats.Budget | None:
    """The primary metric's budget in its stored units (CER as a fraction); None when none is set."""
    limit = ACCURACY_BUDGETS.get((model, precision))
    if limit is None or model not in MODELS:
        return None
    _, metric, higher, _ = MODELS[model]
    return stats.Budget(limit / METRIC_SCALE.get(metric, 1.0), higher)


@dataclass(frozen=True)
class Comparison:
    """A row's paired accuracy changes against its FP32 reference row, and the primary metric's budget verdict."""

    reference: Row
    changes: Mapping[str, stats.Change]  # metric -> change in the metric's stored units
    verdict: stats.Verdict | None  # None: no budget for this precision

    def to_dict(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for key, change in self.changes.items():  # the verdict was judged on the primary metric's change object
            judged = self.verdict if self.verdict and self.verdict.change is change else None
            metrics[key] = judged.to_dict() if judged else {**change.to_dict(), "budget": None, "verdict": None,
                                                             "n_to_tell": None}
        return {"reference": f"{self.reference['backend']} {self.reference['precision']}", "metrics": metrics}


def compare(row: Row, rows: Sequence[Row]) -> Comparison | None:
    """Paired changes of every metric both rows have per-utterance results for; None without a reference."""
    reference = reference_row(row, rows)
    if reference is None:
        return None
    ref_columns, columns = reference.get("per_utterance") or {}, row.get("per_utterance") or {}
    changes = {}
    try:
        for key, _, higher, _ in CHANGE_METRICS[task_kind(row["model"])]:
            before, after = stats.from_columns(ref_columns, key), stats.from_columns(columns, key)
            if before is not None and after is not None:
                changes[key] = stats.paired_change(before, after, higher)
    except ReportError as error:  # a hand-edited or merged results.json: report the rest
        logger.warning("%s %s %s vs FP32: %s", *row_key(row), error)
        return None
    if not changes:
        return None
    budget = budget_for(row["model"], row["precision"])
    primary = MODELS.get(row["model"], ("", "", True, ""))[1]
    verdict = stats.judge(changes[primary], budget) if budget and primary in changes else None
    return Comparison(reference, changes, verdict)


def comparisons(results: Mapping[str, Any]) -> dict[RowKey, Comparison]:
    rows = ok_rows(results)
    found = {row_key(row): compare(row, rows) for row in rows}
    return {key: comparison for key, comparison in found.items() if comparison is not None}


def with_comparisons(results: Mapping[str, Any]) -> dict[str, Any]:
    """results with each compared row's "vs_fp32" (what results.json stores for other tools)."""
    found = comparisons(results)
    rows = []
    for row in results["rows"]:
        comparison = found.get(row_key(row)) if row.get("status") == "ok" else None
        rows.append({**row, "vs_fp32": comparison.to_dict()} if comparison else dict(row))
    return {**results, "rows": rows}


def change_metric(key: str) -> tuple[str, bool, str]:
    """(label, higher is better, format) of a compared metric."""
    for metrics in CHANGE_METRICS.values():
        for name, label, higher, fmt in metrics:
            if name == key:
                return label, higher, fmt
    return key, True, "+.3f"


def format_change(change: stats.Change | None, key: str) -> str:
    """'+0.048 [-0.010, +0.100] n=40, 45 % worse' in the metric's display units."""
    if change is None:
        return "-"
    scale, fmt = METRIC_SCALE.get(key, 1.0), change_metric(key)[2]
    return (f"{format(scale * change.delta, fmt)} [{format(scale * change.ci_low, fmt)}, "
            f"{format(scale * change.ci_high, fmt)}] n={change.n}, {100 * change.share_worse:.0f} % worse")


def verdict_text(verdict: stats.Verdict) -> str:
    if verdict.verdict != stats.CANNOT_TELL:
        return verdict.verdict
    if verdict.n_to_tell is None:
        return f"cannot tell at n={verdict.change.n}: the change sits on the budget line"
    return f"cannot tell at n={verdict.change.n}; about {verdict.n_to_tell} utterances would tell"


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float | None
    target: str
    met: bool | None  # None: not measured, or (accuracy) the interval straddles the budget
    interval: str = ""  # accuracy goals: the change with its 95 % interval, n and share worse
    verdict: str = ""  # accuracy goals: within budget / over budget / cannot tell ... (and why)

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.name, "measured": self.measured, "target": self.target, "met": self.met,
                "interval": self.interval, "verdict": self.verdict}

    @property
    def met_text(self) -> str:
        if self.verdict:
            return {stats.WITHIN: "yes (within budget)", stats.OVER: "NO (over budget)"}.get(self.verdict,
                                                                                         self.verdict)
        return "n/a" if self.met is None else ("yes" if self.met else "NO")


def _ratio_goal(name: str, value: float | None, limit: float) -> Goal:
    return Goal(name, value, f"<= {limit:g}x", None if value is None else value <= limit)


def _budget_target(limit: float, unit: str, higher_is_better: bool) -> str:
    if higher_is_better:
        return f">= -{limit:g}{unit} (drop at most {limit:g})"
    return f"<= +{limit:g}{unit} (rise at most {limit:g})"


def goals(results: Mapping[str, Any], changes: Mapping[RowKey, Comparison] | None = None) -> list[Goal]:
    """The issue's speed and accuracy goals, evaluated from one results.json (one run, one machine); accuracy
    budgets are judged on the paired 95 % interval of the change (`changes`: comparisons(results), reused)."""
    rows = ok_rows(results)
    out: list[Goal] = []
    speed_goals = (("dpcrn-stream", "dpcrn_stream", 0.6, "streaming DPCRN INT8 / FP32 per frame (ORT)"),
                   ("dpcrn", "dpcrn", 0.55, "offline DPCRN INT8 / FP32 (ORT)"))
    for model, graph, limit, name in speed_goals:
        fp32, int8 = find_row(rows, model, "ort", "fp32"), find_row(rows, model, "ort", "int8")
        value = ratio(graph_latency(int8, graph) if int8 else None, graph_latency(fp32, graph) if fp32 else None)
        out.append(_ratio_goal(name, value, limit))
    fp32, int8 = find_row(rows, "wenet", "ort", "fp32"), find_row(rows, "wenet", "ort", "int8")
    for batch in (1, 8):
        value = ratio(batch_latency(int8, "encoder", batch) if int8 else None,
                      batch_latency(fp32, "encoder", batch) if fp32 else None)
        out.append(_ratio_goal(f"WeNet encoder INT8 / FP32 at batch {batch} (ORT)", value, 0.5))
    for row in (r for r in sorted_rows(rows) if r["backend"] == "ort"):
        eager = find_row(rows, row["model"], "torch", "fp32")
        value = ratio(primary_latency(eager) if eager else None, primary_latency(row))
        out.append(Goal(f"{row['model']} ORT {row['precision']} speed-up vs PyTorch eager", value, ">= 2x",
                        None if value is None else value >= 2.0))
    out.extend(_accuracy_goals(rows, comparisons(results) if changes is None else changes))
    return out


def _accuracy_goals(rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[Goal]:
    """One goal per budget and backend row at that precision (ONNX Runtime always, as 'not measured' if absent)."""
    out = []
    for (model, precision), limit in ACCURACY_BUDGETS.items():
        _, metric, higher, label = MODELS[model]
        backends = [r["backend"] for r in sorted_rows(rows) if r["model"] == model and r["precision"] == precision]
        for backend in backends if "ort" in backends else ["ort", *backends]:
            name = f"{model} {backend.upper()} {precision} {label} change vs FP32 ({precision} - fp32)"
            row = find_row(rows, model, backend, precision)
            comparison = changes.get(row_key(row)) if row else None
            out.append(_change_goal(name, metric, row, rows, comparison, stats.Budget(limit, higher)))
    return out


def _change_goal(name: str, metric: str, row: Row | None, rows: Sequence[Row], comparison: Comparison | None,
                 budget: stats.Budget) -> Goal:
    """Judged on the interval when per-utterance results exist; else the point change, not judged. `budget` is in
    display units (CER points)."""
    scale = METRIC_SCALE.get(metric, 1.0)
    target = _budget_target(budget.limit, " CER points" if metric == "cer" else "", budget.higher_is_better)
    if comparison is not None and comparison.verdict is not None:
        verdict = comparison.verdict
        met = {stats.WITHIN: True, stats.OVER: False}.get(verdict.verdict)
        return Goal(name, scale * verdict.change.delta, target, met, format_change(verdict.change, metric),
                    verdict_text(verdict))
    reference = reference_row(row, rows) if row else None
    if row is None or reference is None or task_value(row, metric) is None or task_value(reference, metric) is None:
        return Goal(name, None, target, None)
    delta = scale * (float(task_value(row, metric)) - float(task_value(reference, metric)))  # type: ignore[arg-type]
    return Goal(name, delta, target, None,
                verdict="not judged: no paired per-utterance results (see the log); run `quant run` again")


# ------------------------------------------------------------------------------------------------ markdown / csv


def _fmt(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "pct":
        return f"{100 * value:.2f}"
    if fmt == "x":
        return f"{value:.2f}x"
    return format(value, fmt)


def task_kind(model: str) -> str:
    return "asr" if model == "wenet" else "se"


def _model_table(model: str, rows: Sequence[Row], all_rows: Sequence[Row]) -> list[str]:
    columns = TASK_COLUMNS[task_kind(model)]
    graph = MODELS.get(model, (model,))[0]
    header = ["backend", "precision", *[c[1] for c in columns], "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms",
              "mean ms (2 thr)", "RTF", "vs FP32 ORT", "vs eager", "min SNR vs FP32 dB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fp32 = find_row(all_rows, model, "ort", "fp32")
    eager = find_row(all_rows, model, "torch", "fp32")
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['backend']} | {row['precision']} | {row.get('status')}: "
                         f"{_one_line(row.get('error'))} |" + " |" * (len(header) - 3))
            continue
        mean = primary_latency(row)
        cells = [row["backend"], row["precision"], *[_fmt(task_value(row, key), fmt) for key, _, fmt in columns],
                 _fmt(primary_latency(row, "runs"), ".0f"),
                 *[_fmt(primary_latency(row, s), ".3f") for s in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")],
                 _fmt(graph_latency(row, graph, "2"), ".3f"), _fmt(row.get("rtf"), ".4f"),
                 _fmt(ratio(mean, primary_latency(fp32) if fp32 else None), "x"),
                 _fmt(ratio(mean, primary_latency(eager) if eager else None), "x"), _fmt(min_snr_db(row), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _one_line(text: object) -> str:
    return " ".join(str(text or "").split())[:160].replace("|", "/")


def _throughput_table(rows: Sequence[Row], graph: str) -> list[str]:
    batches = sorted({int(b) for row in rows for b in (row.get("speed", {}).get(graph, {}).get("batches") or {})})
    if not batches:
        return []
    lines = [f"\n{graph} throughput (utterances/s, 1 thread; mean ms per batch in brackets)\n",
             "| backend | precision | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for row in rows:
        sweep = row.get("speed", {}).get(graph, {}).get("batches") or {}
        cells = []
        for batch in batches:
            entry = sweep.get(str(batch))
            cells.append(f"{entry['items_per_s']:.1f} ({entry['latency_ms']['mean_ms']:.1f})" if entry else "-")
        lines.append(f"| {row['backend']} | {row['precision']} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    all_rows = sorted_rows(results["rows"])
    changes = comparisons(results)
    lines = ["# quant results", ""]
    env = results.get("environment") or {}
    if env:
        lines.append(_environment_line(env))
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`.")
    lines.append("Latency: one batch-1 run of the unit below after warm-up, 1 thread unless noted; "
                 "RTF = processing time / audio duration; ratios are mean latency against the same model's "
                 "FP32 ONNX Runtime and PyTorch eager rows of this run.")
    for model in [m for m in MODELS if any(r["model"] == m for r in all_rows)] + sorted(
        {r["model"] for r in all_rows} - set(MODELS)
    ):
        rows = [r for r in all_rows if r["model"] == model]
        lines += ["", f"## {model}", "", _unit_line(rows, model), ""]
        lines += _model_table(model, rows, all_rows)
        if any(r["backend"] == "trt-sim" for r in rows):
            lines += ["", f"trt-sim rows: {simulation_note('trt-sim')}."]
        lines += _noisy_line(rows)
        lines += _change_table(model, rows, changes)
        if model == "wenet":
            timed = [r for r in rows if r.get("status") == "ok" and r.get("speed")]
            lines += _throughput_table(timed, "encoder")
            lines += _throughput_table(timed, "decoder")
            lines += _decoder_latency_lines(timed)
    lines += ["", "## Goals", "", "Accuracy budgets are judged on the 95 % interval of the paired change: within "
              "budget when the whole interval is on the allowed side, over budget when it is wholly beyond it.", "",
              "| goal | measured | target | met |", "|---|---|---|---|"]
    for goal in goals(results, changes):
        lines.append(f"| {goal.name} | {goal.interval or _fmt(goal.measured, '.3f')} | {goal.target} "
                     f"| {goal.met_text} |")
    return "\n".join(lines) + "\n"


def simulation_note(backend: str) -> str:
    """What a simulated backend's numbers are (empty for measured backends): the label results.md and .csv carry."""
    if backend != "trt-sim":
        return ""
    return ("a simulation of TensorRT's numerics, not a TensorRT measurement: ONNX Runtime on the CPU runs the ONNX "
            "TensorRT's explicit mode builds from (int8: model_trt_qdq.onnx, symmetric int8 Q/DQ kept as fake "
            "quantization; fp16: the FP16 model.onnx); accuracy and error vs FP32 only, no latency")


def _environment_line(env: Mapping[str, Any]) -> str:
    machine = f"{env.get('cpu', 'unknown CPU')} ({env.get('cores', '?')} cores)"
    if env.get("load_average_at_start") is not None:
        machine += f", 1-minute load average {env['load_average_at_start']:.2f} at the start"
    tools = ", ".join(f"{k} {v}" for k, v in sorted(env.items())
                      if k not in ("cpu", "cores", "load_average_at_start"))
    return f"Measured in one run on {machine}; {tools}."


def _unit_line(rows: Sequence[Row], model: str) -> str:
    graph = MODELS.get(model, (model,))[0]
    for row in rows:
        unit = row.get("speed", {}).get(graph, {}).get("unit")
        if unit:
            return f"Latency unit: {unit} ({graph} graph)."
    return "No speed measured."


def _noisy_line(rows: Sequence[Row]) -> list[str]:
    """The unprocessed noisy input's scores (same for every row of an SE model), as the baseline to beat."""
    for row in rows:
        task = row.get("task") or {}
        if row.get("status") == "ok" and "noisy_pesq_wb" in task:
            parts = [f"{label} {_fmt(task_value(row, 'noisy_' + key), fmt)}" for key, label, fmt in TASK_COLUMNS["se"]]
            return ["", f"Noisy input (no enhancement), {task.get('utterances', '?')} utterances: " + ", ".join(parts)]
    return []


def _change_table(model: str, rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[str]:
    """Each compared row's change vs its FP32 row: change [95 % interval] n, share of utterances worse."""
    compared = [(row, changes[row_key(row)]) for row in rows if row.get("status") == "ok" and row_key(row) in changes]
    if not compared:
        return []
    metrics = [key for key, _, _, _ in CHANGE_METRICS[task_kind(model)]
               if any(key in comparison.changes for _, comparison in compared)]
    header = ["backend", "precision", "vs", *[change_metric(key)[0] for key in metrics], "budget", "verdict"]
    lines = ["", "Accuracy change vs FP32, paired over the same utterances: change [95 % bootstrap interval] "
             "n utterances, share of utterances worse (CER/WER in percentage points)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, comparison in compared:
        verdict = comparison.verdict
        budget = "-" if verdict is None else format(METRIC_SCALE.get(MODELS[model][1], 1.0) * verdict.budget.line,
                                                    "+g")
        cells = [row["backend"], row["precision"], f"{comparison.reference['backend']} fp32",
                 *[format_change(comparison.changes.get(key), key) for key in metrics], budget,
                 verdict_text(verdict) if verdict else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _decoder_latency_lines(rows: Sequence[Row]) -> list[str]:
    lines = ["", "decoder (attention rescoring, beam 10) batch-1 latency, ms: "
             + ", ".join(f"{r['backend']} {r['precision']} {_fmt(graph_latency(r, 'decoder'), '.2f')}" for r in rows)]
    return lines


CSV_FIELDS = ["model", "backend", "precision", "status", "pesq_wb", "pesq_nb", "stoi", "si_sdr", "cer", "wer",
              "cer_greedy", "wer_greedy", "cer_real", "cer_synthetic", "latency_min_ms", "latency_mean_ms",
              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "latency_runs",
              "latency_mean_ms_2_threads", "rtf", "ratio_vs_fp32_ort", "ratio_vs_eager", "min_snr_db_vs_fp32",
              # the primary metric's paired change vs the FP32 row `compared_with`, in the metric's stored units
              "compared_with", "change_metric", "delta", "ci_low", "ci_high", "n", "share_worse", "budget",
              "verdict", "n_to_tell", "simulation", "error"]


def render_csv(results: Mapping[str, Any]) -> str:
    rows = sorted_rows(results["rows"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    changes = comparisons(results)
    for row in rows:
        out = _csv_row(row, rows)
        if row_key(row) in changes and row.get("status") == "ok":
            out.update(_csv_change(row["model"], changes[row_key(row)]))
        writer.writerow(out)
    return buffer.getvalue()


def _csv_row(row: Row, rows: Sequence[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {key: row.get(key, "") for key in ("model", "backend", "precision", "status")}
    out["error"] = _one_line(row.get("error"))
    out["simulation"] = simulation_note(str(row.get("backend")))
    if row.get("status") != "ok":
        return out
    for key in ("pesq_wb", "pesq_nb", "stoi", "si_sdr", "cer", "wer", "cer_greedy", "wer_greedy", "cer_real",
                "cer_synthetic"):
        out[key] = _num(task_value(row, key))
    for stat in ("min", "mean", "p50", "p90", "p99", "max"):
        out[f"latency_{stat}_ms"] = _num(primary_latency(row, f"{stat}_ms"))
    out["latency_runs"] = _num(primary_latency(row, "runs"))
    graph = MODELS.get(row["model"], (row["model"],))[0]
    out["latency_mean_ms_2_threads"] = _num(graph_latency(row, graph, "2"))
    out["rtf"] = _num(row.get("rtf"))
    fp32, eager = find_row(rows, row["model"], "ort", "fp32"), find_row(rows, row["model"], "torch", "fp32")
    out["ratio_vs_fp32_ort"] = _num(ratio(primary_latency(row), primary_latency(fp32) if fp32 else None))
    out["ratio_vs_eager"] = _num(ratio(primary_latency(row), primary_latency(eager) if eager else None))
    out["min_snr_db_vs_fp32"] = _num(min_snr_db(row))
    return out


def _csv_change(model: str, comparison: Comparison) -> dict[str, Any]:
    metric = MODELS.get(model, ("", "", True, ""))[1]
    change = comparison.changes.get(metric)
    if change is None:
        return {}
    verdict = comparison.verdict
    return {"compared_with": f"{comparison.reference['backend']} fp32", "change_metric": metric,
            "delta": _num(change.delta), "ci_low": _num(change.ci_low), "ci_high": _num(change.ci_high),
            "n": change.n, "share_worse": _num(change.share_worse),
            "budget": _num(verdict.budget.line) if verdict else "", "verdict": verdict.verdict if verdict else "",
            "n_to_tell": verdict.n_to_tell if verdict and verdict.n_to_tell else ""}


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


# ------------------------------------------------------------------------------------------------ plot


PLOT_AXIS = {"pesq_wb": "PESQ-WB (MOS-LQO)", "cer": "CER, %"}
MARKERS = {"torch": "s", "ort": "o", "trt": "^"}
COLORS = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red"}
# label offsets (points) tried in turn around a marker: beside it first, then further up and down
LABEL_OFFSETS = [(dx, dy) for dy in (5, -13, 17, -25, 29, -37, 41, -49) for dx in (6, -6)]


@dataclass(frozen=True)
class PlotPoint:
    x: float
    y: float  # the row's value, display units
    low: float  # the row's FP32 reference value + the 95 % interval of the paired change (y itself when none)
    high: float
    label: str
    marker: str
    color: str


def plot_points(model: str, rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[PlotPoint]:
    """A row's mean with, as its error bar, its FP32 reference's mean plus the paired change's interval: the
    uncertainty that matters when choosing a precision (the unpaired spread over utterances would hide it)."""
    metric = MODELS[model][1]
    scale = METRIC_SCALE.get(metric, 1.0)
    points = []
    for row in rows:
        x, y = primary_latency(row), task_value(row, metric)
        if x is None or y is None:
            continue
        low = high = y
        comparison = changes.get(row_key(row))
        change = comparison.changes.get(metric) if comparison else None
        reference = task_value(comparison.reference, metric) if comparison else None
        if change is not None and reference is not None:
            low, high = reference + change.ci_low, reference + change.ci_high
        points.append(PlotPoint(x, scale * y, scale * low, scale * high, f"{row['backend']} {row['precision']}",
                                MARKERS.get(row["backend"], "x"), COLORS.get(row["precision"], "k")))
    return points


def reference_lines(model: str, rows: Sequence[Row]) -> list[tuple[float, str, str]]:
    """(value, label, line style): the FP32 ONNX Runtime row and, for enhancement, the unprocessed noisy input."""
    metric = MODELS[model][1]
    scale = METRIC_SCALE.get(metric, 1.0)
    lines = []
    fp32 = find_row(rows, model, "ort", "fp32")
    if fp32 is not None and task_value(fp32, metric) is not None:
        lines.append((scale * float(task_value(fp32, metric)), "FP32 (ORT)", ":"))  # type: ignore[arg-type]
    noisy = next((task_value(r, f"noisy_{metric}") for r in rows if task_value(r, f"noisy_{metric}") is not None),
                 None)
    if noisy is not None:
        lines.append((scale * noisy, "noisy input (no enhancement)", "--"))
    return lines


def metric_limits(points: Sequence[PlotPoint], references: Sequence[float], error_rate: bool) -> tuple[float, float]:
    """An honest metric axis: it spans every interval and reference line (error rates from 0), padded, and is
    never narrower than a tenth of its top value, so a tiny difference does not fill the panel."""
    values = [v for p in points for v in (p.low, p.high)] + list(references) + ([0.0] if error_rate else [])
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    span = max(high - low, 0.1 * abs(high), 1e-6)
    widen = (span - (high - low)) / 2 + 0.08 * span  # to the minimum span, centred, plus a margin
    return (0.0 if error_rate else low - widen), high + widen


def place_labels(ax: Any, points: Sequence[PlotPoint]) -> list[Any]:
    """Annotate each point at the first offset whose text box stays inside the axes and overlaps no marker, legend
    or earlier label (greedy; the figure must be laid out already). Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    taken = [_marker_box(ax, p) for p in points]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    annotations = []
    for point in sorted(points, key=lambda p: (p.x, -p.y)):
        for dx, dy in LABEL_OFFSETS:
            note = ax.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(dx, dy),
                               ha="left" if dx > 0 else "right", fontsize=8)
            box = note.get_window_extent(renderer)
            inside = panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
            note.remove()
        else:  # crowded beyond every offset: keep the first one
            note = ax.annotate(point.label, (point.x, point.y), textcoords="offset points",
                               xytext=LABEL_OFFSETS[0], fontsize=8)
            box = note.get_window_extent(renderer)
        taken.append(box)
        annotations.append(note)
    return annotations


def _marker_box(ax: Any, point: PlotPoint, half_px: float = 5.0) -> Any:
    """The marker and its error bar, in display pixels."""
    from matplotlib.transforms import Bbox

    x, low = ax.transData.transform((point.x, point.low))
    _, high = ax.transData.transform((point.x, point.high))
    return Bbox.from_extents(x - half_px, min(low, high) - half_px, x + half_px, max(low, high) + half_px)


def render_plot(results: Mapping[str, Any]) -> bytes:
    """PNG: primary task metric vs mean latency (1 thread), one panel per model, one marker per backend, error bars
    for the 95 % interval of each row's change vs FP32, reference lines for FP32 and the noisy input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ok_rows(results)
    changes = comparisons(results)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)] or ["(no results)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    panels = []
    for ax, model in zip(axes[0], models):
        if model not in MODELS:
            continue
        points = plot_points(model, [r for r in rows if r["model"] == model], changes)
        _draw_panel(ax, model, points, reference_lines(model, rows))
        panels.append((ax, points))
    fig.tight_layout()
    for ax, points in panels:  # labels last: placement needs the final layout
        place_labels(ax, points)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _draw_panel(ax: Any, model: str, points: Sequence[PlotPoint], references: Sequence[tuple[float, str, str]]) -> None:
    graph, metric, higher, _ = MODELS[model]
    for point in points:
        ax.errorbar(point.x, point.y, yerr=[[max(0.0, point.y - point.low)], [max(0.0, point.high - point.y)]],
                    fmt=point.marker, color=point.color, markersize=7, capsize=3, elinewidth=1)
    for value, label, style in references:
        ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=label)
    ax.set_ylim(*metric_limits(points, [v for v, _, _ in references], metric in METRIC_SCALE))
    ax.margins(x=0.15)  # room for labels beside the outermost points
    ax.set_title(f"{model}: bars = 95 % interval of the change vs FP32", fontsize=9)
    ax.set_xlabel(f"{graph} mean latency, ms (1 thread)")
    ax.set_ylabel(f"{PLOT_AXIS.get(metric, metric)}, {'higher' if higher else 'lower'} is better")
    ax.grid(True, alpha=0.3)
    if references:
        ax.legend(loc="best", fontsize=7)


# ------------------------------------------------------------------------------------------------ console summary


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """A compact plain-text table for the end of `quant run`."""
    rows = sorted_rows(results["rows"])
    lines = [f"{'model':<13} {'backend':<7} {'prec':<5} {'status':<7} {'metric':>14} {'mean ms':>9} {'RTF':>8} "
             f"{'vs FP32':>8} {'vs eager':>9}"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"{row['model']:<13} {row['backend']:<7} {row['precision']:<5} {row.get('status', '?'):<7} "
                         f"{_one_line(row.get('error'))[:60]}")
            continue
        _, metric, _, label = MODELS.get(row["model"], (row["model"], "", True, ""))
        value = task_value(row, metric)
        shown = "-" if value is None else (f"{100 * value:.2f}%" if metric == "cer" else f"{value:.3f}")
        fp32, eager = find_row(rows, row["model"], "ort", "fp32"), find_row(rows, row["model"], "torch", "fp32")
        mean = primary_latency(row)
        lines.append(
            f"{row['model']:<13} {row['backend']:<7} {row['precision']:<5} {'ok':<7} {label + ' ' + shown:>14} "
            f"{_fmt(mean, '.3f'):>9} {_fmt(row.get('rtf'), '.4f'):>8} "
            f"{_fmt(ratio(mean, primary_latency(fp32) if fp32 else None), 'x'):>8} "
            f"{_fmt(ratio(mean, primary_latency(eager) if eager else None), 'x'):>9}"
        )
    for goal in goals(results):
        met = goal.met_text if goal.verdict else ("n/a" if goal.met is None else ("met" if goal.met else "NOT met"))
        lines.append(f"goal: {goal.name}: {goal.interval or _fmt(goal.measured, '.3f')} (target {goal.target}) {met}")
    return lines
