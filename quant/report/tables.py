"""results.md, results.csv and the console summary, rendered from results.json."""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

from quant.eval.stats import verdict_text
from quant.report.compare import CHANGE_METRICS, Comparison, change_metric, comparisons, format_change
from quant.report.ceiling import CEILING_CAPTION, ceiling_table
from quant.report.goals import goals
from quant.report.rows import (METRIC_SCALE, PLAIN_FP32, TASK_COLUMNS, Row, RowKey, find_row, graph_latency,
                               interleaved_entry, min_snr_db, model_order, primary, primary_latency, ratio,
                               ratio_base, ratio_text, row_key, simulation_note, sorted_rows, stored_ratio, task_kind,
                               task_value, timed_graphs)


def fmt_number(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "pct":
        return f"{100 * value:.2f}"
    if fmt == "x":
        return f"{value:.2f}x"
    return format(value, fmt)

Table = tuple[list[str], list[list[str]]]  # header, rows of cells (a failed row: backend, precision, error)


def model_table(model: str, rows: Sequence[Row], all_rows: Sequence[Row]) -> Table:
    """The accuracy/speed table of one model; results.md and report.html render the same cells."""
    columns = TASK_COLUMNS[task_kind(rows)]
    graph = primary(rows, model).graph
    header = ["backend", "precision", *[c[1] for c in columns], "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms",
              "mean ms (2 thr)", "RTF", "vs FP32 ORT", "vs eager", "min SNR vs FP32 dB"]
    fp32 = find_row(all_rows, model, "ort", "fp32")
    eager = find_row(all_rows, model, "torch", "fp32")
    out = []
    for row in rows:
        if row.get("status") != "ok":
            out.append([row["backend"], row["precision"], f"{row.get('status')}: {_one_line(row.get('error'))}"])
            continue
        mean = primary_latency(row)
        out.append([row["backend"], row["precision"], *[fmt_number(task_value(row, key), fmt) for key, _, fmt in columns],
                    fmt_number(primary_latency(row, "runs"), ".0f"),
                    *[fmt_number(primary_latency(row, s), ".3f") for s in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")],
                    fmt_number(graph_latency(row, graph, "2"), ".3f"), fmt_number(row.get("rtf"), ".4f"),
                    ratio_cell(row, fp32, "vs_fp32"), ratio_cell(row, eager, "vs_eager"),
                    fmt_number(min_snr_db(row), ".1f")])
    return header, out


def ratio_cell(row: Row, base: Row | None, key: str) -> str:
    """The row's primary latency against `base`: the interleaved ratio it carries (median, min, paired p10-p90,
    "unreliable"), else (results.json from before interleaved timing) the ratio of the means."""
    stored = stored_ratio(row, key)
    if stored is not None:
        return ratio_text(stored)
    return fmt_number(speed_ratio(row, base, key), "x")


RATIO_NOTE = ("vs FP32 ORT / vs eager: median latency over the other row's median, both timed interleaved "
              "round-robin in the same rounds (min: ratio of the minima; paired: p10-p90 of the per-round ratio); "
              "'unreliable': the two rows' p10-p90 latency spreads overlap and the paired p10-p90 straddles 1, "
              "so the difference is within this machine's noise at the time")


def timing_line(rows: Sequence[Row], model: str) -> str:
    """How the model's rows were timed: interleaved rounds and the 1-minute load average around its timing."""
    entries = [e for e in (interleaved_entry(row) for row in rows if row.get("status") == "ok") if e is not None]
    if not entries:
        return ""
    info = entries[0]["interleaved"]  # the primary graph's group at 1 thread: every row of it shares the record
    return (f"Timed interleaved: {', '.join(info['variants'])} rotating round-robin in one process, "
            f"{info['rounds']} rounds x {info['calls_per_round']} call(s) each at 1 thread; 1-minute load average "
            f"{float(info['load_before']):.2f} before, {float(info['load_after']):.2f} after. {RATIO_NOTE}."
            + fp32_base_text(info))


def fp32_base_text(info: Mapping[str, Any]) -> str:
    """Which FP32 row "vs FP32 ORT" divides by in a timed group when the spec's rewrites gave it two."""
    base = (info.get("baselines") or {}).get("vs_fp32")
    if base is None or f"ort {PLAIN_FP32}" not in info["variants"]:
        return ""
    return (f" Ratios vs FP32 ORT divide by {base}, the faster in these rounds of the two FP32 builds (ort fp32: the "
            f"graph the builds use, rewritten; ort {PLAIN_FP32}: the export as it is).")


def row_notes(rows: Sequence[Row]) -> list[str]:
    """"<backend> <precision>: <note>" of each ok row that says what it is (the plain export's FP32 row)."""
    return [f"{row['backend']} {row['precision']}: {row['note']}." for row in rows
            if row.get("status") == "ok" and row.get("note")]


def markdown_table(table: Table) -> list[str]:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in rows:  # a short (failed) row keeps the column count
        lines.append("| " + " | ".join(cells) + " |" + " |" * (len(header) - len(cells)))
    return lines


def _one_line(text: object) -> str:
    return " ".join(str(text or "").split())[:160].replace("|", "/")


def _throughput_table(rows: Sequence[Row], graph: str) -> list[str]:
    batches = sorted({int(b) for row in rows for b in (row.get("speed", {}).get(graph, {}).get("batches") or {})})
    if not batches:
        return []
    lines = [f"\n{graph} throughput (utterances/s, 1 thread; mean ms per batch in brackets)\n",
             "| backend | precision | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for row in rows:
        sweep = row.get("speed", {}).get(graph, {}).get("batches") or {}
        cells = []
        for batch in batches:
            entry = sweep.get(str(batch))
            cells.append(f"{entry['items_per_s']:.1f} ({entry['latency_ms']['mean_ms']:.1f})" if entry else "-")
        lines.append(f"| {row['backend']} | {row['precision']} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    all_rows = sorted_rows(results["rows"])
    changes = comparisons(results)
    lines = ["# quant results", ""]
    env = results.get("environment") or {}
    if env:
        lines.append(_environment_line(env))
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`.")
    lines.append("Latency: one batch-1 run of the unit below after warm-up, 1 thread unless noted; "
                 "RTF = processing time / audio duration; ratios are against the same model's FP32 ONNX Runtime and "
                 "PyTorch eager rows of this run (timed interleaved with them: see each model's timing note; "
                 "results.json from before interleaved timing: ratio of the means).")
    for model in model_order(all_rows):
        rows = [r for r in all_rows if r["model"] == model]
        lines += ["", f"## {model}", "", unit_line(rows, model), ""]
        lines += markdown_table(model_table(model, rows, all_rows))
        timing = timing_line(rows, model)
        lines += ["", timing] if timing else []
        lines += [line for note in row_notes(rows) for line in ("", note)]
        if any(r["backend"] == "trt-sim" for r in rows):
            lines += ["", f"trt-sim rows: {simulation_note('trt-sim')}."]
        lines += noisy_line(rows)
        lines += _change_table(model, rows, changes)
        lines += _ceiling_table(rows)
        timed = [r for r in rows if r.get("status") == "ok" and r.get("speed")]
        for graph in timed_graphs(timed, model):  # graphs timed at several batch sizes (WeNet's): throughput
            lines += _throughput_table(timed, graph)
        for graph in timed_graphs(timed, model)[1:]:  # the model table shows the first graph's latency; the rest here
            lines += _graph_latency_lines(timed, graph)
    lines += ["", "## Goals", "", "Accuracy budgets are judged on the 95 % interval of the paired change: within "
              "budget when the whole interval is on the allowed side, over budget when it is wholly beyond it.", "",
              "| goal | measured | target | met |", "|---|---|---|---|"]
    for goal in goals(results, changes):
        lines.append(f"| {goal.name} | {goal.interval or fmt_number(goal.measured, '.3f')} | {goal.target} "
                     f"| {goal.met_text} |")
    return "\n".join(lines) + "\n"

def _environment_line(env: Mapping[str, Any]) -> str:
    machine = f"{env.get('cpu', 'unknown CPU')} ({env.get('cores', '?')} cores)"
    if env.get("load_average_at_start") is not None:
        machine += f", 1-minute load average {env['load_average_at_start']:.2f} at the start"
    tools = ", ".join(f"{k} {v}" for k, v in sorted(env.items())
                      if k not in ("cpu", "cores", "load_average_at_start"))
    return f"Measured in one run on {machine}; {tools}."


def unit_line(rows: Sequence[Row], model: str) -> str:
    graph = primary(rows, model).graph
    for row in rows:
        unit = row.get("speed", {}).get(graph, {}).get("unit")
        if unit:
            return f"Latency unit: {unit} ({graph} graph)."
    return "No speed measured."


def noisy_line(rows: Sequence[Row]) -> list[str]:
    """The unprocessed noisy input's scores (same for every row of an SE model), as the baseline to beat."""
    for row in rows:
        task = row.get("task") or {}
        if row.get("status") == "ok" and "noisy_pesq_wb" in task:
            parts = [f"{label} {fmt_number(task_value(row, 'noisy_' + key), fmt)}" for key, label, fmt in TASK_COLUMNS["se"]]
            return ["", f"Noisy input (no enhancement), {task.get('utterances', '?')} utterances: " + ", ".join(parts)]
    return []


CHANGE_CAPTION = ("Accuracy change vs FP32, paired over the same utterances: change [95 % bootstrap interval] "
                  "n utterances, share of utterances worse (CER/WER in percentage points)")


def change_table(model: str, rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> Table | None:
    """Each compared row's change vs its FP32 row: change [95 % interval] n, share of utterances worse."""
    compared = [(row, changes[row_key(row)]) for row in rows if row.get("status") == "ok" and row_key(row) in changes]
    if not compared:
        return None
    metrics = [key for key, _, _, _ in CHANGE_METRICS[task_kind(rows)]
               if any(key in comparison.changes for _, comparison in compared)]
    header = ["backend", "precision", "vs", *[change_metric(key)[0] for key in metrics], "budget", "verdict"]
    out = []
    for row, comparison in compared:
        verdict = comparison.verdict
        budget = "-" if verdict is None else format(
            METRIC_SCALE.get(comparison.budget_metric or "", 1.0) * verdict.budget.line, "+g")
        out.append([row["backend"], row["precision"], f"{comparison.reference['backend']} fp32",
                    *[format_change(comparison.changes.get(key), key) for key in metrics], budget,
                    verdict_text(verdict) if verdict else "-"])
    return header, out


def _change_table(model: str, rows: Sequence[Row], changes: Mapping[RowKey, Comparison]) -> list[str]:
    table = change_table(model, rows, changes)
    return [] if table is None else ["", CHANGE_CAPTION, "", *markdown_table(table)]


def _ceiling_table(rows: Sequence[Row]) -> list[str]:
    table = ceiling_table(rows)
    return [] if table is None else ["", CEILING_CAPTION, "", *markdown_table(table)]


def _graph_latency_lines(rows: Sequence[Row], graph: str) -> list[str]:
    unit = next((str(r["speed"][graph].get("unit")) for r in rows if graph in r["speed"]), "run")
    return ["", f"{graph} batch-1 latency on a {unit}, ms: "
            + ", ".join(f"{r['backend']} {r['precision']} {fmt_number(graph_latency(r, graph), '.2f')}" for r in rows)]


CSV_FIELDS = ["model", "backend", "precision", "status", "pesq_wb", "pesq_nb", "stoi", "si_sdr", "cer", "wer",
              "cer_greedy", "wer_greedy", "cer_real", "cer_synthetic", "latency_min_ms", "latency_mean_ms",
              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "latency_runs",
              "latency_mean_ms_2_threads", "rtf", "ratio_vs_fp32_ort", "ratio_vs_eager",
              # interleaved timing (ratio columns above: median over median): the ratio vs FP32 ORT's min and paired
              # per-round p10-p90, whether it is reliable (p10-p90 spreads apart or paired p10-p90 on one side of 1), the load around the timing
              "ratio_vs_fp32_min", "ratio_vs_fp32_paired_p10", "ratio_vs_fp32_paired_p90", "ratio_vs_fp32_reliable",
              "ratio_vs_fp32_base",  # the FP32 row the ratio divides by (the faster of rewritten and plain export)
              "ratio_vs_eager_reliable", "timing_load_before", "timing_load_after", "min_snr_db_vs_fp32",
              # the primary metric's paired change vs the FP32 row `compared_with`, in the metric's stored units
              "compared_with", "change_metric", "delta", "ci_low", "ci_high", "n", "share_worse", "budget",
              "verdict", "n_to_tell", "simulation", "error"]


def render_csv(results: Mapping[str, Any]) -> str:
    rows = sorted_rows(results["rows"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    changes = comparisons(results)
    for row in rows:
        out = _csv_row(row, rows)
        if row_key(row) in changes and row.get("status") == "ok":
            out.update(_csv_change(row, changes[row_key(row)]))
        writer.writerow(out)
    return buffer.getvalue()


def _csv_row(row: Row, rows: Sequence[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {key: row.get(key, "") for key in ("model", "backend", "precision", "status")}
    out["error"] = _one_line(row.get("error"))
    out["simulation"] = simulation_note(str(row.get("backend")))
    if row.get("status") != "ok":
        return out
    for key in ("pesq_wb", "pesq_nb", "stoi", "si_sdr", "cer", "wer", "cer_greedy", "wer_greedy", "cer_real",
                "cer_synthetic"):
        out[key] = _num(task_value(row, key))
    for stat in ("min", "mean", "p50", "p90", "p99", "max"):
        out[f"latency_{stat}_ms"] = _num(primary_latency(row, f"{stat}_ms"))
    out["latency_runs"] = _num(primary_latency(row, "runs"))
    graph = primary([row], row["model"]).graph
    out["latency_mean_ms_2_threads"] = _num(graph_latency(row, graph, "2"))
    out["rtf"] = _num(row.get("rtf"))
    fp32, eager = find_row(rows, row["model"], "ort", "fp32"), find_row(rows, row["model"], "torch", "fp32")
    out["ratio_vs_fp32_ort"] = _num(speed_ratio(row, fp32, "vs_fp32"))
    out["ratio_vs_eager"] = _num(speed_ratio(row, eager, "vs_eager"))
    stored, to_eager = stored_ratio(row, "vs_fp32"), stored_ratio(row, "vs_eager")
    if stored is not None:
        out.update(ratio_vs_fp32_min=_num(stored["min_ratio"]), ratio_vs_fp32_paired_p10=_num(stored["paired_p10"]),
                   ratio_vs_fp32_paired_p90=_num(stored["paired_p90"]), ratio_vs_fp32_reliable=bool(stored["reliable"]),
                   ratio_vs_fp32_base=stored.get("base", ""))
    if to_eager is not None:
        out["ratio_vs_eager_reliable"] = bool(to_eager["reliable"])
    entry = interleaved_entry(row)
    if entry is not None:
        out.update(timing_load_before=_num(entry["interleaved"]["load_before"]),
                   timing_load_after=_num(entry["interleaved"]["load_after"]))
    out["min_snr_db_vs_fp32"] = _num(min_snr_db(row))
    return out


def _csv_change(row: Row, comparison: Comparison) -> dict[str, Any]:
    metric = comparison.budget_metric or primary([row], row["model"]).metric
    change = comparison.changes.get(metric)
    if change is None:
        return {}
    verdict = comparison.verdict
    return {"compared_with": f"{comparison.reference['backend']} fp32", "change_metric": metric,
            "delta": _num(change.delta), "ci_low": _num(change.ci_low), "ci_high": _num(change.ci_high),
            "n": change.n, "share_worse": _num(change.share_worse),
            "budget": _num(verdict.budget.line) if verdict else "", "verdict": verdict.verdict if verdict else "",
            "n_to_tell": verdict.n_to_tell if verdict and verdict.n_to_tell else ""}


def speed_ratio(row: Row, base: Row | None, key: str) -> float | None:
    """The median ratio of the interleaved timing the row carries; 1 for the row its group divided by (with two FP32
    rows, the faster); else (older results.json) the ratio of means."""
    stored = stored_ratio(row, key)
    if stored is not None:
        return float(stored["median_ratio"])
    entry = interleaved_entry(row)
    bases = (entry["interleaved"].get("baselines") or {}) if entry is not None else {}
    if bases.get(key) == f"{row['backend']} {row['precision']}":
        return 1.0
    return ratio(primary_latency(row), primary_latency(base) if base else None)


def _summary_ratio(row: Row, base: Row | None, key: str) -> str:
    stored = stored_ratio(row, key)
    text = fmt_number(speed_ratio(row, base, key), "x")
    return text + "?" if stored is not None and not stored.get("reliable") else text


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """A compact plain-text table for the end of `quant run`."""
    rows = sorted_rows(results["rows"])
    lines = [f"{'model':<13} {'backend':<7} {'prec':<13} {'status':<7} {'metric':>14} {'mean ms':>9} {'RTF':>8} "
             f"{'vs FP32':>8} {'vs eager':>9}"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"{row['model']:<13} {row['backend']:<7} {row['precision']:<13} {row.get('status', '?'):<7} "
                         f"{_one_line(row.get('error'))[:60]}")
            continue
        _, metric, _, label = primary([row], row["model"])
        value = task_value(row, metric)
        shown = "-" if value is None else (f"{100 * value:.2f}%" if metric == "cer" else f"{value:.3f}")
        fp32, eager = find_row(rows, row["model"], "ort", "fp32"), find_row(rows, row["model"], "torch", "fp32")
        lines.append(
            f"{row['model']:<13} {row['backend']:<7} {row['precision']:<13} {'ok':<7} {label + ' ' + shown:>14} "
            f"{fmt_number(primary_latency(row), '.3f'):>9} {fmt_number(row.get('rtf'), '.4f'):>8} "
            f"{_summary_ratio(row, fp32, 'vs_fp32'):>8} {_summary_ratio(row, eager, 'vs_eager'):>9}"
        )
    for model in dict.fromkeys(row["model"] for row in rows):
        bases = {base for row in rows if row["model"] == model
                 for base in [ratio_base(stored_ratio(row, "vs_fp32"))] if base}
        if bases:
            lines.append(f"{model}: vs FP32 divides by {', '.join(sorted(bases))}, the faster FP32 build (the export "
                         "without the spec's rewrites)")
    if any(_summary_ratio(row, None, key).endswith("?") for row in rows for key in ("vs_fp32", "vs_eager")):
        lines.append("?: unreliable ratio (p10-p90 latencies overlap, paired p10-p90 straddles 1); ratios are medians of "
                     "interleaved timing")
    for goal in goals(results):
        met = goal.met_text if goal.verdict else ("n/a" if goal.met is None else ("met" if goal.met else "NOT met"))
        lines.append(f"goal: {goal.name}: {goal.interval or fmt_number(goal.measured, '.3f')} (target {goal.target}) {met}")
    return lines
