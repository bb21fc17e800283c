import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quant.artifacts.wenet_export import check_onnx_file, export_wenet, verify_wenet
from quant.data.audio import load_audio
from quant.decoding import ctc_prefix_beam_search_topk, hyps_to_decoder_inputs
from quant.errors import ModelError
from quant.features import fbank, pad_features
from quant.models.conformer import Conformer, ConformerConfig, WenetDecoder, WenetEncoder, checkpoint_dict, load_conformer
from quant.models.tokenizer import CharTokenizer

DATA = Path(__file__).parent / "data"
INT32, INT64, FLOAT = onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wenet")
    paths = export_wenet(out, opset=17)
    assert [p.name for p in paths] == ["encoder.onnx", "decoder.onnx", "meta.json"]
    return out


def io_of(path: Path) -> dict[str, tuple[int, list[str | int]]]:
    graph = onnx.load(str(path)).graph
    values = list(graph.input) + list(graph.output)
    return {
        v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in values
    }


def test_encoder_io_names_dtypes_and_dynamic_axes(exported: Path) -> None:
    io = io_of(exported / "encoder.onnx")
    assert io["speech"] == (FLOAT, ["B", "T", 80])
    assert io["speech_lengths"] == (INT32, ["B"])
    assert io["encoder_out"] == (FLOAT, ["B", "T_OUT", 144])
    assert io["encoder_out_lens"] == (INT32, ["B"])
    assert io["ctc_log_probs"] == (FLOAT, ["B", "T_OUT", 30])
    assert io["beam_log_probs"] == (FLOAT, ["B", "T_OUT", 10])
    assert io["beam_log_probs_idx"] == (INT64, ["B", "T_OUT", 10])
    assert len(io) == 7


def test_decoder_io_names_dtypes_and_dynamic_axes(exported: Path) -> None:
    io = io_of(exported / "decoder.onnx")
    assert io["encoder_out"] == (FLOAT, ["B", "T_OUT", 144])
    assert io["encoder_out_lens"] == (INT32, ["B"])
    assert io["hyps_pad_sos_eos"] == (INT64, ["B", 10, "T2"])
    assert io["hyps_lens_sos"] == (INT32, ["B", 10])
    assert io["ctc_score"] == (FLOAT, ["B", 10])
    assert io["best_index"] == (INT64, ["B"])
    assert io["score"] == (FLOAT, ["B", 10])


def test_files_are_self_contained_at_the_asked_opset_and_meta_describes_them(exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["decoder.onnx", "encoder.onnx", "meta.json"]
    model = onnx.load(str(exported / "encoder.onnx"))
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into the depthwise Conv
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["model"] == "wenet" and meta["opset"] == 17
    assert meta["decoding"]["sos"] == meta["decoding"]["eos"] == 29 and meta["decoding"]["beam"] == 10
    assert meta["config"]["d_model"] == 144
    enc_inputs = meta["files"]["encoder.onnx"]["inputs"]
    assert [(i["name"], i["dtype"]) for i in enc_inputs] == [("speech", "float32"), ("speech_lengths", "int32")]
    assert len(meta["files"]["decoder.onnx"]["sha256"]) == 64


def test_ort_matches_pytorch_on_real_speech_with_a_new_batch_size(exported: Path) -> None:
    """B=2 and T not seen at export: encoder outputs within 1e-3, decoder scores within 1e-3 + 1e-3*|score|."""
    model = load_conformer()
    audios = [load_audio(DATA / n) for n in ("librivox_0930.flac", "librivox_0870.flac")]
    speech, lengths = pad_features([fbank(a) for a in audios])
    enc = ort.InferenceSession(str(exported / "encoder.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in enc.get_outputs()]
    out = dict(zip(names, enc.run(None, {"speech": speech, "speech_lengths": lengths})))
    with torch.no_grad():
        ref = WenetEncoder(model)(torch.from_numpy(speech), torch.from_numpy(lengths))
    assert np.abs(out["encoder_out"] - ref[0].numpy()).max() < 1e-3
    assert np.array_equal(out["encoder_out_lens"], ref[1].numpy())
    assert np.abs(out["ctc_log_probs"] - ref[2].numpy()).max() < 1e-3
    nbests = [
        ctc_prefix_beam_search_topk(out["beam_log_probs"][b], out["beam_log_probs_idx"][b], out["encoder_out_lens"][b])
        for b in range(2)
    ]
    feeds = {"encoder_out": out["encoder_out"], "encoder_out_lens": out["encoder_out_lens"],
             **hyps_to_decoder_inputs(nbests, 29).feeds()}
    dec = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    best, score = dec.run(["best_index", "score"], feeds)
    with torch.no_grad():
        ref_best, ref_score = WenetDecoder(model)(*[torch.from_numpy(feeds[k]) for k in feeds])
    assert np.allclose(score, ref_score.numpy(), atol=1e-3, rtol=1e-3)
    assert best.tolist() == ref_best.tolist()
    # WeNet pads with ignore_id (-1) instead of eos: same scores
    padded = feeds["hyps_pad_sos_eos"].copy()
    steps = np.arange(padded.shape[2])[None, None, :]
    padded[steps > feeds["hyps_lens_sos"][:, :, None]] = -1
    assert (padded == -1).any()
    _, score_ignore = dec.run(["best_index", "score"], {**feeds, "hyps_pad_sos_eos": padded})
    assert np.allclose(score_ignore, score, atol=1e-5)


def test_opset_13_decomposes_layer_norm(tmp_path: Path) -> None:
    torch.manual_seed(1)
    small = Conformer(ConformerConfig(encoder_blocks=2, decoder_blocks=1))
    weights = tmp_path / "small.pt"
    torch.save(checkpoint_dict(small, CharTokenizer().units), weights)
    export_wenet(tmp_path / "out", opset=13, weights=weights)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "encoder.onnx")).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops
    check_onnx_file(tmp_path / "out" / "decoder.onnx", 13)
    with pytest.raises(ModelError, match="opset 13, expected 17"):
        check_onnx_file(tmp_path / "out" / "decoder.onnx", 17)


def test_verification_fails_loudly_when_the_graph_differs(exported: Path) -> None:
    other = Conformer().eval()  # different random weights than the exported model
    torch.nn.init.constant_(other.ctc.bias, 3.0)
    audio = [load_audio(DATA / "librivox_0880.flac")]
    with pytest.raises(ModelError, match="encoder.onnx: output encoder_out at B=1 differs"):
        verify_wenet(other, exported / "encoder.onnx", exported / "decoder.onnx", audio)


def test_unsupported_opset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="opset 11"):
        export_wenet(tmp_path, opset=11)


def test_onnx_runtime_symbolic_shape_inference_handles_both_graphs(exported: Path) -> None:
    """quant_pre_process (ORT quantization) runs this; the encoder needs auto_merge (REFERENCE section 6)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    for name in ("encoder.onnx", "decoder.onnx"):
        inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(exported / name)), auto_merge=True)
        assert inferred is not None and len(inferred.graph.value_info) > 100
