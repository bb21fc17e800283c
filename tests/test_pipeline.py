from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quant import pipeline
from quant.data.audio import load_audio
from quant.errors import BuildError
from quant.eval.speed import BenchOptions
from quant.fileio import sha256_file
from quant.features import FREQ_BINS, SEGMENT_FRAMES

DATA = Path(__file__).parent / "data"


def identity_dpcrn(path: Path, gain: float = 1.0) -> Path:
    shape: list[Any] = ["B", FREQ_BINS, SEGMENT_FRAMES, 2]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["mix", "gain"], ["enh"])], "identity_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)],
        [helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


class FakeSteps:
    """Export writes an identity mask model; int8 'builds' scale the mask slightly; calls are recorded."""

    calls: list[str] = []
    fail_int8 = False

    def __init__(self, root: Path, options: pipeline.RunOptions) -> None:
        self.root, self.options = root, options

    def export(self, model: str) -> dict[str, Path]:
        FakeSteps.calls.append(f"export {model}")
        return {"dpcrn": identity_dpcrn(self.root / "export" / model / "dpcrn.onnx")}

    def calibrate(self, graph: str, onnx_path: Path) -> Path:
        FakeSteps.calls.append(f"calibrate {graph}")
        return onnx_path

    def build(self, graph: str, precision: str, backend: str, source: Path, cache: Path | None) -> Path:
        FakeSteps.calls.append(f"build {graph} {precision} {backend} cache={cache is not None}")
        if precision == "int8" and FakeSteps.fail_int8:
            raise BuildError("int8 build failed on purpose")
        target = self.root / graph / precision / "model.onnx"
        if precision == "int8":
            return identity_dpcrn(target, gain=0.99)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return target


@pytest.fixture()
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pipeline.RunOptions:
    speech = load_audio(DATA / "librivox_0880.flac")
    noisy = speech + 0.05 * np.random.default_rng(0).standard_normal(speech.size).astype(np.float32)

    def load_test_data(model: str, options: pipeline.RunOptions) -> pipeline.TestData:
        data = pipeline.TestData(tmp_path / "se_test.jsonl", 1)
        data.se_pairs = [("0:librivox_0880.flac", noisy, speech)]
        return data

    FakeSteps.calls = []
    FakeSteps.fail_int8 = False
    monkeypatch.setattr(pipeline, "Steps", FakeSteps)
    monkeypatch.setattr(pipeline, "load_test_data", load_test_data)
    bench = BenchOptions(runs=3, stream_runs=3, warmup=1, throughput_runs=2, batches=(1,), threads=(1, 2))
    return pipeline.RunOptions(models=("dpcrn",), backends=("ort",), eager=False, bench=bench, out_dir=tmp_path,
                               progress=False)


def test_run_all_wires_every_step(fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    result = pipeline.run_all(fake_run)
    assert result.ok, result.failures
    assert FakeSteps.calls == [
        "export dpcrn", "build dpcrn fp32 ort cache=False", "build dpcrn fp16 ort cache=False",
        "calibrate dpcrn", "build dpcrn int8 ort cache=True",
    ]
    rows = {row["precision"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "fp16", "int8"}
    fp32, int8 = rows["fp32"], rows["int8"]
    # identity enhancement leaves the noisy input's scores unchanged
    assert fp32["task"]["pesq_wb"] == pytest.approx(fp32["task"]["noisy_pesq_wb"], abs=1e-3)
    # the 0.99 mask of the fake int8 build shows up as an output error vs FP32 of 20*log10(1/0.01) = 40 dB
    assert int8["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"] == pytest.approx(40.0, abs=0.01)
    assert fp32["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"] is None  # identical outputs: infinite SNR
    assert set(fp32["speed"]["dpcrn"]["threads"]) == {"1", "2"}
    assert fp32["latency_ms"]["runs"] == 3
    assert fp32["rtf"] == pytest.approx(fp32["latency_ms"]["mean_ms"] / 9000.0)
    for name in ("results.md", "results.csv", "tradeoff.png"):
        assert (tmp_path / name).is_file()


def test_second_run_reuses_accuracy(fake_run: pipeline.RunOptions, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline.run_all(fake_run)
    calls: list[str] = []
    original = pipeline.evaluate_task

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append("eval")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate_task", counting)
    again = pipeline.run_all(fake_run)
    assert again.ok and calls == []
    pipeline.run_all(pipeline.RunOptions(**{**fake_run.__dict__, "force": True}))
    assert len(calls) == 3


def test_failed_build_fails_the_run_but_keeps_other_rows(fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    FakeSteps.fail_int8 = True
    result = pipeline.run_all(fake_run)
    assert not result.ok
    assert any("int8 build failed on purpose" in failure for failure in result.failures)
    rows = {row["precision"]: row for row in result.results["rows"]}
    assert rows["int8"]["status"] == "failed" and rows["fp32"]["status"] == "ok"
    assert "failed" in (tmp_path / "results.md").read_text()


def test_failed_export_fails_every_row(fake_run: pipeline.RunOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: FakeSteps, model: str) -> dict[str, Path]:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(FakeSteps, "export", broken)
    result = pipeline.run_all(fake_run)
    assert not result.ok and len(result.failures) == 3
    assert all(row["status"] == "failed" for row in result.results["rows"])


def test_stamps(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.write_text("x")
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])
    pipeline.write_stamp(tmp_path, "step", {"a": 1}, {"value": 2})
    assert pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 2}, [out])
    assert pipeline.read_stamp_payload(tmp_path, "step") == {"value": 2}
    out.unlink()
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(pipeline.QuantError, match="nonsense"):
        pipeline.run_all(pipeline.RunOptions(models=("nonsense",), out_dir=tmp_path))


def test_representative_is_the_median_length() -> None:
    assert pipeline.representative([1.0, 9.0, 4.0, 5.0, 3.0]) == 2


def test_spread_subset_covers_the_whole_manifest(tmp_path: Path) -> None:
    from quant.data.manifest import read_manifest

    src = tmp_path / "set"
    src.mkdir()
    audio = DATA / "librivox_0880.flac"
    digest = sha256_file(audio)
    lines = [json.dumps({"path": os.path.relpath(audio.resolve(), src), "duration": 3.0, "sha256": digest,
                         "source": "real" if i < 6 else "synthetic", "license": "pd", "text": f"u{i}"})
             for i in range(10)]
    manifest = src / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    subset = pipeline.spread_subset(manifest, 4, tmp_path / "subsets")
    rows = read_manifest(subset, allow_outside=True)  # it points back into the source set's folder
    assert [r.text for r in rows] == ["u0", "u2", "u5", "u7"]
    assert {r.source for r in rows} == {"real", "synthetic"}
    assert rows[0].path == audio.resolve()
    assert pipeline.spread_subset(manifest, None, tmp_path) == manifest
    assert pipeline.spread_subset(manifest, 10, tmp_path) == manifest
    assert pipeline.spread_subset(manifest, 4, tmp_path / "subsets") == subset


def test_speed_only_run_skips_accuracy(fake_run: pipeline.RunOptions, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_accuracy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("accuracy must not be evaluated in a speed-only run")

    monkeypatch.setattr(pipeline, "evaluate_task", no_accuracy)
    options = pipeline.RunOptions(**{**fake_run.__dict__, "accuracy": False, "report_dir": tmp_path / "bench"})
    result = pipeline.run_all(options)
    assert result.ok, result.failures
    assert all(row["task"] == {} and row["speed"]["dpcrn"]["threads"] for row in result.results["rows"])
    assert (tmp_path / "bench" / "results.md").is_file()
