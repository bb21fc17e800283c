"""results.json is the single source; results.md, results.csv, tradeoff.png and report.html are rendered from it.

Modules: rows (a row's shape and derived values), targets (goals as data), compare (paired changes vs FP32),
goals (goal evaluation), tables (markdown, CSV, console summary), plots (tradeoff.png), html (report.html) with
the artifacts it reads (artifacts), its figures (figures) and its enhanced examples (examples).
Ratios (vs FP32 ONNX Runtime, vs PyTorch eager) and the issue's goals are derived here. Each row's accuracy change
against its FP32 reference (paired over utterances, 95 % bootstrap interval: quant.eval.stats) is derived here too;
write_results stores it in results.json as the row's "vs_fp32" for other tools, but rendering always recomputes it
from the per-utterance columns (seeded, so identical).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from quant.errors import ReportError
from quant.eval.stats import verdict_text
from quant.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from quant.report.compare import (CHANGE_METRICS, Comparison, budget_for, change_metric, compare, comparisons,
                                  format_change, reference_row, with_comparisons)
from quant.report.goals import Goal, goals
from quant.report.html import HtmlOptions, render_html
from quant.report.plots import PlotPoint, metric_limits, place_labels, plot_points, reference_lines, render_plot
from quant.report.rows import (BACKEND_ORDER, MODELS, METRIC_SCALE, PRECISION_ORDER, SCHEMA, TASK_COLUMNS, ResultRow,
                               Row, RowKey, batch_latency, find_row, graph_latency, min_snr_db, ok_rows, primary_latency,
                               ratio, row_key, simulation_note, sorted_rows, task_kind, task_value)
from quant.report.tables import CSV_FIELDS, render_csv, render_markdown, summary_lines

__all__ = [
    "BACKEND_ORDER", "CHANGE_METRICS", "CSV_FIELDS", "METRIC_SCALE", "MODELS", "PRECISION_ORDER",
    "SCHEMA", "TASK_COLUMNS", "Comparison", "Goal", "HtmlOptions", "PlotPoint", "ReportError", "Row", "RowKey", "batch_latency",
    "ResultRow", "budget_for", "change_metric", "compare", "comparisons", "find_row", "format_change", "goals", "graph_latency",
    "load_results", "metric_limits", "min_snr_db", "ok_rows", "place_labels", "plot_points", "primary_latency",
    "ratio", "reference_lines", "reference_row", "render", "render_csv", "render_html", "render_markdown", "render_plot",
    "row_key", "simulation_note", "sorted_rows", "summary_lines", "task_kind", "task_value", "verdict_text",
    "with_comparisons", "write_results",
]


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


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike[str],
                  html: HtmlOptions = HtmlOptions()) -> dict[str, Path]:
    """Write results.json and render results.md, results.csv, tradeoff.png and report.html beside it (all
    atomically)."""
    folder = Path(out_dir)
    clean = _finite(with_comparisons(results))
    paths = {"json": atomic_write_json(folder / "results.json", clean)}
    paths.update(render(clean, folder, html))
    return paths


def render(results: Mapping[str, Any], out_dir: str | os.PathLike[str],
           html: HtmlOptions = HtmlOptions()) -> dict[str, Path]:
    folder = Path(out_dir)
    return {
        "md": atomic_write_text(folder / "results.md", render_markdown(results)),
        "csv": atomic_write_text(folder / "results.csv", render_csv(results)),
        "png": atomic_write_bytes(folder / "tradeoff.png", render_plot(results)),
        "html": atomic_write_text(folder / "report.html", render_html(results, html)),
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


