from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from quant.paths import calib_data_dir
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
        [helper.make_node("Mul", ["mix", "gain"], ["enh"], name="mask")], "identity_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)],
        [helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def symmetric_qdq_dpcrn(path: Path, scale: float) -> Path:
    """An identity mask reading its input through symmetric int8 Q/DQ (what TensorRT's explicit mode builds from)."""
    shape: list[Any] = ["B", FREQ_BINS, SEGMENT_FRAMES, 2]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["mix", "scale", "zero"], ["mix_q"], name="mix_Q"),
         helper.make_node("DequantizeLinear", ["mix_q", "scale", "zero"], ["enh"], name="mix_DQ")], "qdq_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]), helper.make_tensor("zero", TensorProto.INT8, [], [0])],
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

    def export(self, spec: Any) -> dict[str, Path]:
        FakeSteps.calls.append(f"export {spec.name}")
        return {"enhancer": identity_dpcrn(self.root / "export" / spec.name / "dpcrn.onnx")}

    rewrite = pipeline.Steps.rewrite  # the real step: the identity export has nothing any rewrite applies to

    def calibrate(self, spec: Any, graph: Any, exported: dict[str, Path]) -> Path:
        FakeSteps.calls.append(f"calibrate {graph.name}")
        return exported[graph.role]

    def build(self, graph: str, precision: str, backend: str, source: Path, cache: Path | None,
              rules_off: tuple[str, ...] = ()) -> Path:
        FakeSteps.calls.append(f"build {graph} {precision} {backend} cache={cache is not None}"
                               + (f" rules_off={','.join(rules_off)}" if rules_off else ""))
        if precision == "int8" and FakeSteps.fail_int8:
            raise BuildError("int8 build failed on purpose")
        target = self.root / graph / precision / "model.onnx"
        if precision == "int8":
            symmetric_qdq_dpcrn(target.with_name("model_trt_qdq.onnx"), scale=0.02)
            return identity_dpcrn(target, gain=0.99)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return target


@pytest.fixture()
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pipeline.RunOptions:
    def load_test_data(spec: Any, options: pipeline.RunOptions) -> pipeline.TestData:
        return pipeline.TestData(calib_data_dir() / "se_test" / "manifest.jsonl", 1)  # one real noisy mixture

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
    # what the report reads from a row instead of from tables keyed by model name: the spec's task, budget, primary
    assert int8["kind"] == "se" and fp32["budget"] is None
    assert int8["budget"] == {"metric": "pesq_wb", "limit": 0.05, "higher_is_better": True}
    assert int8["primary"] == {"graph": "dpcrn", "metric": "pesq_wb", "higher_is_better": True}
    assert fp32["latency_ms"]["runs"] == 3
    assert fp32["rtf"] == pytest.approx(fp32["latency_ms"]["mean_ms"] / 9000.0)
    for name in ("results.md", "results.csv", "tradeoff.png"):
        assert (tmp_path / name).is_file()


