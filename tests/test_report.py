from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from quant import report


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


def se_row(backend: str, precision: str, pesq: float, mean: float, snr: float | None = None) -> dict:
    row = {"model": "dpcrn", "backend": backend, "precision": precision, "status": "ok", "error": None,
           "task": {"pesq_wb": pesq, "pesq_nb": pesq + 0.3, "stoi": 0.9, "si_sdr": 12.0},
           "speed": speed("dpcrn", mean), "rtf": mean / 9000,
           "error_vs_fp32": {"dpcrn": {"enh": {"snr_db": snr}}} if snr is not None else {}}
    row["latency_ms"] = row["speed"]["dpcrn"]["threads"]["1"]["latency_ms"]  # type: ignore[index]
    return row


def asr_row(precision: str, cer: float, enc: dict[int, float]) -> dict:
    sp = speed("encoder", enc[1], "4.0 s utterance", enc)
    sp.update(speed("decoder", 2.0, "4.0 s utterance"))
    return {"model": "wenet", "backend": "ort", "precision": precision, "status": "ok",
            "task": {"cer": cer, "wer": cer * 2, "cer_greedy": cer + 0.01, "cer_real": cer, "cer_synthetic": cer},
            "speed": sp, "rtf": 0.01, "error_vs_fp32": {}}


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
    assert pesq.measured == pytest.approx(-0.04) and pesq.met is True
    assert by_name["dpcrn ORT fp16 PESQ-WB change vs FP32 (fp16 - fp32)"].met is True  # -0.005
    cer = by_name["wenet ORT int8 CER change vs FP32 (int8 - fp32)"]
    assert cer.measured == pytest.approx(0.2) and cer.met is True


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
