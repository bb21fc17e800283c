"""The report page's figures (matplotlib, PNG bytes): latency distributions, batch sweeps, per-op time, calibration
clipping, unit sensitivity, the search frontier and spectrograms. Every axis carries its unit."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from quant.report.artifacts import TensorClip
from quant.report.examples import Example
from quant.report.rows import METRIC_SCALE, Row

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


def histograms(tensors: Sequence[TensorClip], method: str, columns: int = 2) -> bytes:
    """Per tensor (each with a stored histogram): log count against |x| over the calibration set, a line at each
    method's amax, and the share of values beyond the build's amax (clipped to it in INT8)."""
    plt = pyplot()
    shown = [t for t in tensors if t.histogram is not None]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(WIDTH_IN, 2.5 * rows + 0.4), squeeze=False)
    methods = sorted({m for t in shown for m in t.amax})
    styles = dict(zip(methods, ("-", "--", ":", "-.")))
    for ax, tensor in zip(axes.flat, shown):
        histogram = tensor.histogram
        assert histogram is not None  # filtered above
        edges = np.linspace(0.0, histogram.amax, histogram.counts.size + 1)
        ax.stairs(np.where(histogram.counts > 0, histogram.counts, np.nan), edges, color="0.35", fill=False)
        ax.set_yscale("log")
        for name in methods:
            if name in tensor.amax:
                ax.axvline(tensor.amax[name], color="tab:red" if name == method else "tab:blue",
                           linestyle=styles[name], linewidth=1, label=f"amax {name}")
        share = tensor.mass_clipped or 0.0
        ax.set_title(f"{_short(tensor.name, 44)}\n{100 * share:.3g} % of values beyond the {method} amax", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("|x|", fontsize=8)
        ax.set_ylabel("count (log)", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.tight_layout()
    return png(fig)


def _short(name: str, keep: int = 38) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1:]


def sensitivity(units: Sequence[Mapping[str, Any]], metric: str, higher_is_better: bool, top: int = 15) -> bytes:
    """Per unit, worst first: the output SNR against FP32 with only this unit in INT8 (every unit the search
    measured), or, where the search measured no SNR, the budget metric's change (display units)."""
    plt = pyplot()
    by_snr = any(u.get("snr_db") is not None for u in units)
    if by_snr:
        worst = sorted((u for u in units if u.get("snr_db") is not None), key=lambda u: float(u["snr_db"]))[:top]
        values = [min(float(u["snr_db"]), 120.0) for u in worst]  # a bit-identical output has infinite SNR
        xlabel = "output SNR vs FP32 with only this unit in INT8, dB (lower = more sensitive)"
    else:
        measured = [u for u in units if u.get("delta") is not None]
        worst = sorted(measured, key=lambda u: float(u["delta"]) * (1 if higher_is_better else -1))[:top]
        values = [float(u["delta"]) for u in worst]
        xlabel = (f"{metric} change vs FP32 with only this unit in INT8 ({'higher' if higher_is_better else 'lower'} "
                  "is better)")
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.32 * len(worst) + 1.3))
    colors = ["tab:red" if not u.get("int8") else "tab:blue" for u in worst]
    ax.barh(range(len(worst)), values, color=colors)
    ax.set_yticks(range(len(worst)), [_short(str(u["unit"])) for u in worst], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.axvline(0, color="0.3", linewidth=1)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("red: kept float by the chosen configuration; blue: INT8", fontsize=8)
    fig.tight_layout()
    return png(fig)


def search_frontier(entry: Mapping[str, Any]) -> bytes:
    """The configurations a search measured: latency (or, untimed, INT8 structural blocks) against the budget
    metric's change vs FP32 on the validation split with its 95 % interval; the Pareto frontier, the default rules
    and the chosen one marked, the budget line dashed."""
    plt = pyplot()
    points = list(entry.get("points") or [])
    timed = any(p.get("latency_ms") is not None for p in points)
    shown = [p for p in points if not timed or p.get("latency_ms") is not None]

    def x(point: Mapping[str, Any]) -> float:
        return float(point["latency_ms"]) if timed else float(point.get("int8_blocks", point["int8_units"]))

    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0))
    for point in shown:
        delta = float(point["delta"])
        ax.errorbar(x(point), delta, yerr=[[delta - float(point["ci_low"])], [float(point["ci_high"]) - delta]],
                    fmt="o", color="tab:green" if point.get("holds") else "tab:red", alpha=0.6, capsize=2)
    frontier = sorted((x(p), float(p["delta"])) for p in shown if p.get("frontier"))
    if frontier:
        ax.plot(*zip(*frontier), "-", color="0.3", linewidth=1, label="frontier")
    for key, marker, name in (("default", "s", "default rules"), ("chosen", "*", "chosen")):
        for point in (p for p in shown if p.get(key)):
            ax.plot(x(point), float(point["delta"]), marker, markersize=14, mfc="none", color="black", label=name)
    if entry.get("budget_line") is not None:
        ax.axhline(float(entry["budget_line"]), color="tab:orange", linestyle="--", label="budget")
    ax.set_xlabel("latency per call, ms (median over the search's interleaved rounds)" if timed else
                  f"INT8 blocks in the {entry.get('backend', '')} Q/DQ plan (speed proxy; no latency measured)")
    metric = str(entry.get("metric", "metric"))
    ax.set_ylabel(f"{metric} change vs FP32{' (pp)' if metric in METRIC_SCALE else ''} (validation)")
    ax.set_title("green: estimate within budget, red: over; bars: 95 % interval", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
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
