import itertools
import math

import numpy as np
import pytest

from quant.decoding import (
    MISSING_HYP_SCORE,
    attention_log_likelihood,
    attention_rescoring,
    best_hypotheses,
    ctc_greedy,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_topk,
    hyps_to_decoder_inputs,
)


def collapse(path: tuple[int, ...]) -> tuple[int, ...]:
    out: list[int] = []
    previous = 0
    for token in path:
        if token != previous and token != 0:
            out.append(token)
        previous = token
    return tuple(out)


def brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """log P(labels) = logsumexp over every alignment that collapses to the labels."""
    frames, vocab = log_probs.shape
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(vocab), repeat=frames):
        score = float(sum(log_probs[t, s] for t, s in enumerate(path)))
        key = collapse(path)
        totals[key] = float(np.logaddexp(totals.get(key, -math.inf), score))
    return totals


def random_log_probs(seed: int, frames: int, vocab: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(frames, vocab)) * 2
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_search_equals_brute_force_when_nothing_is_pruned(seed: int) -> None:
    log_probs = random_log_probs(seed, frames=5, vocab=3)
    exact = brute_force(log_probs)
    nbest = ctc_prefix_beam_search(log_probs, beam=1000)
    assert {tokens for tokens, _ in nbest} == set(exact)
    for tokens, score in nbest:
        assert score == pytest.approx(exact[tokens], abs=1e-9)
    best_exact = max(exact, key=lambda k: exact[k])
    assert nbest[0][0] == best_exact
    assert math.log(sum(math.exp(s) for _, s in nbest)) == pytest.approx(0.0, abs=1e-9)


def test_pruned_beam_keeps_the_best_prefix_on_a_peaky_table() -> None:
    # 'a a' needs a blank between the two a's; the table says exactly that
    table = np.log(
        np.array(
            [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]
        )
    )
    nbest = ctc_prefix_beam_search(table, beam=2)
    assert len(nbest) == 2
    assert nbest[0][0] == (1, 1, 2)
    assert ctc_greedy(table) == [1, 1, 2]


def test_length_limits_the_frames_used() -> None:
    table = np.log(np.array([[0.1, 0.9], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]))
    assert ctc_greedy(table) == [1, 1]
    assert ctc_greedy(table, length=2) == [1]
    assert ctc_prefix_beam_search(table, length=2, beam=4)[0][0] == (1,)


def test_topk_search_matches_full_search_when_k_covers_the_vocabulary() -> None:
    log_probs = random_log_probs(7, frames=6, vocab=4)
    idx = np.argsort(-log_probs, axis=1)[:, :4]
    values = np.take_along_axis(log_probs, idx, axis=1)
    full = ctc_prefix_beam_search(log_probs, beam=4)
    topk = ctc_prefix_beam_search_topk(values, idx, beam=4)
    assert [t for t, _ in full] == [t for t, _ in topk]
    assert np.allclose([s for _, s in full], [s for _, s in topk])


def test_decoder_inputs_layout() -> None:
    nbests = [[((3, 4, 5), -1.0), ((3,), -2.0)], [((6,), -0.5)]]
    inputs = hyps_to_decoder_inputs(nbests, sos_eos=9, beam=3)
    assert inputs.hyps_pad_sos_eos.dtype == np.int64 and inputs.hyps_pad_sos_eos.shape == (2, 3, 5)
    assert inputs.hyps_pad_sos_eos[0, 0].tolist() == [9, 3, 4, 5, 9]
    assert inputs.hyps_pad_sos_eos[0, 1].tolist() == [9, 3, 9, 9, 9]
    assert inputs.hyps_pad_sos_eos[1, 2].tolist() == [9, 9, 9, 9, 9]
    assert inputs.hyps_lens_sos.dtype == np.int32
    assert inputs.hyps_lens_sos.tolist() == [[4, 2, 1], [2, 1, 1]]
    assert inputs.ctc_score.dtype == np.float32
    assert inputs.ctc_score.tolist() == [[-1.0, -2.0, MISSING_HYP_SCORE], [-0.5, MISSING_HYP_SCORE, MISSING_HYP_SCORE]]
    assert set(inputs.feeds()) == {"hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score"}


def test_attention_log_likelihood_sums_only_real_steps_and_eos() -> None:
    nbests = [[((1, 2), 0.0), ((2,), 0.0)]]
    inputs = hyps_to_decoder_inputs(nbests, sos_eos=3, beam=2)
    probs = np.full((1, 2, 3, 4), 0.25)
    probs[0, 0, 0, 1], probs[0, 0, 1, 2], probs[0, 0, 2, 3] = 0.5, 0.5, 0.5  # hyp 0: 1, 2, eos
    log_probs = np.log(probs)
    scores = attention_log_likelihood(log_probs, inputs)
    assert scores[0, 0] == pytest.approx(3 * math.log(0.5))
    assert scores[0, 1] == pytest.approx(2 * math.log(0.25))  # 2, eos; the padded step is ignored


def test_attention_rescoring_trades_attention_against_ctc() -> None:
    attention = np.array([[-5.0, -4.5]])
    ctc = np.array([[-1.0, -2.0]])
    assert attention_rescoring(attention, ctc, ctc_weight=0.3).tolist() == [1]  # -5.3 vs -5.1
    assert attention_rescoring(attention, ctc, ctc_weight=1.0).tolist() == [0]  # -6.0 vs -6.5
    nbests = [[((1,), -1.0), ((2,), -5.0)]]
    assert best_hypotheses(nbests, np.array([1])) == [[2]]
    assert best_hypotheses(nbests, np.array([5])) == [[]]


def test_long_peaky_utterance_beam_top_equals_greedy_and_zero_probabilities_are_safe() -> None:
    rng = np.random.default_rng(3)
    path = rng.integers(0, 6, size=400)
    probs = np.full((400, 6), 0.002)
    probs[np.arange(400), path] = 0.99
    log_probs = np.log(probs / probs.sum(axis=1, keepdims=True))
    nbest = ctc_prefix_beam_search(log_probs, beam=10)
    assert list(nbest[0][0]) == ctc_greedy(log_probs)
    assert all(np.isfinite(score) for _, score in nbest)
    with np.errstate(divide="ignore"):
        hard = np.log(np.eye(3)[[1, 1, 0, 2]])  # exact zeros -> -inf log-probs
    assert ctc_prefix_beam_search(hard, beam=5) == [((1, 2), 0.0)]
