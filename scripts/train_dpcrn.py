#!/usr/bin/env python3
"""Train DPCRN (quant.models.dpcrn) on real speech mixed on the fly with real noise.

  python scripts/train_dpcrn.py --pack .carry/se_pack.npz --minutes 20 --device cuda
  python scripts/train_dpcrn.py --pack tiny.npz --smoke --out /tmp/dpcrn.pt      # a few CPU steps (tests)

Data: a pack (scripts/make_train_pack.py se): int16 16 kHz `speech`/`noise` clips concatenated with `*_offsets`
(N+1 sample boundaries), and held-out `val_speech`/`val_noise`; an array stored instead as `<name>_ogg` (one Ogg
Vorbis stream of the same samples) is decoded with soundfile, imported only then. Each step draws random crops (they may run across
clip boundaries: every crop is real speech), sets the speech to a random level (-35..-15 dBFS RMS) and adds noise
at a random SNR (-5..20 dB), all on the training device.

Loss (as in DPCRN's public training recipes): power-law compressed spectra (|X|^0.3 with the phase kept),
30 x (MSE real + MSE imag) + 70 x MSE magnitude, plus `--sisnr-weight` x (-SI-SNR in dB) of the waveforms.
Adam (lr 1e-3), cosine decay over the run (epochs or the --minutes budget, whichever ends first), gradient
clipping at 5, seeded. Each epoch logs the train loss and the validation SI-SDR improvement on fixed held-out
mixtures; the checkpoint with the best validation SI-SDRi is written atomically to --out (state_dict, config,
summary) with the measured numbers in <out stem>_train.json beside it, after every improving epoch (so a killed
run leaves its best so far). SIGTERM/SIGINT end the epoch early, score it, save and exit 0.

Runs where only numpy and torch exist (the GPU machine): of quant it imports quant.models.dpcrn, quant.fileio and
quant.features (the one STFT; kaldi_native_fbank is imported only by its fbank).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.features import HOP, SAMPLE_RATE, istft, stft  # noqa: E402
from quant.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from quant.models.dpcrn import DPCRN, count_parameters  # noqa: E402
from quant.paths import ASSETS_DIR  # noqa: E402

log = logging.getLogger("train_dpcrn")

PACK_ARRAYS = ("speech", "noise", "val_speech", "val_noise")
COMPRESS = 0.3
COMPLEX_WEIGHT = 30.0
MAG_WEIGHT = 70.0
EPS = 1e-8


@dataclass(frozen=True)
class TrainOptions:
    pack: Path = Path(".carry/se_pack.npz")
    out: Path = ASSETS_DIR / "dpcrn.pt"
    epochs: int = 1000
    minutes: float = 0.0  # wall-clock budget; 0 = no budget
    steps_per_epoch: int = 200
    batch: int = 32
    crop_seconds: float = 3.0
    snr_db: tuple[float, float] = (-5.0, 20.0)
    level_dbfs: tuple[float, float] = (-35.0, -15.0)
    lr: float = 1e-3
    lr_floor: float = 0.05  # cosine decays to lr * lr_floor
    clip_norm: float = 5.0
    sisnr_weight: float = 1.0
    val_items: int = 256
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    amp: bool = False  # bf16 autocast on CUDA
    init: Path | None = None  # continue from this checkpoint's weights (fresh optimizer and schedule)
    # checkpoint selection: "si_sdri" (validation SI-SDR improvement) or "pesq_wb" (validation PESQ-WB, the task
    # metric; SI-SDRi stayed ~0 dB while test PESQ rose in the first run, so it was a poor proxy)
    select: str = "si_sdri"
    pesq_items: int = 96  # validation mixtures scored with PESQ-WB when select == "pesq_wb"


SMOKE = dict(epochs=2, steps_per_epoch=2, batch=2, crop_seconds=0.5, val_items=4, device="cpu")


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Pack:
    speech: torch.Tensor  # int16, concatenated clips
    noise: torch.Tensor
    val_speech: torch.Tensor
    val_noise: torch.Tensor
    meta: dict[str, Any]


def load_pack(path: Path, device: torch.device) -> Pack:
    """Read the numpy-only pack and move its int16 audio to `device`; fails naming what is missing or wrong."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such pack; build it with scripts/make_train_pack.py se -o {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [
            name
            for base in PACK_ARRAYS
            for name in (base, f"{base}_offsets")
            if name not in data.files and not (name == base and f"{base}_ogg" in data.files)
        ]
        if missing:
            raise SystemExit(f"{path}: missing arrays {missing}; expected {PACK_ARRAYS} and their *_offsets")
        arrays = {
            name: _checked_audio(path, name, _pack_audio(path, data, name), data[f"{name}_offsets"])
            for name in PACK_ARRAYS
        }
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    return Pack(**{name: torch.from_numpy(array).to(device) for name, array in arrays.items()}, meta=meta)


