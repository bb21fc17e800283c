"""The issue's speed and accuracy goals, evaluated from one results.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from quant.eval import stats
from quant.eval.stats import verdict_text
from quant.report.compare import Comparison, budget_for, comparisons, format_change, reference_row
from quant.report.rows import (METRIC_SCALE, PLAIN_FP32, Row, RowKey, batch_latency, find_row, graph_latency, ok_rows,
                               primary_latency, ratio, ratio_text, row_key, sorted_rows, stored_ratio, task_value)
from quant.report.targets import (EAGER_SPEEDUP, ENCODER_BATCH_GOALS, ENCODER_BATCH_RATIO,
                                   SPEED_RATIO_GOALS)


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


def _ratio_goal(name: str, value: float | None, limit: float, stored: Mapping[str, Any] | None = None) -> Goal:
    """A latency ratio goal; with the interleaved ratio the row carries, its median is the measured value and the
    interval column shows min, paired spread and whether it is reliable."""
    if stored is not None:
        value = float(stored["median_ratio"])
    return Goal(name, value, f"<= {limit:g}x", None if value is None else value <= limit,
                interval=ratio_text(stored) if stored is not None else "")


def _budget_target(limit: float, unit: str, higher_is_better: bool) -> str:
    if higher_is_better:
        return f">= -{limit:g}{unit} (drop at most {limit:g})"
    return f"<= +{limit:g}{unit} (rise at most {limit:g})"


def goals(results: Mapping[str, Any], changes: Mapping[RowKey, Comparison] | None = None) -> list[Goal]:
    """The issue's speed and accuracy goals, evaluated from one results.json (one run, one machine); accuracy
    budgets are judged on the paired 95 % interval of the change (`changes`: comparisons(results), reused)."""
    rows = ok_rows(results)
    # a goal is about a model of this run: a run of a user's spec shows no reference model's goals, and a model
    # without PyTorch eager rows (no eager module, or --no-eager) no speed-up over eager; a failed row still counts
    present = {row["model"] for row in results["rows"]}
    with_eager = {row["model"] for row in results["rows"] if row["backend"] == "torch"}
    out: list[Goal] = []
    for model, graph, limit, name in (goal for goal in SPEED_RATIO_GOALS if goal[0] in present):
        fp32, int8 = find_row(rows, model, "ort", "fp32"), find_row(rows, model, "ort", "int8")
        value = ratio(graph_latency(int8, graph) if int8 else None, graph_latency(fp32, graph) if fp32 else None)
        out.append(_ratio_goal(name, value, limit, stored_ratio(int8, "vs_fp32", graph) if fp32 else None))
    fp32, int8 = find_row(rows, "wenet", "ort", "fp32"), find_row(rows, "wenet", "ort", "int8")
    for batch in ENCODER_BATCH_GOALS if "wenet" in present else ():
        value = ratio(batch_latency(int8, "encoder", batch) if int8 else None,
                      batch_latency(fp32, "encoder", batch) if fp32 else None)
        out.append(_ratio_goal(f"WeNet encoder INT8 / FP32 at batch {batch} (ORT)", value, ENCODER_BATCH_RATIO,
                               stored_ratio(int8, "vs_fp32", "encoder", batch=batch) if fp32 else None))
    # the plain export's FP32 row is a baseline, not a build to ship: no goal of its own
    for row in (r for r in sorted_rows(rows) if r["backend"] == "ort" and r["model"] in with_eager
                and r["precision"] != PLAIN_FP32):
        eager = find_row(rows, row["model"], "torch", "fp32")
        value = ratio(primary_latency(eager) if eager else None, primary_latency(row))
        stored = stored_ratio(row, "vs_eager") if eager else None
        if stored is not None:  # the interleaved ratio is row / eager: the speed-up is its inverse
            value = 1.0 / float(stored["median_ratio"])
        out.append(Goal(f"{row['model']} ORT {row['precision']} speed-up vs PyTorch eager", value,
                        f">= {EAGER_SPEEDUP:g}x", None if value is None else value >= EAGER_SPEEDUP,
                        interval=ratio_text(stored, invert=True) if stored is not None else ""))
    if any(row.get("task") for row in results["rows"]):  # a speed-only run (quant bench) measured no accuracy
        out.extend(_accuracy_goals(rows, comparisons(results) if changes is None else changes))
    return out


def _accuracy_goals(rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[Goal]:
    """One goal per budget the rows carry (from their model specs) and backend row at that model and precision
    (ONNX Runtime always, as 'not measured' if absent)."""
    budgets: dict[tuple[str, str], tuple[str, stats.Budget]] = {}
    for candidate in sorted_rows(rows):
        found = budget_for(candidate)
        if found is not None:
            budgets.setdefault((candidate["model"], candidate["precision"]), found)
    out = []
    for (model, precision), (metric, budget) in budgets.items():
        label = metric.upper().replace("_", "-")
        backends = [r["backend"] for r in sorted_rows(rows) if r["model"] == model and r["precision"] == precision]
        for backend in backends if "ort" in backends else ["ort", *backends]:
            name = f"{model} {backend.upper()} {precision} {label} change vs FP32 ({precision} - fp32)"
            row = find_row(rows, model, backend, precision)
            comparison = changes.get(row_key(row)) if row else None
            scale = METRIC_SCALE.get(metric, 1.0)  # the goal shows the display units (CER points)
            out.append(_change_goal(name, metric, row, rows, comparison,
                                    stats.Budget(scale * budget.limit, budget.higher_is_better)))
    return out


def _change_goal(name: str, metric: str, row: Row | None, rows: Sequence[Row], comparison: Comparison | None,
                 budget: stats.Budget) -> Goal:
    """Judged on the interval when per-utterance results exist; else the point change, not judged. `budget` is in
    display units (CER points)."""
    scale = METRIC_SCALE.get(metric, 1.0)
    unit = f" {metric.upper()} points" if metric in METRIC_SCALE else ""
    target = _budget_target(budget.limit, unit, budget.higher_is_better)
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
