from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quant import report
from quant.eval import stats
from quant.pipeline import row_budget
from quant.report import rows as rows_module
from quant.report.tables import model_table
from quant.spec import load_spec

SE_IDS = [f"{i}:se_{i:02d}.wav" for i in range(40)]
ASR_IDS = [f"{i}:asr_{i:02d}.wav" for i in range(20)]
ASR_LENGTH = 50  # characters per reference transcript: 20 utterances, 1000 characters


def se_columns(pesq: float, spread: np.ndarray | None = None) -> dict[str, list]:
    """Per-utterance PESQ-WB whose mean is `pesq`: a fixed zero-mean pattern around it (plus `spread`)."""
    values = pesq + np.linspace(-0.5, 0.5, len(SE_IDS)) + (0.0 if spread is None else spread)
    return {"ids": SE_IDS, "pesq_wb": [float(v) for v in values], "pesq_nb": [float(v) + 0.3 for v in values],
            "stoi": [0.9] * len(SE_IDS), "si_sdr": [12.0] * len(SE_IDS)}


def asr_columns(cer: float) -> dict[str, list]:
    """round(cer * 1000) edits spread over the 20 utterances, one more on each of the first ones."""
    total = round(cer * len(ASR_IDS) * ASR_LENGTH)
    errors = [total // len(ASR_IDS) + (1 if i < total % len(ASR_IDS) else 0) for i in range(len(ASR_IDS))]
    columns: dict[str, list] = {"ids": ASR_IDS}
    for rate in ("cer", "wer", "cer_greedy"):
        columns[f"{rate}_errors"] = errors
        columns[f"{rate}_length"] = [ASR_LENGTH] * len(ASR_IDS)
    return columns


def speed(graph: str, mean: float, unit: str = "9 s segment", batches: dict[int, float] | None = None) -> dict:
    def stats(m: float) -> dict[str, float]:
        return {"runs": 200, "min_ms": m * 0.9, "mean_ms": m, "p50_ms": m, "p90_ms": m * 1.1, "p99_ms": m * 1.2,
                "max_ms": m * 1.5}

    entry: dict[str, Any] = {"unit": unit, "audio_seconds": 9.0,
                             "threads": {"1": {"latency_ms": stats(mean), "rtf": mean / 9000},
                                         "2": {"latency_ms": stats(mean * 0.7), "rtf": mean * 0.7 / 9000}}}
    if batches:
        entry["batches"] = {str(b): {"batch": b, "latency_ms": stats(m), "items_per_s": b / (m / 1000),
                                     "audio_seconds": 4.0 * b, "rtf": m / 4000 / b} for b, m in batches.items()}
    return {graph: entry}


def budget(model: str, precision: str) -> dict | None:
    """The budget a pipeline row of the shipped spec carries."""
    return row_budget(load_spec(model), precision)


def se_row(backend: str, precision: str, pesq: float, mean: float, snr: float | None = None) -> dict:
    row = {"model": "dpcrn", "backend": backend, "precision": precision, "status": "ok", "error": None,
           "task": {"pesq_wb": pesq, "pesq_nb": pesq + 0.3, "stoi": 0.9, "si_sdr": 12.0, "noisy_pesq_wb": 1.9},
           "per_utterance": se_columns(pesq),
           "speed": speed("dpcrn", mean), "rtf": mean / 9000,
           "error_vs_fp32": {"dpcrn": {"enh": {"snr_db": snr}}} if snr is not None else {},
           "budget": budget("dpcrn", precision)}
    row["latency_ms"] = row["speed"]["dpcrn"]["threads"]["1"]["latency_ms"]  # type: ignore[index]
    return row


def asr_row(precision: str, cer: float, enc: dict[int, float]) -> dict:
    sp = speed("encoder", enc[1], "4.0 s utterance", enc)
    sp.update(speed("decoder", 2.0, "4.0 s utterance"))
    return {"model": "wenet", "backend": "ort", "precision": precision, "status": "ok",
            "task": {"cer": cer, "wer": cer * 2, "cer_greedy": cer + 0.01, "cer_real": cer, "cer_synthetic": cer},
            "per_utterance": asr_columns(cer),
            "speed": sp, "rtf": 0.01, "error_vs_fp32": {}, "budget": budget("wenet", precision)}


@pytest.fixture()
def results() -> dict:
    return {
        "schema": 1,
        "command": "quant run --quick",
        "environment": {"cpu": "test", "cores": 2},
        "rows": [
            se_row("ort", "int8", 2.96, 100.0, snr=25.0),
            se_row("ort", "fp32", 3.00, 200.0),
            se_row("torch", "fp32", 3.00, 500.0),
            se_row("ort", "fp16", 2.995, 210.0, snr=float("inf")),
            asr_row("fp32", 0.05, {1: 20.0, 8: 100.0}),
            asr_row("int8", 0.052, {1: 12.0, 8: 40.0}),
            {"model": "dpcrn-stream", "backend": "ort", "precision": "int8", "status": "failed",
             "error": "BuildError: boom | details"},
        ],
    }


def test_goals_are_derived_from_rows(results: dict) -> None:
    by_name = {g.name: g for g in report.goals(results)}
    offline = by_name["offline DPCRN INT8 / FP32 (ORT)"]
    assert offline.measured == pytest.approx(0.5) and offline.met is True
    stream = by_name["streaming DPCRN INT8 / FP32 per frame (ORT)"]
    assert stream.measured is None and stream.met is None
    assert by_name["WeNet encoder INT8 / FP32 at batch 1 (ORT)"].met is False  # 12/20 = 0.6
    assert by_name["WeNet encoder INT8 / FP32 at batch 8 (ORT)"].measured == pytest.approx(0.4)
    assert by_name["dpcrn ORT fp32 speed-up vs PyTorch eager"].measured == pytest.approx(2.5)
    pesq = by_name["dpcrn ORT int8 PESQ-WB change vs FP32 (int8 - fp32)"]
    # every utterance loses exactly 0.04: the interval is that point, inside the 0.05 budget
    assert pesq.measured == pytest.approx(-0.04) and pesq.met is True and pesq.verdict == stats.WITHIN
    assert pesq.interval == "-0.040 [-0.040, -0.040] n=40, 100 % worse"
    assert by_name["dpcrn ORT fp16 PESQ-WB change vs FP32 (fp16 - fp32)"].met is True  # -0.005
    cer = by_name["wenet ORT int8 CER change vs FP32 (int8 - fp32)"]
    # 2 more edits on 2 of 20 utterances: a resample draws k ~ Binomial(20, 0.1) of them, so the change is k/10
    # points; its 2.5 % / 97.5 % quantiles are k = 0 and 5: [0, 0.5] straddles the 0.3-point budget
    assert cer.measured == pytest.approx(0.2) and cer.met is None
    assert cer.interval == "+0.20 [+0.00, +0.50] n=20, 10 % worse"
    assert cer.verdict.startswith("cannot tell at n=20; about ") and cer.met_text == cer.verdict


def test_accuracy_goals_are_one_sided(results: dict) -> None:
    worse = se_row("ort", "int8", 2.90, 100.0)  # drops 0.10 PESQ-WB: fails the 0.05 budget
    better = asr_row("int8", 0.01, {1: 12.0, 8: 40.0})  # 4 CER points better than FP32: no loss, met
    rows = [r for r in results["rows"] if r.get("precision") != "int8"] + [worse, better]
    by_name = {g.name: g for g in report.goals({"rows": rows})}
    assert by_name["dpcrn ORT int8 PESQ-WB change vs FP32 (int8 - fp32)"].met is False
    assert by_name["wenet ORT int8 CER change vs FP32 (int8 - fp32)"].measured == pytest.approx(-4.0)
    assert by_name["wenet ORT int8 CER change vs FP32 (int8 - fp32)"].met is True


def test_write_results_renders_consistent_outputs(results: dict, tmp_path: Path) -> None:
    paths = report.write_results(results, tmp_path)
    stored = json.loads(paths["json"].read_text())
    # an infinite SNR (bit-exact output) is stored as null, not as invalid JSON
    fp16 = [r for r in stored["rows"] if r["precision"] == "fp16"][0]
    assert fp16["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"] is None

    md = paths["md"].read_text()
    assert "## dpcrn" in md and "## wenet" in md and "## Goals" in md
    int8_line = next(line for line in md.splitlines() if line.startswith("| ort | int8 | 2.960"))
    assert "0.50x" in int8_line and "0.20x" in int8_line  # vs FP32 ORT, vs eager
    assert "25.0" in int8_line
    assert "failed: BuildError: boom / details" in md
    assert "batch 8" in md

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == len(results["rows"])
    int8 = next(r for r in rows if r["model"] == "dpcrn" and r["precision"] == "int8")
    assert float(int8["latency_mean_ms"]) == 100.0 and float(int8["ratio_vs_fp32_ort"]) == 0.5
    assert float(int8["pesq_wb"]) == 2.96
    wenet = next(r for r in rows if r["model"] == "wenet" and r["precision"] == "int8")
    assert float(wenet["cer"]) == pytest.approx(0.052)

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_from_stored_json_is_reproducible(results: dict, tmp_path: Path) -> None:
    paths = report.write_results(results, tmp_path)
    first = paths["md"].read_text()
    again = report.render(report.load_results(paths["json"]), tmp_path / "again")
    assert again["md"].read_text() == first


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="quant run"):
        report.load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"rows\": 3}")
    with pytest.raises(report.ReportError, match="rows"):
        report.load_results(bad)


