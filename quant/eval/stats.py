"""Paired statistics of an accuracy change between two rows evaluated on the same utterances.

Every task metric quant reports is a ratio of sums over utterances: a mean (PESQ, STOI, SI-SDR: sum of values /
number of utterances) or an error rate (CER, WER: sum of edits / sum of reference lengths). So one statistic covers
both: with a per-utterance numerator and denominator, change = sum(cand - ref numerators) / sum(denominators).

The 95 % interval is a percentile bootstrap over utterances: utterances are resampled with replacement (both rows
together, which is what makes it paired) and the change is recomputed from the resampled sums, so an error rate is
recomputed from edit counts rather than averaged per utterance. The generator is seeded, so a report is
reproducible. numpy rather than scipy.stats.bootstrap: scipy's default (BCa) returns NaN for a degenerate sample, and
bit-identical rows (every per-utterance difference 0) or a constant shift are exactly the cases a precision
comparison meets; the percentile interval is then [0, 0] or [shift, shift], as it should be.

The test-set size that would tell comes from the normal approximation of the same statistic: its standard error is
s / sqrt(n), with s the standard deviation of the linearised per-utterance differences (cand - ref - change *
denominator) / mean denominator (for a mean metric: the plain standard deviation of the differences). The interval
clears the budget line once Z95 * s / sqrt(n) < |change - budget line|, assuming the change and the spread stay as
measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from quant.errors import ReportError

SEED = 20240917
RESAMPLES = 10_000
CONFIDENCE = 0.95
Z95 = 1.959963984540054  # two-sided 95 % normal quantile

WITHIN = "within budget"
OVER = "over budget"
CANNOT_TELL = "cannot tell at this test-set size"


@dataclass(frozen=True)
class PerUtterance:
    """One metric of one row per utterance: the row's value is sum(numerator) / sum(denominator)."""

    ids: tuple[str, ...]
    numerator: np.ndarray  # the value (mean metrics) or the edit count (error rates)
    denominator: np.ndarray  # 1 (mean metrics) or the reference length (error rates)

    @classmethod
    def values(cls, ids: Sequence[str], values: Sequence[float]) -> PerUtterance:
        return cls(tuple(ids), np.asarray(values, dtype=np.float64), np.ones(len(values), dtype=np.float64))

    @classmethod
    def counts(cls, ids: Sequence[str], errors: Sequence[int], lengths: Sequence[int]) -> PerUtterance:
        return cls(tuple(ids), np.asarray(errors, dtype=np.float64), np.asarray(lengths, dtype=np.float64))

    @property
    def value(self) -> float:
        return float(self.numerator.sum() / self.denominator.sum())


def from_columns(columns: Mapping[str, Sequence[Any]], metric: str) -> PerUtterance | None:
    """A metric out of the per-utterance columns results.json stores (quant.eval.se / asr `per_utterance_columns`):
    `metric` as a value list, or `<metric>_errors` with `<metric>_length` for an error rate; None when absent."""
    ids = [str(name) for name in columns.get("ids", ())]
    if f"{metric}_errors" in columns and f"{metric}_length" in columns:
        errors, lengths = columns[f"{metric}_errors"], columns[f"{metric}_length"]
        return PerUtterance.counts(ids, [int(e) for e in errors], [int(n) for n in lengths])
    if metric in columns:
        return PerUtterance.values(ids, [float(v) for v in columns[metric]])
    return None


@dataclass(frozen=True)
class Change:
    """candidate - reference over the shared utterances, with its 95 % bootstrap interval."""

    delta: float
    ci_low: float
    ci_high: float
    n: int
    share_worse: float  # share of utterances on which the candidate is worse than the reference
    spread: float  # standard deviation of the linearised per-utterance differences (see the module docstring)

    def to_dict(self) -> dict[str, float | int]:
        return {"delta": self.delta, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "share_worse": self.share_worse, "spread": self.spread}


