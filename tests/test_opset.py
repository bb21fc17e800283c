"""Graphs below opset 13 (quant.calib.opset): upgraded with ONNX's version converter and checked against the original
before calibration and the INT8 build, which then quantize the upgraded graph per channel; per-tensor Q/DQ when the
upgrade fails; an invalid INT8 model is never renamed into place (quant.artifacts.ort_build.save_validated)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant import features
from quant.artifacts.ort_build import save_validated
from quant.artifacts.qdq import insert_qdq, sort_topologically
from quant.backends.ort import OrtRunner
from quant.calib import opset as opset_mod
from quant.cli import main
from quant.errors import BuildError
from quant.fileio import sha256_file
from quant.precision import QdqSite

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "librivox.jsonl"


def torch_se_model(path: Path) -> Path:
    """Conv -> GRU -> Linear -> sigmoid mask on an STFT (B, 257, T, 2), exported by TorchScript at opset 11 (the
    usual export of published speech-enhancement models)."""
    torch = pytest.importorskip("torch")

    class MaskNet(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, (5, 1), stride=(4, 1))
            self.gru = torch.nn.GRU(256, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 257)

        def forward(self, mix: torch.Tensor) -> torch.Tensor:
            batch, _, frames, _ = mix.shape
            hidden = torch.relu(self.conv(mix.permute(0, 3, 1, 2))).reshape(batch, 256, frames).transpose(1, 2)
            hidden, _ = self.gru(hidden)
            return mix * torch.sigmoid(self.fc(hidden)).transpose(1, 2).unsqueeze(-1)

    torch.manual_seed(0)
    torch.onnx.export(MaskNet().eval(), (torch.randn(1, 257, 20, 2),), str(path), dynamo=False, opset_version=11,
                      input_names=["mix"], output_names=["enh"],
                      dynamic_axes={"mix": {0: "B", 2: "T"}, "enh": {0: "B", 2: "T"}})
    assert opset_mod.default_opset(onnx.load(str(path))) == 11
    return path


def helper_waveform_model(path: Path) -> Path:
    """wav (B, N) -> Unsqueeze(axes attribute: opset < 13) -> Conv (input layer, kept float) -> Relu -> Conv (4
    channels) -> Relu -> Conv -> Squeeze, opset 11."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Unsqueeze", ["wav"], ["wav3"], name="unsqueeze", axes=[1]),
        helper.make_node("Conv", ["wav3", "w0", "b0"], ["c0"], name="conv0", strides=[4]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Squeeze", ["c2"], ["out"], name="squeeze", axes=[1]),
    ]
    inits = [numpy_helper.from_array(rng.normal(scale=0.5, size=shape).astype(np.float32), name)
             for name, shape in (("w0", (4, 1, 8)), ("b0", (4,)), ("w1", (4, 4, 3)), ("b1", (4,)),
                                 ("w2", (1, 4, 1)), ("b2", (1,)))]
    graph = helper.make_graph(nodes, "wave11", [helper.make_tensor_value_info("wav", TensorProto.FLOAT, ["B", "N"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "T"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def calibrate_and_build(model: Path, feature: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """`quant calibrate` on two real utterances, then `quant build --precision int8 --cache`; the artifact folder."""
    cache, out = tmp_path / f"{model.stem}.cache", tmp_path / "int8"
    code = main(["calibrate", str(model), "--feature", feature, "--method", "minmax", "--limit", "2",
                 "--data", str(MANIFEST), "-o", str(cache), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    code = main(["build", str(model), "--precision", "int8", "--cache", str(cache), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    return out


def per_channel_weight_dq(model: onnx.ModelProto) -> list[str]:
    """DequantizeLinear nodes of weights with one scale per channel."""
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in scales
            and scales[n.input[1]].size > 1]


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - test) ** 2), 1e-30)))


def speech(seconds: float = 2.0) -> np.ndarray:
    from quant.data.audio import load_audio

    return load_audio(DATA / "librivox_0880.flac")[: int(seconds * features.SAMPLE_RATE)][None]


@pytest.fixture(autouse=True)
def engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI's default output root (./engines) lands under tmp_path


def test_opset11_torch_export_builds_a_valid_per_channel_int8_close_to_fp32(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("quant.data.manifest")
    model = torch_se_model(tmp_path / "se.onnx")
    out = calibrate_and_build(model, "stft", tmp_path, capsys)
    upgraded = tmp_path / "se.opset13.onnx"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["opset_upgrade"]["path"] == str(upgraded) and meta["opset_upgrade"]["fallback"] is None
    assert meta["ort_int8"]["per_channel"] and meta["trt_qdq"]["per_channel"]
    # the cache key names the upgraded graph, which was checked on the calibration feeds
    sidecar = json.loads((tmp_path / "se.cache.json").read_text())
    assert json.dumps(sidecar).count(sha256_file(upgraded)) >= 1
    assert sha256_file(model) not in json.dumps(sidecar)
    record = json.loads(upgraded.with_suffix(".json").read_text())
    assert record["check_inputs"] == opset_mod.CALIBRATION_FEEDS and record["max_abs_error"] <= 1e-4
    for name in ("model.onnx", "model_trt_qdq.onnx"):
        built = onnx.load(str(out / name))
        onnx.checker.check_model(built)
        assert opset_mod.default_opset(built) == 13, name
    # TensorRT's Q/DQ model: the Linear's weight per channel; ONNX Runtime runs that Linear as dynamic INT8 (rule
    # linear-dynamic-ort: an integer kernel, no weight DequantizeLinear)
    assert per_channel_weight_dq(onnx.load(str(out / "model_trt_qdq.onnx")))
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    feed = {"mix": features.stft(speech()).astype(np.float32)}
    want = OrtRunner(model).run(feed)["enh"]
    got = OrtRunner(out / "model.onnx").run(feed)["enh"]
    assert snr_db(want, got) > 20.0


def test_opset11_helper_graph_builds_per_channel_and_reuses_its_upgrade(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("quant.data.manifest")
    model = helper_waveform_model(tmp_path / "wave.onnx")
    out = calibrate_and_build(model, "waveform", tmp_path, capsys)
    built = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(built)
    assert opset_mod.default_opset(built) == 13 and per_channel_weight_dq(built)
    feed = {"wav": speech()}
    want = OrtRunner(model).run(feed)["out"]
    assert snr_db(want, OrtRunner(out / "model.onnx").run(feed)["out"]) > 20.0
    # a second build reuses the recorded upgrade: the converter is not called again
    monkeypatch.setattr(opset_mod.version_converter, "convert_version", _failing_converter)
    result = opset_mod.ensure_opset(model)
    assert result.upgraded and result.check_inputs == opset_mod.CALIBRATION_FEEDS
    # ... until the source changes: then it is made again (and here fails, so per tensor)
    helper_waveform_model(model)
    onnx.save(_with_weight(onnx.load(str(model)), "b2", np.array([0.25], np.float32)), str(model))
    assert not opset_mod.ensure_opset(model).upgraded


def _failing_converter(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    raise RuntimeError("No adapter for op FancyOp")


def _with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for init in changed.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return changed


def test_failed_conversion_falls_back_to_per_tensor_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("quant.data.manifest")
    monkeypatch.setattr(opset_mod.version_converter, "convert_version", _failing_converter)
    model = helper_waveform_model(tmp_path / "wave.onnx")
    with caplog.at_level(logging.WARNING, logger="quant.calib.opset"):
        out = calibrate_and_build(model, "waveform", tmp_path, capsys)
    assert "per-tensor" in caplog.text and "FancyOp" in caplog.text
    assert not (tmp_path / "wave.opset13.onnx").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert "FancyOp" in meta["opset_upgrade"]["fallback"] and not meta["ort_int8"]["per_channel"]
    for name in ("model.onnx", "model_trt_qdq.onnx"):
        built = onnx.load(str(out / name))
        onnx.checker.check_model(built)
        assert opset_mod.default_opset(built) == 11 and not per_channel_weight_dq(built), name
        assert any(n.op_type == "DequantizeLinear" for n in built.graph.node)
    feed = {"wav": speech()}
    assert snr_db(OrtRunner(model).run(feed)["out"], OrtRunner(out / "model.onnx").run(feed)["out"]) > 15.0


def test_an_upgrade_that_changes_the_outputs_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    model = helper_waveform_model(tmp_path / "wave.onnx")
    convert = opset_mod.version_converter.convert_version

    def wrong_converter(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
        return _with_weight(convert(proto, opset), "b2", np.array([3.0], np.float32))

    monkeypatch.setattr(opset_mod.version_converter, "convert_version", wrong_converter)
    with caplog.at_level(logging.WARNING, logger="quant.calib.opset"):
        result = opset_mod.ensure_opset(model)
    assert result.path == model and not result.per_channel and "differs from the original" in str(result.fallback)
    assert opset_mod.RANDOM_INPUTS in str(result.fallback) and "per-tensor" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wave.onnx"]  # no upgrade, no temp file left


def test_an_upgrade_checked_on_random_inputs_is_checked_again_on_real_feeds(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = helper_waveform_model(tmp_path / "wave.onnx")
    first = opset_mod.ensure_opset(model)
    assert first.upgraded and first.check_inputs == opset_mod.RANDOM_INPUTS
    feeds = [{"wav": speech(0.5)}]
    again = opset_mod.ensure_opset(model, feeds=feeds)
    assert again.path == first.path and again.check_inputs == opset_mod.CALIBRATION_FEEDS
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["check_inputs"] == opset_mod.CALIBRATION_FEEDS
    # a copy that fails on real inputs is not used, and its record goes: no later build reuses it
    opset_mod._write_record(first, sha256_file(model))
    monkeypatch.setattr(opset_mod, "RELATIVE_TOLERANCE", -1.0)
    assert not opset_mod.ensure_opset(model, feeds=feeds).upgraded
    assert not first.path.with_suffix(".json").exists()


def test_a_check_onnx_runtime_cannot_run_falls_back_instead_of_raising(tmp_path: Path) -> None:
    """Random inputs of the declared shapes that the graph rejects (it reshapes N samples to 5): per tensor."""
    shape = numpy_helper.from_array(np.array([1, 5], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [shape])
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), str(path))
    result = opset_mod.ensure_opset(path)
    assert result.path == path and "could not run the check" in str(result.fallback)
    assert opset_mod.ensure_opset(path, feeds=[{"x": np.ones((1, 5), np.float32)}]).upgraded


def test_graphs_at_opset_13_or_above_are_used_as_they_are(tmp_path: Path) -> None:
    model = helper_waveform_model(tmp_path / "wave.onnx")
    upgraded = opset_mod.ensure_opset(model)
    assert opset_mod.ensure_opset(upgraded.path) == opset_mod.UpgradeResult(upgraded.path, upgraded.path, 13, 13)


def test_an_invalid_int8_model_is_never_left_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The build as it was before the upgrade (per-channel Q/DQ on the opset-11 graph) must fail with one line, and
    leave neither model.onnx nor a temp file behind."""
    pytest.importorskip("quant.data.manifest")
    from quant.artifacts import artifact

    model = helper_waveform_model(tmp_path / "wave.onnx")
    cache = tmp_path / "wave.cache"
    def no_upgrade(path: Path, *_: object) -> opset_mod.UpgradeResult:
        return opset_mod.UpgradeResult(Path(path), Path(path), 13, 13)  # claims per-channel is fine at opset 11

    monkeypatch.setattr(opset_mod, "ensure_opset", no_upgrade)
    monkeypatch.setattr(artifact, "ensure_opset", no_upgrade)
    assert main(["calibrate", str(model), "--feature", "waveform", "--method", "minmax", "--limit", "1",
                 "--data", str(MANIFEST), "-o", str(cache), "--no-progress"]) == 0
    code = main(["build", str(model), "--precision", "int8", "--cache", str(cache), "-o", str(tmp_path / "int8")])
    error = capsys.readouterr().err
    assert code == 2 and "model.onnx" in error and "axis" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "int8").exists()  # a build folder is produced whole or not at all
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".int8.")]  # nor a temp sibling left behind


def test_save_validated_refuses_an_invalid_model_and_keeps_the_previous_one(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((2, 3), np.int8), "w_q")
    scale = numpy_helper.from_array(np.full(2, 0.1, np.float32), "w_scale")
    node = helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["y"], axis=0)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [weight, scale])
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    with pytest.raises(BuildError, match=r"model\.onnx.*invalid.*axis"):
        save_validated(bad, target)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    good = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    save_validated(good, target)
    assert onnx.load(str(target)) == good


def test_insert_qdq_per_tensor_below_opset_13_and_refuses_per_channel_there(tmp_path: Path) -> None:
    model = onnx.load(str(helper_waveform_model(tmp_path / "wave.onnx")))
    sites = [QdqSite("wav3", ("conv1",), False, None), QdqSite("w1", ("conv1",), True, 0)]
    with pytest.raises(BuildError, match="opset >= 13"):
        insert_qdq(model, sites, {"wav3": 1.0})
    quantized = insert_qdq(model, sites, {"wav3": 1.0}, per_channel=False)
    onnx.checker.check_model(quantized)
    assert not per_channel_weight_dq(quantized)
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    scale = numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == "w1_qdq_scale"))
    assert scale.shape == () and scale == pytest.approx(np.abs(w1).max() / 127)


def test_sort_topologically_keeps_valid_order_and_moves_appended_nodes() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Neg", ["b"], ["y"], name="reads_late"),
             helper.make_node("Abs", ["x"], ["c"], name="independent"),
             helper.make_node("Relu", ["a"], ["b"], name="appended")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    sort_topologically(graph)
    assert [n.name for n in graph.node] == ["first", "independent", "appended", "reads_late"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    graph.node[0].input[0] = "y"  # first <- reads_late <- appended <- first
    with pytest.raises(BuildError, match="cycle"):
        sort_topologically(graph)


def test_random_check_inputs_follow_the_declared_shapes() -> None:
    class Spec:
        def __init__(self, name: str, kind: str, shape: list[object]) -> None:
            self.name, self.type, self.shape = name, kind, shape

    class Session:
        def get_inputs(self) -> list[Spec]:
            return [Spec("x", "tensor(float)", ["B", 257, "T", 2]), Spec("n", "tensor(int32)", ["B"]),
                    Spec("s", "tensor(float)", [None, "T"])]

    feed = opset_mod.random_inputs(Session())
    assert feed["x"].shape == (1, 257, opset_mod.RANDOM_DIM, 2) and feed["x"].dtype == np.float32
    assert feed["n"].tolist() == [1] and feed["s"].shape == (1, opset_mod.RANDOM_DIM)
    assert np.array_equal(feed["x"], opset_mod.random_inputs(Session())["x"])  # deterministic
