"""report.html: one self-contained page per run, rendered from results.json and the artifacts it names.

No network access is needed to view it: CSS is inline, figures are base64 PNGs from matplotlib, there are no scripts,
and a Content-Security-Policy forbids the page any request (a stray URL shows up as a browser error, not a request).
Sections whose data a run did not produce (per-op profiles, search results, artifacts deleted since) are left out or
say what is missing. The keys read beyond quant.report.rows: docs/architecture.md, "report.html".
"""

from __future__ import annotations

import base64
import html
import logging
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from quant.report import artifacts, examples, figures
from quant.report.ceiling import CEILING_CAPTION, ceiling_table, profiled
from quant.report.compare import Comparison, comparisons
from quant.report.goals import goals
from quant.report.plots import render_plot, search_points
from quant.report.search import entries_of
from quant.report.rows import (
    Row, RowKey, model_order, ok_rows, primary, simulation_note, sorted_rows, task_kind, timed_graphs,
)
from quant.report.tables import (CHANGE_CAPTION, Table, change_table, fmt_number, model_table, noisy_line, row_notes,
                                 timing_line, unit_line)

logger = logging.getLogger(__name__)

TOP_CLIPPED = 8  # tensors shown in the calibration section
TOP_HISTOGRAMS = 4  # of which the histograms drawn
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; max-width: 1100px; padding: 0 12px 40px; }
h1 { font-size: 1.6em; margin: 18px 0 4px; } h2 { border-bottom: 2px solid #ddd; margin-top: 36px; }
h3 { margin: 22px 0 6px; font-size: 1.1em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; white-space: normal; }
td.failed { color: #a00; text-align: left; white-space: normal; }
figure { margin: 10px 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 13px; } nav a { margin-right: 12px; }
details summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
"""


@dataclass(frozen=True)
class HtmlOptions:
    examples: bool = True  # run the SE models' FP32 and INT8 artifacts on one short utterance for spectrograms


def render_html(results: Mapping[str, Any], options: HtmlOptions = HtmlOptions()) -> str:
    rows = sorted_rows(results["rows"])
    changes = comparisons(results)
    searched = results.get("search") or {}
    models = model_order(rows)
    # `quant search`'s own page: no rows, only its search
    models += sorted({str(entry.get("model", key)) for key, entry in searched.items()} - set(models))
    body = [f"<h1>quant report</h1><p class=note>{_e(results.get('created_utc', ''))} &middot; "
            f"<code>{_e(results.get('command', ''))}</code></p>",
            "<nav>" + "".join(f'<a href="#{_e(m)}">{_e(m)}</a>' for m in models)
            + ('<a href="#goals">goals</a>' if rows else "") + '<a href="#environment">environment</a></nav>']
    for model in models:
        model_rows = [r for r in rows if r["model"] == model]
        body += (_model_section(model, results, model_rows, rows, changes, options) if model_rows
                 else [f'<h2 id="{_e(model)}">{_e(model)}</h2>', *_search(model, results, model_rows)])
    body += _goals_section(results, changes) if rows else []  # a search's page: no rows, no goal to judge
    body += _environment_section(results)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>quant report</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(table: Table, text_columns: Iterable[int] = (0, 1)) -> str:
    header, rows = table
    texts = set(text_columns)
    head = "".join(f"<th{' class=text' if i in texts else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    lines = []
    for cells in rows:
        if len(cells) < len(header):  # a failed row: its error spans the remaining columns
            lines.append("<tr>" + "".join(f"<td class=text>{_e(c)}</td>" for c in cells[:-1])
                         + f"<td class=failed colspan={len(header) - len(cells) + 1}>{_e(cells[-1])}</td></tr>")
        else:
            lines.append("<tr>" + "".join(f"<td{' class=text' if i in texts else ''}>{_e(c)}</td>"
                                          for i, c in enumerate(cells)) + "</tr>")
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table></div>"


def _figure(png: bytes, alt: str, caption: str = "") -> str:
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR size
    data = base64.b64encode(png).decode("ascii")
    note = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}" width={width} height={height}>'
            f"{note}</figure>")


def _model_section(model: str, results: Mapping[str, Any], rows: Sequence[Row], all_rows: Sequence[Row],
                   changes: Mapping[RowKey, Comparison], options: HtmlOptions) -> list[str]:
    out = [f'<h2 id="{_e(model)}">{_e(model)}</h2>', f"<p class=note>{_e(unit_line(rows, model))}</p>",
           _table(model_table(model, rows, all_rows))]
    timing = timing_line(rows, model)
    if timing:
        out.append(f"<p class=note>{_e(timing)}</p>")
    out += [f"<p class=note>{_e(note)}</p>" for note in row_notes(rows)]
    if any(r["backend"] == "trt-sim" for r in rows):
        out.append(f"<p class=note>trt-sim rows: {_e(simulation_note('trt-sim'))}.</p>")
    out += [f"<p class=note>{_e(line)}</p>" for line in noisy_line(rows) if line]
    changed = change_table(model, rows, changes)
    if changed is not None:
        out += [f"<h3>Accuracy change vs FP32</h3><p class=note>{_e(CHANGE_CAPTION)}</p>",
                _table(changed, range(len(changed[0])))]
    sections = (_tradeoff, _latency, _profile, _plan, _calibration, _search)
    for section in sections:
        out += section(model, results, rows)
    if options.examples:
        out += _examples(model, rows)
    return out


def _tradeoff(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    if not primary(rows, model).metric or not any(r.get("speed") for r in ok_rows({"rows": rows})):
        return []
    searched = (" Grey dots: configurations the search built (latency: the search's own median; metric: FP32 plus "
                "the change the search measured on its validation split); line: their frontier."
                if search_points(results, model, primary(rows, model).metric) else "")
    return ["<h3>Trade-off</h3>", _figure(render_plot(results, [model]), f"{model} task metric against latency",
                                          "Task metric against median latency for every timed backend and precision "
                                          "(simulated rows have no latency)." + searched)]


def _timed(rows: Sequence[Row], graph: str, key: str) -> list[Row]:
    return [r for r in ok_rows({"rows": rows}) if ((r.get("speed") or {}).get(graph) or {}).get(key)]


def _latency(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    graphs = timed_graphs(rows, model) or (primary(rows, model).graph,)
    out = []
    for graph in graphs:
        timed = [r for r in _timed(rows, graph, "threads") if "1" in r["speed"][graph]["threads"]]
        if timed:
            unit = timed[0]["speed"][graph].get("unit", "run")
            out.append(_figure(figures.latency_distribution(timed, graph, unit), f"{graph} latency distribution",
                               f"{graph}: p50 / p90 / p99 latency over the timed runs, batch 1, 1 thread."))
        swept = _timed(rows, graph, "batches")
        if swept:
            out.append(_figure(figures.batch_sweep(swept, graph), f"{graph} throughput by batch"))
    return ["<h3>Latency</h3>", *out] if out else []


def _profile(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    """The INT8 rows' ceiling and what holds the rest (report/ceiling.py), and per-op time: of each INT8 row's
    profiled primary graph, FP32 vs INT8, or of rows with a "profile" ({op type: ms per run}) in older results."""
    out = []
    table = ceiling_table(rows)
    if table is not None:
        out = ["<h3>INT8 time accounting</h3>", f"<p class=note>{_e(CEILING_CAPTION)}</p>",
               _table(table, (0, 1, 6))]
    profiles = {f"{r['backend']} {r['precision']}": r["profile"] for r in ok_rows({"rows": rows}) if r.get("profile")}
    for row, graph, profile in profiled(rows):
        if graph == primary(rows, model).graph:
            profiles.setdefault("ort fp32", profile["fp32"])
            profiles[f"{row['backend']} {row['precision']}"] = profile["int8"]
    if not profiles:
        return out
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in
                                                                                    profiles.values()))
    table = (["op type", *[f"{name} ms" for name in profiles]],
             [[op, *[fmt_number(p.get(op), ".3f") for p in profiles.values()]] for op in ops])
    return [*out, "<h3>Time per op type</h3>", _figure(figures.op_profile(profiles), f"{model} time per op type"),
            "<details><summary>all op types</summary>" + _table(table, (0,)) + "</details>"]


def _plan(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    out, seen = [], set()
    for row in ok_rows({"rows": rows}):
        meta = artifacts.build_meta(row) if row["precision"] != "fp32" else None
        if meta is None:
            continue
        plan = artifacts.precision_plan(meta)
        key = meta.get("source_sha256"), row["precision"], meta.get("backend")
        if not plan or key in seen:  # trt-sim rows read the ORT build's folder: one table for both
            continue
        seen.add(key)
        table = (["op type", "precision", "rule", "nodes", "why"],
                 [[p.op_type, p.precision, p.rule, str(p.nodes), p.reason] for p in plan if p.rule != "default"])
        defaults = [p for p in plan if p.rule == "default"]
        rest = ("<p class=note>No rule matched, so the build's default precision: "
                + _e(", ".join(f"{p.op_type} {p.nodes} ({p.precision})" for p in defaults)) + ".</p>") if defaults else ""
        opened = " open" if row["precision"] == "int8" else ""
        out.append(f"<details{opened}><summary>{_e(meta.get('backend', row['backend']))} {_e(row['precision'])} "
                   f"build: precision by op type</summary>{_table(table, (0, 1, 2, 4))}{rest}</details>")
    return ["<h3>Precision plan</h3><p class=note>The first precision rule that matches a node decides; "
            "its reason is the rule's <code>why</code>.</p>", *out] if out else []


def _calibration(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    out, seen = [], set()
    for row in ok_rows({"rows": rows}):
        meta = artifacts.build_meta(row) if row["precision"] == "int8" else None
        found = artifacts.calibration(meta) if meta else None
        if found is None or found.cache in seen:
            continue
        seen.add(found.cache)
        worst = found.tensors[:TOP_CLIPPED]
        methods = found.methods
        table = (["tensor", *[f"amax {m}" for m in methods], "largest |x| seen", f"range clipped ({found.method})",
                  f"values clipped ({found.method})"],
                 [[t.name, *[fmt_number(t.amax.get(m), ".4g") for m in methods], fmt_number(t.observed, ".4g"),
                   f"{100 * t.clipped:.1f} %", "" if t.mass_clipped is None else f"{100 * t.mass_clipped:.3g} %"]
                  for t in worst])
        out += [f"<p class=note>Cache {_e(found.cache.name)}: {len(found.tensors)} tensors, method "
                f"{_e(found.method)}; other methods shown where the cache store holds them for the same model. "
                "Range clipped: the share of the largest magnitude seen that lies beyond amax; values clipped: the "
                "share of calibration values beyond amax, from the stored |x| histograms.</p>",
                _table(table, (0,)), _figure(figures.clipping(worst, found.method), f"{model} most clipped tensors")]
        drawn = [t for t in worst if t.histogram is not None][:TOP_HISTOGRAMS]
        if drawn:
            out.append(_figure(figures.histograms(drawn, found.method), f"{model} histograms of the most clipped "
                               "tensors", "|x| over the calibration set (equal bins up to the largest |x| seen) of "
                               "the most clipped tensors; lines: each method's amax; title: share of values beyond "
                               "the build's amax."))
        elif found.histogram_note:
            out.append(f"<p class=note>{_e(found.histogram_note)}</p>")
    return ["<h3>Calibration</h3>", *out] if out else []


def _search(model: str, results: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    """What `quant search` measured for the model (results.json "search", quant.report.search): the configurations
    with their frontier, the chosen one and its held-out verdict, and each unit's sensitivity."""
    return [part for entry in entries_of(results.get("search") or {}, model) for part in _search_entry(model, entry)]


def _search_entry(model: str, entry: Mapping[str, Any]) -> list[str]:
    """One search of the model (ONNX Runtime, or TensorRT simulated: --target trt-sim)."""
    simulated = entry.get("target", "trt-sim" if entry.get("backend") == "trt" else "ort") == "trt-sim"
    target = " (TensorRT, simulated: --target trt-sim)" if simulated else ""
    cost = entry.get("cost") or {}
    chosen = entry.get("chosen")
    held = (entry.get("held_out") or {}).get("searched")
    facts = [f"Graph {entry.get('graph', '')}, backend {entry.get('backend', '')}, budget {entry.get('budget', '')}",
             f"{cost.get('evaluations', '?')} builds in {fmt_number(cost.get('minutes'), '.1f')} min",
             f"speed: {entry.get('speed_basis', '')}",
             f"chosen: {chosen}" if chosen else "no measured configuration met the budget"]
    if held:
        facts.append(f"held-out ({held.get('n')} utterances): change {fmt_number(held.get('delta'), '+.4f')} "
                     f"[{fmt_number(held.get('ci_low'), '+.4f')}, {fmt_number(held.get('ci_high'), '+.4f')}], "
                     f"{held.get('verdict_text', held.get('verdict', ''))}")
    points = sorted(entry.get("points") or [], key=lambda p: (-int(p["int8_units"]), p["label"]))
    table = (["configuration", "INT8 units", "latency ms", f"{entry.get('metric', '')} change", "95 % interval",
              "within budget", "frontier"],
             [[p["label"] + (" (chosen)" if p.get("chosen") else "") + (" (default rules)" if p.get("default") else ""),
               str(p["int8_units"]), fmt_number(p.get("latency_ms"), ".2f"), fmt_number(p["delta"], "+.4f"),
               f"[{fmt_number(p['ci_low'], '+.4f')}, {fmt_number(p['ci_high'], '+.4f')}]",
               "yes" if p.get("holds") else "no", "yes" if p.get("frontier") else ""] for p in points])
    out = [f"<h3>Precision search{_e(target)}</h3>", f"<p class=note>{_e('; '.join(facts))}. Command: "
           f"<code>{_e(entry.get('command', ''))}</code></p>",
           _figure(figures.search_frontier(entry), f"{model} searched configurations",
                   "Every configuration the search built, measured on the validation split; line: the Pareto "
                   "frontier of speed and metric change.") if points else "",
           _table(table, (0,)) if points else ""]
    units = entry.get("units") or []
    measured = [u for u in units if u.get("snr_db") is not None or u.get("delta") is not None]
    if units and not measured:
        out += ["<h3>Sensitivity of each quantized unit</h3>", "<p class=note>The search measured no unit's "
                "sensitivity (its evaluation budget, --max-evals, ran out before that step).</p>"]
    if units:
        unit_table = (["unit", "op types", "nodes", "SNR, only this unit INT8, dB",
                       f"{entry.get('metric', '')} change, only this unit INT8", "kernel ms saved", "chosen"],
                      [[u["unit"], u.get("op_type", ""), str(u.get("nodes", "")), fmt_number(u.get("snr_db"), ".1f"),
                        fmt_number(u.get("delta"), "+.4f"), fmt_number(u.get("saved_ms"), ".3f"),
                        "INT8" if u.get("int8") else "partly INT8 (base rules)" if u.get("base_rules") else "float"]
                       for u in units])
        if measured:
            out += ["<h3>Sensitivity of each quantized unit</h3>",
                    _figure(figures.sensitivity(measured, str(entry.get("metric", "")),
                                                bool(entry.get("higher_is_better", True))),
                            f"{model} unit sensitivity", "Worst units first (from the search).")]
        out.append("<details><summary>all units</summary>" + _table(unit_table, (0, 1)) + "</details>")
    return [part for part in out if part]


def _examples(model: str, rows: Sequence[Row]) -> list[str]:
    if task_kind([row for row in rows if row.get("model") == model]) != "se":
        return []
    found = examples.enhanced_example(model, rows)
    if isinstance(found, str):
        return ["<h3>Enhanced example</h3>", f"<p class=note>{_e(found)}</p>"]
    caption = (f"Utterance {found.utterance}, first {examples.EXAMPLE_SECONDS:g} s, enhanced at report time by the "
               "ONNX Runtime artifacts of this run.")
    return ["<h3>Enhanced example</h3>", _figure(figures.spectrograms(found), f"{model} spectrograms", caption)]


def _goals_section(results: Mapping[str, Any], changes: Mapping[RowKey, Comparison]) -> list[str]:
    table = (["goal", "measured", "target", "met"],
             [[g.name, g.interval or fmt_number(g.measured, ".3f"), g.target, g.met_text] for g in goals(results, changes)])
    return ['<h2 id="goals">Goals</h2>', "<p class=note>Accuracy budgets are judged on the 95 % interval of the "
            "paired change.</p>", _table(table, (0, 1, 2, 3))]


def _environment_section(results: Mapping[str, Any]) -> list[str]:
    env = dict(results.get("environment") or {})
    options = results.get("options") or {}
    bench = options.get("bench") or {}
    facts = [("command", results.get("command")), ("created (UTC)", results.get("created_utc")),
             ("wall time, s", fmt_number(results.get("wall_seconds"), ".0f") if results.get("wall_seconds") else None),
             ("timed thread counts", ", ".join(map(str, bench.get("threads", []))) or None),
             ("accuracy threads", options.get("eval_threads")), ("backends", ", ".join(results.get("backends", [])))]
    facts += sorted(env.items())
    table = (["", "value"], [[name, str(value)] for name, value in facts if value not in (None, "")])
    return ['<h2 id="environment">Environment</h2>', _table(table, (0, 1))]
