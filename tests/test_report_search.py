"""results.json's "search" key from quant search's search.json; `quant search` writes results.json and report.html;
`quant run` picks a search output up from the output root."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from quant import report
from quant.cli import main
from quant.errors import ReportError
from quant.report.html import HtmlOptions, render_html
from quant.report.search import search_section, search_sections, write_search_report
from quant.search.budget import parse_budget
from quant.search.core import Point, SearchResult, Sensitivity
from quant.search.output import to_json
from quant.search.speed import Latency
from quant.search.units import Unit
from tests.test_report_html import se_row

UNITS = (Unit("/enc/conv1", ("/enc/conv1",), ("Conv",), "int8", "int8-compute"),
         Unit("/enc/conv2", ("/enc/conv2",), ("Conv",), "int8", "int8-compute"),
         Unit("/lstm/matmul", ("/lstm/matmul", "/lstm/add"), ("MatMul", "Add"), "fp32", "recurrent"))


def point(label: str, int8: set[str], delta: float, median_ms: float, holds: bool) -> Point:
    verdict = {"delta": delta, "ci_low": delta - 0.02, "ci_high": delta + 0.02, "n": 6, "share_worse": 0.5,
               "spread": 0.01, "budget": -0.05, "verdict": "cannot tell", "n_to_tell": 40}
    return Point(label, frozenset(int8), Path("/gone") / label, {}, verdict, holds,
                 Latency(median_ms - 1.0, median_ms, 9))


def search_result() -> SearchResult:
    """A search of three units: all-INT8 is fastest but over budget; 'step-1' is dominated by 'default-rules'."""
    everything = point("all-int8", {u.name for u in UNITS}, -0.20, 80.0, False)
    default = point("default-rules", {"/enc/conv1", "/enc/conv2"}, -0.03, 90.0, True)
    dominated = point("step-1", {"/enc/conv1"}, -0.04, 95.0, True)
    sens = {"/enc/conv1": Sensitivity("/enc/conv1", 10.0, 6.0, 35.0),
            "/enc/conv2": Sensitivity("/enc/conv2", 8.0, 5.0, 31.0),
            "/lstm/matmul": Sensitivity("/lstm/matmul", 12.0, 9.0, 14.0, 20.0, everything.verdict | {"delta": -0.15})}
    return SearchResult(parse_budget("pesq_wb=-0.05"), UNITS, sens, (everything, default, dominated),
                        ("revert /lstm/matmul",), default, default, Latency(119.0, 120.0, 9),
                        {"searched": {"delta": -0.02, "ci_low": -0.04, "ci_high": 0.0, "n": 6,
                                      "verdict": "within budget"}}, 7, 1.5, "ONNX Runtime CPU")


def write_search_json(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "search.json"
    path.write_text(json.dumps(to_json(search_result(), "quant search dpcrn --budget pesq_wb=-0.05")))
    return path


def test_section_holds_points_frontier_units_and_choice(tmp_path: Path) -> None:
    entry = search_section(write_search_json(tmp_path / "dpcrn"))
    points = {p["label"]: p for p in entry["points"]}
    assert set(points) == {"all-int8", "default-rules", "step-1"}
    # Pareto: all-int8 (fastest) and default-rules (better metric than step-1, faster) are; step-1 is not
    assert [points[name]["frontier"] for name in ("all-int8", "default-rules", "step-1")] == [True, True, False]
    assert points["default-rules"]["chosen"] and points["default-rules"]["default"]
    assert points["all-int8"]["latency_ms"] == 80.0 and points["all-int8"]["int8_units"] == 3
    assert entry["chosen"] == "default-rules" and entry["metric"] == "pesq_wb" and entry["higher_is_better"]
    units = {u["unit"]: u for u in entry["units"]}
    assert units["/lstm/matmul"] == {"unit": "/lstm/matmul", "op_type": "MatMul/Add", "nodes": 2, "snr_db": 14.0,
                                     "delta": -0.15, "saved_ms": 3.0, "int8": False, "base_rules": False}
    assert units["/enc/conv1"]["int8"] and units["/enc/conv1"]["delta"] is None
    assert entry["graph"] == "dpcrn" and entry["cost"] == {"minutes": 1.5, "evaluations": 7}


@pytest.mark.parametrize("content", ["{", "[]", '{"units": [], "frontier": [], "budget": {"metric": "nope"}}'])
def test_a_broken_search_json_is_one_error_naming_it_and_skipped_by_a_run(tmp_path: Path, content: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "search" / "dpcrn" / "search.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ReportError, match=str(path)):
        search_section(path)
    assert search_sections(tmp_path / "search", {"dpcrn": ["dpcrn"]}) == {}
    assert "search results left out of the report" in caplog.text


def test_run_takes_the_first_searched_graph_of_each_model(tmp_path: Path) -> None:
    write_search_json(tmp_path / "search" / "wenet-decoder")
    found = search_sections(tmp_path / "search", {"wenet": ["wenet-encoder", "wenet-decoder"], "dpcrn": ["dpcrn"]})
    assert list(found) == ["wenet"] and found["wenet"]["graph"] == "wenet-decoder"


def test_run_takes_a_trt_sim_search_beside_the_ort_one_and_the_page_shows_both(tmp_path: Path) -> None:
    write_search_json(tmp_path / "search" / "dpcrn")
    write_search_json(tmp_path / "search" / "dpcrn-trt-sim")  # quant search dpcrn --target trt-sim
    found = search_sections(tmp_path / "search", {"dpcrn": ["dpcrn"]})
    assert list(found) == ["dpcrn", "dpcrn/trt-sim"] and [e["model"] for e in found.values()] == ["dpcrn", "dpcrn"]
    text = render_html({"rows": [se_row("fp32", 3.0, 120.0)], "search": found}, HtmlOptions(examples=False))
    assert text.count("<h3>Precision search") == 2 and "Precision search (TensorRT, simulated" in text
    assert text.count('<h2 id="dpcrn">') == 1  # one model, two searches


def test_run_page_shows_the_search_sections(tmp_path: Path) -> None:
    entry = search_section(write_search_json(tmp_path / "dpcrn"))
    results = {"rows": [se_row("fp32", 3.0, 120.0)], "search": {"dpcrn": entry}}
    text = render_html(results, HtmlOptions(examples=False))
    assert "Precision search" in text and "Sensitivity of each quantized unit" in text
    assert "default-rules (chosen) (default rules)" in text and "/lstm/matmul" in text
    assert "configurations the search built" in text  # drawn into the trade-off figure as FP32 + the change
    from quant.report.plots import search_points

    assert sorted(search_points(results, "dpcrn", "pesq_wb")) == [(80.0, pytest.approx(2.8), True),
                                                                (90.0, pytest.approx(2.97), True),
                                                                (95.0, pytest.approx(2.96), False)]
    assert search_points(results, "dpcrn", "stoi") == []  # the search judged another metric: not drawn


def fake_search(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`quant search` without exporting, building or evaluating: the problem and the result are given."""
    import quant.cli.specs
    import quant.search
    import quant.search.models
    from quant.cli import build_parser

    # every command module imported before the patch: one first imported under it (quant.cli.calibrate imports
    # fp32_graphs by name) kept the fake for the rest of the session and failed test_cli_specs when run after this
    build_parser()
    monkeypatch.setattr(quant.cli.specs, "fp32_graphs", lambda spec: {"enhancer": tmp_path / "dpcrn.onnx"})
    monkeypatch.setattr(quant.search.models, "spec_problem",
                        lambda *args, **kwargs: SimpleNamespace(units=UNITS, base_rules=()))
    monkeypatch.setattr(quant.search.models, "search_widening",
                        lambda make_problem, split, *args: (make_problem(split), search_result()))
    monkeypatch.setattr(quant.search.models, "test_set_size", lambda spec: 40)