def _pack_audio(path: Path, data: Any, name: str) -> np.ndarray:
    """`name` as int16 samples: stored as is, or as `<name>_ogg` (one Ogg Vorbis stream, decoded by soundfile)."""
    if name in data.files:
        return np.asarray(data[name])
    try:
        import soundfile
    except ImportError:
        raise SystemExit(
            f"{path}: `{name}_ogg` is Ogg Vorbis and decoding it needs soundfile (pip install the soundfile wheel "
            "shipped with the pack), or rebuild the pack with int16 arrays"
        ) from None
    samples, rate = soundfile.read(io.BytesIO(data[f"{name}_ogg"].tobytes()), dtype="int16")
    if rate != SAMPLE_RATE or samples.ndim != 1:
        raise SystemExit(f"{path}: `{name}_ogg` decodes to {rate} Hz {samples.shape}; expected 16 kHz mono")
    return np.asarray(samples)


def _checked_audio(path: Path, name: str, audio: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if audio.dtype != np.int16 or audio.ndim != 1 or audio.size < HOP:
        raise SystemExit(f"{path}: `{name}` must be 1-D int16 16 kHz samples, got {audio.dtype} {audio.shape}")
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != audio.size or np.any(np.diff(offsets) <= 0):
        raise SystemExit(f"{path}: `{name}_offsets` must rise from 0 to {audio.size} (N+1 clip boundaries)")
    return audio


def random_crops(audio: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`count` crops of `length` samples at random starts (wrapping at the end), float32 in [-1, 1]."""
    starts = torch.randint(0, audio.numel(), (count, 1), generator=generator, device=audio.device)
    index = (starts + torch.arange(length, device=audio.device)) % audio.numel()
    return audio[index].float() / 32768.0


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).add(EPS * EPS).sqrt()


def mix_at(
    speech: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor, level_dbfs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech at `level_dbfs` RMS plus noise at `snr_db` below it, (B, L) each; scaled down together if a
    mixture would clip. Returns (mixture, clean target)."""
    clean = speech * (10.0 ** (level_dbfs[:, None] / 20.0) / rms(speech))
    noise = noise * (rms(clean) / (rms(noise) * 10.0 ** (snr_db[:, None] / 20.0)))
    mixture = clean + noise
    scale = (0.99 / mixture.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)).clamp(max=1.0)
    return mixture * scale, clean * scale


def uniform(
    low_high: tuple[float, float], count: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    low, high = low_high
    return low + (high - low) * torch.rand(count, generator=generator, device=device)


def mixtures(
    speech: torch.Tensor, noise: torch.Tensor, count: int, opts: TrainOptions, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    length = int(opts.crop_seconds * SAMPLE_RATE)
    device = speech.device
    return mix_at(
        random_crops(speech, count, length, generator),
        random_crops(noise, count, length, generator),
        uniform(opts.snr_db, count, generator, device),
        uniform(opts.level_dbfs, count, generator, device),
    )


# ---------------------------------------------------------------------------------------------- loss and metrics


def compressed_spectral_loss(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, F, T, 2) spectra: 30 x (MSE real + MSE imag) of |X|^0.3 e^{j angle X} + 70 x MSE of |X|^0.3."""
    est_mag = est.pow(2).sum(-1).add(EPS).sqrt()
    ref_mag = ref.pow(2).sum(-1).add(EPS).sqrt()
    est_c = est / est_mag.pow(1.0 - COMPRESS).unsqueeze(-1)
    ref_c = ref / ref_mag.pow(1.0 - COMPRESS).unsqueeze(-1)
    complex_mse = (est_c - ref_c).pow(2).mean(dim=(1, 2)).sum(-1)  # real + imag
    mag_mse = (est_mag.pow(COMPRESS) - ref_mag.pow(COMPRESS)).pow(2).mean(dim=(1, 2))
    return (COMPLEX_WEIGHT * complex_mse + MAG_WEIGHT * mag_mse).mean()


def si_sdr_db(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SDR in dB per row of (B, L) waveforms (zero-mean)."""
    est = est - est.mean(dim=-1, keepdim=True)
    ref = ref - ref.mean(dim=-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True).add(EPS)
    target = alpha * ref
    ratio = target.pow(2).sum(-1) / (est - target).pow(2).sum(-1).add(EPS)
    return 10.0 * torch.log10(ratio.add(EPS))


@dataclass(frozen=True)
class Batch:
    mixture: torch.Tensor  # (B, L) waveforms
    clean: torch.Tensor


class Trainer:
    """One model and its optimizer; `step` trains on a batch, `evaluate` scores fixed mixtures."""

    def __init__(self, model: DPCRN, opts: TrainOptions) -> None:
        self.model = model
        self.opts = opts
        self.pesq_pool = _pesq_pool() if opts.select == "pesq_wb" else None
        self.optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
        self.skipped_steps = 0

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Enhanced spectrum (float32) and the clean spectrum."""
        mix_spec = stft(batch.mixture)
        use_amp = self.opts.amp and batch.mixture.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            est = self.model(mix_spec)
        return est.float(), stft(batch.clean)

    def loss(self, batch: Batch) -> torch.Tensor:
        est, ref = self._forward(batch)
        loss = compressed_spectral_loss(est, ref)
        if self.opts.sisnr_weight:
            length = batch.clean.shape[-1]
            loss = loss - self.opts.sisnr_weight * si_sdr_db(istft(est, length), batch.clean).mean()
        return loss

    def step(self, batch: Batch, lr: float) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            if self.skipped_steps > 20:
                raise SystemExit("training diverged: more than 20 steps with a non-finite loss")
            log.warning("non-finite loss; step skipped (%d so far)", self.skipped_steps)
            return float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip_norm)
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, val: Batch) -> dict[str, float]:
        self.model.eval()
        losses, noisy, enhanced = [], [], []
        for chunk in _chunks(val, self.opts.batch):
            est, ref = self._forward(chunk)
            losses.append(float(compressed_spectral_loss(est, ref)) * chunk.clean.shape[0])
            noisy.append(si_sdr_db(chunk.mixture, chunk.clean))
            enhanced.append(si_sdr_db(istft(est, chunk.clean.shape[-1]), chunk.clean))
        noisy_db, enhanced_db = torch.cat(noisy), torch.cat(enhanced)
        scores = {
            "val_spectral_loss": sum(losses) / val.clean.shape[0],
            "val_si_sdr_noisy_db": float(noisy_db.mean()),
            "val_si_sdr_enhanced_db": float(enhanced_db.mean()),
            "val_si_sdri_db": float((enhanced_db - noisy_db).mean()),
        }
        if self.pesq_pool is not None:
            scores["val_pesq_wb"] = self._val_pesq(val)
        return scores

    def _val_pesq(self, val: Batch) -> float:
        """Mean PESQ-WB of the enhanced first `pesq_items` validation mixtures (scored in a process pool)."""
        count = min(self.opts.pesq_items, val.clean.shape[0])
        subset = Batch(val.mixture[:count], val.clean[:count])
        enhanced = torch.cat([istft(self._forward(chunk)[0], chunk.clean.shape[-1])
                              for chunk in _chunks(subset, self.opts.batch)])
        pairs = list(zip(subset.clean.cpu().numpy(), enhanced.cpu().numpy()))
        assert self.pesq_pool is not None
        return float(np.mean(self.pesq_pool.starmap(_pesq_wb, pairs)))


def _pesq_pool() -> Any:
    try:
        import pesq  # noqa: F401
    except ImportError:
        raise SystemExit("--select pesq_wb needs the pesq package (carry its wheel to the GPU machine)") from None
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool()


def _pesq_wb(clean: np.ndarray, enhanced: np.ndarray) -> float:
    from pesq import pesq

    try:
        return float(pesq(SAMPLE_RATE, clean, enhanced, "wb"))
    except Exception:  # pesq raises on silent crops ("No utterances detected"): score them as the floor
        return 1.0


def _chunks(batch: Batch, size: int) -> Iterator[Batch]:
    for start in range(0, batch.clean.shape[0], size):
        yield Batch(batch.mixture[start : start + size], batch.clean[start : start + size])


# ---------------------------------------------------------------------------------------------- schedule and loop


def cosine_lr(opts: TrainOptions, progress: float) -> float:
    """lr at `progress` in [0, 1] of the run: cosine from lr down to lr * lr_floor."""
    progress = min(max(progress, 0.0), 1.0)
    return opts.lr * (opts.lr_floor + (1.0 - opts.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _progress(opts: TrainOptions, step: int, elapsed_s: float) -> float:
    by_steps = step / (opts.epochs * opts.steps_per_epoch)
    by_time = elapsed_s / (opts.minutes * 60.0) if opts.minutes > 0 else 0.0
    return max(by_steps, by_time)


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train, keep the checkpoint with the best validation SI-SDRi, write it; returns the summary."""
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
    pack = load_pack(opts.pack, device)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    val_generator = torch.Generator(device=device).manual_seed(opts.seed + 1)
    val = Batch(*mixtures(pack.val_speech, pack.val_noise, opts.val_items, opts, val_generator))
    model = DPCRN().to(device)
    if opts.init is not None:
        model.load_state_dict(torch.load(opts.init, map_location=device, weights_only=False)["state_dict"])
        log.info("initialized from %s", opts.init)
    trainer = Trainer(model, opts)
    summary = _summary_head(opts, pack, model)
    best: dict[str, Any] | None = None
    start = time.monotonic()
    step = 0
    stop = _stop_on_signals()
    for epoch in range(1, opts.epochs + 1):
        losses = []
        for _ in range(opts.steps_per_epoch):
            lr = cosine_lr(opts, _progress(opts, step, time.monotonic() - start))
            batch = Batch(*mixtures(pack.speech, pack.noise, opts.batch, opts, generator))
            losses.append(trainer.step(batch, lr))
            step += 1
            if stop:
                break
        record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": float(np.nanmean(losses))}
        record |= trainer.evaluate(val)
        record["elapsed_s"] = time.monotonic() - start
        summary["history"].append(record)
        _log_epoch(record)
        score_key = "val_pesq_wb" if opts.select == "pesq_wb" else "val_si_sdri_db"
        if best is None or record[score_key] > best["record"][score_key]:
            best = {"record": record, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            _save(opts, model, best["state"], summary, best["record"])
        if opts.minutes > 0 and time.monotonic() - start >= opts.minutes * 60.0:
            log.info("wall-clock budget of %.1f min reached after epoch %d", opts.minutes, epoch)
            break
        if stop:
            log.info("stopping on %s after epoch %d (step %d)", stop[0], epoch, step)
            break
    assert best is not None
    summary["skipped_steps"] = trainer.skipped_steps
    return _save(opts, model, best["state"], summary, best["record"])


def _stop_on_signals() -> list[str]:
    """SIGTERM/SIGINT end the current epoch early; training then scores, saves and exits cleanly.
    The returned list is empty until a signal arrives (then it holds the signal's name)."""
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return received


def _log_epoch(record: dict[str, Any]) -> None:
    log.info(
        "epoch %d (step %d, lr %.2e): train loss %.4f | val loss %.4f, SI-SDR %.2f -> %.2f dB "
        "(SI-SDRi %+.2f dB) PESQ-WB %s | %.0f s",
        record["epoch"], record["step"], record["lr"], record["train_loss"], record["val_spectral_loss"],
        record["val_si_sdr_noisy_db"], record["val_si_sdr_enhanced_db"], record["val_si_sdri_db"],
        record.get("val_pesq_wb", "-"), record["elapsed_s"],
    )


def _summary_head(opts: TrainOptions, pack: Pack, model: DPCRN) -> dict[str, Any]:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    device = torch.device(opts.device)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "options": options,
        "parameters": count_parameters(model),
        "train_speech_hours": pack.speech.numel() / SAMPLE_RATE / 3600.0,
        "train_noise_hours": pack.noise.numel() / SAMPLE_RATE / 3600.0,
        "val_speech_seconds": pack.val_speech.numel() / SAMPLE_RATE,
        "val_noise_seconds": pack.val_noise.numel() / SAMPLE_RATE,
        "pack_meta": pack.meta,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "loss": f"{COMPLEX_WEIGHT:g} x (MSE real + imag) + {MAG_WEIGHT:g} x MSE magnitude of |X|^{COMPRESS:g} spectra"
        f" + {opts.sisnr_weight:g} x (-SI-SNR dB)",
        "history": [],
    }


def _save(
    opts: TrainOptions, model: DPCRN, state: dict[str, torch.Tensor], summary: dict[str, Any], best: dict[str, Any]
) -> dict[str, Any]:
    """Write the checkpoint (best state) and the JSON of measured numbers; returns the summary written."""
    summary = {**summary, "best": best, "epochs_run": len(summary["history"]), "steps": summary["history"][-1]["step"]}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "config": model.config.to_dict(), "summary": summary}, buffer)
    atomic_write_bytes(opts.out, buffer.getvalue())
    atomic_write_json(train_json_path(opts.out), summary)
    log.info("saved %s (epoch %d, val SI-SDRi %+.2f dB, val PESQ-WB %s)", opts.out, best["epoch"],
             best["val_si_sdri_db"], best.get("val_pesq_wb", "not scored"))
    return summary


def train_json_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "_train.json")


