"""What every test model needs: real-speech training mixtures, a few Adam steps, an opset-checked ONNX export."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from quant.data.manifest import load_noisy_clean, read_manifest
from quant.paths import calib_data_dir

SAMPLE_RATE = 16000
CLIP_SAMPLES = 2 * SAMPLE_RATE  # training clips: 2 s crops
HELD_OUT = 4  # the last utterances of se_calib are never trained on: the enhancement metric is measured on them


@dataclass(frozen=True)
class Mixtures:
    noisy: np.ndarray  # (N, samples) float32
    clean: np.ndarray


def training_mixtures(count: int = 16, seed: int = 0) -> Mixtures:
    """`count` 2 s crops of se_calib mixtures (its noise recipe: speech + looped noise at the listed SNR),
    from utterances other than the held-out ones."""
    utterances = read_manifest(calib_data_dir() / "se_calib" / "manifest.jsonl")[:-HELD_OUT]
    rng = np.random.default_rng(seed)
    noisy, clean = [], []
    for utt in utterances[:count]:
        mix, speech = load_noisy_clean(utt)
        start = int(rng.integers(0, max(1, len(mix) - CLIP_SAMPLES + 1)))
        noisy.append(_crop(mix, start))
        clean.append(_crop(speech, start))
    return Mixtures(np.stack(noisy).astype(np.float32), np.stack(clean).astype(np.float32))


def held_out_mixtures() -> list[tuple[np.ndarray, np.ndarray]]:
    """(noisy, clean) of the held-out se_calib utterances, whole."""
    utterances = read_manifest(calib_data_dir() / "se_calib" / "manifest.jsonl")[-HELD_OUT:]
    return [load_noisy_clean(utt) for utt in utterances]


def _crop(wave: np.ndarray, start: int, length: int = CLIP_SAMPLES) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    part = wave[start:start + length]
    out[: len(part)] = part
    return out


def train(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    """A handful of full-batch Adam steps; returns the loss before each step (the first is the untrained loss)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    module.eval()
    return losses


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: Sequence[str],
           outputs: Sequence[str], opset: int, dynamic_axes: dict[str, dict[int, str]] | None = None) -> Path:
    """TorchScript-based export (dynamo=False) to one self-contained file; the file's opset must be `opset`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the TorchScript exporter warns about its own deprecation and about traced RNN shapes; both are expected here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, torch.jit.TracerWarning))
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic_axes, external_data=False,
                          do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    produced = onnx_opset(model)
    if produced != opset:
        raise AssertionError(f"{path}: asked for opset {opset}, the exporter wrote {produced}")
    if [i.name for i in model.graph.input] != list(inputs) or [o.name for o in model.graph.output] != list(outputs):
        raise AssertionError(f"{path}: names {[i.name for i in model.graph.input]} -> "
                             f"{[o.name for o in model.graph.output]}, expected {list(inputs)} -> {list(outputs)}")
    return path


def onnx_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
