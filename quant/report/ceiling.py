"""The INT8 rows' time accounting in the report: per graph, the INT8/FP32 ratio measured interleaved beside the
ceiling the profile computes (integer-kernel ops at their INT8 kernel time, every other op at its FP32 time,
conversions free), how far the measured ratio is from it, and what holds the rest.

Reads a row's `speed[graph]["profile"]` (quant.eval.profile.ProfileComparison.to_dict(), written by `quant run`
for each INT8 ORT row against the ORT FP32 row); results.json without it renders nothing here."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from quant.report.rows import Row

Table = tuple[list[str], list[list[str]]]

CEILING_CAPTION = ("INT8 time accounting (ONNX Runtime's profiler, FP32 and INT8 runs alternating, medians): "
                   "measured = INT8/FP32 of the interleaved timing, paired per-round median (p10-p90); ceiling = the "
                   "ratio if every op with an integer kernel ran at its INT8 kernel time and everything else at FP32 "
                   "time, conversions free; what holds the INT8 run, as shares of the FP32 run (in brackets: the part "
                   "beyond the ceiling: Q/DQ, time outside kernels (ORT's dispatch; waits on a busy machine), float "
                   "ops slower than in FP32). All against the faster FP32 build of the interleaved timing: where "
                   "that is the plain export (named), the profiled FP32's ceiling and shares are scaled by its "
                   "measured ratio to it")
HOLDBACK_SHOWN = 4


def profiled(rows: Sequence[Row]) -> list[tuple[Row, str, Mapping[str, Any]]]:
    """(row, graph, profile) of every ok row's profiled graph, in row order."""
    out = []
    for row in rows:
        if row.get("status") != "ok":
            continue
        for graph, entry in (row.get("speed") or {}).items():
            profile = entry.get("profile") if isinstance(entry, Mapping) else None
            if isinstance(profile, Mapping) and "ceiling_ratio" in profile:
                out.append((row, graph, profile))
    return out


def ceiling_table(rows: Sequence[Row]) -> Table | None:
    found = profiled(rows)
    if not found:
        return None
    header = ["graph", "build", "measured INT8/FP32", "ceiling", "above ceiling", "FP32 time in integer ops",
              "what holds it"]
    out = []
    for row, graph, profile in found:
        measured = _measured(row, graph)
        base, scale = _baseline(profile)
        ceiling = float(profile["ceiling_ratio"]) * scale
        gap = "-" if measured is None else f"{measured[0] - ceiling:+.2f}"
        against = f" vs {base}" if base else ""
        out.append([graph, f"{row['backend']} {row['precision']}",
                    "-" if measured is None else f"{measured[0]:.2f} ({measured[1]:.2f}-{measured[2]:.2f}){against}",
                    f"{ceiling:.2f}", gap, f"{100 * float(profile['integer_share']):.0f} %",
                    holdback_text(profile.get("holdback") or [], scale=scale)])
    return header, out


def _baseline(profile: Mapping[str, Any]) -> tuple[str | None, float]:
    """(the FP32 row the accounting is read against when it is not the profiled one, the profiled FP32's ratio to
    it): quant.pipeline.profile_baseline's record; (None, 1) without one or when they are the same build."""
    baseline = profile.get("baseline")
    if not isinstance(baseline, Mapping) or baseline.get("label") == baseline.get("profiled"):
        return None, 1.0
    return str(baseline["label"]), float(baseline["scale"])


def holdback_text(parts: Sequence[Mapping[str, Any]], shown: int = HOLDBACK_SHOWN, scale: float = 1.0) -> str:
    """`float GRU 0.45, Q/DQ and reorders 0.06 (+0.06), ...`: the largest parts as shares of the FP32 run (x
    `scale`: of another FP32 run, the profiled one's ratio to it)."""
    cells = []
    for part in list(parts)[:shown]:
        above = scale * float(part.get("above_ceiling", 0.0))
        cells.append(f"{part['what']} {scale * float(part['share']):.2f}"
                     + (f" (+{above:.2f})" if above >= 0.005 else ""))
    return ", ".join(cells) or "-"


def _measured(row: Row, graph: str) -> tuple[float, float, float] | None:
    """The row's paired INT8/FP32 ratio of `graph` at 1 thread (median, p10, p90), or the median ratio alone."""
    try:
        ratio = row["speed"][graph]["threads"]["1"]["vs_fp32"]
    except (KeyError, TypeError):
        return None
    paired = float(ratio.get("paired_median", float("nan")))
    if paired == paired:  # not nan
        return paired, float(ratio["paired_p10"]), float(ratio["paired_p90"])
    median = float(ratio["median_ratio"])
    return median, median, median
