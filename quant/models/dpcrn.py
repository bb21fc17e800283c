"""DPCRN speech enhancement (shared/REFERENCE.md section 1), offline and streaming from the same weights.

Layout: input and output (B, 257, T, 2) = real/imag of an STFT (quant.features). The network predicts a complex
ratio mask M and returns M * X (complex product).

- Encoder: 5 x [causal pad (1 past frame, symmetric in F) -> Conv2d -> BatchNorm2d -> PReLU],
  F 257->129->65->33->33->33.
- 2 DPRNN blocks: intra BiLSTM over the 33 bins of a frame, inter LSTM over time per bin (Linear, LayerNorm, residual).
- Decoder: ConvTranspose2d mirrors with skip concatenation. A time kernel of 2 at stride 1 makes T+1 output frames;
  keeping the first T makes output frame t = W0 x[t] + W1 x[t-1]: causal. The streaming step feeds [x[t-1], x[t]]
  and keeps the middle of its 3 output frames, which is exactly that sum.

Streaming (StreamingDPCRN, T = 1): every conv/deconv keeps its last input frame as a cache; the inter-LSTM of
each DPRNN block carries (h, c). State names and shapes follow REFERENCE section 1 (`STREAM_STATES`):
  en_cache1..5  the last input frame of encoder conv 1..5
  rnn_cache1/2  h/c of the inter-LSTM of DPRNN block 1; rnn_cache3/4: h/c of block 2. Shape (1, 33, 128) =
                (LSTM layers, batch x 33 bins, units): one LSTM sequence per frequency bin.
  de_cache1..5  the last input frame (skip concatenation included) of decoder deconv 1..5
All states start at zero at the beginning of an utterance.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quant.errors import ModelError
from quant.models.checkpoint import build_model, load_state, read_checkpoint
from quant.paths import ASSETS_DIR

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = ASSETS_DIR / "dpcrn.pt"
TIME_KERNEL = 2  # every conv looks at the current and one past frame


@dataclass(frozen=True)
class DPCRNConfig:
    """Architecture of DPCRN; the defaults are the deployed model of REFERENCE section 1 (787.15 k parameters)."""

    freq_bins: int = 257
    channels: tuple[int, ...] = (32, 32, 32, 64, 128)
    freq_kernels: tuple[int, ...] = (5, 3, 3, 3, 3)
    freq_strides: tuple[int, ...] = (2, 2, 2, 1, 1)
    rnn_units: int = 128
    dprnn_blocks: int = 2
    layer_norm_eps: float = 1e-8

    def freq_sizes(self) -> list[int]:
        """Bins at the input of each encoder layer plus the bottleneck: [257, 129, 65, 33, 33, 33]."""
        sizes = [self.freq_bins]
        for kernel, stride in zip(self.freq_kernels, self.freq_strides):
            sizes.append((sizes[-1] + 2 * (kernel // 2) - kernel) // stride + 1)
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPCRNConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ModelError(f"DPCRN config has unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


class CausalConvBlock(nn.Module):
    """Causal pad (1 past frame) -> Conv2d -> BatchNorm2d -> PReLU on (B, C, T, F)."""

    def __init__(self, in_channels: int, out_channels: int, freq_kernel: int, freq_stride: int) -> None:
        super().__init__()
        self.freq_pad = freq_kernel // 2
        self.conv = nn.Conv2d(in_channels, out_channels, (TIME_KERNEL, freq_kernel), (1, freq_stride))
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, [self.freq_pad, self.freq_pad, TIME_KERNEL - 1, 0])
        return self.act(self.norm(self.conv(x)))

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame x (B, C, 1, F) with the previous input frame `cache` -> (output frame, new cache)."""
        window = nn.functional.pad(torch.cat([cache, x], dim=2), [self.freq_pad, self.freq_pad])
        return self.act(self.norm(self.conv(window))), x


