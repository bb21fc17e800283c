"""A WeNet-style conformer for English characters: CTC head plus a left-to-right attention decoder for rescoring.

Encoder: global CMVN (buffers, set from training statistics) -> Conv2dSubsampling4 (two 3x3 stride-2 convs + linear,
time / 4) -> N conformer blocks [macaron FFN (swish, half step), rel-pos self-attention with pos_bias_u/v as in WeNet's
RelPositionMultiHeadedAttention, convolution module (pointwise + GLU, depthwise kernel 15, BatchNorm, swish, pointwise),
FFN (half step), LayerNorm] -> LayerNorm. Pre-norm everywhere.

BatchNorm in the convolution module: at export (eval mode) it folds into the depthwise Conv, leaving one Conv node
that quantizes per channel, instead of a Transpose-LayerNorm-Transpose group that INT8 must avoid.

Masking: padded frames are zeroed before the depthwise convolution; attention scores of padded keys are filled with
-inf before the softmax and the probabilities of padded keys are set to 0 after it (WeNet's scheme: a row with no
valid key, whose softmax is NaN, becomes all zeros, so no NaN leaves an attention layer; range collection skips the
non-finite masked scores instead of stretching a range to a large finite fill value); Conv2dSubsampling4 has no
padding, so the real frames of a padded batch equal those of the same utterance run alone.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quant.errors import ModelError
from quant.models.checkpoint import build_model, load_state, read_checkpoint
from quant.paths import ASSETS_DIR

logger = logging.getLogger(__name__)

WEIGHTS_PATH = ASSETS_DIR / "conformer.pt"
MASK_FILL = float("-inf")  # masked scores; probabilities of masked keys are zeroed after the softmax
MAX_FRAMES = 5000  # positional table length after subsampling (200 s of audio)
MAX_TOKENS = 512  # decoder positional table length


@dataclass(frozen=True)
class ConformerConfig:
    input_dim: int = 80
    vocab_size: int = 30  # quant/assets/units.txt
    d_model: int = 144
    heads: int = 4
    ffn_dim: int = 576
    encoder_blocks: int = 10
    conv_kernel: int = 15
    decoder_blocks: int = 3
    decoder_ffn_dim: int = 576
    dropout: float = 0.1
    attention_dropout: float = 0.0
    ctc_weight: float = 0.3  # training loss weight and WeNet's rescoring weight (model_conf.ctc_weight)

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ModelError(f"ConformerConfig: d_model {self.d_model} must be divisible by heads {self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ModelError(f"ConformerConfig: conv_kernel {self.conv_kernel} must be odd (symmetric padding)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ConformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ModelError(f"ConformerConfig: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on real frames."""
    steps = torch.arange(max_len, device=lengths.device, dtype=lengths.dtype)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def sinusoid_table(length: int, dim: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table.unsqueeze(0)


def positions(table: Tensor, length: int) -> Tensor:
    """The first `length` rows of a (1, N, d) positional table, as a Gather over arange(length): ONNX Runtime's
    symbolic shape inference (quant_pre_process) cannot bound a Slice whose end is the subsampled length."""
    return table.index_select(1, torch.arange(length, device=table.device))


class GlobalCMVN(nn.Module):
    mean: Tensor
    istd: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("istd", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.istd


class Conv2dSubsampling4(nn.Module):
    """(B, T, 80) -> (B, T', d) with T' = ((T - 1) // 2 - 1) // 2, no padding (so padded frames never leak in)."""

    def __init__(self, input_dim: int, d_model: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, d_model, 3, 2), nn.ReLU(), nn.Conv2d(d_model, d_model, 3, 2), nn.ReLU()
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(d_model * freq, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.unsqueeze(1))
        batch, channels, frames, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, frames, channels * freq))

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Frames left after the two convs, in the lengths' own integer type. Division of non-negative values
        exports as a plain integer Div, and Max (not Clip, which TensorRT only runs on floats) keeps them >= 0."""
        zero = torch.zeros_like(lengths)
        halved = torch.div(torch.maximum(lengths - 1, zero), 2, rounding_mode="trunc")
        return torch.div(torch.maximum(halved - 1, zero), 2, rounding_mode="trunc")


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float, activation: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), activation, nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention; `mask` (B, 1 or Tq, Tk) bool, True where attending is allowed."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.d_k = heads, d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1, self.heads, self.d_k).transpose(1, 2)

    def attend(self, scores: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        allowed = mask.unsqueeze(1)  # (B, 1, 1|Tq, Tk)
        probs = torch.softmax(scores.masked_fill(~allowed, MASK_FILL), dim=-1).masked_fill(~allowed, 0.0)
        context = torch.matmul(self.dropout(probs), value)  # (B, H, Tq, d_k)
        context = context.transpose(1, 2).reshape(value.size(0), -1, self.heads * self.d_k)
        return self.linear_out(context)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.split(self.linear_q(query)), self.split(self.linear_k(key)), self.split(self.linear_v(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        return self.attend(scores, v, mask)


class RelPositionAttention(MultiHeadAttention):
    """WeNet's RelPositionMultiHeadedAttention: scores = (q+u)k^T + (q+v)p^T, p = linear_pos(pos_emb)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__(d_model, heads, dropout)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward_rel(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        q = self.linear_q(x).view(x.size(0), -1, self.heads, self.d_k)  # (B, T, H, d_k)
        k, v = self.split(self.linear_k(x)), self.split(self.linear_v(x))
        p = self.split(self.linear_pos(pos_emb))  # (1, H, T, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scores = (torch.matmul(q_u, k.transpose(-2, -1)) + torch.matmul(q_v, p.transpose(-2, -1))) / math.sqrt(
            self.d_k
        )
        return self.attend(scores, v, mask)


