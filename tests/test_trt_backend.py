"""quant.backends.trt against the strict TensorRT/pycuda test double: lazy import, version gating, building,
precision constraints, profiles, timing cache, runners (binding by name, foreign engines, streaming states)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import trt_double
from quant.artifacts import trt_build
from quant.backends import trt as backend
from quant.backends import trt_inputs
from quant.errors import BackendUnavailable, BuildError, ModelError
from trt_double import graphs
from trt_double.fixtures import double, two_inputs  # noqa: F401  (pytest fixtures)


def _meta(engine: Path) -> dict:
    return json.loads(backend.meta_path_of(engine).read_text())


# ---- import and availability -----------------------------------------------------------------------------------


def test_import_does_not_import_tensorrt() -> None:
    code = "import sys, quant.backends.trt, quant.artifacts.trt_build; print('tensorrt' in sys.modules, 'pycuda' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_missing_tensorrt_says_how_to_install(monkeypatch: pytest.MonkeyPatch, two_inputs: Path, tmp_path: Path) -> None:
    trt_double.hide_tensorrt(monkeypatch)
    with pytest.raises(BackendUnavailable, match=r"pip install 'quant\[trt\]'.*TensorRT <= 10 for implicit INT8"):
        backend.require_tensorrt()
    with pytest.raises(BackendUnavailable, match="pycuda"):
        backend.require_pycuda()
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        backend.build_engine(two_inputs, tmp_path / "out")


def test_type_stubs_alone_are_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what the stub package imports as
    with pytest.raises(BackendUnavailable, match="only the tensorrt type stubs"):
        backend.require_tensorrt()


# ---- capabilities and version gating ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "implicit", "strong", "strong_required", "explicit_batch"),
    [("8.6.1", True, False, False, True), ("10.0.1", True, True, False, False),
     ("10.13.0.35", True, True, False, False), ("11.0.0", False, True, True, False)],
)
def test_capabilities(version: str, implicit: bool, strong: bool, strong_required: bool, explicit_batch: bool) -> None:
    caps = backend.capabilities(version)
    assert (caps.implicit_int8, caps.precision_flags) == (implicit, implicit)
    assert (caps.strongly_typed, caps.strongly_typed_required, caps.explicit_batch_flag) == (
        strong, strong_required, explicit_batch)
    assert caps.explicit_qdq


def test_implicit_int8_refused_on_11_with_the_way_out(monkeypatch: pytest.MonkeyPatch, two_inputs: Path,
                                                       tmp_path: Path) -> None:
    trt_double.install(monkeypatch, "11.0.0")
    with pytest.raises(BuildError, match=r"TensorRT 11\.0\.0 cannot do implicit INT8.*--mode explicit.*tensorrt<11"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8", "implicit", feeds=[])
    with pytest.raises(BuildError, match="no FP16 builder flag"):
        backend.build_engine(two_inputs, tmp_path / "out", "fp16", "implicit")


def test_unknown_precision_and_mode_are_refused() -> None:
    caps = backend.capabilities("10.13.0")
    with pytest.raises(BuildError, match="unknown precision"):
        backend.check_mode(caps, "int4", "implicit", False)
    with pytest.raises(BuildError, match="unknown mode"):
        backend.check_mode(caps, "int8", "sideways", False)


# ---- building ----------------------------------------------------------------------------------------------------


def test_fp32_build_writes_engine_and_record(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    engine = backend.build_engine(two_inputs, tmp_path / "dpcrn" / "fp32", "fp32", meta={"model": "toy"})
    assert engine == tmp_path / "dpcrn" / "fp32" / "model.engine" and engine.read_bytes().startswith(b"FAKE-TRT")
    meta = _meta(engine)
    assert meta["tensorrt_version"] == "10.13.0.35"
    assert (meta["gpu_name"], meta["compute_capability"]) == ("Fake GPU", "9.0")
    assert (meta["precision"], meta["mode"], meta["model"]) == ("fp32", "implicit", "toy")
    build = double.state.builds[-1]
    assert build["flags"] == [] and not build["strongly_typed"]


def test_tensorrt_8_needs_and_gets_an_explicit_batch_network(monkeypatch: pytest.MonkeyPatch, two_inputs: Path,
                                                             tmp_path: Path) -> None:
    fake = trt_double.install(monkeypatch, "8.6.1")
    backend.build_engine(two_inputs, tmp_path / "out", "fp16")
    assert fake.state.builds[-1]["flags"] == ["FP16"]


@pytest.mark.parametrize(("constraints", "flag"), [("obey", "OBEY_PRECISION_CONSTRAINTS"),
                                                     ("prefer", "PREFER_PRECISION_CONSTRAINTS")])
def test_layer_precisions_pin_rule_nodes(double: trt_double.Double, two_inputs: Path, tmp_path: Path,
                                         constraints: str, flag: str) -> None:
    rules = {"soft": "fp32", "add": "int8"}  # int8 decisions leave TensorRT free
    backend.build_engine(two_inputs, tmp_path / "out", "fp16", layer_precisions=rules, constraints=constraints)
    build = double.state.builds[-1]
    assert set(build["flags"]) == {"FP16", flag}
    assert build["layers"] == {"soft": {"precision": "FLOAT", "output_types": {"0": "FLOAT"}, "effective": True}}


def test_layer_precisions_from_a_json_file(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([["scale", "fp32"]]))
    backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=[_feed(4)], layer_precisions=rules)
    build = double.state.builds[-1]
    assert set(build["flags"]) == {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"}
    assert list(build["layers"]) == ["scale"]


def test_onnx_node_of_maps_parser_layer_names() -> None:
    nodes = ["/enc/ln", "/enc/ln/Pow", "soft"]
    assert backend.onnx_node_of("x", "[ONNX Layer: soft]", nodes) == "soft"
    assert backend.onnx_node_of("/enc/ln/Pow", "", nodes) == "/enc/ln/Pow"
    assert backend.onnx_node_of("/enc/ln_1", "", nodes) == "/enc/ln"
    assert backend.onnx_node_of("/enc/lnx", "", nodes) is None


def test_explicit_int8_builds_strongly_typed_from_qdq(double: trt_double.Double, tmp_path: Path) -> None:
    qdq = graphs.qdq_model(tmp_path / "model_trt_qdq.onnx")
    engine = backend.build_engine(qdq, tmp_path / "out", "int8", "explicit", layer_precisions={"double": "fp32"})
    build = double.state.builds[-1]
    assert build["strongly_typed"] and build["flags"] == [] and build["layers"] == {}
    assert double.state.calibrator_calls == []  # Q/DQ carries the scales: no calibrator
    assert _meta(engine)["strongly_typed"] is True


def test_explicit_int8_on_tensorrt_8_uses_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = trt_double.install(monkeypatch, "8.6.1")
    backend.build_engine(graphs.qdq_model(tmp_path / "q.onnx"), tmp_path / "out", "int8", "explicit")
    assert fake.state.builds[-1]["flags"] == ["FP16", "INT8"] and not fake.state.builds[-1]["strongly_typed"]


def test_explicit_int8_on_11(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = trt_double.install(monkeypatch, "11.0.0")
    backend.build_engine(graphs.qdq_model(tmp_path / "q.onnx"), tmp_path / "out", "int8", "explicit")
    assert fake.state.builds[-1]["strongly_typed"] and fake.state.builds[-1]["flags"] == []


def test_explicit_modes_refuse_an_onnx_without_the_precision(double: trt_double.Double, two_inputs: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no QuantizeLinear/DequantizeLinear"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8", "explicit")
    with pytest.raises(BuildError, match="FP32 ONNX"):
        backend.build_engine(two_inputs, tmp_path / "out", "fp16", "explicit")
    assert double.state.builds == []


def test_parser_errors_name_the_node(double: trt_double.Double, tmp_path: Path) -> None:
    bad = graphs.unsupported_model(tmp_path / "bad.onnx")
    with pytest.raises(BuildError, match=r"could not parse .*node 0 'mystery' \(NotATensorRTOp\)"):
        backend.build_engine(bad, tmp_path / "out")


def test_missing_onnx(double: trt_double.Double, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist: export it first"):
        backend.build_engine(tmp_path / "nothing.onnx", tmp_path / "out")


def test_failed_build_is_a_build_error(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    bad_profile = [{"zeta": ((1, 3), (2, 3), (4, 3))}]  # no shapes for the dynamic input alpha
    with pytest.raises(BuildError, match="dynamic inputs without shapes \\['alpha'\\]"):
        backend.build_engine(two_inputs, tmp_path / "out", profiles=bad_profile)


def test_explicit_profiles_are_used(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    profile = {"zeta": ((1, 3), (2, 3), (4, 3)), "alpha": ((1, 3), (2, 3), (4, 3))}
    backend.build_engine(two_inputs, tmp_path / "out", profiles=[profile])
    assert double.state.builds[-1]["profiles"] == [{name: [[1, 3], [2, 3], [4, 3]] for name in ("zeta", "alpha")}]


def test_unknown_model_with_dynamic_time_needs_profiles(double: trt_double.Double, tmp_path: Path) -> None:
    model = graphs.dynamic_time_model(tmp_path / "dyn.onnx")
    with pytest.raises(BuildError, match="pass profiles explicitly"):
        backend.build_engine(model, tmp_path / "out")


# ---- default profiles (no tensorrt needed) -----------------------------------------------------------------------


def test_default_profiles_of_the_known_models() -> None:
    encoder = trt_inputs.default_profiles({"speech": (-1, -1, 80), "speech_lengths": (-1,)})
    assert encoder == [{"speech": ((1, 16, 80), (8, 800, 80), (16, 3000, 80)), "speech_lengths": ((1,), (8,), (16,))}]
    decoder = trt_inputs.default_profiles({
        "encoder_out": (-1, -1, 256), "encoder_out_lens": (-1,), "hyps_pad_sos_eos": (-1, 10, -1),
        "hyps_lens_sos": (-1, 10), "ctc_score": (-1, 10)})[0]
    assert decoder["hyps_pad_sos_eos"] == ((1, 10, 2), (8, 10, 150), (16, 10, 602))
    assert decoder["encoder_out"] == ((1, 4, 256), (8, 200, 256), (16, 750, 256))
    assert "r_hyps_pad_sos_eos" not in decoder
    assert trt_inputs.default_profiles({"mix": (-1, 257, 563, 2)}) == [
        {"mix": ((1, 257, 563, 2), (4, 257, 563, 2), (8, 257, 563, 2))}]
    streaming = {"mix": (1, 257, 1, 2), "en_cache1": (1, 2, 1, 257)}
    assert trt_inputs.default_profiles(streaming) == []
    assert trt_inputs.default_profiles({"mix": (-1, 257, 1, 2), "rnn_cache1": (-1, 33, 128)}) == [
        {"mix": ((1, 257, 1, 2),) * 3, "rnn_cache1": ((1, 33, 128),) * 3}]


# ---- timing cache ------------------------------------------------------------------------------------------------


def test_timing_cache_is_kept_and_reused(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    cache = tmp_path / "engines" / "timing.cache"
    backend.build_engine(two_inputs, tmp_path / "a", timing_cache_path=cache)
    assert json.loads(cache.read_bytes().split(b"\n", 1)[1])["entries"] == 1
    backend.build_engine(two_inputs, tmp_path / "b", timing_cache_path=cache)
    assert json.loads(cache.read_bytes().split(b"\n", 1)[1])["entries"] == 2


def test_corrupt_timing_cache_starts_fresh(double: trt_double.Double, two_inputs: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    backend.build_engine(two_inputs, tmp_path / "a", timing_cache_path=cache)
    assert "does not match" in caplog.text
    assert cache.read_bytes().startswith(b"FAKE-TRT-TIMING")


# ---- runners -----------------------------------------------------------------------------------------------------


def _feed(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"alpha": rng.standard_normal((batch, 3)).astype(np.float32),
            "zeta": rng.standard_normal((batch, 3)).astype(np.float32)}


def test_runner_binds_by_name_and_sets_shapes_per_call(double: trt_double.Double, two_inputs: Path,
                                                      tmp_path: Path) -> None:
    runner = backend.TrtRunner(backend.build_engine(two_inputs, tmp_path / "out"))
    assert runner.input_names == ["zeta", "alpha"] and runner.output_names == ["y"]
    for batch in (2, 5):
        feed = _feed(batch, seed=batch)  # dict order alpha, zeta: the opposite of the engine's
        outputs = runner.run(feed)
        np.testing.assert_allclose(outputs["y"], graphs.reference_two_input(feed["zeta"], feed["alpha"]), rtol=1e-6)
    runner.close()


def test_runner_reports_bad_feeds(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    runner = backend.TrtRunner(backend.build_engine(two_inputs, tmp_path / "out"))
    with pytest.raises(ModelError, match=r"miss \['alpha'\]"):
        runner.run({"zeta": np.zeros((1, 3), np.float32)})
    with pytest.raises(ModelError, match=r"unknown \['beta'\]"):
        runner.run({**_feed(1), "beta": np.zeros(1)})
    with pytest.raises(ModelError, match="outside the engine's optimization profile"):
        runner.run(_feed(17))


def test_runner_refuses_an_engine_for_another_gpu(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    engine = backend.build_engine(two_inputs, tmp_path / "out")
    double.device.compute_capability = (8, 6)
    double.device.gpu_name = "Other GPU"
    with pytest.raises(BackendUnavailable, match=r"compute_capability=9\.0.*this machine has.*8\.6.*rebuild it here"):
        backend.TrtRunner(engine)


def test_runner_refuses_an_engine_from_another_tensorrt(monkeypatch: pytest.MonkeyPatch, two_inputs: Path,
                                                       tmp_path: Path) -> None:
    trt_double.install(monkeypatch, "10.13.0.35")
    engine = backend.build_engine(two_inputs, tmp_path / "out")
    trt_double.install(monkeypatch, "10.0.1")
    with pytest.raises(BackendUnavailable, match="tensorrt_version=10.13.0.35"):
        backend.TrtRunner(engine)
    with pytest.raises(ModelError, match="could not load"):  # and TensorRT itself would refuse it too
        backend.TrtRunner(engine, check_compatibility=False)


def test_runner_needs_the_engine_record(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    engine = backend.build_engine(two_inputs, tmp_path / "out")
    backend.meta_path_of(engine).unlink()
    with pytest.raises(ModelError, match="model.engine.json is missing"):
        backend.TrtRunner(engine)
    assert backend.TrtRunner(engine, check_compatibility=False).run(_feed(1))["y"].shape == (1, 3)


def test_streaming_states_stay_on_the_device(double: trt_double.Double, tmp_path: Path) -> None:
    engine = backend.build_engine(graphs.streaming_model(tmp_path / "stream.onnx"), tmp_path / "out")
    runner = backend.runner_for(engine)
    assert isinstance(runner, backend.StreamingTrtRunner) and runner.states == {"h": "h_out"}
    frames = np.random.default_rng(1).standard_normal((6, 1, 4)).astype(np.float32)
    before = dict(double.device.copies)
    state = np.zeros((1, 4), np.float32)
    for frame in frames:
        out = runner.run({"frame": frame})
        np.testing.assert_allclose(out["out"], frame + state, rtol=1e-6)
        assert list(out) == ["out"]
        state = 0.5 * state + frame
    copies = {kind: double.device.copies[kind] - before[kind] for kind in before}
    assert copies == {"htod": 1 + len(frames), "dtoh": len(frames)}  # one zero-state upload at reset, then frames only


def test_streaming_reset_and_explicit_states(double: trt_double.Double, tmp_path: Path) -> None:
    engine = backend.build_engine(graphs.streaming_model(tmp_path / "stream.onnx"), tmp_path / "out")
    runner = backend.StreamingTrtRunner(engine, return_states=True)
    frame = np.ones((1, 4), np.float32)
    first = runner.run({"frame": frame})
    second = runner.run({"frame": frame})
    np.testing.assert_allclose(second["out"], frame + first["h_out"])
    runner.reset()
    np.testing.assert_allclose(runner.run({"frame": frame})["out"], first["out"])
    given = {"frame": frame, "h": np.full((1, 4), 3.0, np.float32)}
    np.testing.assert_allclose(runner.run(given)["out"], frame + 3.0)
    with pytest.raises(ModelError, match="miss \\['frame'\\]"):
        runner.run({})


def test_streaming_states_with_a_dynamic_batch(double: trt_double.Double, tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    frame = helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["B", 4])
    state = helper.make_tensor_value_info("cache", TensorProto.FLOAT, ["B", 4])
    out = helper.make_tensor_value_info("enh", TensorProto.FLOAT, ["B", 4])
    state_out = helper.make_tensor_value_info("cache_out", TensorProto.FLOAT, ["B", 4])
    nodes = [helper.make_node("Add", ["mix", "cache"], ["enh"], name="emit"),
             helper.make_node("Identity", ["mix"], ["cache_out"], name="keep")]
    model = helper.make_model(helper.make_graph(nodes, "s", [frame, state], [out, state_out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    __import__("onnx").save(model, str(tmp_path / "s.onnx"))
    runner = backend.runner_for(backend.build_engine(tmp_path / "s.onnx", tmp_path / "out"))  # profile: batch 1
    ones = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(runner.run({"mix": ones})["enh"], ones)  # zero state of shape (1, 4)
    np.testing.assert_allclose(runner.run({"mix": 2 * ones})["enh"], 3 * ones)  # the previous frame as state


def test_runner_for_plain_engine(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    runner = backend.runner_for(backend.build_engine(two_inputs, tmp_path / "out"))
    assert type(runner) is backend.TrtRunner
    with pytest.raises(ModelError, match="no state pair"):
        backend.StreamingTrtRunner(runner.engine_path)


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_build_without_tensorrt_exits_2(monkeypatch: pytest.MonkeyPatch, two_inputs: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("quant.cli")
    try:
        cli.build_parser()
    except (ImportError, AttributeError) as error:
        pytest.skip(f"the quant CLI is not complete yet: {error}")
    monkeypatch.chdir(tmp_path)  # the CLI's default output root (./engines) lands under tmp_path
    trt_double.hide_tensorrt(monkeypatch)
    code = cli.main(["build", str(two_inputs), "--backend", "trt", "--precision", "fp32"])
    assert code == 2
    assert "pip install 'quant[trt]'" in capsys.readouterr().err


# ---- orchestration: quant.artifacts.trt_build.build_trt --------------------------------------------------------------


def _store_cache_for(onnx_path: Path, store: Path) -> Path:
    from quant.calib.cache import CacheKey
    from quant.fileio import sha256_file

    key = CacheKey.create(sha256_file(onnx_path), "e" * 64, "entropy", {}, versions={"quant": "test"})
    cache = b"TRT-101300-EntropyCalibration2\nzeta: 3c010204\nalpha: 3c010204\n"
    trt_build.StoreCacheIO(store, key, "two").write(cache)
    return next(store.glob("*.cache"))


def test_build_trt_implicit_int8_with_quant_cache_and_rules(double: trt_double.Double, two_inputs: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("quant.precision")
    import onnx

    from quant.artifacts.ort_build import streaming_states
    from quant.precision import load_rules, plan, trt_layer_precisions

    cache = _store_cache_for(two_inputs, tmp_path / "store")
    options = trt_build.TrtBuildOptions(precision="int8", mode="implicit", cache=cache, out_root=tmp_path / "engines")
    engine = trt_build.build_trt("two", two_inputs, tmp_path / "engines" / "two" / "int8", options)
    assert double.state.calibrator_calls == ["read_calibration_cache"]  # quant's ranges: TensorRT does not calibrate
    model = onnx.load(str(two_inputs))
    planned = dict(trt_layer_precisions(plan(model, load_rules(None), "int8", "trt", streaming_states(model))))
    pinned = {node for node, precision in planned.items() if precision in ("fp32", "fp16")}
    build = double.state.builds[-1]
    assert set(build["layers"]) == pinned and "OBEY_PRECISION_CONSTRAINTS" in build["flags"]
    assert (tmp_path / "engines" / "timing.cache").is_file()
    meta = _meta(engine)
    assert meta["model"] == "two" and meta["calibration"]["cache_hit"] is True


def test_build_trt_explicit_needs_the_ort_build_first(double: trt_double.Double, two_inputs: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "engines" / "two" / "int8"
    options = trt_build.TrtBuildOptions(precision="int8", mode="explicit", out_root=tmp_path / "engines")
    with pytest.raises(BuildError, match=r"model_trt_qdq.onnx is missing: run quant build MODEL --precision int8"):
        trt_build.build_trt("two", two_inputs, out_dir, options)
    out_dir.mkdir(parents=True)
    graphs.qdq_model(out_dir / "model_trt_qdq.onnx")
    trt_build.build_trt("two", two_inputs, out_dir, options)
    assert double.state.builds[-1]["onnx_path"].endswith("model_trt_qdq.onnx")
    assert double.state.builds[-1]["strongly_typed"]


def test_build_trt_implicit_int8_needs_a_cache_or_feeds(double: trt_double.Double, two_inputs: Path,
                                                        tmp_path: Path) -> None:
    """Builds never calibrate: quant's ranges come as a cache, TensorRT's calibrator gets the caller's feeds."""
    with pytest.raises(BuildError, match="needs quant's calibration cache"):
        trt_build.build_trt("two", two_inputs, tmp_path / "a", trt_build.TrtBuildOptions("int8"))
    with pytest.raises(BuildError, match="TensorRT's calibrator needs calibration feeds"):
        trt_build.build_trt("two", two_inputs, tmp_path / "b", trt_build.TrtBuildOptions("int8", calibrator="tensorrt"))