def test_run_reports_a_search_found_in_the_output_root(fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    from tests.test_report_search import write_search_json

    write_search_json(tmp_path / "search" / "dpcrn")  # as `quant search dpcrn` leaves it under the output root
    assert pipeline.run_all(replace(fake_run, precisions=("fp32",))).ok
    searched = json.loads((tmp_path / "results.json").read_text())["search"]
    assert list(searched) == ["dpcrn"] and searched["dpcrn"]["chosen"] == "default-rules"
    assert "Precision search" in (tmp_path / "report.html").read_text()


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that grows by one for every accuracy evaluation the pipeline really runs."""
    calls: list[str] = []
    original = pipeline.evaluate_task

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append("eval")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate_task", counting)
    return calls


def test_second_run_reuses_accuracy(fake_run: pipeline.RunOptions, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline.run_all(fake_run)
    calls = count_evaluations(monkeypatch)
    again = pipeline.run_all(fake_run)
    assert again.ok and calls == []
    pipeline.run_all(pipeline.RunOptions(**{**fake_run.__dict__, "force": True}))
    assert len(calls) == 3


def test_rows_keep_per_utterance_scores_through_the_stamps(fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    first = pipeline.run_all(fake_run)
    again = pipeline.run_all(fake_run)  # accuracy reused from the stamps
    for result in (first, again):
        rows = {row["precision"]: row for row in result.results["rows"]}
        columns = rows["int8"]["per_utterance"]
        assert columns["ids"] == ["0:librivox_0870.flac"]  # the first se_test utterance
        assert columns["pesq_wb"] == [pytest.approx(rows["int8"]["task"]["pesq_wb"])]
    assert first.results["rows"][0]["per_utterance"] == again.results["rows"][0]["per_utterance"]


def test_stored_accuracy_without_per_utterance_scores_is_recomputed(fake_run: pipeline.RunOptions, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline.run_all(fake_run)
    for stamp in (tmp_path / pipeline.STAMP_DIR).glob("eval-*.json"):  # as an earlier quant version wrote them
        recorded = json.loads(stamp.read_text())
        del recorded["payload"]["per_utterance"]
        stamp.write_text(json.dumps(recorded))
    calls = count_evaluations(monkeypatch)
    result = pipeline.run_all(fake_run)
    assert len(calls) == 3
    assert all(row["per_utterance"]["ids"] for row in result.results["rows"])


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
    pipeline.write_stamp(tmp_path, "step", {"a": 1}, [out], {"value": 2})
    assert pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 2}, [out])
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out, tmp_path / "other"])  # other outputs
    assert pipeline.read_stamp_payload(tmp_path, "step") == {"value": 2}
    out.write_text("y")  # same name, other content: what a killed run leaves after replacing an output
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])
    out.write_text("x")
    assert pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])
    out.unlink()
    assert not pipeline.is_fresh(tmp_path, "step", {"a": 1}, [out])


def test_build_step_passes_the_specs_rules_off_and_rebuilds_when_it_changes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's builds leave the spec graph's rules_off out of the shipped rules; a changed rules_off is another
    build (the stamp names it), not an up-to-date one."""
    import quant.artifacts

    real_build = quant.artifacts.build_artifact
    seen: list[object] = []

    def build(source: Path, precision: str, backend: str, **options: Any) -> Path:
        seen.append(options.get("rules_off", ()))
        return real_build(source, precision, backend, **options)

    monkeypatch.setattr(quant.artifacts, "build_artifact", build)
    source = identity_dpcrn(tmp_path / "a.onnx", gain=1.0)
    steps = pipeline.Steps(tmp_path / "engines", pipeline.RunOptions(progress=False))
    steps.build("dpcrn", "fp32", "ort", source, None)
    steps.build("dpcrn", "fp32", "ort", source, None, rules_off=("skip-concat",))
    steps.build("dpcrn", "fp32", "ort", source, None, rules_off=("skip-concat",))  # up to date
    assert seen == [(), ("skip-concat",)]


def test_build_step_rebuilds_an_artifact_replaced_after_its_stamp(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`quant run` killed after a build replaced model.onnx but before it stamped it: the next run with the earlier
    options must not call the other model "up to date"."""
    import quant.artifacts
    from quant.fileio import sha256_file

    real_build = quant.artifacts.build_artifact
    sources = {"a": identity_dpcrn(tmp_path / "a.onnx", gain=1.0), "b": identity_dpcrn(tmp_path / "b.onnx", gain=0.5)}
    built: list[Path] = []

    def build_from(source: Path) -> Any:
        def build(graph: str, precision: str, backend: str, **options: Any) -> Path:
            built.append(source)
            return real_build(source, precision, backend, **options)
        return build

    root = tmp_path / "engines"
    steps = pipeline.Steps(root, pipeline.RunOptions(progress=False))
    monkeypatch.setattr(quant.artifacts, "build_artifact", build_from(sources["a"]))
    artifact = steps.build("dpcrn", "fp32", "ort", sources["a"], None)
    assert steps.build("dpcrn", "fp32", "ort", sources["a"], None) == artifact and len(built) == 1  # reused
    real_build(sources["b"], "fp32", out_dir=artifact.parent)  # the killed run's build, never stamped
    assert steps.build("dpcrn", "fp32", "ort", sources["a"], None) == artifact and len(built) == 2  # rebuilt
    assert sha256_file(artifact) == sha256_file(sources["a"])
    (artifact.parent / "plan.json").write_text("{}")  # a file the stamp does not name: meta.json's hashes catch it
    steps.build("dpcrn", "fp32", "ort", sources["a"], None)
    assert len(built) == 3 and not (artifact.parent / "plan.json").exists()


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(pipeline.QuantError, match="nonsense"):
        pipeline.run_all(pipeline.RunOptions(models=("nonsense",), out_dir=tmp_path))


def test_representative_is_the_median_length() -> None:
    from quant.tasks.se import representative

    assert representative([1.0, 9.0, 4.0, 5.0, 3.0]) == 2


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


def test_trt_sim_rows_run_the_tensorrt_onnx_untimed(fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    result = pipeline.run_all(replace(fake_run, backends=("ort", "trt-sim")))
    assert result.ok, result.failures
    rows = {(row["backend"], row["precision"]): row for row in result.results["rows"]}
    assert set(rows) == {("ort", "fp32"), ("ort", "fp16"), ("ort", "int8"), ("trt-sim", "fp16"), ("trt-sim", "int8")}
    assert FakeSteps.calls.count("build dpcrn int8 ort cache=True") == 1  # trt-sim reads the ORT build's folder
    simulated, ort_int8 = rows["trt-sim", "int8"], rows["ort", "int8"]
    assert simulated["artifacts"]["dpcrn"] == str(tmp_path / "dpcrn" / "int8" / "model_trt_qdq.onnx")
    assert rows["trt-sim", "fp16"]["artifacts"] == rows["ort", "fp16"]["artifacts"]
    snr_sim, snr_ort = (row["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"] for row in (simulated, ort_int8))
    assert snr_sim is not None and abs(snr_sim - snr_ort) > 1  # not FP32 and not ORT's int8 model
    assert simulated["task"]["si_sdr"] != ort_int8["task"]["si_sdr"]
    assert simulated["speed"] == {} and simulated["latency_ms"] is None and ort_int8["speed"]
    assert "trt-sim rows: a simulation of TensorRT's numerics, not a TensorRT measurement" in (
        tmp_path / "results.md").read_text()
    csv_rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {row["backend"]: bool(row["simulation"]) for row in csv_rows} == {"ort": False, "trt-sim": True}


def test_rows_without_a_reference_fail_loudly(fake_run: pipeline.RunOptions) -> None:
    result = pipeline.run_all(replace(fake_run, backends=("trt-sim",)))
    assert not result.ok and len(result.failures) == 2
    assert all("no FP32 reference row" in failure for failure in result.failures)


def test_a_models_rows_are_timed_together_afresh_every_run(fake_run: pipeline.RunOptions,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed row of a model comes from one interleaved measurement of this run (never from a stamp), with its
    ratio vs FP32 from the same rounds and the load around them."""
    measured: list[pipeline.ModelSpeed] = []
    original = pipeline.measure_speed

    def recording(*args: Any, **kwargs: Any) -> pipeline.ModelSpeed:
        measured.append(original(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(pipeline, "measure_speed", recording)
    pipeline.run_all(fake_run)
    again = pipeline.run_all(fake_run)  # accuracy reused, speed measured again
    assert len(measured) == 2
    rows = {row["precision"]: row for row in again.results["rows"]}
    for precision, row in rows.items():
        timed = {graph: {k: v for k, v in entry.items() if k != "profile"} for graph, entry in row["speed"].items()}
        assert timed == measured[1].speed[f"ort {precision}"]
        for count in ("1", "2"):
            entry = row["speed"]["dpcrn"]["threads"][count]
            assert entry["interleaved"]["variants"] == ["ort fp32", "ort fp16", "ort int8"]
            assert {"load_before", "load_after"} <= set(entry["interleaved"])
            assert ("vs_fp32" in entry) == (precision != "fp32")
    ratio = rows["int8"]["speed"]["dpcrn"]["threads"]["1"]["vs_fp32"]
    assert isinstance(ratio["reliable"], bool) and ratio["paired_p10"] <= ratio["paired_p90"]


def test_int8_rows_carry_their_profile_against_fp32_and_the_report_states_the_ceiling(
        fake_run: pipeline.RunOptions, tmp_path: Path) -> None:
    """Each INT8 ORT row's graph gets the time accounting against the ORT FP32 build (profile_pair on the speed
    workload), and results.md turns it into the ceiling and what holds the INT8 run."""
    result = pipeline.run_all(fake_run)
    assert result.ok, result.failures
    rows = {row["precision"]: row for row in result.results["rows"]}
    assert "profile" not in rows["fp32"]["speed"]["dpcrn"] and "profile" not in rows["fp16"]["speed"]["dpcrn"]
    profile = rows["int8"]["speed"]["dpcrn"]["profile"]
    # the fake INT8 build is a float Mul: no integer kernel, so the ceiling is the FP32 time and the Mul holds it
    assert profile["integer_share"] == 0.0 and profile["ceiling_ratio"] == pytest.approx(1.0)
    assert profile["runs"] == fake_run.bench.profile_runs
    assert any(part["what"] == "float Mul" for part in profile["holdback"])
    markdown = (tmp_path / "results.md").read_text()
    assert "INT8 time accounting" in markdown and "| dpcrn | ort int8 |" in markdown and "float Mul" in markdown


def test_profile_rows_profiles_each_int8_ort_row_against_the_ort_fp32_row(tmp_path: Path) -> None:
    from quant.eval.speed import GraphWorkload

    spec = pipeline.load_spec("dpcrn")
    fp32, int8 = identity_dpcrn(tmp_path / "fp32.onnx"), identity_dpcrn(tmp_path / "int8.onnx", gain=0.99)
    broken = tmp_path / "broken.onnx"
    broken.write_text("not onnx")
    load = GraphWorkload("dpcrn", "9 s segment", 9.0,
                         feeds={"mix": np.ones((1, FREQ_BINS, SEGMENT_FRAMES, 2), np.float32)})
    rows = [pipeline.RowSpec(spec, "ort", precision, {"dpcrn": path}) for precision, path in
            (("fp32", fp32), ("fp16", fp32), ("int8", int8), ("int8-searched", int8), ("int8-broken", broken))]
    profiles = pipeline.profile_rows(rows, [load], runs=2)
    assert set(profiles) == {"ort int8", "ort int8-searched"}  # fp16 is not INT8; the broken build is left out
    assert profiles["ort int8"]["dpcrn"]["runs"] == 2 and "ceiling_ratio" in profiles["ort int8"]["dpcrn"]
    assert pipeline.profile_rows(rows[2:], [load], runs=2) == {}  # no FP32 row: nothing to account against
    assert pipeline.profile_rows(rows, [load], runs=0) == {}


def test_a_row_that_cannot_be_timed_fails_alone(fake_run: pipeline.RunOptions,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    original = pipeline.RowSpec.open

    def open_unless_int8_at_two_threads(self: pipeline.RowSpec, stem: str, threads: int) -> Any:
        if self.precision == "int8" and threads == 2:
            raise RuntimeError("no session at 2 threads")
        return original(self, stem, threads)

    monkeypatch.setattr(pipeline.RowSpec, "open", open_unless_int8_at_two_threads)
    result = pipeline.run_all(fake_run)
    rows = {row["precision"]: row for row in result.results["rows"]}
    assert rows["int8"]["status"] == "failed" and "timing: RuntimeError: no session" in rows["int8"]["error"]
    assert rows["fp16"]["status"] == "ok" and set(rows["fp16"]["speed"]["dpcrn"]["threads"]) == {"1", "2"}
    assert rows["fp16"]["speed"]["dpcrn"]["threads"]["2"]["interleaved"]["variants"] == ["ort fp32", "ort fp16"]


class SearchedFakeSteps(FakeSteps):
    """FakeSteps whose build with searched rules writes a 0.995 mask into <graph>/int8-searched/."""

    def build(self, graph: str, precision: str, backend: str, source: Path, cache: Path | None,
              rules: Path | None = None, rules_off: tuple[str, ...] = (), label: str | None = None) -> Path:
        if rules is None:
            return super().build(graph, precision, backend, source, cache, rules_off)
        FakeSteps.calls.append(f"build {graph} {precision} {backend} rules={rules.relative_to(self.root)} "
                               f"into {label}")
        folder = self.root / graph / (label or "int8-searched")
        symmetric_qdq_dpcrn(folder / "model_trt_qdq.onnx", scale=0.01)  # what a trt-sim row of this build reads
        return identity_dpcrn(folder / "model.onnx", gain=0.995)


def _precisions(tmp_path: Path) -> dict[str, Any]:
    return {row["precision"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}


def test_searched_rules_add_an_int8_searched_row(fake_run: pipeline.RunOptions, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from quant.precision import load_rules
    from quant.search.units import write_rules

    monkeypatch.setattr(pipeline, "Steps", SearchedFakeSteps)
    assert pipeline.run_all(replace(fake_run, precisions=("fp32", "int8"))).ok
    assert set(_precisions(tmp_path)) == {"fp32", "int8"}  # no `quant search` rules, no --search: no row
    write_rules(tmp_path / "search" / "dpcrn" / "rules.toml", load_rules())
    result = pipeline.run_all(replace(fake_run, precisions=("fp32", "int8")))
    assert result.ok, result.failures
    assert "build dpcrn int8 ort rules=search/dpcrn/rules.toml into int8-searched" in FakeSteps.calls
    searched = _precisions(tmp_path)["int8-searched"]
    assert searched["backend"] == "ort" and searched["budget"] == _precisions(tmp_path)["int8"]["budget"]
    # the 0.995 mask of the searched build: output error vs FP32 of 20*log10(1/0.005) = 46.0 dB
    assert searched["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"] == pytest.approx(46.02, abs=0.01)
    assert "int8-searched" in (tmp_path / "results.md").read_text()


def test_trt_sim_search_rules_add_a_trt_sim_int8_searched_row_and_its_report_section(
        fake_run: pipeline.RunOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`quant search --target trt-sim` leaves engines/search/<graph>-trt-sim/: the run builds INT8 with those rules
    into their own folder and simulates TensorRT on its model_trt_qdq.onnx; ORT gets no searched row from them."""
    from quant.precision import load_rules
    from quant.search.units import write_rules
    from tests.test_report_search import write_search_json

    monkeypatch.setattr(pipeline, "Steps", SearchedFakeSteps)
    write_rules(tmp_path / "search" / "dpcrn-trt-sim" / "rules.toml", load_rules())
    write_search_json(tmp_path / "search" / "dpcrn-trt-sim")
    result = pipeline.run_all(replace(fake_run, precisions=("fp32", "int8"), backends=("ort", "trt-sim")))
    assert result.ok, result.failures
    assert "build dpcrn int8 ort rules=search/dpcrn-trt-sim/rules.toml into int8-searched-trt-sim" in FakeSteps.calls
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    searched = [row for row in rows if row["precision"] == "int8-searched"]
    assert [row["backend"] for row in searched] == ["trt-sim"]
    assert searched[0]["artifacts"]["dpcrn"].endswith("int8-searched-trt-sim/model_trt_qdq.onnx")
    # the symmetric Q/DQ with step 0.01 the fake build wrote, not the int8 row's 0.02: the searched build's own file
    int8 = next(row for row in rows if (row["backend"], row["precision"]) == ("trt-sim", "int8"))
    snr = searched[0]["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"]
    assert snr != pytest.approx(int8["error_vs_fp32"]["dpcrn"]["enh"]["snr_db"], abs=0.1)
    sections = json.loads((tmp_path / "results.json").read_text())["search"]
    assert list(sections) == ["dpcrn/trt-sim"] and sections["dpcrn/trt-sim"]["model"] == "dpcrn"
    assert "Precision search (TensorRT, simulated" in (tmp_path / "report.html").read_text()


def test_run_search_searches_first_where_no_rules_are(fake_run: pipeline.RunOptions, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import quant.search.store
    from quant.precision import load_rules
    from quant.search.units import write_rules

    searched: list[tuple[str, int | None, int]] = []

    def small_search(spec: Any, role: str, graphs: Any, out_root: Path, cache: Path, utterances: int | None,
                     max_evals: int) -> Path:
        searched.append((role, utterances, max_evals))
        return write_rules(out_root / "search" / "dpcrn" / "rules.toml", load_rules())

    monkeypatch.setattr(pipeline, "Steps", SearchedFakeSteps)
    monkeypatch.setattr(quant.search.store, "run_small_search", small_search)
    options = replace(fake_run, precisions=("fp32", "int8"), search=True, se_utterances=4, search_evals=5)
    assert pipeline.run_all(options).ok
    assert searched == [("enhancer", 2, 5)] and "int8-searched" in _precisions(tmp_path)


def test_ray_executor_evaluates_rows_in_shards_with_the_same_numbers(fake_run: pipeline.RunOptions, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     ray_cluster: Any) -> None:
    from quant.tasks import sharded

    def two_utterances(spec: Any, options: pipeline.RunOptions) -> pipeline.TestData:
        return pipeline.TestData(calib_data_dir() / "se_test" / "manifest.jsonl", 2)

    monkeypatch.setattr(pipeline, "load_test_data", two_utterances)
    calls: list[str] = []
    original = sharded.evaluate_sharded

    def counting(spec: Any, artifacts: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(artifacts["enhancer"]))
        return original(spec, artifacts, *args, **kwargs)

    monkeypatch.setattr(sharded, "evaluate_sharded", counting)
    local = pipeline.run_all(replace(fake_run, out_dir=tmp_path / "local"))
    assert calls == []  # the default runs in process
    on_ray = pipeline.run_all(replace(fake_run, out_dir=tmp_path / "ray", executor="ray"))
    assert local.ok and on_ray.ok, (local.failures, on_ray.failures)
    assert len(calls) == 3  # fp32, fp16, int8 rows: every accuracy evaluation went to Ray
    for mine, theirs in zip(local.results["rows"], on_ray.results["rows"]):
        assert mine["task"] == theirs["task"] and mine["task"]["utterances"] == 2
        assert mine["per_utterance"] == theirs["per_utterance"]
        assert set(theirs["speed"]["dpcrn"]["threads"]) == {"1", "2"}  # timed here, as always


class RewritingFakeSteps(FakeSteps):
    """FakeSteps whose spec 'rewrites' the export: an identical copy under rewrite/ (what a rewrite that found
    something returns: another file); builds with a label write into <graph>/<label>/."""

    def rewrite(self, spec: Any, exported: dict[str, Path]) -> dict[str, Path]:
        target = self.root / "rewrite" / "dpcrn" / "dpcrn.deconv-to-conv.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(exported["enhancer"], target)
        return {"enhancer": target}

    def build(self, graph: str, precision: str, backend: str, source: Path, cache: Path | None,
              rules_off: tuple[str, ...] = (), label: str | None = None) -> Path:
        if label is None:
            return super().build(graph, precision, backend, source, cache, rules_off)
        FakeSteps.calls.append(f"build {graph} {precision} {backend} from {source.relative_to(self.root)} into {label}")
        target = self.root / graph / label / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return target


def fixed_timing(monkeypatch: pytest.MonkeyPatch, ms: dict[str, float]) -> None:
    """Every interleaved round gives each row label its `ms` (the timing seam: quant.eval.speed.round_robin)."""
    from quant.eval import speed

    def round_robin(steps: Any, rounds: int, warmup: int = 3, calls_per_round: int = 1) -> dict[str, list[float]]:
        return {label: [ms[label] / 1000.0] * (rounds * calls_per_round) for label in steps}

    monkeypatch.setattr(speed, "round_robin", round_robin)


def test_rewritten_specs_time_the_plain_export_and_divide_by_the_faster_fp32(
        fake_run: pipeline.RunOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec whose rewrites change a graph gets an `ort fp32-plain` row (the export as it is, speed only); when it
    is faster than the rewritten FP32, every vs-FP32 ratio, the time accounting and the goals divide by it and say
    so."""
    monkeypatch.setattr(pipeline, "Steps", RewritingFakeSteps)
    fixed_timing(monkeypatch, {"ort fp32": 10.5, "ort fp32-plain": 10.0, "ort fp16": 11.0, "ort int8": 8.0})
    evaluated = count_evaluations(monkeypatch)
    result = pipeline.run_all(fake_run)
    assert result.ok, result.failures
    assert "build dpcrn fp32 ort from export/dpcrn/dpcrn.onnx into fp32-plain" in FakeSteps.calls
    assert len(evaluated) == 3  # fp32, fp16, int8: the plain row's accuracy is the FP32 row's, not evaluated again
    rows = {row["precision"]: row for row in result.results["rows"]}
    plain = rows["fp32-plain"]
    assert plain["status"] == "ok" and plain["task"] == {} and "without the spec's exact rewrites" in plain["note"]
    entry = rows["int8"]["speed"]["dpcrn"]["threads"]["1"]
    assert entry["interleaved"]["variants"] == ["ort fp32", "ort fp32-plain", "ort fp16", "ort int8"]
    assert entry["interleaved"]["baselines"] == {"vs_fp32": "ort fp32-plain"}
    assert entry["vs_fp32"]["base"] == "ort fp32-plain"
    assert entry["vs_fp32"]["median_ratio"] == pytest.approx(0.8)  # 8.0 / 10.0, not 8.0 / 10.5
    assert rows["fp32"]["speed"]["dpcrn"]["threads"]["1"]["vs_fp32"]["median_ratio"] == pytest.approx(1.05)
    assert "vs_fp32" not in plain["speed"]["dpcrn"]["threads"]["1"]
    # the time accounting profiled INT8 against the rewritten FP32: its ceiling is read against the plain one
    profile = rows["int8"]["speed"]["dpcrn"]["profile"]
    assert profile["baseline"]["label"] == "ort fp32-plain" and profile["baseline"]["scale"] == pytest.approx(1.05)
    assert profile["baseline"]["ceiling_ratio"] == pytest.approx(1.05 * profile["ceiling_ratio"])
    markdown = (tmp_path / "results.md").read_text()
    assert "0.80x (min 0.80x; paired 0.80-0.80) vs ort fp32-plain" in markdown
    assert "Ratios vs FP32 ORT divide by ort fp32-plain" in markdown
    assert "ort fp32-plain: FP32 build of the graph as exported" in markdown
    assert "ort fp32-plain: FP32 build of the graph as exported" in (tmp_path / "report.html").read_text()
    assert "| dpcrn | ort int8 | 0.80 (0.80-0.80) vs ort fp32-plain | 1.05 |" in markdown  # ceiling 1.0 x 1.05
    csv_rows = {r["precision"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert csv_rows["int8"]["ratio_vs_fp32_base"] == "ort fp32-plain"
    assert any("dpcrn: vs FP32 divides by ort fp32-plain" in line for line in pipeline_summary(result))
    from quant.report.tables import ratio_cell

    assert ratio_cell(plain, rows["fp32"], "vs_fp32") == "1.00x"  # the base itself, not its mean over ort fp32's
    assert csv_rows["fp32-plain"]["ratio_vs_fp32_ort"] == "1"


def pipeline_summary(result: pipeline.RunResult) -> list[str]:
    from quant.report import summary_lines

    return summary_lines(result.results)


def test_the_rewritten_fp32_stays_the_base_where_it_is_faster(fake_run: pipeline.RunOptions, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "Steps", RewritingFakeSteps)
    fixed_timing(monkeypatch, {"ort fp32": 10.0, "ort fp32-plain": 10.4, "ort fp16": 11.0, "ort int8": 8.0})
    result = pipeline.run_all(fake_run)
    assert result.ok, result.failures
    rows = {row["precision"]: row for row in result.results["rows"]}
    entry = rows["int8"]["speed"]["dpcrn"]["threads"]["1"]
    assert entry["vs_fp32"]["base"] == "ort fp32" and entry["vs_fp32"]["median_ratio"] == pytest.approx(0.8)
    assert rows["fp32-plain"]["speed"]["dpcrn"]["threads"]["1"]["vs_fp32"]["median_ratio"] == pytest.approx(1.04)
    profile = rows["int8"]["speed"]["dpcrn"]["profile"]
    assert profile["baseline"] == {"label": "ort fp32", "profiled": "ort fp32", "scale": 1.0,
                                   "ceiling_ratio": profile["ceiling_ratio"]}
    markdown = (tmp_path / "results.md").read_text()
    assert "Ratios vs FP32 ORT divide by ort fp32, the faster" in markdown and "vs ort fp32-plain" not in markdown


def test_no_plain_export_row_without_rewrites(fake_run: pipeline.RunOptions, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_timing(monkeypatch, {"ort fp32": 10.0, "ort fp16": 11.0, "ort int8": 8.0})
    result = pipeline.run_all(fake_run)  # FakeSteps: the real rewrite step, which finds nothing in the identity mask
    rows = {row["precision"]: row for row in result.results["rows"]}
    assert set(rows) == {"fp32", "fp16", "int8"} and not any("into fp32-plain" in c for c in FakeSteps.calls)
    entry = rows["int8"]["speed"]["dpcrn"]["threads"]["1"]
    assert entry["interleaved"]["baselines"] == {"vs_fp32": "ort fp32"} and entry["vs_fp32"]["base"] == "ort fp32"
    assert "Ratios vs FP32 ORT divide" not in (tmp_path / "results.md").read_text()


def test_the_plain_export_build_is_reused_like_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own folder and stamp beside the rewritten FP32's: both are up to date on a second run."""
    import quant.artifacts

    real_build = quant.artifacts.build_artifact
    built: list[str] = []

    def build(source: Path, precision: str, backend: str, **options: Any) -> Path:
        built.append(Path(options["out_dir"]).name)
        return real_build(source, precision, backend, **options)

    monkeypatch.setattr(quant.artifacts, "build_artifact", build)
    export, rewritten = identity_dpcrn(tmp_path / "a.onnx"), identity_dpcrn(tmp_path / "b.onnx", gain=0.5)
    steps = pipeline.Steps(tmp_path / "engines", pipeline.RunOptions(progress=False))
    for _ in range(2):
        fp32 = steps.build("dpcrn", "fp32", "ort", rewritten, None)
        plain = steps.build("dpcrn", "fp32", "ort", export, None, label="fp32-plain")
    assert built == ["fp32", "fp32-plain"]
    assert plain == tmp_path / "engines" / "dpcrn" / "fp32-plain" / "model.onnx" and plain != fp32
