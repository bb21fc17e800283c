"""Builds on a tiny streaming SE-like graph: FP32 copy, FP16 with rules and state dtypes, INT8 for ORT (integer kernels,
rules honoured) and for TensorRT (int8 symmetric Q/DQ), meta.json, cache checks, the CLI. Real-model builds are slow."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.artifacts import build_artifact
from quant.backends.ort import OrtRunner
from quant.errors import BackendUnavailable, BuildError, CacheMismatch, CalibrationError, ModelError, QuantError
from quant.fileio import sha256_file

RNG = np.random.default_rng(0)
FRAME = [1, 2, 8, 8]
STATE = [1, 4, 8, 8]


def weights(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.4).astype(np.float32), name)


def tiny_streaming_model(path: Path) -> Path:
    """mix -> conv_in -> Relu -> (+cache) -> conv_mid -> LayerNorm(decomposed, last axis) -> conv_out -> Sigmoid mask
    -> Mul(mix); the Relu output is the next state (cache_out)."""
    nodes = [
        helper.make_node("Conv", ["mix", "w_in", "b_in"], ["c_in"], name="conv_in", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c_in"], ["cache_out"], name="relu_in"),
        helper.make_node("Concat", ["cache", "cache_out"], ["cat"], name="cache_concat", axis=1),
        helper.make_node("Conv", ["cat", "w_mid", "b_mid"], ["c_mid"], name="conv_mid", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c_mid"], ["mean"], name="ln_mean", axes=[-1]),
        helper.make_node("Sub", ["c_mid", "mean"], ["centered"], name="ln_sub"),
        helper.make_node("Pow", ["centered", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="ln_div"),
        helper.make_node("Conv", ["normed", "w_out", "b_out"], ["c_out"], name="conv_out", pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["c_out"], ["mask"], name="softmax", axis=1),
        helper.make_node("Mul", ["mix", "mask"], ["enh"], name="apply_mask"),
    ]
    inits = [weights("w_in", 4, 2, 3, 3), weights("b_in", 4), weights("w_mid", 4, 8, 3, 3), weights("b_mid", 4),
             weights("w_out", 2, 4, 3, 3), weights("b_out", 2),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    graph = helper.make_graph(
        nodes, "tiny_stream",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, FRAME),
         helper.make_tensor_value_info("cache", TensorProto.FLOAT, STATE)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, FRAME),
         helper.make_tensor_value_info("cache_out", TensorProto.FLOAT, STATE)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def feeds(count: int = 6) -> list[dict[str, np.ndarray]]:
    return [{"mix": RNG.standard_normal(FRAME).astype(np.float32),
             "cache": np.abs(RNG.standard_normal(STATE)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from quant.calib import cache
    from quant.calib.ranges import RangeOptions, collect_ranges

    folder = tmp_path_factory.mktemp("tiny")
    path = tiny_streaming_model(folder / "tiny_stream.onnx")
    result = collect_ranges(path, feeds(), "minmax", RangeOptions(progress=False))
    key = cache.CacheKey.create(sha256_file(path), "0" * 64, "minmax", {})
    entry = cache.write_entry(folder / "tiny.cache", key, result)
    return path, entry.path


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((reference - test) ** 2).sum()))


def test_fp32_copy_and_meta(model_and_cache: tuple[Path, Path], tmp_path: Path):
    source, _ = model_and_cache
    out = build_artifact(source, "fp32", out_dir=tmp_path / "fp32")
    assert sha256_file(out / "model.onnx") == sha256_file(source)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source_sha256"] == sha256_file(source) and meta["precision"] == "fp32"
    assert {"onnx", "onnxruntime", "quant"} <= set(meta["versions"]) and len(meta["cache_key"]) == 64
    assert meta["rules"]["sha256"] == sha256_file(Path(meta["rules"]["path"]))


def test_fp16_keeps_rules_and_state_dtype(model_and_cache: tuple[Path, Path], tmp_path: Path):
    source, _ = model_and_cache
    out = build_artifact(source, "fp16", out_dir=tmp_path / "fp16")
    model = onnx.load(str(out / "model.onnx"))
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT, TensorProto.FLOAT]
    weights_fp16 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert "w_mid" in weights_fp16 and "eps" not in weights_fp16  # LayerNorm constants stay FP32
    runner, reference = OrtRunner(out / "model.onnx"), OrtRunner(source)
    feed = feeds(1)[0]
    got, want = runner.run(feed), reference.run(feed)
    assert got["cache_out"].dtype == np.float32  # can be fed back as the next state
    assert snr_db(want["enh"], got["enh"]) > 40
    meta = json.loads((out / "meta.json").read_text())
    assert meta["plan"]["Softmax"] == {"fp32 (softmax)": 1}


def test_int8_ort_artifact(model_and_cache: tuple[Path, Path], tmp_path: Path):
    source, cache = model_and_cache
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["integer_kernels"].get("QLinearConv", 0) >= 1
    assert meta["cache"]["key"]["model_sha256"] == sha256_file(source)
    assert meta["plan"]["Conv"] == {"fp32 (input-layer)": 1, "int8 (int8-compute)": 2}
    model = onnx.load(str(out / "model.onnx"))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for name in ("ln_pow", "ln_var", "ln_sqrt", "apply_mask", "cache_concat", "conv_in"):
        assert not set(by_name[name].input) & dequantized, name  # rule-protected nodes read float tensors
    assert by_name["conv_mid"].input[0] in dequantized and by_name["conv_mid"].input[1] in dequantized
    runner, reference = OrtRunner(out / "model.onnx"), OrtRunner(source)
    values = [snr_db(reference.run(f)["enh"], runner.run(f)["enh"]) for f in feeds(3)]
    assert min(values) > 15, values


def test_int8_trt_qdq_is_symmetric_per_channel(model_and_cache: tuple[Path, Path], tmp_path: Path):
    source, cache = model_and_cache
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    model = onnx.load(str(out / "model_trt_qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any() for n in qdq)
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] == "w_mid_quantized"]
    assert len(weight_dq) == 1 and weight_dq[0].attribute[0].i == 0 and inits["w_mid_qdq_scale"].shape == (4,)
    dequantized = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    assert not set(by_name["softmax"].input) & dequantized and not set(by_name["ln_sub"].input) & dequantized
    order = [o for n in model.graph.node for o in n.output]
    assert all(order.index(i) < order.index(o) for n in model.graph.node for i in n.input if i in order
               for o in n.output)  # topologically sorted
    runner, reference = OrtRunner(out / "model_trt_qdq.onnx"), OrtRunner(source)
    feed = feeds(1)[0]
    assert snr_db(reference.run(feed)["enh"], runner.run(feed)["enh"]) > 15


def test_trt_sim_runs_the_tensorrt_qdq_model_not_orts(model_and_cache: tuple[Path, Path], tmp_path: Path):
    from quant.backends import open_runner

    source, cache = model_and_cache
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    feed = feeds(1)[0]
    fp32 = open_runner(source, "ort").run(feed)["enh"]
    ort_int8 = open_runner(out / "model.onnx", "ort").run(feed)["enh"]
    simulated = open_runner(out / "model_trt_qdq.onnx", "trt-sim").run(feed)["enh"]
    assert not np.allclose(simulated, fp32, rtol=0, atol=1e-6) and snr_db(fp32, simulated) > 15
    assert not np.allclose(simulated, ort_int8, rtol=0, atol=1e-6)  # another model: int8 symmetric, 8-bit weights
    with pytest.raises(ModelError, match=r"model\.onnx: .* is not symmetric int8.*model_trt_qdq\.onnx beside it"):
        open_runner(out / "model.onnx", "trt-sim")  # ORT's uint8 model would make trt-sim measure ORT


def test_cache_of_another_model_is_refused(model_and_cache: tuple[Path, Path], tmp_path: Path):
    _, cache = model_and_cache
    other = tiny_streaming_model(tmp_path / "other.onnx")  # new random weights: another sha256
    with pytest.raises(CacheMismatch, match="re-run `quant calibrate`"):
        build_artifact(other, "int8", cache=cache, out_dir=tmp_path / "x")


def test_missing_ranges_are_named(model_and_cache: tuple[Path, Path], tmp_path: Path):
    from quant.calib import cache
    from quant.calib.ranges import RangeOptions, RangeResult, collect_ranges

    source, _ = model_and_cache
    full = collect_ranges(source, feeds(2), "minmax", RangeOptions(progress=False))
    partial = RangeResult(full.method, full.params, {k: v for k, v in full.tensors.items() if k != "normed"})
    key = cache.CacheKey.create(sha256_file(source), "1" * 64, "minmax", {})
    entry = cache.write_entry(tmp_path / "partial.cache", key, partial)
    with pytest.raises(CalibrationError, match="normed"):
        build_artifact(source, "int8", cache=entry.path, out_dir=tmp_path / "y")


def test_bad_options_and_models(tmp_path: Path):
    with pytest.raises(BuildError, match="precision"):
        build_artifact("whatever.onnx", "int4")
    with pytest.raises(ModelError, match="not an existing .onnx file"):
        build_artifact(tmp_path / "missing.onnx", "fp32")


def test_trt_backend_reports_unavailable(model_and_cache: tuple[Path, Path], tmp_path: Path):
    trt_backend = pytest.importorskip("quant.backends.trt")
    try:
        trt_backend.require_tensorrt()
        pytest.skip("a usable TensorRT is installed here; the unavailable path cannot be shown")
    except BackendUnavailable:
        pass
    source, _ = model_and_cache
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        build_artifact(source, "fp32", "trt", out_dir=tmp_path / "trt")


def _parser() -> argparse.ArgumentParser:
    from quant.cli import build as build_cli
    from quant.cli import inspect as inspect_cli

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    build_cli.register(commands)
    inspect_cli.register(commands)
    return parser


def test_cli_build_and_inspect(model_and_cache: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]):
    source, cache = model_and_cache
    args = _parser().parse_args(["build", str(source), "--precision", "int8", "--cache", str(cache),
                                 "-o", str(tmp_path / "cli")])
    assert args.handler(args) == 0
    assert "integer kernels" in capsys.readouterr().out
    args = _parser().parse_args(["inspect", str(tmp_path / "cli" / "model.onnx")])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "Softmax" in out and "fp32 (softmax)" in out and "QLinearConv" in out
    args = _parser().parse_args(["inspect", str(source), "--precision", "fp16"])
    args.handler(args)
    assert "fp32 (layernorm-decomposed)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ real models


SHIPPED_GRAPHS = ("dpcrn", "dpcrn-stream", "wenet-encoder", "wenet-decoder")


def _export_or_skip(name: str) -> Path:
    from quant.paths import DEFAULT_OUT_ROOT
    from quant.spec import load_spec, shipped_specs

    graph = next(g for spec in map(load_spec, shipped_specs()) for g in spec.graphs if g.name == name)
    path = DEFAULT_OUT_ROOT / "export" / str(graph.exporter) / str(graph.export_file)
    if not path.is_file():
        pytest.skip(f"{path} not exported (run `quant export`)")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED_GRAPHS)
def test_real_model_builds_three_precisions(name: str, tmp_path: Path):
    """Calibrate on the first utterances of the committed set, build FP32/FP16/INT8, check integer kernels and that
    INT8 stays close to FP32 on a calibration feed."""
    from quant.calib.calibrate import CalibrateOptions
    from quant.calib.ranges import RangeOptions
    from quant.spec import load_spec, shipped_specs
    from quant.tasks import FeedOptions, task_for
    from quant.tasks.calibration import calibrate_spec

    source = _export_or_skip(name)
    spec, graph = next((s, g) for s in map(load_spec, shipped_specs()) for g in s.graphs if g.name == name)
    feed_options = FeedOptions(limit=3, batch_size=1, frame_stride=8,
                               graphs={g.role: _export_or_skip(str(g.name)) for g in spec.graphs})
    options = CalibrateOptions(ranges=RangeOptions(progress=False))
    entry = calibrate_spec(spec, graph.role, source, out_cache=tmp_path / "calib.cache", options=options,
                           feed_options=feed_options)  # the spec's method
    for precision in ("fp32", "fp16", "int8"):
        build_artifact(source, precision, name=name, cache=entry.path if precision == "int8" else None,
                       out_dir=tmp_path / precision)
    meta = json.loads((tmp_path / "int8" / "meta.json").read_text())
    assert meta["integer_kernels"], meta["optimized_op_counts"]
    assert meta["ort_int8"]["planned_int8_not_quantized"] == []
    assert os.path.isfile(tmp_path / "int8" / "model_trt_qdq.onnx")
    feed = next(iter(task_for(spec).calibration_feeds(graph.role, options=feed_options)))
    reference = OrtRunner(source).run(feed)
    for precision, floor_db in (("fp16", 40.0), ("int8", 15.0)):
        got = OrtRunner(tmp_path / precision / "model.onnx").run(feed)
        output = next(n for n in reference if reference[n].dtype == np.float32)
        assert snr_db(reference[output], got[output]) > floor_db, (precision, output)


# ---- ranges: the sidecar's observed min/max; calibration through the keyed store ------------------------------------


def test_uint8_activations_get_the_sidecars_observed_min_max(model_and_cache: tuple[Path, Path], tmp_path: Path):
    """`cat` (Concat of |cache| and a Relu output) is never negative: its uint8 encoding spends no code on negatives
    (zero point 0, scale max/255), which only the sidecar's min/max can give; c_mid's zero point follows its min."""
    from quant.artifacts.artifact import load_ranges
    from quant.calib.cache import read_entry

    source, cache = model_and_cache
    observed = read_entry(cache).ranges
    ranges, meta = load_ranges("tiny", source, cache)
    assert meta["path"] == str(cache)
    assert ranges["cat"].minimum == observed["cat"].minimum == 0.0
    assert ranges["c_mid"].ort_range(True) == (observed["c_mid"].minimum, observed["c_mid"].maximum)
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantize = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert int(inits[quantize["cat"].input[2]]) == 0
    assert float(inits[quantize["cat"].input[1]]) == pytest.approx(observed["cat"].maximum / 255, rel=1e-5)
    c_mid_scale = float(inits[quantize["c_mid"].input[1]])
    assert int(inits[quantize["c_mid"].input[2]]) == round(-observed["c_mid"].minimum / c_mid_scale)


def test_int8_without_cache_says_how_to_calibrate(model_and_cache: tuple[Path, Path], tmp_path: Path):
    """Builds never calibrate (quant.tasks.calibration.calibrate_spec does, before `quant build SPEC`)."""
    source, _ = model_and_cache
    with pytest.raises(BuildError, match="INT8 needs calibration ranges"):
        build_artifact(source, "int8", out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---- TensorRT hand-off (quant.artifacts.trt_build.build_trt, against the TensorRT test double) --------------------------


def test_missing_tensorrt_fails_before_export_or_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import trt_double

    trt_double.hide_tensorrt(monkeypatch)
    with pytest.raises(BackendUnavailable, match="pip install 'quant\\[trt\\]'"):
        build_artifact(tmp_path / "absent.onnx", "int8", "trt", out_root=tmp_path / "engines")  # checked first
    assert not (tmp_path / "engines").exists()


def test_trt_implicit_int8_uses_this_builds_ranges_and_pins_only_rule_nodes(
        model_and_cache: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import trt_double

    double = trt_double.install(monkeypatch, "10.13.0.35")
    source, cache = model_and_cache
    out = build_artifact(source, "int8", "trt", mode="implicit", cache=cache, out_dir=tmp_path / "int8",
                         out_root=tmp_path / "engines")
    assert double.state.calibrator_calls == ["read_calibration_cache"]  # quant's ranges: TensorRT does not calibrate
    build = double.state.builds[-1]
    assert build["onnx_path"] == str(source) and "OBEY_PRECISION_CONSTRAINTS" in build["flags"]
    pinned = set(build["layers"])
    assert "relu_in" not in pinned and {"softmax", "ln_pow", "apply_mask"} <= pinned  # default vs rule nodes
    meta = json.loads((out / "meta.json").read_text())
    assert meta["trt"]["engine"] == str(out / "model.engine") and meta["trt"]["mode"] == "implicit"
    explicit = build_artifact(source, "int8", "trt", cache=cache, out_dir=tmp_path / "custom_dir",
                              out_root=tmp_path / "engines")
    built_from = Path(double.state.builds[-1]["onnx_path"])  # the Q/DQ ONNX of this build, in its temp folder
    assert built_from.name == "model_trt_qdq.onnx" and built_from.parent.name.startswith(".custom_dir.")
    assert json.loads((explicit / "meta.json").read_text())["trt"]["onnx"] == str(explicit / "model_trt_qdq.onnx")


def test_meta_records_every_file_and_verify_catches_a_change(model_and_cache: tuple[Path, Path], tmp_path: Path):
    from quant.artifacts.artifact import verify_artifact

    source, cache = model_and_cache
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"] == {name: sha256_file(out / name) for name in ("model.onnx", "model_trt_qdq.onnx", "plan.json")}
    assert verify_artifact(out) == meta
    (out / "model_trt_qdq.onnx").write_bytes((source).read_bytes())  # another model under a described name
    with pytest.raises(ModelError, match="model_trt_qdq.onnx differ from what meta.json records"):
        verify_artifact(out)
    (out / "model_trt_qdq.onnx").unlink()
    with pytest.raises(ModelError, match="model_trt_qdq.onnx differ"):
        verify_artifact(out)


def test_a_failed_build_leaves_the_previous_folder_whole(model_and_cache: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from quant.artifacts import artifact

    source, cache = model_and_cache
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "int8")
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    def trt_qdq_fails(*args: object) -> None:
        raise BuildError("Q/DQ failed on purpose")  # after model.onnx and its kernel report were written

    monkeypatch.setattr(artifact, "build_int8_trt_qdq", trt_qdq_fails)
    with pytest.raises(BuildError, match="on purpose"):
        build_artifact(source, "int8", cache=cache, out_dir=out, activation_uint8=False)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert artifact.verify_artifact(out)["ort_int8"]["activation_type"] == "uint8"
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]  # no temp folder left beside it


def test_build_refuses_to_replace_a_folder_of_other_files(model_and_cache: tuple[Path, Path], tmp_path: Path):
    source, _ = model_and_cache
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="notes.txt.*give a new or empty folder"):
        build_artifact(source, "fp32", out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    legacy = tmp_path / "fp32"  # what killed builds of older versions left: replaced with the folder
    (legacy / "tmpab_cd123").mkdir(parents=True)
    (legacy / ".model.onnx.k2j4h5g6.tmp.onnx").write_text("partial")
    out = build_artifact(source, "fp32", out_dir=legacy)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.onnx"]


def test_rules_off_leaves_shipped_rules_out_of_the_plan(model_and_cache: tuple[Path, Path], tmp_path: Path):
    """A spec graph's `rules_off` (measured on that model) removes shipped rules from its builds' plan, is recorded
    in meta.json and the cache key, and a name that is no rule is refused with the rule names."""
    source, cache = model_and_cache
    plain = json.loads((build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "a") / "meta.json").read_text())
    out = build_artifact(source, "int8", cache=cache, out_dir=tmp_path / "b", rules_off=("input-layer",))
    meta = json.loads((out / "meta.json").read_text())
    assert plain["plan"]["Conv"] == {"fp32 (input-layer)": 1, "int8 (int8-compute)": 2}
    assert meta["plan"]["Conv"] == {"int8 (int8-compute)": 3} and meta["plan_trt"]["Conv"] == {"int8 (int8-compute)": 3}
    assert meta["rules"]["off"] == ["input-layer"] and meta["cache_key"] != plain["cache_key"]
    with pytest.raises(BuildError, match=r"tiny: rules_off: \['no-such-rule'\] name no precision rule"):
        build_artifact(source, "int8", name="tiny", cache=cache, out_dir=tmp_path / "c", rules_off=("no-such-rule",))


# ---- dynamic INT8 Linear layers on ONNX Runtime ----------------------------------------------------------------------


def test_linear_matmuls_build_as_dynamic_int8_on_ort(tmp_path: Path):
    """The shipped rules make a MatMul by a constant weight dynamic INT8 on ORT: no calibrated range needed, no
    Q/DQ around it, an integer kernel in the built model."""
    from quant.artifacts.ort_build import build_int8_ort
    from quant.precision import load_rules, plan

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),  # linear1 is not the input layer
             helper.make_node("MatMul", ["s", "w1"], ["h"], name="linear1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="linear2")]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)))]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    int8_plan = plan(model, load_rules(), "int8", "ort")
    assert {d.node: d.precision for d in int8_plan.decisions if d.op_type == "MatMul"} == {
        "linear1": "int8-dynamic", "linear2": "int8-dynamic"}
    target = tmp_path / "model.onnx"
    facts = build_int8_ort(model, int8_plan, {}, target)
    assert facts["dynamic_nodes"] == 2 and facts["static_nodes"] == 0
    built = onnx.load(str(target))
    ops = [n.op_type for n in built.graph.node]
    assert ops.count("MatMulInteger") == 2 and "QuantizeLinear" not in ops
    x = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    assert snr_db(OrtRunner(model_path(model, tmp_path)).run(x)["y"], OrtRunner(target).run(x)["y"]) > 25


@pytest.mark.parametrize("forms", ["ds", "sd", "dsd"])
def test_static_and_dynamic_matmuls_can_share_an_input(forms: str, tmp_path: Path):
    """MatMuls reading one tensor, each static (s) or dynamic (d) INT8 by a rule: the build must not fail with a
    cycle (a dynamic MatMul before a static one in graph order did), no dynamic kernel or quantizer reads a
    DequantizeLinear output (a fake-quantized copy quantized again), and the output stays close to FP32."""
    from quant.artifacts.calibration import TensorRange
    from quant.artifacts.ort_build import build_int8_ort
    from quant.precision import Rule, plan

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu")]
    nodes += [helper.make_node("MatMul", ["t", f"w{i}"], [f"o{i}"], name=f"mm{i}") for i in range(len(forms))]
    nodes += [helper.make_node("Sum", [f"o{i}" for i in range(len(forms))], ["y"], name="sum")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}")
             for i in range(len(forms))]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    rules = [Rule(f"mm{i}", "int8" if form == "s" else "int8-dynamic", name_regex=f"^mm{i}$", builds=("int8",))
             for i, form in enumerate(forms)]
    x = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    values = {"t": np.maximum(x["x"], 0)}
    values |= {f"o{i}": values["t"] @ numpy_helper.to_array(w) for i, w in enumerate(inits)}
    ranges = {name: TensorRange(float(np.abs(v).max()), float(v.min()), float(v.max())) for name, v in values.items()}
    target = tmp_path / "model.onnx"
    facts = build_int8_ort(model, plan(model, rules, "int8", "ort"), ranges, target)
    assert (facts["static_nodes"], facts["dynamic_nodes"]) == (forms.count("s"), forms.count("d"))
    built = onnx.load(str(target))
    dequantized = {out for n in built.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    assert [n.op_type for n in built.graph.node].count("MatMulInteger") == forms.count("d")
    dynamic = [n for n in built.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")]
    assert not any(t in dequantized for n in dynamic for t in n.input)
    assert snr_db(OrtRunner(model_path(model, tmp_path)).run(x)["y"], OrtRunner(target).run(x)["y"]) > 25


def model_path(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "source.onnx"
    onnx.save(model, str(path))
    return path


# ---- data movement between integer ops ----------------------------------------------------------------------------


def test_a_slice_between_two_int8_convs_runs_on_the_integer_tensor(tmp_path: Path):
    """A rule making data movement INT8: the Slice between two QLinearConvs reads the first one's uint8 output in
    ONNX Runtime's optimized graph (no DequantizeLinear -> float Slice -> QuantizeLinear); with the shipped rules
    alone it does not (the Slice's own range gives it another scale, so ORT cannot drop the pair by itself)."""
    from quant.artifacts.calibration import TensorRange
    from quant.artifacts.ort_build import build_int8_ort
    from quant.backends.ort import optimized_graph
    from quant.precision import DATA_MOVEMENT_OPS, Rule, load_rules, plan

    data_movement = Rule(name="data-movement-int8", op_types=tuple(sorted(DATA_MOVEMENT_OPS)), precision="int8",
                         builds=("int8",))

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),  # conv1 is not the input layer
             helper.make_node("Conv", ["s", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["t"], name="crop"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[4:] *= 10  # the channels the Slice drops hold the largest values: its output gets a range of its own
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w2")]
    inits += [numpy_helper.from_array(np.array([v], np.int64), name)
              for name, v in (("starts", 0), ("ends", 4), ("axes", 1))]
    graph = helper.make_graph(nodes, "crop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = {"x": rng.standard_normal((1, 4, 6, 10)).astype(np.float32)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("s", "a", "t"))
    values = OrtRunner(model_path(probe, tmp_path)).run(x)
    ranges = {k: TensorRange(float(np.abs(v).max()), float(v.min()), float(v.max())) for k, v in values.items()}

    def slice_input_op(rules, label: str) -> str:
        (tmp_path / label).mkdir()
        target = tmp_path / label / "int8.onnx"
        build_int8_ort(model, plan(model, rules, "int8", "ort"), ranges, target)
        optimized = optimized_graph(target, tmp_path / label)
        producers = {out: n for n in optimized.graph.node for out in n.output}
        (crop,) = [n for n in optimized.graph.node if n.op_type == "Slice"]
        assert snr_db(values["y"], OrtRunner(target).run(x)["y"]) > 25
        return producers[crop.input[0]].op_type

    assert slice_input_op((*load_rules(), data_movement), "with") == "QLinearConv"
    assert slice_input_op(load_rules(), "without") == "DequantizeLinear"
