#!/usr/bin/env python3
"""Train the WeNet-style conformer (quant.models.conformer) on character CTC + attention, within a wall-clock budget.

  python scripts/train_conformer.py --train DIR [DIR ...] --dev DEV/manifest.jsonl [--test M ...] \
      [--noise se_pack.npz] --minutes 8 -o quant/assets/conformer.pt
  python scripts/train_conformer.py --smoke -o /tmp/smoke.pt      # tiny CPU run on tests/data (seconds)
  python scripts/train_conformer.py --smoke --device cuda -o /tmp/smoke.pt   # the same through CUDA + bf16

Each --train DIR holds manifest.jsonl (path relative to the manifest, duration, text, source) and 16 kHz audio.
Features: quant.features.fbank (the one implementation) computed once in a process pool and cached in memory as
float16, one copy per speed factor (0.9/1.0/1.1 by resampling); each copy gets additive noise from --noise
(an .npz with int16 `noise` + `noise_offsets`, the SE training pack layout) with probability --noise-prob at a
random SNR (5-25 dB), and a random level change (--gain-db). Each epoch picks one cached copy per utterance;
SpecAugment (2 frequency masks F <= 27, 2 time masks) runs on the device. Global CMVN comes from the speed-1.0
training copies. --minutes bounds the whole run: training stops --reserve-s before it for final scoring + saving.
Loss: 0.3 * CTC + 0.7 * attention cross-entropy (label smoothing 0.1); Adam with linear warmup then a cosine decay
over the wall-clock budget; batches by total frames; bf16 autocast on CUDA (CTC computed in float32).
Every epoch logs the train loss and the dev CER of CTC greedy decoding; the best-by-dev model is kept and saved
(state_dict + config + cmvn + vocab) with a JSON of measured metrics and a markdown model card beside it.
At the end the best model is also scored with CTC prefix beam search + attention rescoring on dev and --test sets.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.data.audio import load_audio, resample  # noqa: E402
from quant.decoding import (  # noqa: E402
    best_hypotheses,
    ctc_greedy,
    ctc_prefix_beam_search,
    hyps_to_decoder_inputs,
)
from quant.features import SAMPLE_RATE, fbank  # noqa: E402
from quant.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from quant.models.conformer import (  # noqa: E402
    Conformer,
    ConformerConfig,
    WenetDecoder,
    checkpoint_dict,
    load_conformer,
)
from quant.models.tokenizer import CharTokenizer  # noqa: E402

log = logging.getLogger("train_conformer")
IGNORE_ID = -1
RESCORE_BEAM = 10
SMOKE_CONFIG = ConformerConfig(d_model=32, heads=2, ffn_dim=64, encoder_blocks=2, decoder_blocks=1,
                               decoder_ffn_dim=64, dropout=0.0)


@dataclass(frozen=True)
class TrainOptions:
    minutes: float = 8.0
    max_epochs: int = 200
    batch_frames: int = 40000  # padded fbank frames per batch (100 per second of audio)
    peak_lr: float = 2e-3
    warmup_steps: int = 600
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0
    ctc_weight: float = 0.3
    label_smoothing: float = 0.1
    spec_freq_masks: int = 2
    spec_freq_width: int = 27
    spec_time_masks: int = 2
    spec_time_ratio: float = 0.05
    max_time_width: int = 40
    seed: int = 1234


@dataclass(frozen=True)
class Utt:
    path: Path
    text: str
    source: str


@dataclass
class Example:
    copies: list[np.ndarray]  # fbank (T, 80) float16, one per speed/noise copy
    tokens: np.ndarray  # int64 character ids
    text: str


# ------------------------------------------------------------------------------------------------------------ data


def read_manifest(path: Path) -> list[Utt]:
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    utts = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("text"):
            raise SystemExit(f"{manifest}:{number}: utterance {row.get('path')} has no transcript")
        utts.append(Utt(manifest.parent / row["path"], row["text"], str(row.get("source", ""))))
    return utts


_NOISE: tuple[np.ndarray, np.ndarray] | None = None  # (samples int16, offsets), shared with forked workers


def load_noise(path: Path | None) -> None:
    global _NOISE
    if path is None:
        return
    with np.load(path) as pack:  # allow_pickle stays False
        if "noise" not in pack or "noise_offsets" not in pack:
            raise SystemExit(f"{path}: expected int16 `noise` and `noise_offsets` arrays, found {sorted(pack.files)}")
        _NOISE = (pack["noise"], pack["noise_offsets"])
    log.info("noise: %d clips, %.1f min from %s", len(_NOISE[1]) - 1, len(_NOISE[0]) / SAMPLE_RATE / 60, path)


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_low: float = 5.0, snr_high: float = 25.0) -> np.ndarray:
    if _NOISE is None:
        return audio
    samples, offsets = _NOISE
    clip = int(rng.integers(len(offsets) - 1))
    noise = samples[offsets[clip] : offsets[clip + 1]].astype(np.float32) / 32768.0
    if len(noise) == 0:
        return audio
    start = int(rng.integers(len(noise)))
    noise = np.resize(np.roll(noise, -start), len(audio))  # loop short clips
    speech_power = float(np.mean(audio**2)) + 1e-10
    noise_power = float(np.mean(noise**2)) + 1e-10
    snr_db = rng.uniform(snr_low, snr_high)
    mixed = audio + noise * math.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    peak = float(np.abs(mixed).max())
    return (mixed / peak * 0.89 if peak > 0.99 else mixed).astype(np.float32)


def speed_perturb(audio: np.ndarray, speed: float) -> np.ndarray:
    """Play `speed` times faster (pitch shifts too, as Kaldi/WeNet speed perturbation does)."""
    if speed == 1.0:
        return audio
    return resample(audio, int(round(SAMPLE_RATE * speed)), SAMPLE_RATE)


@dataclass(frozen=True)
class Augment:
    speeds: tuple[float, ...] = (1.0,)
    noise_prob: float = 0.0
    gain_db: tuple[float, float] = (0.0, 0.0)  # uniform random level change per copy


def featurize(job: tuple[str, Augment, int]) -> list[np.ndarray]:
    path, augment, seed = job
    rng = np.random.default_rng(seed)
    audio = load_audio(path)
    copies = []
    for speed in augment.speeds:
        wave = speed_perturb(audio, speed) * 10 ** (rng.uniform(*augment.gain_db) / 20)
        if _NOISE is not None and rng.random() < augment.noise_prob:
            wave = add_noise(wave, rng)
        copies.append(fbank(np.clip(wave, -1.0, 1.0)).astype(np.float16))
    return copies


def build_examples(
    utts: Sequence[Utt], tokenizer: CharTokenizer, augment: Augment, workers: int, seed: int
) -> list[Example]:
    jobs = [(str(u.path), augment, seed * 1_000_003 + i) for i, u in enumerate(utts)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            features = pool.map(featurize, jobs, chunksize=32)
    else:
        features = [featurize(job) for job in jobs]
    examples = []
    for utt, copies in zip(utts, features):
        tokens = np.array(tokenizer.encode(utt.text), dtype=np.int64)
        frames = min(c.shape[0] for c in copies)
        if len(tokens) == 0 or frames < 7 or ((frames - 1) // 2 - 1) // 2 < len(tokens):
            continue  # too short for 4x subsampling or more characters than output frames: CTC cannot align
        examples.append(Example(copies, tokens, utt.text))
    log.info("%d of %d utterances usable (%d copies each)", len(examples), len(utts), len(augment.speeds))
    return examples


def cmvn_stats(examples: Sequence[Example], clean_copy: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = np.zeros(80, np.float64)
    square = np.zeros(80, np.float64)
    frames = 0
    for example in examples:
        feats = example.copies[clean_copy].astype(np.float64)
        total += feats.sum(axis=0)
        square += (feats**2).sum(axis=0)
        frames += feats.shape[0]
    mean = total / frames
    std = np.sqrt(np.maximum(square / frames - mean**2, 1e-20))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(1.0 / np.maximum(std, 1e-5), dtype=torch.float32)


def make_batches(lengths: Sequence[int], batch_frames: int, rng: random.Random) -> list[list[int]]:
    """Length-sorted buckets whose padded size (count x longest) stays under batch_frames, in shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_frames:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(feats: Sequence[np.ndarray], tokens: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    speech = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1], dtype=torch.float16)
    for row, feat in enumerate(feats):
        speech[row, : feat.shape[0]] = torch.from_numpy(feat)
    token_lens = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
    ys = torch.full((len(tokens), int(token_lens.max())), IGNORE_ID, dtype=torch.int64)
    for row, toks in enumerate(tokens):
        ys[row, : len(toks)] = torch.from_numpy(toks)
    return {"speech": speech, "lengths": lengths, "ys": ys, "ys_lens": token_lens}


