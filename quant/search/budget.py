"""Task-metric budgets of `quant search`: `pesq_wb=-0.05` (a change against FP32), `cer=+0.3` (percentage points),
`snr_db=25` (a floor on the output SNR against FP32), judged with the paired bootstrap of quant.eval.stats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from quant.errors import QuantError
from quant.eval.stats import Budget, PerUtterance, Verdict, from_columns, judge_change

HIGHER_IS_BETTER: Mapping[str, bool] = {"pesq_wb": True, "pesq_nb": True, "stoi": True, "si_sdr": True,
                                        "snr_db": True, "cer": False, "wer": False}
ERROR_RATES = frozenset({"cer", "wer"})  # budgets and reports in percentage points, columns hold edit counts
FLOORS = frozenset({"snr_db"})  # an absolute floor, not a change against FP32
SNR_CAP_DB = 120.0  # output SNR of a bit-identical output (infinite) is reported as this


class BudgetError(QuantError):
    """A --budget that is not METRIC=VALUE with a known metric and a change in the allowed direction."""


@dataclass(frozen=True)
class TaskBudget:
    metric: str
    value: float  # as given: a change (negative for higher-is-better metrics) or, for a floor, the floor

    @property
    def is_floor(self) -> bool:
        return self.metric in FLOORS

    @property
    def scale(self) -> float:
        """Display units per column unit (error rates: percentage points)."""
        return 100.0 if self.metric in ERROR_RATES else 1.0

    def stats_budget(self) -> Budget:
        if self.is_floor:
            return Budget(0.0, True)
        return Budget(abs(self.value) / self.scale, HIGHER_IS_BETTER[self.metric])

    def per_utterance(self, columns: Mapping[str, Sequence[Any]], where: str) -> PerUtterance:
        values = from_columns(columns, self.metric)
        if values is None:
            raise BudgetError(f"{where}: the evaluation gives no per-utterance {self.metric!r}; it gives "
                              f"{sorted(k for k in columns if k != 'ids')}")
        if self.is_floor:
            capped = np.minimum(values.numerator, SNR_CAP_DB)
            return PerUtterance(values.ids, capped, values.denominator)
        return values

    def judge(self, reference: Mapping[str, Sequence[Any]], candidate: Mapping[str, Sequence[Any]]) -> Verdict:
        """candidate vs reference (FP32) on the same utterances; a floor compares the candidate with the floor."""
        cand = self.per_utterance(candidate, "candidate")
        if self.is_floor:
            ref = PerUtterance.values(cand.ids, [self.value] * len(cand.ids))
        else:
            ref = self.per_utterance(reference, "reference")
        return judge_change(ref, cand, self.stats_budget())

    def holds(self, verdict: Verdict) -> bool:
        """The point estimate on the allowed side of the line and not proven over: a small validation split rarely
        proves `within`, so the search steers by the estimate and reports the interval and the verdict."""
        line = verdict.budget.line
        delta = verdict.change.delta
        inside = delta >= line if verdict.budget.higher_is_better else delta <= line
        return inside and verdict.verdict != "over budget"

    def describe(self) -> str:
        if self.is_floor:
            return f"{self.metric} >= {self.value:g} dB against FP32's output"
        unit = " pp" if self.metric in ERROR_RATES else ""
        return f"{self.metric} change >= {self.value:+g}{unit}" if HIGHER_IS_BETTER[self.metric] \
            else f"{self.metric} change <= {self.value:+g}{unit}"


def parse_budget(text: str) -> TaskBudget:
    metric, sep, raw = text.partition("=")
    metric = metric.strip().lower()
    if not sep or metric not in HIGHER_IS_BETTER:
        raise BudgetError(f"--budget {text!r}: expected METRIC=VALUE with METRIC one of {sorted(HIGHER_IS_BETTER)} "
                          "(e.g. pesq_wb=-0.05, cer=+0.3, snr_db=25)")
    try:
        value = float(raw)
    except ValueError:
        raise BudgetError(f"--budget {text!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise BudgetError(f"--budget {text!r}: the value must be finite")
    if metric in FLOORS:
        return TaskBudget(metric, value)
    higher = HIGHER_IS_BETTER[metric]
    if higher and value > 0 or not higher and value < 0:
        direction, sign, example = ("higher", "negative", "-") if higher else ("lower", "positive", "+")
        raise BudgetError(f"--budget {text!r}: {metric} is {direction}-is-better; give the allowed loss as a {sign} "
                          f"change (e.g. {metric}={example}{abs(value):g})")
    return TaskBudget(metric, value)
