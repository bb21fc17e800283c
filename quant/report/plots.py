"""tradeoff.png: the primary task metric against latency, rendered with matplotlib."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from quant.report.compare import Comparison, comparisons
from quant.report.rows import (METRIC_SCALE, Primary, Row, RowKey, find_row, model_order, ok_rows, primary,
                               primary_latency, row_key, task_value)


PLOT_AXIS = {"pesq_wb": "PESQ-WB (MOS-LQO)", "cer": "CER, %"}
MARKERS = {"torch": "s", "ort": "o", "trt": "^"}
COLORS = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red"}
# label offsets (points) tried in turn around a marker: beside it first, then further up and down
LABEL_OFFSETS = [(dx, dy) for dy in (5, -13, 17, -25, 29, -37, 41, -49) for dx in (6, -6)]


@dataclass(frozen=True)
class PlotPoint:
    x: float
    y: float  # the row's value, display units
    low: float  # the row's FP32 reference value + the 95 % interval of the paired change (y itself when none)
    high: float
    label: str
    marker: str
    color: str


PLOT_LATENCY = "p50_ms"  # the latency statistic the trade-off plot places rows by


def plot_points(model: str, rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[PlotPoint]:
    """A row at its median latency (as the ratios and the search's points: a few preempted runs move a mean on a busy
    machine) and its metric value, with, as its error bar, its FP32 reference's value plus the paired change's
    interval: the uncertainty that matters when choosing a precision (the unpaired spread over utterances would hide
    it)."""
    metric = primary(rows, model).metric
    scale = METRIC_SCALE.get(metric, 1.0)
    points = []
    for row in rows:
        x, y = primary_latency(row, PLOT_LATENCY), task_value(row, metric)
        if x is None or y is None:
            continue
        low = high = y
        comparison = changes.get(row_key(row))
        change = comparison.changes.get(metric) if comparison else None
        reference = task_value(comparison.reference, metric) if comparison else None
        if change is not None and reference is not None:
            low, high = reference + change.ci_low, reference + change.ci_high
        points.append(PlotPoint(x, scale * y, scale * low, scale * high, f"{row['backend']} {row['precision']}",
                                MARKERS.get(row["backend"], "x"), COLORS.get(row["precision"], "k")))
    return points


def reference_lines(model: str, rows: Sequence[Row]) -> list[tuple[float, str, str]]:
    """(value, label, line style): the FP32 ONNX Runtime row and, for enhancement, the unprocessed noisy input."""
    metric = primary(rows, model).metric
    scale = METRIC_SCALE.get(metric, 1.0)
    lines = []
    fp32 = find_row(rows, model, "ort", "fp32")
    if fp32 is not None and task_value(fp32, metric) is not None:
        lines.append((scale * float(task_value(fp32, metric)), "FP32 (ORT)", ":"))  # type: ignore[arg-type]
    noisy = next((task_value(r, f"noisy_{metric}") for r in rows if task_value(r, f"noisy_{metric}") is not None),
                 None)
    if noisy is not None:
        lines.append((scale * noisy, "noisy input (no enhancement)", "--"))
    return lines


def metric_limits(points: Sequence[PlotPoint], references: Sequence[float], error_rate: bool) -> tuple[float, float]:
    """An honest metric axis: it spans every interval and reference line, padded, and is never narrower than a
    tenth of its top value, so a tiny difference does not fill the panel; an error rate's axis stops at 0. (It once
    started error rates at 0 always, which drew the WeNet panel's 23.0-23.5 % CER rows with 95 % intervals of
    +-0.2 points as one dot.)"""
    values = [v for p in points for v in (p.low, p.high)] + list(references)
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    span = max(high - low, 0.1 * abs(high), 1e-6)
    widen = (span - (high - low)) / 2 + 0.08 * span  # to the minimum span, centred, plus a margin
    return (max(low - widen, 0.0) if error_rate else low - widen), high + widen


def place_labels(ax: Any, points: Sequence[PlotPoint]) -> list[Any]:
    """Annotate each point at the first offset whose text box stays inside the axes and overlaps no marker, legend
    or earlier label (greedy; the figure must be laid out already). Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    taken = [_marker_box(ax, p) for p in points]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    annotations = []
    for point in sorted(points, key=lambda p: (p.x, -p.y)):
        for dx, dy in LABEL_OFFSETS:
            note = ax.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(dx, dy),
                               ha="left" if dx > 0 else "right", fontsize=8)
            box = note.get_window_extent(renderer)
            inside = panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
            note.remove()
        else:  # crowded beyond every offset: keep the first one
            note = ax.annotate(point.label, (point.x, point.y), textcoords="offset points",
                               xytext=LABEL_OFFSETS[0], fontsize=8)
            box = note.get_window_extent(renderer)
        taken.append(box)
        annotations.append(note)
    return annotations