def _paired(reference: PerUtterance, candidate: PerUtterance) -> tuple[np.ndarray, np.ndarray]:
    """(numerator differences, denominators) in the reference's utterance order."""
    if not reference.ids:
        raise ReportError("paired comparison: the reference row has no per-utterance results")
    if set(reference.ids) != set(candidate.ids) or len(candidate.ids) != len(reference.ids):
        missing = sorted(set(reference.ids) ^ set(candidate.ids))[:3]
        raise ReportError(f"paired comparison: the rows were evaluated on different utterances (e.g. {missing}); "
                          "evaluate both on the same test set")
    position = {name: index for index, name in enumerate(candidate.ids)}
    order = np.array([position[name] for name in reference.ids], dtype=np.int64)
    cand_num, cand_den = candidate.numerator[order], candidate.denominator[order]
    if not np.allclose(cand_den, reference.denominator):
        raise ReportError("paired comparison: reference lengths differ between the rows; the transcripts differ")
    return cand_num - reference.numerator, reference.denominator


def paired_change(reference: PerUtterance, candidate: PerUtterance, higher_is_better: bool,
                  seed: int = SEED, resamples: int = RESAMPLES) -> Change:
    """Paired change candidate - reference with a seeded percentile-bootstrap 95 % interval over utterances."""
    diff, weight = _paired(reference, candidate)
    n = diff.size
    delta = float(diff.sum() / weight.sum())
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = diff[picks].sum(axis=1) / weight[picks].sum(axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail]))
    worse = diff < 0 if higher_is_better else diff > 0
    linearised = (diff - delta * weight) / weight.mean()
    spread = float(np.std(linearised, ddof=1)) if n > 1 else 0.0
    return Change(delta, low, high, n, float(worse.mean()), spread)


@dataclass(frozen=True)
class Budget:
    """How much a candidate may lose against its reference, in the metric's own units (limit >= 0)."""

    limit: float
    higher_is_better: bool

    @property
    def line(self) -> float:
        """The worst allowed change: -limit when higher is better, +limit when lower is better."""
        return -self.limit if self.higher_is_better else self.limit


@dataclass(frozen=True)
class Verdict:
    change: Change
    budget: Budget
    verdict: str  # WITHIN, OVER or CANNOT_TELL
    n_to_tell: int | None  # CANNOT_TELL: utterances that would resolve it (None: the change sits on the line)

    def to_dict(self) -> dict[str, object]:
        return {**self.change.to_dict(), "budget": self.budget.line, "verdict": self.verdict,
                "n_to_tell": self.n_to_tell}


def judge(change: Change, budget: Budget) -> Verdict:
    """Within: the whole interval on the allowed side of the budget line; over: the whole interval beyond it."""
    line = budget.line
    allowed_low, allowed_high = (line, math.inf) if budget.higher_is_better else (-math.inf, line)
    if allowed_low <= change.ci_low and change.ci_high <= allowed_high:
        return Verdict(change, budget, WITHIN, None)
    if change.ci_high < allowed_low or change.ci_low > allowed_high:
        return Verdict(change, budget, OVER, None)
    return Verdict(change, budget, CANNOT_TELL, utterances_to_tell(change, line))


def utterances_to_tell(change: Change, line: float) -> int | None:
    """Utterances needed for the interval (half-width Z95 * spread / sqrt(n)) to clear the budget line."""
    margin = abs(change.delta - line)
    if margin == 0.0:
        return None
    return max(change.n + 1, math.ceil((Z95 * change.spread / margin) ** 2))


def verdict_text(verdict: Verdict) -> str:
    """The verdict as reports print it: 'cannot tell' names the test-set size and the size that would tell."""
    if verdict.verdict != CANNOT_TELL:
        return verdict.verdict
    if verdict.n_to_tell is None:
        return f"cannot tell at n={verdict.change.n}: the change sits on the budget line"
    return f"cannot tell at n={verdict.change.n}; about {verdict.n_to_tell} utterances would tell"


def judge_change(reference: PerUtterance, candidate: PerUtterance, budget: Budget,
                 seed: int = SEED, resamples: int = RESAMPLES) -> Verdict:
    """The paired change of candidate vs reference judged against `budget` (the entry point `quant search` uses)."""
    return judge(paired_change(reference, candidate, budget.higher_is_better, seed, resamples), budget)
