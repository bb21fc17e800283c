"""The report page's figures (matplotlib, PNG bytes): latency distributions, batch sweeps, per-op time, calibration
clipping, unit sensitivity, the search frontier and spectrograms. Every axis carries its unit."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from quant.report.artifacts import TensorClip
from quant.report.examples import Example
from quant.report.rows import METRIC_SCALE, Primary, Row

WIDTH_IN = 7.0  # 700 px at DPI: the page scales images down to a narrow window, never up
DPI = 100
PERCENTILES = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"))
COLORS = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red", "int8-searched": "tab:purple"}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    return buffer.getvalue()


def label(row: Row) -> str:
    return f"{row['backend']} {row['precision']}"


def latency_distribution(rows: Sequence[Row], graph: str, unit: str) -> bytes:
    """Per row: the min-max span, p50/p90/p99 marked, at 1 thread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.45 * len(rows) + 1.3))
    for y, row in enumerate(rows):
        stats = row["speed"][graph]["threads"]["1"]["latency_ms"]
        color = COLORS.get(row["precision"], "0.3")
        ax.hlines(y, stats["min_ms"], stats["max_ms"], color=color, alpha=0.35, linewidth=6)
        for (key, name), marker in zip(PERCENTILES, ("o", "s", "^")):
            ax.plot(stats[key], y, marker, color=color, label=name if y == 0 else None)
    ax.set_yticks(range(len(rows)), [label(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{graph} latency per {unit}, ms (1 thread; bar = min to max)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return png(fig)


def batch_sweep(rows: Sequence[Row], graph: str) -> bytes:
    """Throughput (items/s) against batch size, one line per row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4))
    for row in rows:
        sweep = row["speed"][graph]["batches"]
        batches = sorted(int(b) for b in sweep)
        ax.plot(batches, [sweep[str(b)]["items_per_s"] for b in batches], "o-", label=label(row),
                color=COLORS.get(row["precision"]), alpha=0.6 if row["backend"] == "torch" else 1.0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size, utterances")
    ax.set_ylabel("throughput, utterances/s")
    ax.set_title(f"{graph}: throughput by batch (1 thread)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def op_profile(profiles: Mapping[str, Mapping[str, float]], top: int = 12) -> bytes:
    """Grouped horizontal bars: ms per run by op type, one bar per row label (FP32 vs INT8 ...)."""
    plt = pyplot()
    totals: dict[str, float] = {}
    for profile in profiles.values():
        for op_type, ms in profile.items():
            totals[op_type] = totals.get(op_type, 0.0) + float(ms)
    ops = sorted(totals, key=lambda op: -totals[op])[:top]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.32 * len(ops) * max(1, len(profiles)) + 1.3))
    height = 0.8 / max(1, len(profiles))
    for index, (name, profile) in enumerate(profiles.items()):
        positions = np.arange(len(ops)) + index * height
        ax.barh(positions, [float(profile.get(op, 0.0)) for op in ops], height=height, label=name,
                color=COLORS.get(name.split()[-1], None))
    ax.set_yticks(np.arange(len(ops)) + 0.4 - height / 2, ops)
    ax.invert_yaxis()
    ax.set_xlabel("time per run, ms (sum over the op type's nodes)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def clipping(tensors: Sequence[TensorClip], method: str) -> bytes:
    """The most clipped tensors: largest |value| seen in calibration against each method's amax (log scale)."""
    plt = pyplot()
    methods = sorted({m for t in tensors for m in t.amax})
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.42 * len(tensors) + 1.4))
    ys = np.arange(len(tensors))
    ax.barh(ys, [t.observed for t in tensors], color="0.85", label="largest |value| seen")
    for name, marker in zip(methods, "o^sdv"):
        ax.plot([t.amax.get(name, np.nan) for t in tensors], ys, marker, linestyle="none",
                label=f"amax, {name}" + (" (used)" if name == method else ""))
    ax.set_yticks(ys, [_short(t.name) for t in tensors], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("activation magnitude, |x| (log scale; beyond amax is clipped)")
    ax.set_title(f"most clipped tensors under {method} ranges", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return png(fig)


def _short(name: str, keep: int = 38) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1:]


def sensitivity(units: Sequence[Mapping[str, Any]], profile: Primary, top: int = 15) -> bytes:
    """Primary-metric change when only one unit runs in INT8 (search results), worst first."""
    plt = pyplot()
    _, metric, higher, metric_label = profile
    scale = METRIC_SCALE.get(metric, 1.0)
    worst = sorted(units, key=lambda u: float(u["delta"]) * (1 if higher else -1))[:top]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.32 * len(worst) + 1.3))
    ax.barh(range(len(worst)), [scale * float(u["delta"]) for u in worst], color="tab:red")
    ax.set_yticks(range(len(worst)), [_short(str(u["unit"])) for u in worst], fontsize=8)
    ax.invert_yaxis()
    unit = " points" if scale != 1.0 else ""
    ax.set_xlabel(f"{metric_label} change{unit} with only this unit in INT8 ({'higher' if higher else 'lower'} "
                  "is better)")
    ax.axvline(0, color="0.3", linewidth=1)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return png(fig)


def spectrograms(example: Example) -> bytes:
    """Log-power spectrograms, one panel per signal, on a shared colour scale."""
    from quant.features import HOP, N_FFT, stft

    plt = pyplot()
    fig, axes = plt.subplots(len(example.signals), 1, figsize=(WIDTH_IN, 1.6 * len(example.signals) + 0.6),
                             sharex=True, squeeze=False)
    powers = [_power_db(stft(np.asarray(audio, np.float32))) for _, audio in example.signals]  # (bins, frames)
    top = max(float(p.max()) for p in powers)
    image = None
    for ax, (name, _), power in zip(axes[:, 0], example.signals, powers):
        seconds = power.shape[1] * HOP / example.sample_rate
        image = ax.imshow(power, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
                          extent=(0.0, seconds, 0.0, example.sample_rate / 2000))
        ax.set_ylabel("kHz")
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"time, s (STFT {N_FFT} / hop {HOP})")
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="power, dB", shrink=0.8)
    return png(fig)


def _power_db(spec: np.ndarray) -> np.ndarray:
    """(bins, frames, 2) real/imaginary STFT -> power in dB."""
    return 10 * np.log10(spec[..., 0] ** 2 + spec[..., 1] ** 2 + 1e-10)
