from __future__ import annotations

import numpy as np
import pytest

from quant.errors import ReportError
from quant.eval import stats
from quant.eval.stats import Budget, PerUtterance

IDS = [f"utt{i}" for i in range(40)]


def pesq_like(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.5, 3.5, len(IDS))


def test_identical_rows_give_a_zero_interval() -> None:
    ref = PerUtterance.values(IDS, pesq_like())
    change = stats.paired_change(ref, ref, higher_is_better=True)
    assert (change.delta, change.ci_low, change.ci_high) == (0.0, 0.0, 0.0)
    assert change.share_worse == 0.0 and change.n == 40


def test_constant_shift_is_resolved_and_covered() -> None:
    values = pesq_like()
    rng = np.random.default_rng(1)
    shifted = values - 0.05 + rng.normal(0.0, 0.02, values.size)  # every utterance loses about 0.05
    change = stats.paired_change(PerUtterance.values(IDS, values), PerUtterance.values(IDS, shifted), True)
    assert change.ci_high < 0.0  # excludes 0
    assert change.ci_low <= -0.05 <= change.ci_high  # covers the shift
    assert change.delta == pytest.approx(np.mean(shifted - values))
    assert change.share_worse == pytest.approx(np.mean(shifted < values))


def test_exact_constant_shift_has_a_point_interval() -> None:
    values = pesq_like()
    change = stats.paired_change(PerUtterance.values(IDS, values), PerUtterance.values(IDS, values + 0.25), True)
    assert change.delta == pytest.approx(0.25)
    assert change.ci_low == pytest.approx(0.25) and change.ci_high == pytest.approx(0.25)
    assert change.share_worse == 0.0


def test_pairing_follows_ids_not_order() -> None:
    values = pesq_like()
    ref = PerUtterance.values(IDS, values)
    cand = PerUtterance.values(IDS[::-1], (values + 0.1)[::-1])
    change = stats.paired_change(ref, cand, True)
    assert change.ci_low == pytest.approx(0.1) and change.ci_high == pytest.approx(0.1)


def test_error_rate_is_recomputed_from_edit_counts() -> None:
    # utterance lengths 10 and 30; the candidate makes 1 more edit on the first, 2 more on the second
    ids = ["a", "b"]
    ref = PerUtterance.counts(ids, [1, 3], [10, 30])
    cand = PerUtterance.counts(ids, [2, 5], [10, 30])
    change = stats.paired_change(ref, cand, higher_is_better=False, resamples=4000)
    assert change.delta == pytest.approx(3 / 40)  # (2+5)/40 - (1+3)/40, not the mean of per-utterance rates
    # by hand: a resample is {a,a} -> 2/20 = 0.1, {b,b} -> 4/60 = 0.0667 or {a,b} -> 3/40 = 0.075,
    # with probabilities 1/4, 1/4, 1/2: the 2.5 % and 97.5 % quantiles are 2/30 and 0.1
    assert change.ci_low == pytest.approx(2 / 30) and change.ci_high == pytest.approx(0.1)
    assert change.share_worse == 1.0


def test_seeded_bootstrap_is_reproducible() -> None:
    ref, cand = PerUtterance.values(IDS, pesq_like(0)), PerUtterance.values(IDS, pesq_like(1))
    assert stats.paired_change(ref, cand, True) == stats.paired_change(ref, cand, True)
    assert stats.paired_change(ref, cand, True, seed=1) != stats.paired_change(ref, cand, True)


def change(delta: float, low: float, high: float, spread: float = 0.1, n: int = 40) -> stats.Change:
    return stats.Change(delta, low, high, n, 0.5, spread)


@pytest.mark.parametrize(("higher", "interval", "expected"), [
    (True, (-0.02, -0.04, 0.00), stats.WITHIN),  # PESQ may drop 0.05: the whole interval is above -0.05
    (True, (-0.08, -0.10, -0.06), stats.OVER),  # the whole interval is below -0.05
    (True, (-0.053, -0.09, -0.01), stats.CANNOT_TELL),  # straddles -0.05
    (True, (0.30, 0.20, 0.40), stats.WITHIN),  # an improvement is within any budget
    (False, (0.1, -0.1, 0.29), stats.WITHIN),  # CER may rise 0.3 points
    (False, (0.5, 0.31, 0.7), stats.OVER),
    (False, (0.35, 0.1, 0.6), stats.CANNOT_TELL),
])
def test_budget_verdicts(higher: bool, interval: tuple[float, float, float], expected: str) -> None:
    limit = 0.05 if higher else 0.3
    verdict = stats.judge(change(*interval), Budget(limit, higher))
    assert verdict.verdict == expected
    assert (verdict.n_to_tell is None) == (expected != stats.CANNOT_TELL)


def test_utterances_to_tell_scales_with_spread_and_margin() -> None:
    # margin 0.003 from the -0.05 line, spread 0.12: (1.96 * 0.12 / 0.003)^2 = 6147
    verdict = stats.judge(change(-0.053, -0.09, -0.01, spread=0.12), Budget(0.05, True))
    assert verdict.n_to_tell == 6147
    assert stats.utterances_to_tell(change(-0.05, -0.09, -0.01), -0.05) is None  # on the line: never


def test_judge_change_tells_a_real_loss_from_noise() -> None:
    values = pesq_like()
    rng = np.random.default_rng(2)
    ref = PerUtterance.values(IDS, values)
    clear_loss = PerUtterance.values(IDS, values - 0.2 + rng.normal(0, 0.01, values.size))
    small = PerUtterance.values(IDS, values + rng.normal(0, 0.01, values.size))
    noisy = PerUtterance.values(IDS, values - 0.05 + rng.normal(0, 0.2, values.size))
    assert stats.judge_change(ref, clear_loss, Budget(0.05, True)).verdict == stats.OVER
    assert stats.judge_change(ref, small, Budget(0.05, True)).verdict == stats.WITHIN
    unresolved = stats.judge_change(ref, noisy, Budget(0.05, True))
    assert unresolved.verdict == stats.CANNOT_TELL and unresolved.n_to_tell is not None
    assert unresolved.n_to_tell > len(IDS)


def test_rows_on_different_utterances_are_an_error() -> None:
    ref = PerUtterance.values(["a", "b"], [1.0, 2.0])
    with pytest.raises(ReportError, match="different utterances"):
        stats.paired_change(ref, PerUtterance.values(["a", "c"], [1.0, 2.0]), True)
    with pytest.raises(ReportError, match="reference lengths"):
        stats.paired_change(PerUtterance.counts(["a"], [1], [5]), PerUtterance.counts(["a"], [1], [6]), False)


def test_from_columns_reads_values_and_counts() -> None:
    columns = {"ids": ["a", "b"], "pesq_wb": [2.0, 3.0], "cer_errors": [1, 2], "cer_length": [10, 20]}
    pesq = stats.from_columns(columns, "pesq_wb")
    cer = stats.from_columns(columns, "cer")
    assert pesq is not None and pesq.value == 2.5
    assert cer is not None and cer.value == pytest.approx(0.1)
    assert stats.from_columns(columns, "stoi") is None