def test_build_trt_without_tensorrt_fails_first(monkeypatch: pytest.MonkeyPatch, two_inputs: Path,
                                                tmp_path: Path) -> None:
    trt_double.hide_tensorrt(monkeypatch)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        trt_build.build_trt("two", two_inputs, tmp_path / "two" / "int8", trt_build.TrtBuildOptions("int8"))


def test_shape_layers_are_never_pinned(double: trt_double.Double, tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "shape.onnx"
    __import__("onnx").save(model, str(path))
    backend.build_engine(path, tmp_path / "out", "fp16", layer_precisions={"shape": "fp32", "reshape": "fp32"})
    assert list(double.state.builds[-1]["layers"]) == ["reshape"]


def test_build_trt_tensorrt_calibrator_on_real_speech(double: trt_double.Double, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT's own calibrator fed by the dpcrn spec's task (9 s STFT segments of the committed noisy speech),
    in fixed batches; its cache lands in the store and the next build reuses it without calibrating."""
    from onnx import TensorProto, helper

    from quant.paths import calib_data_dir

    manifest = calib_data_dir() / "se_calib" / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip(f"{manifest} is missing")
    mix = helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["B", 257, 563, 2])
    enh = helper.make_tensor_value_info("enh", TensorProto.FLOAT, ["B", 257, 563, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["mix"], ["enh"], name="mask")],
                                                "toy_dpcrn", [mix], [enh]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / "dpcrn.onnx"
    __import__("onnx").save(model, str(source))
    from quant.spec import load_spec
    from quant.tasks import FeedOptions, task_for

    feeds = task_for(load_spec("dpcrn")).calibration_feeds(
        "enhancer", str(manifest), FeedOptions(limit=2, graphs={"enhancer": source}))
    options = trt_build.TrtBuildOptions("int8", "implicit", calibrator="tensorrt", feeds=feeds, batch_size=2,
                                        out_root=tmp_path / "engines")
    trt_build.build_trt("dpcrn", source, tmp_path / "engines" / "dpcrn" / "int8", options)
    batches = double.state.calibration_batches
    assert batches and all(batch["mix"].shape == (2, 257, 563, 2) for batch in batches)
    assert float(np.abs(batches[0]["mix"]).max()) > 0  # real spectra, not zeros
    stored = list((tmp_path / "engines" / "cache").glob("dpcrn-tensorrt-entropy2-*.cache"))
    assert len(stored) == 1
    calls = len(double.state.calibrator_calls)
    trt_build.build_trt("dpcrn", source, tmp_path / "engines" / "dpcrn" / "int8", options)
    assert double.state.calibrator_calls[calls:] == ["read_calibration_cache"]


def test_quant_build_artifact_hands_off_to_the_backend(double: trt_double.Double, two_inputs: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """quant.artifacts.build_artifact(..., backend="trt") with a `quant calibrate` cache: implicit INT8 uses quant's
    ranges (TensorRT does not calibrate), explicit FP16 builds strongly typed from the ORT build's FP16 ONNX."""
    artifact = pytest.importorskip("quant.artifacts")
    calibrate = pytest.importorskip("quant.calib.calibrate")
    rng = np.random.default_rng(0)
    feeds = [{name: rng.standard_normal((4, 3)).astype(np.float32) for name in ("zeta", "alpha")} for _ in range(3)]
    options = calibrate.CalibrateOptions(trt_version="101300")
    entry = calibrate.calibrate(two_inputs, feeds=feeds, out_cache=tmp_path / "two.cache", options=options)

    root = tmp_path / "engines"
    out = artifact.build_artifact(two_inputs, "int8", "trt", mode="implicit", cache=entry.path,
                                  out_dir=tmp_path / "int8", out_root=root)
    assert double.state.calibrator_calls == ["read_calibration_cache"]
    assert {"FP16", "INT8"} <= set(double.state.builds[-1]["flags"])
    assert _meta(out / "model.engine")["calibration"]["cache_hit"] is True

    fp16 = artifact.build_artifact(two_inputs, "fp16", "trt", mode="explicit", out_dir=tmp_path / "fp16",
                                   out_root=root)
    build = double.state.builds[-1]
    built_from = Path(build["onnx_path"])  # the FP16 ONNX of this build, in its temp folder beside fp16/
    assert built_from.name == "model.onnx" and built_from.parent.name.startswith(".fp16.") and build["strongly_typed"]
    assert json.loads((fp16 / "meta.json").read_text())["trt"]["onnx"] == str(fp16 / "model.onnx")
