"""results.json is the single source; results.md, results.csv and tradeoff.png are rendered from it.

A row is one model x backend x precision:
    {"model", "backend", "precision", "status": ok|failed|skipped, "error", "artifacts": [...],
     "task": {metric: value}, "speed": {graph: measure_graph result}, "latency_ms": {...}, "rtf",
     "error_vs_fp32": {graph: {output: TensorError dict}}}
Ratios (vs FP32 ONNX Runtime, vs PyTorch eager) and the issue's goals are derived here, never stored twice.
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
    clean = _finite(results)
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


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float | None
    target: str
    met: bool | None  # None: not measured

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.name, "measured": self.measured, "target": self.target, "met": self.met}


def _ratio_goal(name: str, value: float | None, limit: float) -> Goal:
    return Goal(name, value, f"<= {limit:g}x", None if value is None else value <= limit)


def _delta_goal(name: str, value: float | None, limit: float, unit: str, higher_is_better: bool) -> Goal:
    """A quantized model may lose at most `limit` against FP32 (value = quantized - FP32, signed)."""
    if higher_is_better:
        target, met = f">= -{limit:g}{unit} (drop at most {limit:g})", None if value is None else value >= -limit - 1e-12
    else:
        target, met = f"<= +{limit:g}{unit} (rise at most {limit:g})", None if value is None else value <= limit + 1e-12
    return Goal(name, value, target, met)


def goals(results: Mapping[str, Any]) -> list[Goal]:
    """The issue's speed and accuracy goals, evaluated from one results.json (one run, one machine)."""
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
    out.extend(_accuracy_goals(rows))
    return out


def _accuracy_goals(rows: Sequence[Row]) -> list[Goal]:
    out = []
    limits = {("dpcrn", "int8"): 0.05, ("dpcrn", "fp16"): 0.01, ("dpcrn-stream", "int8"): 0.05,
              ("dpcrn-stream", "fp16"): 0.01, ("wenet", "int8"): 0.3, ("wenet", "fp16"): 0.05}
    for (model, precision), limit in limits.items():
        _, metric, higher, label = MODELS[model]
        for backend in ("ort", "trt"):
            ref, row = find_row(rows, model, backend, "fp32"), find_row(rows, model, backend, precision)
            if backend == "trt" and row is None:
                continue
            delta = None
            if ref and row and task_value(row, metric) is not None and task_value(ref, metric) is not None:
                delta = float(task_value(row, metric)) - float(task_value(ref, metric))  # type: ignore[arg-type]
                delta = delta * 100 if metric == "cer" else delta
            unit = " CER points" if metric == "cer" else ""
            name = f"{model} {backend.upper()} {precision} {label} change vs FP32 ({precision} - fp32)"
            out.append(_delta_goal(name, delta, limit, unit, higher))
    return out


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
        if model == "wenet":
            timed = [r for r in rows if r.get("status") == "ok" and r.get("speed")]
            lines += _throughput_table(timed, "encoder")
            lines += _throughput_table(timed, "decoder")
            lines += _decoder_latency_lines(timed)
    lines += ["", "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for goal in goals(results):
        met = "n/a" if goal.met is None else ("yes" if goal.met else "NO")
        lines.append(f"| {goal.name} | {_fmt(goal.measured, '.3f')} | {goal.target} | {met} |")
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


def _decoder_latency_lines(rows: Sequence[Row]) -> list[str]:
    lines = ["", "decoder (attention rescoring, beam 10) batch-1 latency, ms: "
             + ", ".join(f"{r['backend']} {r['precision']} {_fmt(graph_latency(r, 'decoder'), '.2f')}" for r in rows)]
    return lines


CSV_FIELDS = ["model", "backend", "precision", "status", "pesq_wb", "pesq_nb", "stoi", "si_sdr", "cer", "wer",
              "cer_greedy", "wer_greedy", "cer_real", "cer_synthetic", "latency_min_ms", "latency_mean_ms",
              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "latency_runs",
              "latency_mean_ms_2_threads", "rtf", "ratio_vs_fp32_ort", "ratio_vs_eager", "min_snr_db_vs_fp32", "simulation",
              "error"]


def render_csv(results: Mapping[str, Any]) -> str:
    rows = sorted_rows(results["rows"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_csv_row(row, rows))
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


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


# ------------------------------------------------------------------------------------------------ plot


def render_plot(results: Mapping[str, Any]) -> bytes:
    """PNG: primary task metric vs mean latency (1 thread), one panel per model, one marker per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ok_rows(results)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)] or ["(no results)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    markers = {"torch": "s", "ort": "o", "trt": "^"}
    colors = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red"}
    for ax, model in zip(axes[0], models):
        graph, metric, higher, label = MODELS.get(model, (model, "", True, ""))
        for row in (r for r in rows if r["model"] == model):
            x, y = primary_latency(row), task_value(row, metric)
            if x is None or y is None:
                continue
            y = 100 * y if metric == "cer" else y
            ax.scatter(x, y, marker=markers.get(row["backend"], "x"), color=colors.get(row["precision"], "k"), s=60)
            ax.annotate(f"{row['backend']} {row['precision']}", (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_title(model)
        ax.set_xlabel(f"{graph} mean latency, ms (1 thread)")
        ax.set_ylabel(f"{label}{' %' if metric == 'cer' else ''} ({'higher' if higher else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


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
        met = "n/a" if goal.met is None else ("met" if goal.met else "NOT met")
        lines.append(f"goal: {goal.name}: {_fmt(goal.measured, '.3f')} (target {goal.target}) {met}")
    return lines