def test_summary_lines_cover_every_row(results: dict) -> None:
    lines = report.summary_lines(results)
    assert sum(1 for line in lines if line.startswith(("dpcrn", "wenet"))) == len(results["rows"])
    assert any("NOT met" in line for line in lines)


def test_results_carry_the_paired_change_of_every_compared_row(results: dict, tmp_path: Path) -> None:
    paths = report.write_results(results, tmp_path)
    stored = {(r["model"], r["backend"], r["precision"]): r for r in json.loads(paths["json"].read_text())["rows"]}
    assert "vs_fp32" not in stored[("dpcrn", "ort", "fp32")]  # the reference itself
    assert "vs_fp32" not in stored[("dpcrn", "torch", "fp32")]
    int8 = stored[("dpcrn", "ort", "int8")]["vs_fp32"]
    assert int8["reference"] == "ort fp32"
    pesq = int8["metrics"]["pesq_wb"]
    assert pesq["delta"] == pytest.approx(-0.04) and pesq["ci_low"] == pytest.approx(-0.04)
    assert pesq["ci_high"] == pytest.approx(-0.04) and pesq["n"] == 40 and pesq["share_worse"] == 1.0
    assert pesq["budget"] == -0.05 and pesq["verdict"] == stats.WITHIN and pesq["n_to_tell"] is None
    assert int8["metrics"]["stoi"]["verdict"] is None  # no budget on secondary metrics
    cer = stored[("wenet", "ort", "int8")]["vs_fp32"]["metrics"]["cer"]
    assert cer["verdict"] == stats.CANNOT_TELL and cer["n_to_tell"] > 20
    assert cer["budget"] == pytest.approx(0.003)  # stored units: CER as a fraction, like the task metric

    md = paths["md"].read_text()
    line = next(row for row in md.splitlines() if row.startswith("| ort | int8 | ort fp32 | -0.040"))
    assert "-0.040 [-0.040, -0.040] n=40, 100 % worse" in line and line.endswith("| -0.05 | within budget |")
    assert "+0.20 [+0.00, +0.50] n=20, 10 % worse" in md and "utterances would tell" in md

    csv_rows = {(r["model"], r["backend"], r["precision"]): r
                for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    int8_csv = csv_rows[("dpcrn", "ort", "int8")]
    assert int8_csv["compared_with"] == "ort fp32" and int8_csv["change_metric"] == "pesq_wb"
    assert float(int8_csv["delta"]) == pytest.approx(-0.04) and float(int8_csv["ci_low"]) == pytest.approx(-0.04)
    assert int8_csv["n"] == "40" and float(int8_csv["share_worse"]) == 1.0 and int8_csv["verdict"] == stats.WITHIN
    assert csv_rows[("wenet", "ort", "int8")]["verdict"] == stats.CANNOT_TELL
    assert csv_rows[("dpcrn", "ort", "fp32")]["delta"] == ""


def test_rows_without_per_utterance_results_are_not_judged(results: dict) -> None:
    for row in results["rows"]:
        row.pop("per_utterance", None)  # a results.json written before per-utterance results were kept
    by_name = {g.name: g for g in report.goals(results)}
    pesq = by_name["dpcrn ORT int8 PESQ-WB change vs FP32 (int8 - fp32)"]
    assert pesq.measured == pytest.approx(-0.04) and pesq.met is None and "quant run" in pesq.verdict
    assert report.comparisons(results) == {}


def test_each_row_is_compared_with_its_own_backends_fp32_else_ort(results: dict) -> None:
    rows = results["rows"] + [se_row("trt", "fp32", 3.1, 50.0), se_row("trt", "int8", 3.0, 30.0),
                              se_row("trt-sim", "int8", 2.9, 0.0)]
    found = report.comparisons({"rows": rows})
    trt = found[("dpcrn", "trt", "int8")]
    assert trt.reference["backend"] == "trt" and trt.changes["pesq_wb"].delta == pytest.approx(-0.1)
    sim = found[("dpcrn", "trt-sim", "int8")]  # a backend without FP32 rows: compared with ONNX Runtime FP32
    assert sim.reference["backend"] == "ort" and sim.verdict is not None and sim.verdict.verdict == stats.OVER
    names = [g.name for g in report.goals({"rows": rows})]
    assert "dpcrn TRT-SIM int8 PESQ-WB change vs FP32 (int8 - fp32)" in names


def test_rows_on_other_utterances_are_left_uncompared(results: dict) -> None:
    int8 = next(r for r in results["rows"] if (r["model"], r["precision"]) == ("dpcrn", "int8"))
    int8["per_utterance"] = {**int8["per_utterance"], "ids": [f"other{i}" for i in range(40)]}
    assert ("dpcrn", "ort", "int8") not in report.comparisons(results)
    assert ("dpcrn", "ort", "fp16") in report.comparisons(results)


def test_metric_axis_spans_the_reference_lines_and_intervals() -> None:
    points = [report.PlotPoint(1.0, 3.0, 3.0, 3.0, "ort fp32", "o", "b"),
              report.PlotPoint(2.0, 2.95, 2.90, 3.01, "ort int8", "o", "r")]
    low, high = report.metric_limits(points, [3.0, 1.9], error_rate=False)  # FP32 and noisy PESQ
    assert low < 1.9 and high > 3.01
    low, high = report.metric_limits(points[:1], [], error_rate=False)  # one point: not zoomed onto it
    assert high - low >= 0.3
    # an error rate: zoomed onto its intervals (a tenth of the top at least), never below 0
    low, high = report.metric_limits([report.PlotPoint(1.0, 23.2, 23.0, 23.5, "a", "o", "r")], [23.1], True)
    assert 20.0 < low < 23.0 and 23.5 < high < 26.0 and high - low >= 2.35
    assert report.metric_limits([report.PlotPoint(1.0, 0.2, 0.0, 0.5, "a", "o", "r")], [0.2], True)[0] == 0.0


def test_labels_of_crowded_points_do_not_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    points = [report.PlotPoint(100.0 + i, 3.0 - 0.002 * i, 2.99, 3.01, f"backend{i} int8", "o", "r")
              for i in range(5)]
    ax.set_xlim(0, 300)
    ax.set_ylim(1.5, 3.5)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    boxes = [note.get_window_extent(renderer) for note in report.place_labels(ax, points)]
    plt.close(fig)
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
def test_trt_sim_rows_are_labelled_simulations_without_latency(results: dict, tmp_path: Path) -> None:
    simulated = {**asr_row("int8", 0.051, {1: 1.0}), "backend": "trt-sim", "speed": {}, "rtf": None}
    paths = report.write_results({**results, "rows": [*results["rows"], simulated]}, tmp_path)
    md = paths["md"].read_text()
    wenet = md[md.index("## wenet"):md.index("## Goals")]
    sim_line = next(line for line in wenet.splitlines() if line.startswith("| trt-sim | int8 | 5.10"))
    assert "| - | - |" in sim_line  # no latency
    assert "trt-sim rows: a simulation of TensorRT's numerics, not a TensorRT measurement" in wenet
    assert "trt-sim" not in md[md.index("## dpcrn"):md.index("## wenet")]  # labelled only where such rows are
    assert "trt-sim int8" not in wenet[wenet.index("throughput"):]  # untimed rows stay out of the speed tables
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert {r["backend"]: r["simulation"].startswith("a simulation of TensorRT") for r in rows} == {
        "ort": False, "torch": False, "trt-sim": True}


def test_budgets_come_from_the_rows_not_the_model_name() -> None:
    """A user's model judged by the budget its rows carry; a shipped model's row without one is not judged."""
    rows = [se_row("ort", "fp32", 3.00, 200.0), se_row("ort", "int8", 2.96, 100.0)]
    for row in rows:
        row["model"] = "my-masker"
    rows[1]["budget"] = {"metric": "stoi", "limit": 0.01, "higher_is_better": True}
    comparison = report.comparisons({"rows": rows})[("my-masker", "ort", "int8")]
    assert comparison.budget_metric == "stoi" and comparison.verdict is not None
    assert comparison.verdict.budget == stats.Budget(0.01, True)
    names = [g.name for g in report.goals({"rows": rows})]
    assert "my-masker ORT int8 STOI change vs FP32 (int8 - fp32)" in names

    shipped = [se_row("ort", "fp32", 3.00, 200.0), {**se_row("ort", "int8", 2.96, 100.0), "budget": None}]
    assert report.comparisons({"rows": shipped})[("dpcrn", "ort", "int8")].verdict is None
    assert not any("change vs FP32" in g.name for g in report.goals({"rows": shipped}))


def test_a_users_asr_model_is_compared_on_asr_metrics() -> None:
    """The task kind comes from the row (its spec's task), not from the reference models' names."""
    rows = [{**asr_row("fp32", 0.05, {1: 20.0}), "model": "u2pp", "kind": "asr"},
            {**asr_row("int8", 0.052, {1: 12.0}), "model": "u2pp", "kind": "asr"}]
    comparison = report.comparisons({"rows": rows})[("u2pp", "ort", "int8")]
    assert set(comparison.changes) == {"cer", "wer", "cer_greedy"}
    header, _ = model_table("u2pp", rows, rows)
    assert "CER %" in header and "PESQ-WB" not in header


def test_a_users_model_is_timed_and_plotted_by_the_primary_its_rows_carry() -> None:
    rows = []
    for precision, pesq, mean in (("fp32", 3.0, 200.0), ("int8", 2.96, 100.0)):
        row = se_row("ort", precision, pesq, mean)
        row.update(model="my-masker", kind="se", speed={"enhancer": row["speed"]["dpcrn"]},
                   primary={"graph": "enhancer", "metric": "stoi", "higher_is_better": True})
        rows.append(row)
    assert report.primary_latency(rows[1]) == 100.0
    assert rows_module.primary(rows, "my-masker") == rows_module.Primary("enhancer", "stoi", True, "STOI")
    header, cells = model_table("my-masker", rows, rows)
    assert cells[1][header.index("mean ms")] != "-"
    assert report.render_plot({"rows": rows}, ["my-masker"])[:4] == b"\x89PNG"


def test_result_rows_are_typed_and_keep_results_json_names(results: dict) -> None:
    for row in results["rows"]:
        typed = report.ResultRow.from_json(row)
        assert report.ResultRow.from_json(typed.to_json()) == typed
    ok = report.ResultRow.from_json({**results["rows"][0], "vs_fp32": {"derived": True}})  # derived keys dropped
    assert set(ok.to_json()) >= {"model", "backend", "precision", "status", "error", "task", "per_utterance",
                                 "error_vs_fp32", "speed", "latency_ms", "rtf", "budget", "primary", "kind"}
    failed = report.ResultRow.failed("dpcrn", "ort", "int8", "BuildError: boom")
    assert failed.to_json() == {"model": "dpcrn", "backend": "ort", "precision": "int8", "status": "failed",
                                "error": "BuildError: boom"}
    with pytest.raises(report.ReportError, match=r"missing \['status'\]"):
        report.ResultRow.from_json({"model": "dpcrn", "backend": "ort", "precision": "int8"})


INTERLEAVED_SAMPLES = {("ort", "fp32"): [0.200, 0.210, 0.190, 0.260, 0.205],
                       ("ort", "int8"): [0.180, 0.220, 0.200, 0.240, 0.215],  # per round 0.90-1.05: no consistent side
                       ("ort", "fp16"): [0.400, 0.420, 0.380, 0.520, 0.410],  # twice FP32 in every round
                       ("torch", "fp32"): [0.5] * 5}


def with_interleaved_timing(results: dict) -> dict:
    """The dpcrn rows as `quant run` now writes them: timed in the same rounds, each carrying its ratios (from
    per-round samples) and the load around the timing. INT8's spread overlaps FP32's (unreliable), FP16's does not."""
    from quant.eval.speed import latency_ratio, latency_stats

    samples = INTERLEAVED_SAMPLES
    fp32 = samples[("ort", "fp32")]
    info = {"rounds": 5, "calls_per_round": 1, "variants": ["torch fp32", "ort fp32", "ort fp16", "ort int8"],
            "load_before": 1.25, "load_after": 3.5}
    for row in results["rows"]:
        seconds = samples.get((row["backend"], row["precision"])) if row["model"] == "dpcrn" else None
        if seconds is None:
            continue
        entry = row["speed"]["dpcrn"]["threads"]["1"]
        entry["latency_ms"] = latency_stats(seconds).to_dict()
        entry["interleaved"] = info
        for key, base in (("vs_fp32", fp32), ("vs_eager", samples[("torch", "fp32")])):
            if seconds is not base:
                entry[key] = latency_ratio(latency_stats(seconds), latency_stats(base), seconds, base).to_dict()
        row["latency_ms"] = entry["latency_ms"]
    return results


def test_interleaved_ratios_and_their_reliability_reach_every_output(results: dict, tmp_path: Path) -> None:
    paths = report.write_results(with_interleaved_timing(results), tmp_path)
    md = paths["md"].read_text()
    int8_line = next(line for line in md.splitlines() if line.startswith("| ort | int8 | 2.960"))
    fp16_line = next(line for line in md.splitlines() if line.startswith("| ort | fp16 |"))
    fp32_s, int8_s = np.array(INTERLEAVED_SAMPLES["ort", "fp32"]), np.array(INTERLEAVED_SAMPLES["ort", "int8"])
    median, low = np.median(int8_s) / np.median(fp32_s), min(int8_s) / min(fp32_s)
    p10, p90 = np.percentile(int8_s / fp32_s, [10, 90])
    int8_cell = f"{median:.2f}x (min {low:.2f}x; paired {p10:.2f}-{p90:.2f}) unreliable"
    assert f"| {int8_cell} |" in int8_line  # the p10-p90 latencies overlap
    assert "| 2.00x (min 2.00x; paired 2.00-2.00) |" in fp16_line  # twice FP32 in every round: apart, reliable
    assert "1-minute load average 1.25 before, 3.50 after" in md and "'unreliable': the two rows' p10-p90" in md and "straddles 1" in md
    by_name = {g.name: g for g in report.goals(results)}
    offline = by_name["offline DPCRN INT8 / FP32 (ORT)"]
    assert offline.measured == pytest.approx(median) and offline.interval == int8_cell
    fp16_s = np.array(INTERLEAVED_SAMPLES["ort", "fp16"])
    speedup = by_name["dpcrn ORT fp16 speed-up vs PyTorch eager"]  # eager / fp16: the inverse of the stored ratio
    assert speedup.measured == pytest.approx(0.5 / np.median(fp16_s))
    assert speedup.interval.startswith(f"{0.5 / np.median(fp16_s):.2f}x (min {0.5 / min(fp16_s):.2f}x")
    rows = {(r["model"], r["backend"], r["precision"]): r for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    int8, fp16 = rows["dpcrn", "ort", "int8"], rows["dpcrn", "ort", "fp16"]
    assert (int8["ratio_vs_fp32_reliable"], fp16["ratio_vs_fp32_reliable"]) == ("False", "True")
    assert float(int8["ratio_vs_fp32_ort"]) == pytest.approx(median, rel=1e-5)
    assert float(int8["timing_load_after"]) == 3.5
    assert rows["wenet", "ort", "int8"]["ratio_vs_fp32_reliable"] == ""  # no interleaved record: mean ratio only
    summary = "\n".join(report.summary_lines(results))
    assert f"{median:.2f}x?" in summary and "?: unreliable ratio" in summary
    page = report.render_html(results)
    assert int8_cell in page and "load average 1.25 before" in page


def test_goals_are_about_the_models_of_the_run() -> None:
    """A run of a user's spec alone (no PyTorch eager module): no reference model's speed goal and no speed-up over
    eager, each of which could only say 'n/a'; its budget goal stays."""
    rows = [se_row("ort", "fp32", 3.00, 200.0), se_row("ort", "int8", 2.96, 100.0)]
    for row in rows:
        row["model"] = "my-masker"
    rows[1]["budget"] = {"metric": "pesq_wb", "limit": 0.05, "higher_is_better": True}
    names = [g.name for g in report.goals({"rows": rows})]
    assert names == ["my-masker ORT int8 PESQ-WB change vs FP32 (int8 - fp32)"]
    failed_eager = {"model": "my-masker", "backend": "torch", "precision": "fp32", "status": "failed", "error": "x"}
    eager = [g for g in report.goals({"rows": [*rows, failed_eager]}) if "vs PyTorch eager" in g.name]
    assert [g.met_text for g in eager] == ["n/a", "n/a"]  # eager was asked for and failed: still shown


def test_a_speed_only_run_shows_no_accuracy_goals() -> None:
    """`quant bench` rows carry their budgets but no task metrics: no 'n/a' accuracy goal for each of them."""
    rows = [se_row("ort", "fp32", 3.00, 200.0), se_row("ort", "int8", 2.96, 100.0)]
    rows[1]["budget"] = {"metric": "pesq_wb", "limit": 0.05, "higher_is_better": True}
    assert any("change vs FP32" in g.name for g in report.goals({"rows": rows}))
    for row in rows:
        row["task"] = {}
        row.pop("per_utterance", None)
    assert not any("change vs FP32" in g.name for g in report.goals({"rows": rows}))


def test_the_trade_off_plot_places_a_row_at_its_median_latency_like_the_search_points():
    """A busy machine's few preempted runs pull a mean far from the median; the plot (and the searched points beside
    the rows, which the search gives as medians) use the median."""
    from quant.report.plots import plot_points

    row = {"model": "dpcrn", "backend": "ort", "precision": "int8", "status": "ok",
           "task": {"pesq_wb": 1.7}, "speed": speed("dpcrn", 200.0)}
    row["speed"]["dpcrn"]["threads"]["1"]["latency_ms"]["mean_ms"] = 900.0  # outliers
    (point,) = plot_points("dpcrn", [row], {})
    assert point.x == 200.0