class ConvolutionModule(nn.Module):
    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: Tensor, frame_mask: Tensor) -> Tensor:
        """x (B, T, d), frame_mask (B, 1, T) float 1/0."""
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1) * frame_mask
        x = nn.functional.silu(self.norm(self.depthwise_conv(x)))
        return (self.pointwise_conv2(x) * frame_mask).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ff_macaron = FeedForward(d, config.ffn_dim, config.dropout, nn.SiLU())
        self.attn = RelPositionAttention(d, config.heads, config.attention_dropout)
        self.conv = ConvolutionModule(d, config.conv_kernel)
        self.ff = FeedForward(d, config.ffn_dim, config.dropout, nn.SiLU())
        self.norm_ff_macaron, self.norm_mha, self.norm_conv = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.norm_ff, self.norm_final = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, pos_emb: Tensor, att_mask: Tensor, frame_mask: Tensor) -> Tensor:
        x = x + 0.5 * self.dropout(self.ff_macaron(self.norm_ff_macaron(x)))
        x = x + self.dropout(self.attn.forward_rel(self.norm_mha(x), pos_emb, att_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), frame_mask))
        x = x + 0.5 * self.dropout(self.ff(self.norm_ff(x)))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    pos_table: Tensor

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.global_cmvn = GlobalCMVN(config.input_dim)
        self.embed = Conv2dSubsampling4(config.input_dim, config.d_model)
        self.register_buffer("pos_table", sinusoid_table(MAX_FRAMES, config.d_model), persistent=False)
        self.xscale = math.sqrt(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ConformerBlock(config) for _ in range(config.encoder_blocks))
        self.after_norm = nn.LayerNorm(config.d_model)

    def forward(self, speech: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """speech (B, T, 80), lengths (B,) -> encoder_out (B, T', d), encoder_out_lens (B,) (same dtype as lengths)."""
        x = self.embed(self.global_cmvn(speech))
        out_lens = Conv2dSubsampling4.output_lengths(lengths)
        frames = x.size(1)
        valid = padding_mask(out_lens, frames)  # (B, T')
        att_mask, frame_mask = valid.unsqueeze(1), valid.unsqueeze(1).to(x.dtype)
        pos_emb = self.dropout(positions(self.pos_table, frames))
        x = self.dropout(x * self.xscale)
        for block in self.blocks:
            x = block(x, pos_emb, att_mask, frame_mask)
        return self.after_norm(x), out_lens


class DecoderBlock(nn.Module):
    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MultiHeadAttention(d, config.heads, config.attention_dropout)
        self.src_attn = MultiHeadAttention(d, config.heads, config.attention_dropout)
        self.ff = FeedForward(d, config.decoder_ffn_dim, config.dropout, nn.ReLU())
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, tgt_mask: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.dropout(self.self_attn(y, y, y, tgt_mask))
        y = self.norm2(x)
        x = x + self.dropout(self.src_attn(y, memory, memory, memory_mask))
        return x + self.dropout(self.ff(self.norm3(x)))


class TransformerDecoder(nn.Module):
    """Left-to-right attention decoder: tokens [sos, y1..yn] -> logits for [y1..yn, eos]."""

    pos_table: Tensor

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.register_buffer("pos_table", sinusoid_table(MAX_TOKENS, config.d_model), persistent=False)
        self.xscale = math.sqrt(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.decoder_blocks))
        self.after_norm = nn.LayerNorm(config.d_model)
        self.output_layer = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, memory: Tensor, memory_lens: Tensor, tokens: Tensor, token_lens: Tensor) -> Tensor:
        """memory (N, T, d), memory_lens (N,), tokens (N, L) valid ids, token_lens (N,) -> logits (N, L, V)."""
        length = tokens.size(1)
        steps = torch.arange(length, device=tokens.device)
        causal = steps.unsqueeze(0) <= steps.unsqueeze(1)  # (L, L) lower triangle; tril needs opset 14
        tgt_mask = padding_mask(token_lens, length).unsqueeze(1) & causal.unsqueeze(0)
        memory_mask = padding_mask(memory_lens, memory.size(1)).unsqueeze(1)
        x = self.dropout(self.embed(tokens) * self.xscale + positions(self.pos_table, length))
        for block in self.blocks:
            x = block(x, tgt_mask, memory, memory_mask)
        return self.output_layer(self.after_norm(x))


