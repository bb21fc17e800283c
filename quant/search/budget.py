"""Task-metric budgets of `quant search`: `pesq_wb=-0.05` (a change against FP32), `cer=+0.3` (percentage points),
`snr_db=25` (a floor on the output SNR against FP32), judged with the paired bootstrap of quant.eval.stats.

A build holds the budget only when its interval stays on the allowed side of the line: by the bootstrap, and by
Student's t on the same spread. On a handful of utterances the percentile bootstrap is narrower than a 95 % interval
(its resamples cannot show more spread than the few utterances have) and Student's t is the honest width there;
from a few tens of utterances on the two agree. The same t width decides whether a validation split can resolve the
budget at all (`resolution`): a 3-utterance split once steered a search to a build that lost 0.20 PESQ-WB on the
full test set against a 0.05 budget.

No interval computed from a few utterances can see what those utterances do not show: on the first 3 utterances of
se_test the all-INT8 offline DPCRN measured -0.015 [-0.020, -0.008] PESQ-WB, proven within -0.05 by both intervals,
while the first 20 measured -0.116 [-0.244, -0.013] (`quant search dpcrn --budget pesq_wb=-0.05 --validation 3` and
the default split). So a change budget is never judged on fewer than MIN_UTTERANCES utterances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from quant.errors import QuantError
from quant.eval.stats import (CONFIDENCE, WITHIN, Budget, PerUtterance, Verdict, from_columns, judge_change,
                              verdict_text)

HIGHER_IS_BETTER: Mapping[str, bool] = {"pesq_wb": True, "pesq_nb": True, "stoi": True, "si_sdr": True,
                                        "snr_db": True, "cer": False, "wer": False}
ERROR_RATES = frozenset({"cer", "wer"})  # budgets and reports in percentage points, columns hold edit counts
FLOORS = frozenset({"snr_db"})  # an absolute floor, not a change against FP32
SNR_CAP_DB = 120.0  # output SNR of a bit-identical output (infinite) is reported as this
MIN_UTTERANCES = 10  # a change budget judged on fewer cannot hold (module docstring)


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

    def text(self) -> str:
        """As `--budget` takes it (parse_budget(b.text()) == b)."""
        return f"{self.metric}={self.value:g}" if self.is_floor else f"{self.metric}={self.value:+g}"

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

    def holds(self, verdict: Verdict, looks: int = 1) -> bool:
        """Proven within: the bootstrap interval and the Student-t interval (module docstring) both on the allowed
        side of the line. A point estimate inside with an interval reaching over does not hold: picking such builds
        is how a small split passes a build the full test set finds over budget. `looks`: the build was picked as
        the best of that many measured on this split, so its t interval is Bonferroni-widened to a 95 % family
        (the best of several noisy changes is too good by the luck that picked it)."""
        change = verdict.change
        if not self.is_floor and change.n < MIN_UTTERANCES:
            return False
        width = t_half_width(change.spread, change.n, looks)
        worst = change.delta - width if verdict.budget.higher_is_better else change.delta + width
        inside = worst >= verdict.budget.line if verdict.budget.higher_is_better else worst <= verdict.budget.line
        return verdict.verdict == WITHIN and inside

    def hold_text(self, verdict: Verdict, looks: int = 1) -> str:
        """Why a build holds or does not, for the search's log: 'holds', or what is missing (too few utterances,
        the Student-t interval reaching over the line, or the verdict itself)."""
        family = f", Bonferroni over the {looks} builds it was picked from" if looks > 1 else ""
        if self.holds(verdict, looks):
            return f"holds{family}"
        change = verdict.change
        if not self.is_floor and change.n < MIN_UTTERANCES:
            return f"not proven within: {change.n} utterances, a change budget needs {MIN_UTTERANCES}"
        if verdict.verdict == WITHIN:
            width = t_half_width(change.spread, change.n, looks) * self.scale
            return f"not proven within: Student's t interval (+-{width:.4f}{family}) reaches over the line"
        return f"not proven within: {self.verdict_text(verdict)}"

    def resolution(self, spread: float, n: int) -> Resolution | None:
        """Can n utterances with this per-utterance spread (column units) tell a build without loss from one on the
        line? None for a floor (candidates are compared with a fixed floor, not with FP32 on a noisy metric)."""
        if self.is_floor:
            return None
        limit = self.stats_budget().limit
        needed = utterances_to_resolve(spread, limit)
        width = t_half_width(spread, n) if n >= MIN_UTTERANCES else math.inf
        return Resolution(n, width, limit, None if needed is None else max(needed, MIN_UTTERANCES), self.scale)

    def verdict_text(self, verdict: Verdict) -> str:
        """quant.eval.stats.verdict_text, and 'cannot tell' below MIN_UTTERANCES for a change budget."""
        if not self.is_floor and verdict.change.n < MIN_UTTERANCES:
            return (f"cannot tell at n={verdict.change.n}; at least {MIN_UTTERANCES} utterances would tell "
                    f"(fewer may all miss what the set does; the interval says {verdict.verdict})")
        return verdict_text(verdict)

    def describe(self) -> str:
        if self.is_floor:
            return f"{self.metric} >= {self.value:g} dB against FP32's output"
        unit = " pp" if self.metric in ERROR_RATES else ""
        return f"{self.metric} change >= {self.value:+g}{unit}" if HIGHER_IS_BETTER[self.metric] \
            else f"{self.metric} change <= {self.value:+g}{unit}"


@dataclass(frozen=True)
class Resolution:
    """The 95 % interval half-width of a paired change at n utterances against the budget's size."""

    n: int
    half_width: float  # column units (Student's t on the measured spread)
    limit: float  # |budget| in column units
    needed: int | None  # utterances at which the half-width drops below the limit (None: a zero budget, never)
    scale: float = 1.0  # display units per column unit

    @property
    def resolves(self) -> bool:
        return self.half_width < self.limit


def t_half_width(spread: float, n: int, looks: int = 1) -> float:
    """Half-width of the 95 % Student-t interval of a mean change over n utterances with this spread; with `looks`
    > 1 the Bonferroni-widened one (each of that many intervals at 1 - 5 %/looks)."""
    if n < 2:
        return math.inf
    return float(scipy_stats.t.ppf(1 - (1 - CONFIDENCE) / 2 / max(looks, 1), n - 1) * spread / math.sqrt(n))


def utterances_to_resolve(spread: float, limit: float) -> int | None:
    """The smallest n whose t half-width at this spread is below `limit` (from the normal approximation up);
    None when no n does (a zero budget with any spread)."""
    if spread <= 0.0:
        return 2
    if limit <= 0.0:
        return None
    n = max(2, math.ceil((scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2) * spread / limit) ** 2))
    while t_half_width(spread, n) >= limit:
        n += 1
    return n


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