# ---------------------------------------------------------------------------------------------------- model + loss


def spec_augment(speech: torch.Tensor, lengths: torch.Tensor, opts: TrainOptions, gen: torch.Generator) -> torch.Tensor:
    """Zero 2 random frequency bands (width < F) and 2 time spans (width <= ratio * length) per utterance."""
    batch, frames, bins = speech.shape
    device = speech.device
    keep = torch.ones_like(speech, dtype=torch.bool)
    freq_axis = torch.arange(bins, device=device).view(1, 1, bins)
    time_axis = torch.arange(frames, device=device).view(1, frames, 1)
    for _ in range(opts.spec_freq_masks):
        width = torch.randint(0, opts.spec_freq_width, (batch, 1, 1), generator=gen).to(device)
        start = (torch.rand((batch, 1, 1), generator=gen).to(device) * (bins - width)).long()
        keep &= ~((freq_axis >= start) & (freq_axis < start + width))
    for _ in range(opts.spec_time_masks):
        limit = torch.clamp((lengths.float() * opts.spec_time_ratio).long(), 1, opts.max_time_width).view(batch, 1, 1)
        width = (torch.rand((batch, 1, 1), generator=gen).to(device) * limit.to(device)).long()
        start = (torch.rand((batch, 1, 1), generator=gen).to(device) * (lengths.view(batch, 1, 1).to(device) - width)).long()
        keep &= ~((time_axis >= start) & (time_axis < start + width))
    return speech * keep