# ---------------------------------------------------------------------------------------------- CLI


def parse_options(argv: list[str] | None = None) -> TrainOptions:
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=defaults.pack)
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    parser.add_argument("--out", type=Path, default=defaults.out, help="checkpoint (default quant/assets/dpcrn.pt)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="wall-clock budget (0: none)")
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--crop-seconds", type=float, default=defaults.crop_seconds)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--sisnr-weight", type=float, default=defaults.sisnr_weight)
    parser.add_argument("--val-items", type=int, default=defaults.val_items)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--select", choices=["si_sdri", "pesq_wb"], default=defaults.select,
                        help="validation score that picks the checkpoint")
    parser.add_argument("--pesq-items", type=int, default=defaults.pesq_items)
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run of a few steps (tests)")
    args = parser.parse_args(argv)
    opts = TrainOptions(
        pack=args.pack, out=args.out, epochs=args.epochs, minutes=args.minutes, steps_per_epoch=args.steps_per_epoch,
        batch=args.batch, crop_seconds=args.crop_seconds, lr=args.lr, sisnr_weight=args.sisnr_weight,
        val_items=args.val_items, seed=args.seed, amp=args.amp, init=args.init, select=args.select,
        pesq_items=args.pesq_items,
    )
    if args.smoke:
        opts = replace(opts, **SMOKE)  # type: ignore[arg-type]
    return replace(opts, device=args.device) if args.device else opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = parse_options(argv)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    summary = train(opts)
    best = summary["best"]
    log.info("done: %d epochs, %d steps; best val SI-SDRi %+.2f dB (epoch %d)",
             summary["epochs_run"], summary["steps"], best["val_si_sdri_db"], best["epoch"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
