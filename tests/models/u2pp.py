"""A WeNet-style U2++ model in the shapes of WeNet's export_onnx_gpu.py: an encoder (Kaldi fbank -> subsampling
convs -> self-attention -> CTC log-probs and their top-k) and a bidirectional attention decoder that rescores the CTC
n-best left-to-right and right-to-left, mixes the two with reverse_weight, adds ctc_weight x the CTC score and returns
best_index. The vocabulary has <sos/eos> = 2 (not the last id), as AISHELL recipes do. Untrained: deterministic
(seeded) weights are enough to check the graphs' shapes, dtypes and decoding plumbing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

UNITS = ("<blank>", "<unk>", "<sos/eos>", "▁", "'", *"abcdefghijklmnopqrstuvwxyz")
SOS_EOS = 2
BEAM = 10
CTC_WEIGHT = 0.5
REVERSE_WEIGHT = 0.3
DIM = 16  # model width of encoder and decoder
ENCODER_INPUTS = ("speech", "speech_lengths")
ENCODER_OUTPUTS = ("encoder_out", "encoder_out_lens", "ctc_log_probs", "beam_log_probs", "beam_log_probs_idx")
DECODER_INPUTS = ("encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "r_hyps_pad_sos_eos",
                  "ctc_score")
DECODER_OUTPUTS = ("best_index",)


def write_units(path: Path) -> Path:
    """WeNet units.txt: `<unit> <id>` per line."""
    path.write_text("".join(f"{unit} {index}\n" for index, unit in enumerate(UNITS)), encoding="utf-8")
    return path


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(DIM)
    return torch.softmax(scores.masked_fill(~allowed, -1e4), dim=-1) @ v


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after two valid convs of kernel 3, stride 2 (WeNet's Conv2dSubsampling4 formula)."""
    return ((lengths - 1) // 2 - 1) // 2


class Encoder(nn.Module):
    def __init__(self, bins: int = 80, dim: int = DIM, vocab: int = len(UNITS), beam: int = BEAM) -> None:
        super().__init__()
        self.beam = beam
        self.conv1 = nn.Conv1d(bins, dim, 3, stride=2)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ctc = nn.Linear(dim, vocab)

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (speech - 10.0) / 4.0  # a fixed global CMVN: int16-scaled log-mel energies are about 5..20
        x = torch.relu(self.conv2(torch.relu(self.conv1(x.transpose(1, 2))))).transpose(1, 2)  # (B, T', D)
        lengths = subsampled_lengths(speech_lengths)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T')
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + _attention(q, k, v, valid[:, None, :])
        log_probs = torch.log_softmax(self.ctc(x), dim=-1)
        top_values, top_indices = log_probs.topk(self.beam, dim=2)
        return x, lengths, log_probs, top_values, top_indices


class AttentionDecoder(nn.Module):
    """One direction: token embedding + position, causal self-attention, cross-attention, output logits."""

    def __init__(self, vocab: int = len(UNITS), dim: int = DIM, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        steps = torch.arange(length, device=tokens.device)
        causal = steps[None, :] <= steps[:, None]  # (L, L): later (padding) tokens never reach earlier ones
        q, k, v = self.self_qkv(x).chunk(3, dim=-1)
        x = x + _attention(q, k, v, causal[None])
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        x = x + _attention(self.cross_q(x), k, v, memory_valid)
        return self.out(x)


class BidirectionalDecoder(nn.Module):
    """WeNet export_onnx_gpu.py's Decoder.forward for U2++, on two AttentionDecoders."""

    def __init__(self, beam: int = BEAM, ctc_weight: float = CTC_WEIGHT, reverse_weight: float = REVERSE_WEIGHT):
        super().__init__()
        self.beam, self.ctc_weight, self.reverse_weight = beam, ctc_weight, reverse_weight
        self.left = AttentionDecoder()
        self.right = AttentionDecoder()

    def scores(self, encoder_out: torch.Tensor, encoder_out_lens: torch.Tensor, hyps_pad_sos_eos: torch.Tensor,
               hyps_lens_sos: torch.Tensor, r_hyps_pad_sos_eos: torch.Tensor, ctc_score: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = encoder_out.shape
        rows = batch * self.beam
        memory = encoder_out.unsqueeze(1).expand(batch, self.beam, frames, dim).reshape(rows, frames, dim)
        valid = torch.arange(frames, device=encoder_out.device)[None, :] < encoder_out_lens[:, None]
        memory_valid = valid.unsqueeze(1).expand(batch, self.beam, frames).reshape(rows, 1, frames)
        steps = hyps_pad_sos_eos.shape[2] - 1
        hyps = hyps_pad_sos_eos.reshape(rows, steps + 1)
        r_hyps = r_hyps_pad_sos_eos.reshape(rows, steps + 1)
        lengths = hyps_lens_sos.reshape(rows)
        mask = torch.arange(steps, device=hyps.device)[None, :] < lengths[:, None]  # hyp tokens and eos
        score = self._log_likelihood(self.left(hyps[:, :-1], memory, memory_valid), hyps[:, 1:], mask)
        if self.reverse_weight > 0:
            r_score = self._log_likelihood(self.right(r_hyps[:, :-1], memory, memory_valid), r_hyps[:, 1:], mask)
            score = score * (1 - self.reverse_weight) + r_score * self.reverse_weight
        return score.sum(dim=1).reshape(batch, self.beam) + self.ctc_weight * ctc_score

    @staticmethod
    def _log_likelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(2, (targets * mask.long()).unsqueeze(2)).squeeze(2)
        return picked * mask.float()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.scores(*inputs), dim=1)


def reversed_hyps(hyps_pad_sos_eos: np.ndarray, hyps_lens_sos: np.ndarray, sos: int = SOS_EOS,
                  eos: int = SOS_EOS) -> np.ndarray:
    """r_hyps_pad_sos_eos as WeNet builds it: [sos] + reversed hyp + [eos], padded with eos."""
    out = np.full_like(hyps_pad_sos_eos, eos)
    out[:, :, 0] = sos
    for b, k in np.ndindex(*hyps_lens_sos.shape):
        hyp = hyps_pad_sos_eos[b, k, 1 : int(hyps_lens_sos[b, k])]
        out[b, k, 1 : 1 + len(hyp)] = hyp[::-1]
    return out


def decoder_feeds(encoder: dict[str, np.ndarray], beam: int = BEAM, sos_eos: int = SOS_EOS) -> dict[str, np.ndarray]:
    """The decoder's feeds from the encoder's outputs: CTC prefix beam search over its top-k (quant.decoding), the
    n-best padded with sos/eos, and the reversed n-best."""
    from quant.decoding import ctc_prefix_beam_search_topk, hyps_to_decoder_inputs

    lengths = encoder["encoder_out_lens"]
    nbests = [ctc_prefix_beam_search_topk(encoder["beam_log_probs"][b], encoder["beam_log_probs_idx"][b],
                                          int(lengths[b]), beam) for b in range(len(lengths))]
    inputs = hyps_to_decoder_inputs(nbests, sos_eos, beam)
    return {"encoder_out": encoder["encoder_out"], "encoder_out_lens": lengths, **inputs.feeds(),
            "r_hyps_pad_sos_eos": reversed_hyps(inputs.hyps_pad_sos_eos, inputs.hyps_lens_sos, sos_eos, sos_eos)}


def example_inputs(seed: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Encoder and decoder example inputs for tracing (batch 2, padded)."""
    generator = torch.Generator().manual_seed(seed)
    speech = torch.rand(2, 50, 80, generator=generator) * 10 + 5
    speech_lengths = torch.tensor([50, 41], dtype=torch.int32)
    hyps = torch.randint(3, len(UNITS), (2, BEAM, 7), generator=generator)
    hyps[:, :, 0] = SOS_EOS
    hyps[:, :, -1] = SOS_EOS
    lens = torch.full((2, BEAM), 6, dtype=torch.int32)
    r_hyps = torch.from_numpy(reversed_hyps(hyps.numpy(), lens.numpy()))
    encoder_out = torch.randn(2, 11, 16, generator=generator)
    decoder = (encoder_out, torch.tensor([11, 9], dtype=torch.int32), hyps, lens, r_hyps,
               torch.randn(2, BEAM, generator=generator))
    return (speech, speech_lengths), decoder


ENCODER_AXES = {"speech": {0: "B", 1: "T"}, "speech_lengths": {0: "B"}, "encoder_out": {0: "B", 1: "T_OUT"},
                "encoder_out_lens": {0: "B"}, "ctc_log_probs": {0: "B", 1: "T_OUT"},
                "beam_log_probs": {0: "B", 1: "T_OUT"}, "beam_log_probs_idx": {0: "B", 1: "T_OUT"}}
DECODER_AXES = {"encoder_out": {0: "B", 1: "T"}, "encoder_out_lens": {0: "B"}, "hyps_pad_sos_eos": {0: "B", 2: "T2"},
                "hyps_lens_sos": {0: "B"}, "r_hyps_pad_sos_eos": {0: "B", 2: "T2"}, "ctc_score": {0: "B"},
                "best_index": {0: "B"}}


def as_numpy(values: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [value.detach().numpy() for value in values]