def add_sos_eos(ys: torch.Tensor, sos_eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ys padded with IGNORE_ID -> decoder input [sos]+y (pad eos), target y+[eos] (pad IGNORE_ID)."""
    batch = ys.size(0)
    lens = (ys != IGNORE_ID).sum(dim=1)
    column = torch.full((batch, 1), sos_eos, dtype=ys.dtype, device=ys.device)
    ys_in = torch.cat([column, ys.masked_fill(ys == IGNORE_ID, sos_eos)], dim=1)
    ys_out = torch.cat([ys, torch.full_like(column, IGNORE_ID)], dim=1)
    ys_out[torch.arange(batch, device=ys.device), lens] = sos_eos
    return ys_in, ys_out


def compute_loss(model: Conformer, batch: dict[str, torch.Tensor], opts: TrainOptions) -> dict[str, torch.Tensor]:
    encoder_out, out_lens = model.encode(batch["speech"], batch["lengths"])
    log_probs = torch.log_softmax(model.ctc(encoder_out).float(), dim=-1)
    ys, ys_lens = batch["ys"], batch["ys_lens"]
    targets = ys.masked_fill(ys == IGNORE_ID, 0)
    ctc = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, ys_lens, blank=0, reduction="sum",
                     zero_infinity=True) / ys.size(0)
    ys_in, ys_out = add_sos_eos(ys, model.sos_eos)
    logits = model.decoder(encoder_out, out_lens, ys_in, ys_lens + 1).float()
    att = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys_out.reshape(-1), ignore_index=IGNORE_ID,
                          label_smoothing=opts.label_smoothing, reduction="sum") / ys.size(0)
    loss = opts.ctc_weight * ctc + (1.0 - opts.ctc_weight) * att
    return {"loss": loss, "ctc": ctc.detach(), "att": att.detach()}


def learning_rate(step: int, elapsed_fraction: float, opts: TrainOptions) -> float:
    warm = min(1.0, (step + 1) / opts.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed_fraction)))
    return opts.peak_lr * warm * (opts.min_lr_ratio + (1.0 - opts.min_lr_ratio) * cosine)


# ------------------------------------------------------------------------------------------------------ evaluation


def edit_distance(ref: str, hyp: str) -> int:
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    return errors / max(1, sum(len(r) for r in refs))


def eval_batches(examples: Sequence[Example], batch_frames: int) -> Iterator[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: examples[i].copies[0].shape[0])
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * examples[index].copies[0].shape[0] > batch_frames:
            yield current
            current = []
        current.append(index)
    if current:
        yield current


@torch.no_grad()
def encode_all(model: Conformer, examples: Sequence[Example], device: torch.device, batch_frames: int
               ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """index -> (ctc log-probs (T', V) float32, encoder_out (T', d) float32), unpadded."""
    model.eval()
    out = {}
    for indices in eval_batches(examples, batch_frames):
        batch = collate([examples[i].copies[0] for i in indices], [examples[i].tokens for i in indices])
        encoder_out, lens = model.encode(batch["speech"].to(device).float(), batch["lengths"].to(device))
        log_probs = model.ctc_log_probs(encoder_out).float().cpu().numpy()
        enc = encoder_out.float().cpu().numpy()
        for row, index in enumerate(indices):
            length = int(lens[row])
            out[index] = (log_probs[row, :length], enc[row, :length])
    return out


def greedy_cer(model: Conformer, examples: Sequence[Example], tokenizer: CharTokenizer, device: torch.device,
               batch_frames: int) -> float:
    encoded = encode_all(model, examples, device, batch_frames)
    hyps = [tokenizer.decode(ctc_greedy(encoded[i][0])) for i in range(len(examples))]
    return cer([e.text for e in examples], hyps)


def _beam_search(log_probs: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
    return ctc_prefix_beam_search(log_probs, beam=RESCORE_BEAM)


@torch.no_grad()
def rescoring_cer(model: Conformer, examples: Sequence[Example], tokenizer: CharTokenizer, device: torch.device,
                  batch_frames: int, workers: int = 1, chunk: int = 64) -> dict[str, float]:
    """CER of CTC greedy, CTC prefix beam search (top hyp) and attention rescoring (WenetDecoder, beam 10).
    Beam searches run in a process pool; the rescoring decoder runs on `chunk` utterances at a time."""
    encoded = encode_all(model, examples, device, batch_frames)
    log_probs = [encoded[i][0] for i in range(len(examples))]
    if workers > 1 and len(examples) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            nbests = pool.map(_beam_search, log_probs, chunksize=4)
    else:
        nbests = [_beam_search(lp) for lp in log_probs]
    rescorer = WenetDecoder(model).eval()
    chosen: list[list[int]] = []
    for start in range(0, len(examples), chunk):
        indices = list(range(start, min(start + chunk, len(examples))))
        enc = [torch.from_numpy(encoded[i][1]) for i in indices]
        memory = torch.nn.utils.rnn.pad_sequence(enc, batch_first=True).to(device)
        lens = torch.tensor([e.shape[0] for e in enc], dtype=torch.int32, device=device)
        inputs = hyps_to_decoder_inputs([nbests[i] for i in indices], tokenizer.sos_eos, RESCORE_BEAM)
        best, _ = rescorer(memory, lens, torch.from_numpy(inputs.hyps_pad_sos_eos).to(device),
                           torch.from_numpy(inputs.hyps_lens_sos).to(device), torch.from_numpy(inputs.ctc_score).to(device))
        chosen += best_hypotheses([nbests[i] for i in indices], best.cpu().numpy())
    refs = [tokenizer.decode(e.tokens.tolist()) for e in examples]
    greedy = [tokenizer.decode(ctc_greedy(lp)) for lp in log_probs]
    prefix = [tokenizer.decode(nbest[0][0]) for nbest in nbests]
    rescored = [tokenizer.decode(tokens) for tokens in chosen]
    return {"ctc_greedy": cer(refs, greedy), "ctc_prefix_beam": cer(refs, prefix),
            "attention_rescoring": cer(refs, rescored), "utterances": len(examples)}


# -------------------------------------------------------------------------------------------------------- training


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best_cer: float = math.inf
    best_epoch: int = -1
    best_state: dict | None = None


def train_epoch(model: Conformer, optimizer: torch.optim.Optimizer, examples: Sequence[Example],
                opts: TrainOptions, state: TrainState, device: torch.device, started: float, budget_s: float,
                rng: random.Random, gen: torch.Generator) -> dict[str, float]:
    model.train()
    picks = [rng.randrange(len(e.copies)) for e in examples]
    lengths = [examples[i].copies[picks[i]].shape[0] for i in range(len(examples))]
    sums = {"loss": 0.0, "ctc": 0.0, "att": 0.0}
    count = 0
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for indices in make_batches(lengths, opts.batch_frames, rng):
        if time.monotonic() - started >= budget_s:
            break
        batch = collate([examples[i].copies[picks[i]] for i in indices], [examples[i].tokens for i in indices])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["speech"] = spec_augment(batch["speech"].float(), batch["lengths"], opts, gen)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state.step, (time.monotonic() - started) / budget_s, opts)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = compute_loss(model, batch, opts)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        if torch.isfinite(norm):
            optimizer.step()
        state.step += 1
        count += 1
        for key in sums:
            sums[key] += float(losses[key].detach())
    return {key: value / max(1, count) for key, value in sums.items()} | {"batches": count}


def train(model: Conformer, train_set: Sequence[Example], dev_set: Sequence[Example], tokenizer: CharTokenizer,
          opts: TrainOptions, device: torch.device, on_best: Callable[[TrainState, list[dict]], None] | None = None,
          ) -> tuple[TrainState, list[dict[str, float]]]:
    """Epochs until opts.minutes of wall clock or opts.max_epochs; `on_best` runs whenever dev CER improves."""
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.peak_lr, betas=(0.9, 0.98), eps=1e-9)
    rng, gen = random.Random(opts.seed), torch.Generator().manual_seed(opts.seed)
    state, history = TrainState(), []
    started, budget_s = time.monotonic(), opts.minutes * 60.0
    while state.epoch < opts.max_epochs and time.monotonic() - started < budget_s:
        epoch_start = time.monotonic()
        try:
            stats = train_epoch(model, optimizer, train_set, opts, state, device, started, budget_s, rng, gen)
        except KeyboardInterrupt:  # SIGINT, or SIGTERM via main's handler: keep the best model, score and save it
            log.warning("interrupted in epoch %d; stopping with the best model so far", state.epoch + 1)
            break
        dev_cer = greedy_cer(model, dev_set, tokenizer, device, opts.batch_frames)
        state.epoch += 1
        record = {"epoch": state.epoch, "step": state.step, **stats, "dev_cer_greedy": dev_cer,
                  "epoch_s": time.monotonic() - epoch_start, "elapsed_s": time.monotonic() - started}
        history.append(record)
        log.info("epoch %d step %d loss %.3f (ctc %.3f att %.3f) dev CER %.4f  %.0f s", state.epoch, state.step,
                 stats["loss"], stats["ctc"], stats["att"], dev_cer, record["elapsed_s"])
        if dev_cer < state.best_cer:
            state.best_cer, state.best_epoch = dev_cer, state.epoch
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            if on_best is not None:
                on_best(state, history)
    return state, history


# ------------------------------------------------------------------------------------------------------------ main


def smoke_inputs(tmp: Path) -> tuple[list[Path], Path]:
    """A manifest over tests/data's LibriVox sentences, used for both train and dev in --smoke."""
    rows = [json.loads(line) for line in (REPO / "tests/data/librivox.jsonl").read_text().splitlines()]
    lines = [json.dumps({**row, "path": str((REPO / "tests/data" / row["path"]).resolve())}) for row in rows[:3]]
    manifest = tmp / "smoke" / "manifest.jsonl"
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return [manifest.parent], manifest


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    return f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def model_card(metrics: dict) -> str:
    test_lines = "\n".join(
        f"| {name} | {m['utterances']} | {m['ctc_greedy']:.4f} | {m['ctc_prefix_beam']:.4f} | "
        f"{m['attention_rescoring']:.4f} |"
        for name, m in metrics["final_eval"].items()
    )
    return f"""# conformer.pt: WeNet-style conformer, English characters

Trained by `scripts/train_conformer.py` (command below); numbers are measured by that run.

- Command: `{metrics['command']}`
- Data: {metrics['train_utterances']} training utterances, {metrics['train_hours']:.2f} h before speed perturbation
  ({', '.join(str(s) for s in metrics['speeds'])}x copies; noise mixed into {metrics['noise_prob']:.0%} of copies
  when a noise pack was given: {metrics['noise']}), sources: {', '.join(metrics['train_sources'][:8])}
- Dev set: {metrics['dev_utterances']} utterances ({metrics['dev']})
- Model: {metrics['parameters']:,} parameters, config {json.dumps(metrics['config'])}
- Training: {metrics['epochs']} epochs, {metrics['steps']} steps, {metrics['train_minutes']:.1f} min on
  {metrics['hardware']} (featurization {metrics['featurize_s']:.0f} s); best dev epoch {metrics['best_epoch']}

| set | utterances | CER CTC greedy | CER CTC prefix beam | CER attention rescoring |
|---|---|---|---|---|
{test_lines}
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, nargs="+", help="corpus dirs (each with manifest.jsonl)")
    parser.add_argument("--dev", type=Path, help="dev manifest (held-out voice): model selection")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="extra manifests scored at the end")
    parser.add_argument("--noise", type=Path, help="noise .npz (int16 `noise`, `noise_offsets`)")
    parser.add_argument("--noise-prob", type=float, default=0.5)
    parser.add_argument("--speeds", default="0.9,1.0,1.1")
    parser.add_argument("--gain-db", default="-20,0", help="random level change range per training copy (dB)")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="wall-clock budget of the whole run (featurization, training, final scoring)")
    parser.add_argument("--reserve-s", type=float, default=60.0, help="seconds kept for final scoring + saving")
    parser.add_argument("--batch-frames", type=int, default=TrainOptions.batch_frames)
    parser.add_argument("--lr", type=float, default=TrainOptions.peak_lr)
    parser.add_argument("--warmup", type=int, default=TrainOptions.warmup_steps)
    parser.add_argument("--max-epochs", type=int, default=TrainOptions.max_epochs)
    parser.add_argument("--init", type=Path, help="start from this checkpoint (fine-tuning)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--final-eval-max", type=int, default=400, help="utterances per set for rescoring CER")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run on tests/data")
    parser.add_argument("-o", "--out", type=Path, default=REPO / "quant/assets/conformer.pt")
    args = parser.parse_args(argv)
    if not args.smoke and (not args.train or not args.dev):
        parser.error("--train and --dev are required (or --smoke)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_started = time.monotonic()
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args, argv, run_started)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, argv: Sequence[str] | None, run_started: float) -> int:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # --smoke runs on the CPU unless a device is named (`--smoke --device cuda` checks the GPU path in seconds)
    device = torch.device("cpu") if args.smoke and args.device == "auto" else pick_device(args.device)
    opts = TrainOptions(minutes=args.minutes, max_epochs=args.max_epochs, batch_frames=args.batch_frames,
                        peak_lr=args.lr, warmup_steps=args.warmup, seed=args.seed)
    config = ConformerConfig()
    if args.smoke:
        args.train, args.dev = smoke_inputs(args.out.parent)
        opts = replace(opts, max_epochs=args.max_epochs if args.max_epochs != TrainOptions.max_epochs else 12,
                       peak_lr=3e-3, warmup_steps=3, spec_freq_masks=0, spec_time_masks=0)
        config = SMOKE_CONFIG
    speeds = (1.0,) if args.smoke else tuple(float(s) for s in args.speeds.split(","))
    clean_copy = speeds.index(1.0) if 1.0 in speeds else 0
    tokenizer = CharTokenizer()
    load_noise(args.noise)

    train_utts = [u for d in args.train for u in read_manifest(d)]
    gain_db = (0.0, 0.0) if args.smoke else tuple(float(g) for g in args.gain_db.split(","))
    augment = Augment(speeds, args.noise_prob, (gain_db[0], gain_db[1]))
    train_set = build_examples(train_utts, tokenizer, augment, args.workers, args.seed)
    dev_set = build_examples(read_manifest(args.dev), tokenizer, Augment(), args.workers, args.seed + 1)
    test_sets = {str(t): build_examples(read_manifest(t), tokenizer, Augment(), args.workers, args.seed + 2)
                 for t in args.test}
    featurize_s = time.monotonic() - run_started
    log.info("featurized %d train + %d dev utterances in %.0f s", len(train_set), len(dev_set), featurize_s)

    model = Conformer(config)
    if args.init:
        model = load_conformer(args.init)
        config = model.config
    else:
        model.set_cmvn(*cmvn_stats(train_set, clean_copy))
    model.to(device)
    log.info("model: %d parameters on %s", model.parameter_count(), hardware(device))

    train_minutes = (args.minutes * 60.0 - (time.monotonic() - run_started) - args.reserve_s) / 60.0
    if train_minutes <= 0:
        raise SystemExit(f"--minutes {args.minutes} leaves no time to train after featurization ({featurize_s:.0f} s)")
    opts = replace(opts, minutes=train_minutes)
    log.info("training for %.1f min", train_minutes)
    facts = {
        "command": "python scripts/train_conformer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_utterances": len(train_set),
        "train_hours": sum(e.copies[clean_copy].shape[0] for e in train_set) / 100 / 3600,
        "speeds": list(speeds), "gain_db": list(gain_db), "noise": str(args.noise) if args.noise else None,
        "noise_prob": args.noise_prob if args.noise else 0.0,
        "train_sources": sorted({u.source.split(" speed=")[0] for u in train_utts}),
        "dev": str(args.dev), "dev_utterances": len(dev_set), "parameters": model.parameter_count(),
        "config": config.to_dict(), "options": opts.__dict__, "featurize_s": featurize_s,
        "hardware": hardware(device), "torch": torch.__version__,
    }

    def save_best(state: TrainState, history: list[dict]) -> None:
        snapshot = Conformer(config)
        snapshot.load_state_dict(state.best_state or {})
        save(snapshot, tokenizer, {**facts, **progress(state, history), "final_eval": {}}, args.out)

    state, history = train(model, train_set, dev_set, tokenizer, opts, device, save_best)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    final_eval = {name: rescoring_cer(model, examples[: args.final_eval_max], tokenizer, device, opts.batch_frames,
                                      args.workers)
                  for name, examples in {"dev": dev_set, **test_sets}.items()}
    for name, result in final_eval.items():
        log.info("final %s: %s", name, json.dumps(result))
    save(model.cpu(), tokenizer, {**facts, **progress(state, history), "final_eval": final_eval}, args.out)
    log.info("run took %.1f min", (time.monotonic() - run_started) / 60)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def progress(state: TrainState, history: list[dict]) -> dict:
    return {"epochs": state.epoch, "steps": state.step, "best_epoch": state.best_epoch,
            "best_dev_cer_greedy": state.best_cer, "history": list(history),
            "train_minutes": history[-1]["elapsed_s"] / 60 if history else 0.0}


def save(model: Conformer, tokenizer: CharTokenizer, metrics: dict, out: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint_dict(model, tokenizer.units, {"metrics_json": json.dumps(metrics)}), buffer)
    atomic_write_bytes(out, buffer.getvalue())
    atomic_write_json(out.with_suffix(".json"), metrics)
    atomic_write_text(out.with_suffix(".md"), model_card(metrics))
    log.info("saved %s (+ .json, .md)", out)


if __name__ == "__main__":
    sys.exit(main())
