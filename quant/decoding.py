"""CTC decoding and attention-rescoring inputs, in numpy (WeNet's conventions; defaults blank = 0, sos = eos = last
id, each one a parameter so a spec's [task] ids are used).

- `ctc_greedy`: best path, collapse repeats, drop blanks.
- `ctc_prefix_beam_search`: prefix beam search in the log domain over the full (T, V) log-probs, or over the
  encoder's top-k (`beam_log_probs`, `beam_log_probs_idx`) as WeNet's GPU pipeline does. Scores are the total
  log-probability of all alignments of a prefix (blank-ending + non-blank-ending), exact when nothing is pruned.
- `hyps_to_decoder_inputs`: n-best lists -> `hyps_pad_sos_eos` (B, beam, T2+1) int64 padded with eos,
  `hyps_lens_sos` (B, beam) int32 (hyp length + 1 for sos), `ctc_score` (B, beam) float32. An n-best shorter than
  the beam is filled with empty hypotheses scored MISSING_HYP_SCORE, so they never win.
- `attention_rescoring`: best = argmax(attention log-likelihood + ctc_weight * ctc_score). CTC_WEIGHT = 0.3, the
  conformer's training CTC weight, which is what WeNet's GPU export passes to its rescoring decoder
  (model_conf.ctc_weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BLANK = 0
CTC_WEIGHT = 0.3
MISSING_HYP_SCORE = -1.0e4  # finite (FP16-safe) score for beam slots without a hypothesis

Hypothesis = tuple[tuple[int, ...], float]
NEG_INF = -math.inf


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def _valid_frames(log_probs: np.ndarray, length: int | None) -> np.ndarray:
    if log_probs.ndim != 2:
        raise ValueError(f"CTC log-probs must be (T, V), got shape {log_probs.shape}")
    frames = log_probs.shape[0] if length is None else int(length)
    return log_probs[:frames]


def ctc_greedy(log_probs: np.ndarray, length: int | None = None, blank: int = BLANK) -> list[int]:
    """Best-path decoding of (T, V) log-probs (first `length` frames)."""
    best = _valid_frames(log_probs, length).argmax(axis=1)
    tokens: list[int] = []
    previous = blank
    for token in best.tolist():
        if token != previous and token != blank:
            tokens.append(token)
        previous = token
    return tokens


def ctc_prefix_beam_search(
    log_probs: np.ndarray, length: int | None = None, beam: int = 10, blank: int = BLANK
) -> list[Hypothesis]:
    """n-best (token ids, log score) sorted best first, from (T, V) log-probs; at most `beam` prefixes are kept and
    each frame only extends with its `beam` most likely tokens (WeNet's pruning)."""
    frames = _valid_frames(log_probs, length)
    width = min(beam, frames.shape[1])
    top_idx = np.argsort(-frames, axis=1, kind="stable")[:, :width]
    top_vals = np.take_along_axis(frames, top_idx, axis=1)
    return _prefix_search(top_vals, top_idx, beam, blank)


def ctc_prefix_beam_search_topk(
    beam_log_probs: np.ndarray, beam_log_probs_idx: np.ndarray, length: int | None = None, beam: int = 10,
    blank: int = BLANK,
) -> list[Hypothesis]:
    """The same search over the encoder's top-k outputs (T, k) values and (T, k) token ids."""
    values = _valid_frames(beam_log_probs, length)
    return _prefix_search(values, np.asarray(beam_log_probs_idx)[: values.shape[0]], beam, blank)


class _PrefixTree:
    """Prefixes as nodes of a tree (node 0 = empty prefix), so extending one by a token costs O(1)."""

    def __init__(self) -> None:
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        self.children: dict[tuple[int, int], int] = {}

    def child(self, node: int, token: int) -> int:
        key = (node, token)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = len(self.parent)
            self.parent.append(node)
            self.token.append(token)
        return found

    def tokens(self, node: int) -> tuple[int, ...]:
        out = []
        while node > 0:
            out.append(self.token[node])
            node = self.parent[node]
        return tuple(reversed(out))


def _prefix_search(values: np.ndarray, indices: np.ndarray, beam: int, blank: int) -> list[Hypothesis]:
    tree = _PrefixTree()
    # node -> (log P ending in blank, log P ending in its last token)
    hyps: dict[int, tuple[float, float]] = {0: (0.0, NEG_INF)}
    for frame_vals, frame_idx in zip(values.tolist(), indices.tolist()):
        hyps = _prune(_extend(tree, hyps, frame_vals, frame_idx, blank), beam)
    ranked = sorted(hyps.items(), key=lambda item: -_logaddexp(*item[1]))
    return [(tree.tokens(node), _logaddexp(*scores)) for node, scores in ranked]


def _extend(
    tree: _PrefixTree, hyps: dict[int, tuple[float, float]], values: list[float], indices: list[int], blank: int
) -> dict[int, tuple[float, float]]:
    """One frame of prefix extension. Sums run in the linear domain relative to the best prefix (`ref`), so each
    addition is a multiply-add instead of a log-add-exp; only paths > 700 nats below the best underflow (dropped)."""
    ref = max(_logaddexp(p_blank, p_token) for p_blank, p_token in hyps.values())
    probs = [math.exp(v) for v in values]
    new: dict[int, list[float]] = {}
    for node, (p_blank, p_token) in hyps.items():
        blank_end, token_end = math.exp(p_blank - ref), math.exp(p_token - ref)
        total = blank_end + token_end
        last = tree.token[node]
        for prob, token in zip(probs, indices):
            if token == blank:
                _accumulate(new, node, 0, total * prob)
            elif token == last:
                _accumulate(new, node, 1, token_end * prob)  # repeat collapses into the same prefix
                _accumulate(new, tree.child(node, token), 1, blank_end * prob)  # a blank separated the repeat
            else:
                _accumulate(new, tree.child(node, token), 1, total * prob)
    return {node: (_log(b) + ref, _log(t) + ref) for node, (b, t) in new.items() if b > 0.0 or t > 0.0}


def _accumulate(table: dict[int, list[float]], node: int, slot: int, value: float) -> None:
    entry = table.get(node)
    if entry is None:
        entry = table[node] = [0.0, 0.0]
    entry[slot] += value


def _log(value: float) -> float:
    return math.log(value) if value > 0.0 else NEG_INF


def _prune(hyps: dict[int, tuple[float, float]], beam: int) -> dict[int, tuple[float, float]]:
    if len(hyps) <= beam:
        return hyps
    ranked = sorted(hyps.items(), key=lambda item: -_logaddexp(*item[1]))
    return dict(ranked[:beam])


@dataclass(frozen=True)
class DecoderInputs:
    hyps_pad_sos_eos: np.ndarray  # (B, beam, T2 + 1) int64
    hyps_lens_sos: np.ndarray  # (B, beam) int32
    ctc_score: np.ndarray  # (B, beam) float32
    r_hyps_pad_sos_eos: np.ndarray | None = None  # (B, beam, T2 + 1) int64, hyps reversed (U2++ right-to-left)

    def feeds(self) -> dict[str, np.ndarray]:
        feeds = {
            "hyps_pad_sos_eos": self.hyps_pad_sos_eos,
            "hyps_lens_sos": self.hyps_lens_sos,
            "ctc_score": self.ctc_score,
        }
        if self.r_hyps_pad_sos_eos is not None:
            feeds["r_hyps_pad_sos_eos"] = self.r_hyps_pad_sos_eos
        return feeds


def _filled(nbests: Sequence[Sequence[Hypothesis]], beam: int) -> list[list[Hypothesis]]:
    filled = []
    for nbest in nbests:
        kept = list(nbest)[:beam]
        filled.append(kept + [((), MISSING_HYP_SCORE)] * (beam - len(kept)))
    return filled


def hyps_pad_sos_eos(
    nbests: Sequence[Sequence[Hypothesis]], sos: int, beam: int = 10, eos: int | None = None, reverse: bool = False
) -> np.ndarray:
    """(B, beam, T2 + 1) int64: [sos] + hyp + [eos], padded with eos (default eos = sos); T2 = longest hyp + 1.
    reverse=True gives U2++'s `r_hyps_pad_sos_eos`: [sos] + reversed hyp + [eos]."""
    end = sos if eos is None else eos
    filled = _filled(nbests, beam)
    longest = max((len(tokens) for nbest in filled for tokens, _ in nbest), default=0)
    out = np.full((len(filled), beam, longest + 2), end, dtype=np.int64)
    out[:, :, 0] = sos
    for b, nbest in enumerate(filled):
        for k, (tokens, _) in enumerate(nbest):
            out[b, k, 1 : 1 + len(tokens)] = tokens[::-1] if reverse else tokens
    return out


def hyps_lens_sos(nbests: Sequence[Sequence[Hypothesis]], beam: int = 10) -> np.ndarray:
    """(B, beam) int32: hyp length + 1 (the sos)."""
    filled = _filled(nbests, beam)
    return np.array([[len(tokens) + 1 for tokens, _ in nbest] for nbest in filled], dtype=np.int32).reshape(
        len(filled), beam
    )


def ctc_score(nbests: Sequence[Sequence[Hypothesis]], beam: int = 10) -> np.ndarray:
    """(B, beam) float32 CTC prefix scores (MISSING_HYP_SCORE for empty slots)."""
    filled = _filled(nbests, beam)
    return np.array([[score for _, score in nbest] for nbest in filled], dtype=np.float32).reshape(len(filled), beam)


def hyps_to_decoder_inputs(
    nbests: Sequence[Sequence[Hypothesis]], sos_eos: int, beam: int = 10, eos: int | None = None,
    reverse: bool = False,
) -> DecoderInputs:
    """The rescoring decoder's n-best inputs; `sos_eos` is the sos id (and eos unless `eos` is given), reverse=True
    adds U2++'s right-to-left hyps."""
    reversed_hyps = hyps_pad_sos_eos(nbests, sos_eos, beam, eos, reverse=True) if reverse else None
    return DecoderInputs(hyps_pad_sos_eos(nbests, sos_eos, beam, eos), hyps_lens_sos(nbests, beam),
                         ctc_score(nbests, beam), reversed_hyps)


def attention_rescoring(
    attention_scores: np.ndarray, ctc_scores: np.ndarray, ctc_weight: float = CTC_WEIGHT,
    reverse_scores: np.ndarray | None = None, reverse_weight: float = 0.0,
) -> np.ndarray:
    """(B, beam) attention log-likelihoods and CTC scores -> (B,) int64 index of the best hypothesis. With a
    bidirectional (U2++) decoder, as WeNet: (1 - reverse_weight) * left-to-right + reverse_weight * right-to-left
    + ctc_weight * CTC."""
    attention = np.asarray(attention_scores)
    if reverse_scores is not None and reverse_weight > 0.0:
        attention = (1.0 - reverse_weight) * attention + reverse_weight * np.asarray(reverse_scores)
    return np.argmax(attention + ctc_weight * np.asarray(ctc_scores), axis=1).astype(np.int64)


def attention_log_likelihood(decoder_log_probs: np.ndarray, inputs: DecoderInputs, reverse: bool = False) -> np.ndarray:
    """Sum of log P(next token) over hyp + eos, from decoder log-probs (B, beam, T2, V) -> (B, beam); reverse=True
    scores the right-to-left decoder's log-probs against the reversed hyps."""
    hyps = inputs.r_hyps_pad_sos_eos if reverse else inputs.hyps_pad_sos_eos
    if hyps is None:
        raise ValueError("right-to-left scores need DecoderInputs built with reverse=True")
    targets = hyps[:, :, 1:]
    picked = np.take_along_axis(decoder_log_probs[:, :, : targets.shape[2]], targets[..., None], axis=3)[..., 0]
    steps = np.arange(targets.shape[2])
    valid = steps[None, None, :] < inputs.hyps_lens_sos[:, :, None]
    return np.where(valid, picked, 0.0).sum(axis=2)


def best_hypotheses(nbests: Sequence[Sequence[Hypothesis]], best_index: np.ndarray) -> list[list[int]]:
    """Token ids of the chosen hypothesis per utterance (an index past a short n-best gives the empty hyp)."""
    chosen = []
    for nbest, index in zip(nbests, np.asarray(best_index).reshape(-1).tolist()):
        chosen.append(list(nbest[index][0]) if index < len(nbest) else [])
    return chosen