class Conformer(nn.Module):
    def __init__(self, config: ConformerConfig = ConformerConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConformerEncoder(config)
        self.ctc = nn.Linear(config.d_model, config.vocab_size)
        self.decoder = TransformerDecoder(config)

    @property
    def sos_eos(self) -> int:
        return self.config.vocab_size - 1

    def encode(self, speech: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(speech, lengths)

    def ctc_log_probs(self, encoder_out: Tensor) -> Tensor:
        return torch.log_softmax(self.ctc(encoder_out), dim=-1)

    def set_cmvn(self, mean: Tensor, istd: Tensor) -> None:
        cmvn = self.encoder.global_cmvn
        if mean.shape != cmvn.mean.shape or istd.shape != cmvn.istd.shape:
            raise ModelError(f"CMVN stats must have shape {tuple(cmvn.mean.shape)}, got {tuple(mean.shape)}")
        cmvn.mean.copy_(mean)
        cmvn.istd.copy_(istd)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class WenetEncoder(nn.Module):
    """WeNet GPU-export encoder I/O: (speech, speech_lengths i32) -> encoder_out, encoder_out_lens i32,
    ctc_log_probs, beam_log_probs, beam_log_probs_idx (top-k of the CTC log-probs)."""

    def __init__(self, model: Conformer, beam: int = 10) -> None:
        super().__init__()
        self.model, self.beam = model, beam

    def forward(self, speech: Tensor, speech_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        encoder_out, out_lens = self.model.encode(speech, speech_lengths)
        log_probs = self.model.ctc_log_probs(encoder_out)
        beam_log_probs, beam_idx = torch.topk(log_probs, self.beam, dim=2)
        return encoder_out, out_lens.int(), log_probs, beam_log_probs, beam_idx


class WenetDecoder(nn.Module):
    """WeNet GPU-export rescoring decoder: scores [sos]+hyp+[eos] with the attention decoder and returns
    best_index = argmax(attention log-likelihood + ctc_weight * ctc_score) (i64) and the scores (B, beam).

    hyps_pad_sos_eos may be padded with eos or with WeNet's ignore_id (-1): negative ids are replaced by eos
    before the embedding, and padded positions are masked out of the score.
    """

    def __init__(self, model: Conformer, ctc_weight: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.ctc_weight = model.config.ctc_weight if ctc_weight is None else ctc_weight

    def forward(
        self, encoder_out: Tensor, encoder_out_lens: Tensor, hyps_pad_sos_eos: Tensor, hyps_lens_sos: Tensor,
        ctc_score: Tensor,
    ) -> tuple[Tensor, Tensor]:
        batch, frames, dim = encoder_out.shape
        beam, steps = hyps_pad_sos_eos.size(1), hyps_pad_sos_eos.size(2) - 1
        memory = encoder_out.unsqueeze(1).expand(batch, beam, frames, dim).reshape(batch * beam, frames, dim)
        memory_lens = encoder_out_lens.unsqueeze(1).expand(batch, beam).reshape(batch * beam)
        hyps = hyps_pad_sos_eos.reshape(batch * beam, steps + 1)
        hyps = torch.where(hyps < 0, torch.full_like(hyps, self.model.sos_eos), hyps)
        hyp_lens = hyps_lens_sos.reshape(batch * beam)
        logits = self.model.decoder(memory, memory_lens, hyps[:, :-1], hyp_lens)
        log_probs = torch.log_softmax(logits, dim=-1)
        token_scores = log_probs.gather(2, hyps[:, 1:].unsqueeze(2)).squeeze(2)
        valid = padding_mask(hyp_lens, steps).to(token_scores.dtype)
        score = (token_scores * valid).sum(dim=1).reshape(batch, beam) + self.ctc_weight * ctc_score
        return torch.argmax(score, dim=1), score


def load_conformer(weights: str | os.PathLike[str] | None = None) -> Conformer:
    """The shipped trained conformer (quant/assets/conformer.pt), or `weights`; random init with a warning if absent."""
    path = Path(weights) if weights is not None else WEIGHTS_PATH
    if weights is None and not path.is_file():
        logger.warning("%s not found: using a randomly initialised conformer (outputs are meaningless)", path)
        torch.manual_seed(0)
        return Conformer().eval()
    return conformer_from_checkpoint(read_checkpoint(path, "conformer", "scripts/train_conformer.py"), path).eval()


def conformer_from_checkpoint(checkpoint: dict[str, Any], source: Path | str = "checkpoint") -> Conformer:
    if "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ModelError(f"{source}: not a conformer checkpoint with config + state_dict (keys {sorted(checkpoint)})")
    model = build_model(source, "conformer", lambda: Conformer(ConformerConfig.from_dict(dict(checkpoint["config"]))))
    load_state(model, checkpoint["state_dict"], source, "conformer")
    _check_vocab(checkpoint.get("vocab"), source)
    if "cmvn_mean" in checkpoint:
        model.set_cmvn(torch.as_tensor(checkpoint["cmvn_mean"]), torch.as_tensor(checkpoint["cmvn_istd"]))
    return model


def _check_vocab(vocab: Any, source: Path | str) -> None:
    """A checkpoint trained on other units than quant/assets/units.txt would decode to wrong characters."""
    from quant.models.tokenizer import read_units

    if vocab is not None and list(vocab) != read_units():
        raise ModelError(f"{source}: trained on units {list(vocab)[:6]}... which differ from quant/assets/units.txt; "
                         "ship the matching units.txt or retrain")


def checkpoint_dict(model: Conformer, vocab: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What train_conformer.py saves: state_dict + config + cmvn + vocab (+ extra metadata)."""
    cmvn = model.encoder.global_cmvn
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "cmvn_mean": cmvn.mean.detach().cpu().clone(),
        "cmvn_istd": cmvn.istd.detach().cpu().clone(),
        "vocab": list(vocab),
        **(extra or {}),
    }
