"""results.json's "search" key from what `quant search` wrote (search.json, quant.search.output), and the files
`quant search` adds beside it: results.json and report.html.

An entry holds what the page draws: the measured configurations (INT8 units, latency, the task metric's change vs FP32
on the validation split with its 95 % interval, Pareto frontier), the units with their sensitivity (output SNR with
only that unit INT8; the task metric's change where the search measured it) and the chosen configuration with its
held-out verdict. Keys: docs/architecture.md, "results.json keys".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from quant.errors import ReportError

logger = logging.getLogger(__name__)

def search_section(search_json: str | Path, graph: str | None = None) -> dict[str, Any]:
    """The "search" entry of one model from a search.json of its graph `graph` (default: the folder's name, as
    `quant search` names it); ReportError naming the file when it is not one."""
    path = Path(search_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no search results; run `quant search` first") from None
    except (OSError, ValueError) as error:
        raise ReportError(f"{path}: not readable as JSON ({str(error)[:80]}); run `quant search` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list) or not isinstance(
            data.get("frontier"), list) or not isinstance(data.get("budget"), dict):
        raise ReportError(f"{path}: expected quant search's search.json (an object with units, frontier and budget)")
    try:
        return _entry(data, graph or path.parent.name)
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{path}: a field of quant search's search.json is missing or malformed ({error!r}); run "
                          "`quant search` again") from None


def _entry(data: Mapping[str, Any], graph: str) -> dict[str, Any]:
    chosen = data.get("chosen") or {}
    default = data.get("default_rules") or {}
    measured = {p["label"]: p for p in [*data["frontier"], default] if p}
    blocks = {u["name"]: int(u.get("blocks", 1)) for u in data["units"]}
    points = [_point(p, chosen.get("label"), default.get("label"), blocks) for p in measured.values()]
    _mark_frontier(points, higher_is_better=_higher_is_better(data))
    budget = data["budget"]
    return {
        "graph": graph, "command": data.get("command", ""),
        "metric": budget["metric"], "budget": budget.get("description", ""), "budget_line": default.get("budget"),
        "higher_is_better": _higher_is_better(data), "backend": data.get("backend", "ort"),
        "speed_basis": data.get("speed_basis", ""), "cost": data.get("cost") or {},
        "chosen": chosen.get("label"), "default": default.get("label"), "held_out": data.get("held_out") or {},
        "points": points, "units": [_unit(u, set(chosen.get("int8_units") or ()), set(chosen.get("base_rules_units")
                                                                                      or ())) for u in data["units"]],
    }


def _higher_is_better(data: Mapping[str, Any]) -> bool:
    from quant.search.budget import HIGHER_IS_BETTER

    metric = data["budget"]["metric"]
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown budget metric {metric!r}")
    return HIGHER_IS_BETTER[metric]


def _point(point: Mapping[str, Any], chosen: str | None, default: str | None, blocks: Mapping[str, int]
           ) -> dict[str, Any]:
    """`int8_blocks`: the structural blocks of its INT8 units (a unit of `alike` blocks counts each), the speed
    proxy where no latency was measured."""
    latency = point.get("latency") or {}
    int8_units = point.get("int8_units") or ()
    return {"label": point["label"], "int8_units": len(int8_units),
            "int8_blocks": sum(blocks.get(name, 1) for name in int8_units),
            "latency_ms": latency.get("median_ms"), "delta": float(point["delta"]),
            "ci_low": float(point["ci_low"]), "ci_high": float(point["ci_high"]), "holds": bool(point.get("holds")),
            "verdict": point.get("verdict", ""), "chosen": point["label"] == chosen,
            "default": point["label"] == default, "frontier": False}


def _mark_frontier(points: Sequence[dict[str, Any]], higher_is_better: bool) -> None:
    """Pareto-optimal points: no other point is at least as fast and at least as accurate, and better in one. Speed
    is the latency where measured, else the number of INT8 blocks (the search's stated proxy)."""
    def speed(p: Mapping[str, Any]) -> float:
        return float(p["latency_ms"]) if p["latency_ms"] is not None else -float(p["int8_blocks"])

    def metric(p: Mapping[str, Any]) -> float:
        return float(p["delta"]) if higher_is_better else -float(p["delta"])

    comparable = [p for p in points if all(q["latency_ms"] is None for q in points) or p["latency_ms"] is not None]
    for point in comparable:
        point["frontier"] = not any(
            speed(other) <= speed(point) and metric(other) >= metric(point)
            and (speed(other) < speed(point) or metric(other) > metric(point)) for other in comparable)


def _unit(unit: Mapping[str, Any], int8: set[str], base: set[str]) -> dict[str, Any]:
    """`int8`: wholly INT8 in the chosen build; `base_rules`: partly INT8, as the base rules place it."""
    task = unit.get("add_one_in") or {}
    return {"unit": unit["name"], "op_type": "/".join(dict.fromkeys(unit.get("op_types") or ())),
            "nodes": len(unit.get("nodes") or ()), "snr_db": unit.get("add_one_in_snr_db"),
            "delta": task.get("delta"), "saved_ms": unit.get("saved_ms"), "int8": unit["name"] in int8,
            "base_rules": unit["name"] in base}


SEARCH_TARGETS = ("ort", "trt-sim")  # `quant search --target`: <graph>/ and <graph>-trt-sim/ under the search root


def search_sections(search_root: str | Path, graphs: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """{key: entry} for the models whose graphs (model -> graph names, the spec's order) have a search output under
    `search_root` (<out_root>/search/<graph>[-trt-sim]/search.json, as `quant search` writes it): per target, the
    first such graph. The ORT search's key is the model, another target's `<model>/<target>`; every entry names its
    "model" (entries_of). A broken search.json is skipped with a warning: a run's report never fails on it."""
    from quant.search.output import JSON_FILE
    from quant.search.store import search_folder

    found: dict[str, dict[str, Any]] = {}
    for model, names in graphs.items():
        for target in SEARCH_TARGETS:
            for name in names:
                path = Path(search_root) / search_folder(name, target) / JSON_FILE
                if not path.is_file():
                    continue
                try:
                    entry = search_section(path, name)
                except ReportError as error:
                    logger.warning("search results left out of the report: %s", error)
                    continue
                found[model if target == "ort" else f"{model}/{target}"] = {**entry, "model": model, "target": target}
                break
    return found


def entries_of(searched: Mapping[str, Mapping[str, Any]], model: str) -> list[Mapping[str, Any]]:
    """The search entries of one model (results.json "search"), the ORT search's first; results.json files from
    before entries named their model are keyed by it."""
    return [entry for key, entry in searched.items() if entry.get("model", key) == model]


def write_search_report(model: str, graph: str, search_json: str | Path, out_dir: str | Path, command: str = ""
                        ) -> dict[str, Path]:
    """results.json (rows empty, "search": {model: entry}) and report.html in `out_dir`, as `quant search` leaves
    them beside search.json; `quant report` re-renders them."""
    from quant.fileio import atomic_write_json, atomic_write_text
    from quant.report.html import HtmlOptions, render_html

    results = {"schema": 1, "command": command, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "rows": [], "search": {model: search_section(search_json, graph)}}
    folder = Path(out_dir)
    return {"results": atomic_write_json(folder / "results.json", results),
            "html": atomic_write_text(folder / "report.html", render_html(results, HtmlOptions(examples=False)))}