def _marker_box(ax: Any, point: PlotPoint, half_px: float = 5.0) -> Any:
    """The marker and its error bar, in display pixels."""
    from matplotlib.transforms import Bbox

    x, low = ax.transData.transform((point.x, point.low))
    _, high = ax.transData.transform((point.x, point.high))
    return Bbox.from_extents(x - half_px, min(low, high) - half_px, x + half_px, max(low, high) + half_px)


def render_plot(results: Mapping[str, Any], models: Sequence[str] | None = None) -> bytes:
    """PNG: primary task metric vs median latency (1 thread), one panel per model (all, or `models`), one marker per
    backend, error bars for the 95 % interval of each row's change vs FP32, reference lines for FP32 and the noisy
    input, and the searched configurations with their frontier where results.json has a "search" entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ok_rows(results)
    changes = comparisons(results)
    shown = [m for m in model_order(rows) if (models is None or m in models) and primary(rows, m).metric]
    shown = shown or ["(no results)"]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.5), squeeze=False)
    panels = []
    for ax, model in zip(axes[0], shown):
        if model not in {r["model"] for r in rows}:
            continue
        points = plot_points(model, [r for r in rows if r["model"] == model], changes)
        _draw_panel(ax, model, primary(rows, model), points, reference_lines(model, rows),
                    search_points(results, model, primary(rows, model).metric))
        panels.append((ax, points))
    fig.tight_layout()
    for ax, points in panels:  # labels last: placement needs the final layout
        place_labels(ax, points)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


SearchPoint = tuple[float, float, bool]  # latency ms, metric in display units, on the frontier


def search_points(results: Mapping[str, Any], model: str, metric: str) -> list[SearchPoint]:
    """The timed configurations a search measured (results.json "search", quant.report.search), display units: the
    search's median latency, and the FP32 ONNX Runtime row's value plus the change the search measured (on its
    validation split). None when the search judged another metric or the run has no FP32 row to add it to."""
    entry = (results.get("search") or {}).get(model) or {}
    fp32 = find_row(ok_rows(results), model, "ort", "fp32")
    base = task_value(fp32, metric) if fp32 is not None else None
    if entry.get("metric") != metric or base is None:
        return []
    scale = METRIC_SCALE.get(metric, 1.0)
    return [(float(p["latency_ms"]), scale * base + float(p["delta"]), bool(p.get("frontier")))
            for p in entry.get("points") or [] if p.get("latency_ms") is not None]


def _draw_panel(ax: Any, model: str, profile: Primary, points: Sequence[PlotPoint],
                references: Sequence[tuple[float, str, str]], searched: Sequence[SearchPoint] = ()) -> None:
    graph, metric, higher, _ = profile
    if searched:
        ax.plot([x for x, _, _ in searched], [y for _, y, _ in searched], ".", color="0.6",
                label="searched configurations")
        frontier = sorted((x, y) for x, y, on in searched if on)
        if frontier:
            ax.plot(*zip(*frontier), "-", color="0.3", linewidth=1, label="frontier")
    for point in points:
        ax.errorbar(point.x, point.y, yerr=[[max(0.0, point.y - point.low)], [max(0.0, point.high - point.y)]],
                    fmt=point.marker, color=point.color, markersize=7, capsize=3, elinewidth=1)
    for value, label, style in references:
        ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=label)
    ax.set_ylim(*metric_limits(points, [v for v, _, _ in references] + [y for _, y, _ in searched],
                               metric in METRIC_SCALE))
    ax.margins(x=0.15)  # room for labels beside the outermost points
    ax.set_title(f"{model}: bars = 95 % interval of the change vs FP32", fontsize=9)
    ax.set_xlabel(f"{graph} median latency, ms (1 thread)")
    ax.set_ylabel(f"{PLOT_AXIS.get(metric, metric)}, {'higher' if higher else 'lower'} is better")
    ax.grid(True, alpha=0.3)
    if references or searched:
        ax.legend(loc="best", fontsize=7)