class CausalDeconvBlock(nn.Module):
    """ConvTranspose2d (time kernel 2, causal crop) -> [BatchNorm2d -> PReLU] on (B, C, T, F)."""

    def __init__(self, in_channels: int, out_channels: int, freq_kernel: int, freq_stride: int, last: bool) -> None:
        super().__init__()
        self.freq_crop = freq_kernel // 2
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, (TIME_KERNEL, freq_kernel), (1, freq_stride))
        self.post: nn.Module = nn.Identity() if last else nn.Sequential(nn.BatchNorm2d(out_channels), nn.PReLU())

    def _crop_freq(self, y: torch.Tensor) -> torch.Tensor:
        return y[..., self.freq_crop : y.shape[-1] - self.freq_crop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        return self.post(self._crop_freq(self.deconv(x)[:, :, :frames]))

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[x[t-1], x[t]] -> 3 output frames; the middle one is W0 x[t] + W1 x[t-1], the offline frame t."""
        y = self.deconv(torch.cat([cache, x], dim=2))[:, :, TIME_KERNEL - 1 : TIME_KERNEL]
        return self.post(self._crop_freq(y)), x


class DPRNN(nn.Module):
    """Dual-path RNN block on (B, C, T, F): intra BiLSTM over F, inter LSTM over T.

    Each path: RNN -> Linear -> LayerNorm((F, C)) -> residual add."""

    def __init__(self, units: int, freq_bins: int, eps: float) -> None:
        super().__init__()
        self.intra_rnn = nn.LSTM(units, units // 2, batch_first=True, bidirectional=True)
        self.intra_fc = nn.Linear(units, units)
        self.intra_ln = nn.LayerNorm((freq_bins, units), eps=eps)
        self.inter_rnn = nn.LSTM(units, units, batch_first=True)
        self.inter_fc = nn.Linear(units, units)
        self.inter_ln = nn.LayerNorm((freq_bins, units), eps=eps)

    def _intra(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, F, C) -> x + LN(FC(BiLSTM over F))."""
        batch, frames, bins, units = x.shape
        y = self.intra_rnn(x.reshape(batch * frames, bins, units))[0]
        return x + self.intra_ln(self.intra_fc(y).reshape(batch, frames, bins, units))

    def _inter(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """x (B, T, F, C) -> (x + LN(FC(LSTM over T)), h, c)."""
        batch, frames, bins, units = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(batch * bins, frames, units)
        y, (h, c) = self.inter_rnn(seq) if state is None else self.inter_rnn(seq, state)
        y = self.inter_fc(y).reshape(batch, bins, frames, units).permute(0, 2, 1, 3)
        return x + self.inter_ln(y), h, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._inter(self._intra(x.permute(0, 2, 3, 1)), None)[0]
        return out.permute(0, 3, 1, 2)

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, h_out, c_out = self._inter(self._intra(x.permute(0, 2, 3, 1)), (h, c))
        return out.permute(0, 3, 1, 2), h_out, c_out


def apply_complex_mask(mix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mix (B, F, T, 2), mask (B, 2, T, F) -> mix * mask as complex numbers, (B, F, T, 2)."""
    mask_real = mask[:, 0].transpose(1, 2)
    mask_imag = mask[:, 1].transpose(1, 2)
    mix_real, mix_imag = mix[..., 0], mix[..., 1]
    real = mix_real * mask_real - mix_imag * mask_imag
    imag = mix_imag * mask_real + mix_real * mask_imag
    return torch.stack([real, imag], dim=-1)


class DPCRN(nn.Module):
    """Offline DPCRN: forward(mix (B, 257, T, 2)) -> enhanced spectrum (B, 257, T, 2); any T."""

    def __init__(self, config: DPCRNConfig = DPCRNConfig()) -> None:
        super().__init__()
        self.config = config
        in_channels = (2, *config.channels[:-1])
        layers = zip(in_channels, config.channels, config.freq_kernels, config.freq_strides)
        self.encoder = nn.ModuleList(CausalConvBlock(*layer) for layer in layers)
        bottleneck_bins = config.freq_sizes()[-1]
        units = config.rnn_units
        if units != config.channels[-1]:
            raise ModelError(
                f"DPCRN config: rnn_units {units} must equal the last encoder channels {config.channels[-1]}"
            )
        eps = config.layer_norm_eps
        self.dprnn = nn.ModuleList(DPRNN(units, bottleneck_bins, eps) for _ in range(config.dprnn_blocks))
        self.decoder = nn.ModuleList(self._decoder_blocks(config))
        self._init_mask_head()

    def _init_mask_head(self, scale: float = 0.1) -> None:
        """Start near the identity mask (1 + 0j, small random weights): an untrained model passes its input through
        with a little change, its output has the input's magnitude, and training starts from the noisy signal."""
        head = self.decoder_blocks()[-1].deconv
        with torch.no_grad():
            head.weight.mul_(scale)
            if head.bias is not None:
                head.bias.copy_(torch.tensor([1.0, 0.0]))

    @staticmethod
    def _decoder_blocks(config: DPCRNConfig) -> list[CausalDeconvBlock]:
        out_channels = (2, *config.channels[:-1])
        return [
            CausalDeconvBlock(
                2 * config.channels[layer],
                out_channels[layer],
                config.freq_kernels[layer],
                config.freq_strides[layer],
                last=layer == 0,
            )
            for layer in reversed(range(len(config.channels)))
        ]

    def encoder_blocks(self) -> list[CausalConvBlock]:
        return [cast(CausalConvBlock, block) for block in self.encoder]

    def dprnn_blocks(self) -> list[DPRNN]:
        return [cast(DPRNN, block) for block in self.dprnn]

    def decoder_blocks(self) -> list[CausalDeconvBlock]:
        return [cast(CausalDeconvBlock, block) for block in self.decoder]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        x = mix.permute(0, 3, 2, 1)  # (B, 2, T, F)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        for rnn in self.dprnn:
            x = rnn(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(torch.cat([x, skip], dim=1))
        return apply_complex_mask(mix, x)


def stream_states(config: DPCRNConfig = DPCRNConfig()) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every streaming state, in REFERENCE order: en_cache1..5, rnn_cache1..4, de_cache1..5."""
    sizes = config.freq_sizes()
    in_channels = (2, *config.channels[:-1])
    states: list[tuple[str, tuple[int, ...]]] = [
        (f"en_cache{i + 1}", (1, in_channels[i], 1, sizes[i])) for i in range(len(config.channels))
    ]
    rnn_shape = (1, sizes[-1], config.rnn_units)
    for block in range(config.dprnn_blocks):
        states += [(f"rnn_cache{2 * block + 1}", rnn_shape), (f"rnn_cache{2 * block + 2}", rnn_shape)]
    for i, layer in enumerate(reversed(range(len(config.channels)))):
        states.append((f"de_cache{i + 1}", (1, 2 * config.channels[layer], 1, sizes[layer + 1])))
    return states


STREAM_STATES: list[tuple[str, tuple[int, ...]]] = stream_states()


class StreamingDPCRN(nn.Module):
    """T = 1 DPCRN sharing the offline model's modules: forward(mix (1, 257, 1, 2), *states) -> (enh, *states_out).

    States are positional in `STREAM_STATES` order (named in ONNX: `<name>` in, `<name>_out` out).
    """

    def __init__(self, offline: DPCRN) -> None:
        super().__init__()
        self.offline = offline
        self.state_specs = stream_states(offline.config)

    @classmethod
    def from_offline(cls, model: DPCRN) -> StreamingDPCRN:
        return cls(model).train(model.training)

    def initial_states(self, batch: int = 1) -> list[torch.Tensor]:
        """Zero states for the start of an utterance (batch other than 1 is for PyTorch use only)."""
        dtype = next(self.offline.parameters()).dtype
        shapes = [
            (shape[0], shape[1] * batch, *shape[2:]) if name.startswith("rnn") else (batch, *shape[1:])
            for name, shape in self.state_specs
        ]
        return [torch.zeros(shape, dtype=dtype) for shape in shapes]

    def forward(self, mix: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.offline
        depth = len(net.encoder)
        if len(states) != len(self.state_specs):
            raise ModelError(f"StreamingDPCRN expects {len(self.state_specs)} states, got {len(states)}")
        en_caches, rnn_caches, de_caches = states[:depth], states[depth:-depth], states[-depth:]
        x = mix.permute(0, 3, 2, 1)
        skips: list[torch.Tensor] = []
        en_out: list[torch.Tensor] = []
        rnn_out: list[torch.Tensor] = []
        de_out: list[torch.Tensor] = []
        for block, cache in zip(net.encoder_blocks(), en_caches):
            x, new_cache = block.step(x, cache)
            skips.append(x)
            en_out.append(new_cache)
        for i, rnn in enumerate(net.dprnn_blocks()):
            x, h, c = rnn.step(x, rnn_caches[2 * i], rnn_caches[2 * i + 1])
            rnn_out += [h, c]
        for deconv, skip, cache in zip(net.decoder_blocks(), reversed(skips), de_caches):
            x, new_cache = deconv.step(torch.cat([x, skip], dim=1), cache)
            de_out.append(new_cache)
        return (apply_complex_mask(mix, x), *en_out, *rnn_out, *de_out)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_dpcrn(weights: str | os.PathLike[str] | None = None) -> DPCRN:
    """DPCRN in eval mode with `weights` (a checkpoint: state_dict + config), else the shipped quant/assets/dpcrn.pt,
    else random initialisation (logged as a warning)."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if weights is None and not path.is_file():
        log.warning("no trained DPCRN weights at %s: using random initialisation (seed 0)", path)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return DPCRN().eval()
    checkpoint = read_checkpoint(path, "DPCRN", "scripts/train_dpcrn.py")
    model = build_model(path, "DPCRN", lambda: DPCRN(DPCRNConfig.from_dict(checkpoint.get("config", {}))))
    load_state(model, checkpoint["state_dict"], path, "DPCRN")
    return model.eval()
