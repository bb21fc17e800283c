"""ONNX export of DPCRN: structure checks at opsets 13 and 17, dynamic batch, streaming == offline in ORT, meta.json."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quant.artifacts import export
from quant.artifacts.export import GraphSpec, check_graph, export_model, run_stream, speech_spectra, verify_dpcrn_stream
from quant.backends.ort import make_session
from quant.errors import ModelError
from quant.fileio import sha256_file
from quant.models.dpcrn import DPCRN, STREAM_STATES, load_dpcrn

STREAM_ATOL = 1e-4  # issue 2: the streaming graph reproduces the offline model within 1e-4
ORT_ATOL = 1e-4  # ORT vs PyTorch on the offline graph (outputs of magnitude ~10..100)


@pytest.fixture(scope="module", params=[13, 17])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    opset = int(request.param)
    out_dir = tmp_path_factory.mktemp(f"opset{opset}")
    paths = export_model("dpcrn", out_dir, opset=opset) + export_model("dpcrn-stream", out_dir, opset=opset)
    assert paths == [out_dir / "dpcrn.onnx", out_dir / "dpcrn_stream.onnx"]
    return opset, out_dir


def test_export_is_one_file_per_graph_at_the_asked_opset(exported: tuple[int, Path]) -> None:
    opset, out_dir = exported
    assert sorted(p.name for p in out_dir.iterdir()) == ["dpcrn.onnx", "dpcrn_stream.onnx", "meta.json"]
    for name in ("dpcrn.onnx", "dpcrn_stream.onnx"):
        model = onnx.load(str(out_dir / name), load_external_data=False)
        assert export.onnx_opset(model) == opset
        assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def test_layer_norm_is_one_op_at_17_and_decomposed_at_13(exported: tuple[int, Path]) -> None:
    opset, out_dir = exported
    ops = [node.op_type for node in onnx.load(str(out_dir / "dpcrn.onnx")).graph.node]
    if opset == 17:
        assert ops.count("LayerNormalization") == 4
    else:
        assert "LayerNormalization" not in ops
        assert all(op in ops for op in ("ReduceMean", "Sub", "Pow", "Sqrt", "Div"))


def test_io_names_and_shapes(exported: tuple[int, Path]) -> None:
    _, out_dir = exported
    offline = onnx.load(str(out_dir / "dpcrn.onnx")).graph
    assert [v.name for v in offline.input] == ["mix"] and [v.name for v in offline.output] == ["enh"]
    dims = [d.dim_param or d.dim_value for d in offline.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 257, 563, 2]
    stream = onnx.load(str(out_dir / "dpcrn_stream.onnx")).graph
    inputs = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in stream.input}
    outputs = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in stream.output}
    assert inputs == {"mix": (1, 257, 1, 2), **dict(STREAM_STATES)}
    assert outputs == {"enh": (1, 257, 1, 2), **{f"{name}_out": shape for name, shape in STREAM_STATES}}


def test_recurrent_states_are_inputs_not_constants(exported: tuple[int, Path]) -> None:
    _, out_dir = exported
    graph = onnx.load(str(out_dir / "dpcrn_stream.onnx")).graph
    constants = {t.name for t in graph.initializer}
    lstm_states = [name for node in graph.node if node.op_type == "LSTM" for name in node.input[5:7] if name]
    assert {"rnn_cache1", "rnn_cache2", "rnn_cache3", "rnn_cache4"} <= set(lstm_states)
    assert not constants & set(lstm_states)


def test_dynamic_batch_matches_pytorch_on_real_speech(exported: tuple[int, Path]) -> None:
    _, out_dir = exported
    session = make_session(out_dir / "dpcrn.onnx")
    model = load_dpcrn()
    mix = speech_spectra(3, 563)
    batched = session.run(["enh"], {"mix": mix})[0]
    single = session.run(["enh"], {"mix": mix[2:3]})[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(mix)).numpy()
    assert batched.shape == (3, 257, 563, 2)
    assert np.abs(batched[2:3] - single).max() <= ORT_ATOL
    assert np.abs(batched - reference).max() <= ORT_ATOL


def test_streaming_graph_matches_offline_frame_by_frame(exported: tuple[int, Path]) -> None:
    """>= 5 s of real speech from zero states, in ORT, against both the PyTorch and the ORT offline model."""
    _, out_dir = exported
    frames = 5 * 16000 // 256 + 1
    mix = speech_spectra(1, frames)
    streamed = run_stream(make_session(out_dir / "dpcrn_stream.onnx"), mix)
    with torch.no_grad():
        reference = load_dpcrn()(torch.from_numpy(mix)).numpy()
    assert np.abs(streamed - reference).max() <= STREAM_ATOL
    padded = np.zeros((1, 257, 563, 2), dtype=np.float32)
    padded[:, :, :frames] = mix
    offline_ort = make_session(out_dir / "dpcrn.onnx").run(["enh"], {"mix": padded})[0][:, :, :frames]
    assert np.abs(streamed - offline_ort).max() <= STREAM_ATOL


def test_meta_json_describes_both_files(exported: tuple[int, Path]) -> None:
    opset, out_dir = exported
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["opset"] == opset and set(meta["files"]) == {"dpcrn.onnx", "dpcrn_stream.onnx"}
    for name, entry in meta["files"].items():
        assert entry["sha256"] == sha256_file(out_dir / name)
        assert entry["opset"] == opset
        assert entry["config"]["channels"] == [32, 32, 32, 64, 128]
    stream = meta["files"]["dpcrn_stream.onnx"]
    assert [io["name"] for io in stream["inputs"]] == ["mix", *(name for name, _ in STREAM_STATES)]
    assert stream["outputs"][6] == {"name": "rnn_cache1_out", "shape": [1, 33, 128], "dtype": "float32"}
    assert meta["files"]["dpcrn.onnx"]["inputs"][0]["shape"] == ["batch", 257, 563, 2]


def test_verification_fails_with_the_max_error_for_other_weights(exported: tuple[int, Path]) -> None:
    _, out_dir = exported
    torch.manual_seed(123)
    other = DPCRN().eval()
    with pytest.raises(ModelError, match=r"differs from PyTorch by max abs"):
        verify_dpcrn_stream(other, out_dir / "dpcrn_stream.onnx", "dpcrn_stream.onnx")


# ------------------------------------------------------------------------------ checks on tiny graphs


def _lstm_graph(opset: int, baked_state: bool) -> onnx.ModelProto:
    hidden = 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, hidden])
    weights = [
        numpy_helper.from_array(np.zeros((1, 4 * hidden, 3), np.float32), "W"),
        numpy_helper.from_array(np.zeros((1, 4 * hidden, hidden), np.float32), "R"),
    ]
    inputs = ["x", "W", "R", "", ""]
    graph_inputs = [x]
    if baked_state:
        weights += [numpy_helper.from_array(np.zeros((1, 1, hidden), np.float32), name) for name in "hc"]
        inputs += ["h", "c"]
    node = helper.make_node("LSTM", inputs, ["y"], name="lstm", hidden_size=hidden)
    graph = helper.make_graph([node], "tiny", graph_inputs, [y], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_check_graph_rejects_baked_lstm_states(tmp_path: Path) -> None:
    spec = GraphSpec(("x",), ("y",), {}, layer_norms=0)
    path = tmp_path / "baked.onnx"
    onnx.save(_lstm_graph(17, baked_state=True), str(path))
    with pytest.raises(ModelError, match="constant states"):
        check_graph(path, spec, 17, "baked.onnx")
    onnx.save(_lstm_graph(17, baked_state=False), str(path))
    check_graph(path, spec, 17, "clean.onnx")
    with pytest.raises(ModelError, match="do not feed any LSTM"):
        check_graph(path, GraphSpec(("x",), ("y",), {}, 0, state_inputs=("x",)), 17, "clean.onnx")


def test_check_graph_rejects_wrong_opset_names_and_layer_norm(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    onnx.save(_lstm_graph(13, baked_state=False), str(path))
    with pytest.raises(ModelError, match="exported at opset 13, but opset 17"):
        check_graph(path, GraphSpec(("x",), ("y",), {}, 0), 17, "g.onnx")
    with pytest.raises(ModelError, match="graph I/O"):
        check_graph(path, GraphSpec(("mix",), ("y",), {}, 0), 13, "g.onnx")
    with pytest.raises(ModelError, match="decomposed LayerNorm"):
        check_graph(path, GraphSpec(("x",), ("y",), {}, layer_norms=4), 13, "g.onnx")


def test_check_graph_rejects_external_data(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(_lstm_graph(17, False), str(path), save_as_external_data=True, size_threshold=0, location="ext.onnx.data")
    with pytest.raises(ModelError, match="self-contained"):
        check_graph(path, GraphSpec(("x",), ("y",), {}, 0), 17, "ext.onnx")


# ------------------------------------------------------------------------------ dispatch and CLI


def test_unknown_model_and_opset_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model"):
        export_model("resnet", tmp_path)
    with pytest.raises(ModelError, match="opset 11"):
        export_model("dpcrn", tmp_path, opset=11)


def test_wenet_is_dispatched_to_wenet_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_export(out_dir: Path, opset: int, weights: Path | None) -> list[Path]:
        calls.append((out_dir, opset, weights))
        return [out_dir / "encoder.onnx", out_dir / "decoder.onnx"]

    monkeypatch.setitem(sys.modules, "quant.artifacts.wenet_export", types.SimpleNamespace(export_wenet=fake_export))
    paths = export_model("wenet", tmp_path, opset=13, weights=tmp_path / "w.pt")
    assert calls == [(tmp_path, 13, tmp_path / "w.pt")]
    assert paths == [tmp_path / "encoder.onnx", tmp_path / "decoder.onnx"]


def test_cli_parses_and_calls_export_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quant.cli import export as cli_export

    parser = argparse.ArgumentParser()
    cli_export.register(parser.add_subparsers(dest="command"))
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake_export(*args: object, **kwargs: object) -> list[Path]:
        calls.append((args, kwargs))
        return []

    monkeypatch.setattr(export, "export_model", fake_export)
    args = parser.parse_args(["export", "dpcrn-stream", "-o", str(tmp_path), "--opset", "13"])
    assert args.handler(args) == 0
    assert calls == [(("dpcrn-stream", tmp_path), {"opset": 13, "weights": None})]
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "dpcrn", "-o", str(tmp_path), "--opset", "12"])
