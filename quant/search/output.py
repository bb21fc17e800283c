"""What `quant search` writes: rules.toml (the chosen configuration, each decision citing its measurements),
search.json (units, sensitivities, every measured build with metric, interval and latency, held-out verdicts,
cost) and frontier.png (latency against metric change)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quant.fileio import atomic_write_bytes, atomic_write_json
from quant.search.core import Point, SearchResult, Sensitivity, task_cost
from quant.search.units import Config, config_rules, int8_blocks, write_rules

log = logging.getLogger(__name__)

RULES_FILE = "rules.toml"
JSON_FILE = "search.json"
PLOT_FILE = "frontier.png"


def write_outputs(result: SearchResult, base_rules: Any, out_dir: Path, command: str) -> dict[str, Path]:
    config: Config = result.chosen.config if result.chosen else frozenset()
    why = {u.name: unit_why(result, result.sensitivities[u.name], u.name in config, command) for u in result.units}
    header = (f"Written by `{command}`: {result.budget.describe()}.\n"
              "Rules named search:<node> carry the measured decision of the node's unit (a group's nodes share it); "
              "the shipped rules follow.\n"
              f"Speed: {result.speed_basis}.\n"
              f"Search cost: {result.evals} builds, {result.minutes:.1f} min.\n"
              "Use with: quant build MODEL --precision int8 --rules THIS_FILE"
              + (" --backend trt (the rules place TensorRT's Q/DQ)" if result.backend == "trt" else ""))
    # a build from the default-rules start: its partly-INT8 groups the greedy kept stay as the base rules place them
    as_base = result.chosen.base if result.chosen else frozenset()
    rules = [*config_rules(result.units, config, why, backend=result.backend, base=as_base), *base_rules]
    paths = {"rules": write_rules(out_dir / RULES_FILE, rules, header)}
    paths["json"] = atomic_write_json(out_dir / JSON_FILE, to_json(result, command))
    paths["plot"] = plot_frontier(result, out_dir / PLOT_FILE)
    return paths


def unit_why(result: SearchResult, item: Sensitivity, int8: bool, command: str) -> str:
    budget = result.budget
    timed = result.fp32_latency is not None
    parts = [f"kernel time FP32 {item.fp32_ms:.3f} ms, INT8 {item.int8_ms:.3f} ms (ORT profiler, Q/DQ included)"
             if timed else "no kernel time measured (TensorRT Q/DQ placement; each INT8 structural block counts 1)"]
    if item.add_one_in_snr_db is not None:
        parts.append(f"output SNR vs FP32 with only this unit INT8 {item.add_one_in_snr_db:.1f} dB")
    if item.leave_one_out_snr_db is not None:
        parts.append(f"with only this unit float {item.leave_one_out_snr_db:.1f} dB")
    for label, verdict in (("only this unit INT8", item.add_one_in), ("only this unit float", item.leave_one_out)):
        if verdict is not None:
            parts.append(f"{budget.metric} change {label} {verdict['delta']:+.4f} "
                         f"[{verdict['ci_low']:+.4f}, {verdict['ci_high']:+.4f}] (n={verdict['n']})")
    cost = task_cost(item, _all_point(result), budget)
    decision = "INT8" if int8 else "float"
    saved = f"{item.saved_ms:.3f} ms saved" if timed else f"{item.saved_ms:g} INT8 block(s)"
    reason = ("saves no kernel time" if item.saved_ms <= 0 and not int8 else
              f"cost {cost:+.4f} {budget.metric} per {saved}" if cost is not None else saved)
    where = (f"as in the fastest measured build within budget ({result.chosen.label})" if result.chosen
             else "no measured build met the budget")
    return f"{decision} by `{command}` ({budget.describe()}), {where}: {reason}; " + "; ".join(parts)


def _all_point(result: SearchResult) -> Any:
    everything = frozenset(u.name for u in result.units)
    return next((p for p in result.frontier if p.config == everything), None)


def to_json(result: SearchResult, command: str) -> dict[str, Any]:
    chosen = result.chosen
    return {
        "command": command,
        "budget": {"metric": result.budget.metric, "value": result.budget.value,
                   "description": result.budget.describe()},
        "cost": {"minutes": round(result.minutes, 2), "evaluations": result.evals},
        "backend": result.backend,
        "speed_basis": result.speed_basis,
        "fp32_latency": result.fp32_latency.to_dict() if result.fp32_latency else None,
        "units": [{"name": u.name, "nodes": list(u.nodes), "op_types": list(u.op_types), "default": u.default,
                   "default_rule": u.rule, "blocks": u.blocks, **_sensitivity(result.sensitivities[u.name])}
                  for u in result.units],
        "frontier": [p.to_dict(result.units) for p in result.frontier],
        "start": result.start,
        "steps": list(result.steps),
        "default_rules": result.default.to_dict(result.units),
        "chosen": chosen.to_dict(result.units) if chosen else None,
        "met_budget": chosen is not None,
        "note": result.note,
        "held_out": result.held_out,
        "validation_resolution": result.resolution,
    }


def _sensitivity(item: Sensitivity) -> dict[str, Any]:
    return {"fp32_ms": item.fp32_ms, "int8_ms": item.int8_ms, "saved_ms": item.saved_ms,
            "add_one_in_snr_db": item.add_one_in_snr_db, "leave_one_out_snr_db": item.leave_one_out_snr_db,
            "add_one_in": item.add_one_in, "leave_one_out": item.leave_one_out}


def plot_frontier(result: SearchResult, path: Path) -> Path:
    """Latency (min over interleaved rounds; untimed: the number of INT8 structural blocks) against the validation
    metric change; error bars are the 95 % bootstrap interval."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = result.fp32_latency is not None

    def x(point: Point) -> float | None:
        if not timed:
            return float(int8_blocks(result.units, point.config))
        return point.latency.min_ms if point.latency is not None else None

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for point in result.frontier:
        where = x(point)
        if where is None:
            continue
        delta, low, high = point.verdict["delta"], point.verdict["ci_low"], point.verdict["ci_high"]
        color = "tab:green" if point.holds else "tab:red"
        axes.errorbar(where, delta, yerr=[[delta - low], [high - delta]], fmt="o", color=color, alpha=0.6, capsize=2)
    marked: tuple[tuple[str, Point | None, str], ...] = (("default rules", result.default, "s"),
                                                         ("searched", result.chosen, "*"))
    for label, mark, marker in marked:
        where = x(mark) if mark is not None else None
        if mark is not None and where is not None:
            axes.plot(where, mark.verdict["delta"], marker, markersize=14, mfc="none", color="black", label=label)
    if result.fp32_latency is not None:
        axes.axvline(result.fp32_latency.min_ms, color="gray", linestyle=":", label="FP32 latency")
    axes.axhline(result.default.verdict["budget"], color="tab:orange", linestyle="--", label="budget")
    axes.set_xlabel("latency per call, min over interleaved rounds (ms, ONNX Runtime CPU)" if timed else
                    f"INT8 blocks in the {result.backend} Q/DQ plan (speed proxy; no latency measured)")
    unit = " (pp)" if result.budget.scale != 1.0 else ""
    axes.set_ylabel(f"{result.budget.metric} change vs FP32{unit}" if not result.budget.is_floor
                    else f"{result.budget.metric} above the floor")
    axes.set_title("quant search: candidate builds (green: proven within budget; bars: 95 % CI)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
