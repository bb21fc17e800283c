"""Each row's accuracy change against its FP32 reference row: paired over utterances, with a 95 % bootstrap
interval (quant.eval.stats), and the verdict on the budget the row carries (from its model spec)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from quant.errors import ReportError
from quant.eval import stats
from quant.report.rows import METRIC_SCALE, Row, RowKey, find_row, ok_rows, row_key, task_kind

logger = logging.getLogger(__name__)

CHANGE_METRICS: dict[str, tuple[tuple[str, str, bool, str], ...]] = {  # key, label, higher is better, format
    "se": (("pesq_wb", "PESQ-WB", True, "+.3f"), ("pesq_nb", "PESQ-NB", True, "+.3f"),
           ("stoi", "STOI", True, "+.4f"), ("si_sdr", "SI-SDR dB", True, "+.2f")),
    "asr": (("cer", "CER pts", False, "+.2f"), ("wer", "WER pts", False, "+.2f"),
            ("cer_greedy", "CER greedy pts", False, "+.2f")),
}


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


def budget_for(row: Row) -> tuple[str, stats.Budget] | None:
    """The row's accuracy budget (its spec's, carried by the row): (metric, budget in the metric's stored units);
    None when the row has none."""
    budget = row.get("budget")
    if not budget:
        return None
    try:
        return str(budget["metric"]), stats.Budget(float(budget["limit"]), bool(budget["higher_is_better"]))
    except (KeyError, TypeError, ValueError):
        logger.warning("%s %s %s: unreadable budget %r; not judged", *row_key(row), budget)
        return None


@dataclass(frozen=True)
class Comparison:
    """A row's paired accuracy changes against its FP32 reference row, and the primary metric's budget verdict."""

    reference: Row
    changes: Mapping[str, stats.Change]  # metric -> change in the metric's stored units
    verdict: stats.Verdict | None  # None: no budget for this precision
    budget_metric: str | None = None  # the metric the verdict judges

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
        for key, _, higher, _ in CHANGE_METRICS[task_kind([row])]:
            before, after = stats.from_columns(ref_columns, key), stats.from_columns(columns, key)
            if before is not None and after is not None:
                changes[key] = stats.paired_change(before, after, higher)
    except ReportError as error:  # a hand-edited or merged results.json: report the rest
        logger.warning("%s %s %s vs FP32: %s", *row_key(row), error)
        return None
    if not changes:
        return None
    found = budget_for(row)
    if found is None or found[0] not in changes:
        return Comparison(reference, changes, None)
    metric, budget = found
    return Comparison(reference, changes, stats.judge(changes[metric], budget), metric)


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

