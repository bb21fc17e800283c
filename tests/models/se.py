"""Four small speech-enhancement models in the shapes third-party exporters produce, trained for a few seconds on
se_calib mixtures with features from quant.frontends (the spec's own front end), so their masks beat identity.

- lstm-mask: Keras-style magnitude-mask LSTM, streaming, state outputs named `tf_op_layer_stack_*`
- gru-logpower: offline log10-power GRU masker, 320/160 frames, 161 bins
- two-stage: DTLN-like chain of two frame maskers, stage 2 reads stage 1's time-domain frames
- stft-gru-stream: streaming complex-mask model with three caches (conv, GRU, transposed conv), `_out` names
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.common import Mixtures

EPS = 1e-8


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _compressed_magnitude_loss(enhanced: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    # magnitudes compressed by ^0.3 (as speech-enhancement losses do) so that quiet bins count too
    return ((enhanced + EPS) ** 0.3 - (clean + EPS) ** 0.3).pow(2).mean()


# ------------------------------------------------------------------------------------------------ lstm-mask


class LstmMask(nn.Module):
    """Dense -> LSTM -> LSTM -> dense sigmoid mask over (B, T, 257) magnitudes; states (1, B, hidden) each."""

    def __init__(self, bins: int = 257, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(bins, hidden)
        self.lstm1 = nn.LSTM(hidden, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, bins)

    def forward(self, magnitude: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor, h2: torch.Tensor,
                c2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.relu(self.inp(torch.log(magnitude + 1.0)))
        x, (h1, c1) = self.lstm1(x, (h1, c1))
        x, (h2, c2) = self.lstm2(x, (h2, c2))
        return torch.sigmoid(self.out(x)), h1, c1, h2, c2

    def states(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(1, batch, self.hidden) for _ in range(4))

    def offline(self, magnitude: torch.Tensor) -> torch.Tensor:
        return self(magnitude, *self.states(magnitude.shape[0]))[0]


def train_lstm_mask(fe, mix: Mixtures, steps: int, **size: int) -> tuple[LstmMask, list[float]]:
    from models.common import train

    torch.manual_seed(0)
    model = LstmMask(**size)
    noisy, clean = _tensor(fe.features(mix.noisy)), _tensor(fe.features(mix.clean))  # (B, T, F) magnitudes
    losses = train(model, lambda: _compressed_magnitude_loss(model.offline(noisy) * noisy, clean), steps)
    return model, losses


# ------------------------------------------------------------------------------------------------ gru-logpower


class GruLogPower(nn.Module):
    """(B, T, 161) log10 power -> (B, T, 161) sigmoid mask; a unidirectional GRU, so it is causal."""

    def __init__(self, bins: int = 161, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(bins, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, bins)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp((features + 4.0) / 4.0))  # log10 power of speech at 16 kHz: about -8..2
        x, _ = self.gru(x)
        return torch.sigmoid(self.out(x))


def train_gru_logpower(fe, mix: Mixtures, steps: int, **size: int) -> tuple[GruLogPower, list[float]]:
    from models.common import train

    torch.manual_seed(0)
    model = GruLogPower(**size)
    features = _tensor(fe.features(mix.noisy))
    noisy = torch.sqrt(10.0 ** features)
    clean = torch.sqrt(10.0 ** _tensor(fe.features(mix.clean)))
    losses = train(model, lambda: _compressed_magnitude_loss(model(features) * noisy, clean), steps)
    return model, losses


# ------------------------------------------------------------------------------------------------ two-stage


def _dft_matrices(size: int) -> tuple[np.ndarray, ...]:
    """rfft and irfft of `size` samples as matrices (real/imag parts), so the graph needs no DFT op (opset 17)."""
    eye = np.eye(size)
    forward = np.fft.rfft(eye, axis=-1)  # (size, bins): frames @ forward = rfft(frames)
    bins = forward.shape[1]
    inverse_re = np.fft.irfft(np.eye(bins), n=size, axis=-1)  # (bins, size)
    inverse_im = np.fft.irfft(1j * np.eye(bins), n=size, axis=-1)
    return forward.real, forward.imag, inverse_re, inverse_im


class FrameMasker(nn.Module):
    """One stage: frames (B, T, 512) -> DFT -> magnitude mask from a tiny MLP -> inverse DFT -> frames."""

    def __init__(self, frame: int = 512, hidden: int = 8) -> None:
        super().__init__()
        for name, values in zip(("cos", "sin", "icos", "isin"), _dft_matrices(frame)):
            self.register_buffer(name, _tensor(values))
        bins = frame // 2 + 1
        self.net1 = nn.Linear(bins, hidden)
        self.net2 = nn.Linear(hidden, bins)
        nn.init.constant_(self.net2.bias, 2.0)  # start close to identity (sigmoid(2) = 0.88)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        re, im = frames @ self.cos, frames @ self.sin
        magnitude = torch.sqrt(re * re + im * im + EPS)
        mask = torch.sigmoid(self.net2(torch.relu(self.net1(torch.log(magnitude + 1.0)))))
        return (re * mask) @ self.icos + (im * mask) @ self.isin


class TwoStage(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.stage1 = FrameMasker(hidden=hidden)
        self.stage2 = FrameMasker(hidden=hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(frames))


class OutlierFrameMasker(FrameMasker):
    """A FrameMasker computing the same function with one outlier in its masked spectrum: the real part gets a last
    bin fixed at `spike` that the inverse DFT weighs by zero. FP32 sees no change; INT8 does: the bin sets the
    per-tensor scale of that inverse DFT MatMul's input (about spike / 255 per step), far above every real bin, so
    they round to zero. Outlier channels of trained networks do this too; here it is known where."""

    def __init__(self, stage: FrameMasker, spike: float) -> None:
        super().__init__(frame=stage.cos.shape[0], hidden=stage.net1.out_features)
        self.load_state_dict(stage.state_dict())
        self.spike = spike
        self.icos = torch.cat([self.icos, torch.zeros(1, self.icos.shape[1])])  # type: ignore[assignment]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        re, im = frames @ self.cos, frames @ self.sin
        magnitude = torch.sqrt(re * re + im * im + EPS)
        mask = torch.sigmoid(self.net2(torch.relu(self.net1(torch.log(magnitude + 1.0)))))
        spiked = nn.functional.pad(re * mask, (0, 1), value=self.spike)
        return spiked @ self.icos + (im * mask) @ self.isin


def train_two_stage(fe, mix: Mixtures, steps: int, **size: int) -> tuple[TwoStage, list[float]]:
    from models.common import train

    torch.manual_seed(0)
    model = TwoStage(**size)
    # (B, T, 512) raw frames; the stages work frame by frame, so every 4th frame is as good and 4x cheaper
    noisy, clean = _tensor(fe.features(mix.noisy)[:, ::4]), _tensor(fe.features(mix.clean)[:, ::4])
    losses = train(model, lambda: (model(noisy) - clean).pow(2).mean() / clean.pow(2).mean(), steps)
    return model, losses


# ------------------------------------------------------------------------------------------------ stft-gru-stream


class StftGruStream(nn.Module):
    """Complex STFT (B, 2, T, 257) -> complex mask (B, 2, T, 257), causal throughout. Three caches carry what the
    next frame needs: the last 2 input frames (time kernel 3 conv), the GRU state, the last frame into the
    time kernel 2 conv before the transposed conv. `forward` takes and returns them (`_out` convention)."""

    def __init__(self, bins: int = 257, channels: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.bins, self.channels, self.hidden = bins, channels, hidden
        self.conv = nn.Conv2d(2, channels, kernel_size=(3, 5), stride=(1, 4), padding=(0, 2))
        self.reduced = (bins + 4 - 5) // 4 + 1  # 65
        self.proj = nn.Linear(channels * self.reduced, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.expand = nn.Linear(hidden, channels * self.reduced)
        self.tconv = nn.Conv2d(channels, channels, kernel_size=(2, 1))
        self.up = nn.ConvTranspose2d(channels, 2, kernel_size=(1, 4), stride=(1, 4))
        self.register_buffer("identity", torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))

    def cache_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        return {"conv_cache": (batch, 2, 2, self.bins), "gru_cache": (1, batch, self.hidden),
                "deconv_cache": (batch, self.channels, 1, self.reduced)}

    def forward(self, spec: torch.Tensor, conv_cache: torch.Tensor, gru_cache: torch.Tensor,
                deconv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        magnitude = torch.sqrt(spec[:, :1] ** 2 + spec[:, 1:] ** 2 + EPS)
        compressed = spec * magnitude ** -0.7  # magnitude^0.3, phase kept
        frames = torch.cat([conv_cache, compressed], dim=2)
        x = torch.relu(self.conv(frames))  # (B, C, T, 65)
        x = torch.relu(self.proj(x.permute(0, 2, 1, 3).flatten(2)))  # (B, T, hidden)
        x, gru_out = self.gru(x, gru_cache)
        y = torch.relu(self.expand(x))  # (B, T, C * 65)
        y = y.reshape(y.shape[0], y.shape[1], self.channels, self.reduced).permute(0, 2, 1, 3)
        ys = torch.cat([deconv_cache, y], dim=2)
        mask = self.up(torch.relu(self.tconv(ys)))[..., : self.bins] + self.identity
        return mask, frames[:, :, -2:], gru_out, ys[:, :, -1:]

    def offline(self, spec: torch.Tensor) -> torch.Tensor:
        caches = [torch.zeros(shape) for shape in self.cache_shapes(spec.shape[0]).values()]
        return self(spec, *caches)[0]


def train_stft_gru(fe, mix: Mixtures, steps: int, **size: int) -> tuple[StftGruStream, list[float]]:
    from models.common import train

    torch.manual_seed(0)
    model = StftGruStream(**size)
    noisy, clean = _tensor(fe.features(mix.noisy)), _tensor(fe.features(mix.clean))  # (B, 2, T, 257)

    def loss() -> torch.Tensor:  # complex MSE relative to the clean energy (magnitude-only losses did worse)
        mask = model.offline(noisy)
        re = mask[:, 0] * noisy[:, 0] - mask[:, 1] * noisy[:, 1]
        im = mask[:, 0] * noisy[:, 1] + mask[:, 1] * noisy[:, 0]
        return ((re - clean[:, 0]) ** 2 + (im - clean[:, 1]) ** 2).mean() / clean.pow(2).mean()

    return model, train(model, loss, steps)
