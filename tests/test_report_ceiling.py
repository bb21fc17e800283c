"""The INT8 time accounting in the report (quant/report/ceiling.py): the ceiling from a row's stored profile, the
measured paired ratio beside it, and what holds the INT8 run, in results.md and report.html."""

from __future__ import annotations

import copy
from typing import Any

from quant.report.ceiling import ceiling_table, holdback_text
from quant.report.html import HtmlOptions, render_html
from quant.report.tables import render_markdown

HOLDBACK = [{"what": "float GRU", "ms": 0.30, "share": 0.45, "above_ceiling": 0.0},
            {"what": "Q/DQ and reorders", "ms": 0.04, "share": 0.06, "above_ceiling": 0.06},
            {"what": "outside kernels", "ms": 0.02, "share": 0.03, "above_ceiling": 0.001}]


def row(precision: str, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"unit": "5 s utterance", "audio_seconds": 5.0, "threads": {"1": {
        "latency_ms": {"runs": 20, "min_ms": 1.0, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.2,
                       "max_ms": 1.3}, "rtf": 0.0002}}}
    if precision != "fp32":
        entry["threads"]["1"]["vs_fp32"] = {"min_ratio": 1.02, "median_ratio": 1.04, "reliable": False,
                                            "paired_median": 1.03, "paired_p10": 0.95, "paired_p90": 1.12}
    if profile is not None:
        entry["profile"] = profile
    return {"model": "gru-logpower", "kind": "se", "backend": "ort", "precision": precision, "status": "ok",
            "error": None, "task": {}, "per_utterance": {}, "error_vs_fp32": {}, "speed": {"masker": entry},
            "latency_ms": entry["threads"]["1"]["latency_ms"], "rtf": 0.0002, "budget": None,
            "primary": {"graph": "masker", "metric": "pesq_wb", "higher_is_better": True}}


PROFILE = {"fp32": {"GRU": 0.35, "MatMul": 0.24}, "int8": {"GRU": 0.36, "QLinearMatMul": 0.23},
           "ceiling_ratio": 0.98, "ceiling_free_ratio": 0.6, "integer_share": 0.4, "holdback": HOLDBACK}


def results(profile: dict[str, Any] | None = PROFILE) -> dict[str, Any]:
    return {"schema": 1, "environment": {"cpu": "test", "cores": 2},
            "rows": [row("fp32"), row("int8", copy.deepcopy(profile) if profile else None)]}


def test_ceiling_table_sets_the_measured_ratio_beside_the_profile_ceiling() -> None:
    table = ceiling_table(results()["rows"])
    assert table is not None
    header, cells = table
    assert header[:5] == ["graph", "build", "measured INT8/FP32", "ceiling", "above ceiling"]
    assert cells == [["masker", "ort int8", "1.03 (0.95-1.12)", "0.98", "+0.05", "40 %",
                      "float GRU 0.45, Q/DQ and reorders 0.06 (+0.06), outside kernels 0.03"]]


def test_a_row_timed_before_paired_ratios_shows_its_median_ratio() -> None:
    rows = results()["rows"]
    ratio = rows[1]["speed"]["masker"]["threads"]["1"]["vs_fp32"]
    for key in ("paired_median", "paired_p10", "paired_p90"):
        del ratio[key]
    assert ceiling_table(rows)[1][0][2:5] == ["1.04 (1.04-1.04)", "0.98", "+0.06"]  # type: ignore[index]


def test_results_without_profiles_have_no_ceiling_section() -> None:
    assert ceiling_table(results(None)["rows"]) is None
    assert "INT8 time accounting" not in render_markdown(results(None))
    assert "INT8 time accounting" not in render_html(results(None), HtmlOptions(examples=False))


def test_markdown_and_html_carry_the_ceiling_and_what_holds_the_rest() -> None:
    markdown = render_markdown(results())
    assert "INT8 time accounting" in markdown
    assert "| masker | ort int8 | 1.03 (0.95-1.12) | 0.98 | +0.05 | 40 % | float GRU 0.45" in markdown
    page = render_html(results(), HtmlOptions(examples=False))
    assert "INT8 time accounting" in page and "float GRU 0.45" in page
    assert "Time per op type" in page  # the primary graph's FP32 vs INT8 op types from the same profile


def test_holdback_text_shows_the_largest_parts_only() -> None:
    assert holdback_text(HOLDBACK, shown=1) == "float GRU 0.45"
    assert holdback_text([]) == "-"