def test_quant_search_writes_results_json_and_report_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fake_search(monkeypatch, tmp_path)
    out = tmp_path / "search" / "dpcrn"
    assert main(["search", "dpcrn", "--budget", "pesq_wb=-0.05", "-o", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["frontier.png", "report.html", "results.json", "rules.toml",
                                                     "search.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == [] and results["search"]["dpcrn"]["chosen"] == "default-rules"
    page = (out / "report.html").read_text()
    assert '<h2 id="dpcrn">dpcrn</h2>' in page and "Precision search" in page and "quant search dpcrn" in page
    assert 'id="goals"' not in page  # no rows: the reference models' goals have nothing to judge
    # `quant report` re-renders a search's results.json like a run's
    assert main(["report", str(out / "results.json"), "-o", str(tmp_path / "again"), "--no-examples"]) == 0
    assert "Precision search" in (tmp_path / "again" / "report.html").read_text()


def search_only_results(tmp_path: Path) -> dict[str, Any]:
    paths = write_search_report("dpcrn", "dpcrn", write_search_json(tmp_path / "dpcrn"), tmp_path / "dpcrn",
                                "quant search x")
    return report.load_results(paths["results"])


def test_untimed_search_plots_int8_units(tmp_path: Path) -> None:
    results = search_only_results(tmp_path)
    for item in results["search"]["dpcrn"]["points"]:
        item["latency_ms"] = None
    text = render_html(results, HtmlOptions(examples=False))
    assert "Precision search" in text and text.count("<img") == 2  # frontier and sensitivity


def test_units_without_a_measured_sensitivity_get_a_note_not_an_empty_chart(tmp_path: Path) -> None:
    results = search_only_results(tmp_path)
    for unit in results["search"]["dpcrn"]["units"]:
        unit["snr_db"] = unit["delta"] = None
    text = render_html(results, HtmlOptions(examples=False))
    assert "measured no unit's sensitivity" in text and "unit sensitivity" not in text and "all units" in text


def test_a_unit_the_chosen_build_leaves_to_the_base_rules_reads_partly_int8(tmp_path: Path) -> None:
    """A search from the default rules keeps a group partly INT8 as the base rules place it: the report must not
    call it float."""
    from dataclasses import replace

    result = search_result()
    chosen = replace(result.default, config=frozenset({"/enc/conv1"}), base=frozenset({"/lstm/matmul"}))
    folder = tmp_path / "dpcrn"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps(to_json(replace(result, chosen=chosen), "quant search x")))
    units = {u["unit"]: u for u in search_section(folder / "search.json")["units"]}
    assert units["/lstm/matmul"]["base_rules"] and not units["/lstm/matmul"]["int8"]
    assert not units["/enc/conv2"]["base_rules"] and not units["/enc/conv2"]["int8"]
    paths = write_search_report("dpcrn", "dpcrn", folder / "search.json", folder, "quant search x")
    text = render_html(report.load_results(paths["results"]), HtmlOptions(examples=False))
    assert "partly INT8 (base rules)" in text


def test_untimed_points_count_the_blocks_of_alike_units(tmp_path: Path) -> None:
    """An `alike` unit of several blocks counts each block in the untimed speed proxy the page plots and ranks by;
    a search.json written before units had blocks counts one per unit."""
    result = search_result()
    stacked = (replace(UNITS[0], blocks=4), *UNITS[1:])
    path = tmp_path / "dpcrn" / "search.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(to_json(replace(result, units=stacked), "quant search x")))
    points = {p["label"]: p for p in search_section(path)["points"]}
    assert points["all-int8"]["int8_units"] == 3 and points["all-int8"]["int8_blocks"] == 6
    data = json.loads(path.read_text())
    for unit in data["units"]:
        del unit["blocks"]
    path.write_text(json.dumps(data))
    assert {p["label"]: p["int8_blocks"] for p in search_section(path)["points"]}["all-int8"] == 3
