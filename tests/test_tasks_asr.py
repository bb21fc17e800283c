"""quant.tasks.asr: the same feeds and metrics as today's WeNet readers and evaluation, and U2++ behaviour (sos/eos = 2,
reversed hyps, reverse-weight rescoring, BPE units) on tiny graphs and fake runners."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.backends import open_runner
from quant.backends.ort import OrtRunner
from quant.calib.readers import AudioSet, DecoderNbestReader, FbankBatchReader
from quant.eval import asr
from quant.fileio import sha256_file
from quant.models.tokenizer import CharTokenizer, UnitsTokenizer
from quant.paths import calib_data_dir
from quant.spec import load_spec
from quant.tasks import FeedOptions, task_for
from quant.tasks.se import representative

ASR_CALIB = str(calib_data_dir() / "asr_calib" / "manifest.jsonl")
ASR_TEST = str(calib_data_dir() / "asr_test" / "manifest.jsonl")
DATA = Path(__file__).parent / "data"
UNITS = ["<blank>", "<unk>", "<sos/eos>", "▁he", "llo", "▁world"]  # sos = eos = 2, BPE pieces


@pytest.fixture(scope="module")
def wenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quant.artifacts.export import export_model

    encoder, decoder = export_model("wenet", tmp_path_factory.mktemp("wenet"))[:2]
    return {"encoder": encoder, "decoder": decoder}


@pytest.mark.slow  # exports the reference conformer (~30 s on 2 cores, once per module)
@pytest.mark.parametrize("role,name", [("encoder", "wenet-encoder"), ("decoder", "wenet-decoder")])
def test_feeds_equal_todays_readers(wenet: dict[str, Path], role: str, name: str) -> None:
    ours = list(task_for(load_spec("wenet")).calibration_feeds(role, ASR_CALIB, FeedOptions(limit=5, graphs=wenet)))
    audio = AudioSet.from_manifest(ASR_CALIB, 5)  # the first wave's WeNet readers
    first_wave = (FbankBatchReader(audio) if role == "encoder" else
                  DecoderNbestReader(wenet["encoder"], tuple(OrtRunner(wenet["decoder"]).input_names), audio))
    theirs = list(first_wave)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert sorted(a) == sorted(b)
        assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_equals_todays_evaluation(wenet: dict[str, Path]) -> None:
    ours = task_for(load_spec("wenet")).evaluate(wenet, ASR_TEST, limit=3)
    theirs = asr.evaluate_asr(open_runner(wenet["encoder"]), open_runner(wenet["decoder"]),
                              asr.load_samples(ASR_TEST, 3))
    assert ours == theirs and ours.overall.utterances == 3
    assert ours.per_utterance_columns() == theirs.per_utterance_columns()


@pytest.mark.slow
def test_speed_workloads(wenet: dict[str, Path]) -> None:
    task = task_for(load_spec("wenet"))
    encoder = task.speed_workload("encoder", ASR_TEST, FeedOptions(graphs=wenet))
    decoder = task.speed_workload("decoder", ASR_TEST, FeedOptions(graphs=wenet))
    assert encoder.feeds is not None and encoder.feeds["speech"].shape[0] == 1 and encoder.sweep_batches
    assert decoder.feeds is not None and decoder.feeds["hyps_pad_sos_eos"].shape[:2] == (1, 10)


@pytest.mark.slow
def test_test_selection_feeds_equal_the_old_rescoring_feeds(wenet: dict[str, Path]) -> None:
    """The pipeline's error-vs-FP32 decoder feeds: the utterances evaluation scores (3 of asr_test, balanced over
    sources) laid out exactly as quant.eval.asr.rescoring_feeds did."""
    options = FeedOptions(limit=3, batch_size=3, graphs=wenet, selection="test")
    ours = next(iter(task_for(load_spec("wenet")).calibration_feeds("decoder", ASR_TEST, options)))
    samples = asr.load_samples(ASR_TEST, 3)
    assert len({asr.source_group(s.source) for s in samples}) > 1  # a subset the first 3 utterances are not
    encoded = open_runner(wenet["encoder"]).run(asr.encoder_feeds([s.audio for s in samples]))
    theirs = asr.rescoring_feeds(encoded, asr.prefix_beam_search(encoded), CharTokenizer().sos_eos)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_speed_workload_is_the_median_of_the_real_audio_lengths(wenet: dict[str, Path]) -> None:
    """As the old pipeline: the utterance nearest the median real audio length among those evaluation scores."""
    samples = asr.load_samples(ASR_TEST, 6)
    seconds = [s.audio.size / 16000 for s in samples]
    expected = seconds[representative(seconds)]
    load = task_for(load_spec("wenet")).speed_workload("encoder", ASR_TEST,
                                                       FeedOptions(limit=6, graphs=wenet, selection="test"))
    assert load.audio_seconds == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ U2++ / BPE


def test_units_tokenizer_decodes_bpe_and_matches_the_char_tokenizer() -> None:
    tokenizer = UnitsTokenizer(UNITS, blank=0, sos=2, eos=2)
    assert tokenizer.decode([3, 4, 5, 1, 2, 0]) == "hello world"
    chars = CharTokenizer()
    ids = chars.encode("don't stop") + [0, chars.sos_eos]
    assert UnitsTokenizer(chars.units).decode(ids) == chars.decode(ids) == "don't stop"
    assert UnitsTokenizer(["<blank>", "你", "好", "<sos/eos>"]).decode([1, 2, 3]) == "你好"


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_u2pp(tmp_path: Path, reverse_weight: float) -> Path:
    """A U2++-style spec: an fbank encoder (a projection + log-softmax over the 6 BPE units) and a decoder taking
    r_hyps_pad_sos_eos; a units.txt with sos/eos = 2 (not the last id)."""
    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((80, 6)).astype(np.float32), "w")
    encoder = helper.make_graph(
        [helper.make_node("MatMul", ["speech", "w"], ["logits"]),
         helper.make_node("LogSoftmax", ["logits"], ["ctc_log_probs"], axis=-1),
         helper.make_node("Identity", ["speech"], ["encoder_out"]),
         helper.make_node("Identity", ["speech_lengths"], ["encoder_out_lens"])], "enc",
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["B", "T", 80]),
         helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in [
            ("ctc_log_probs", TensorProto.FLOAT, ["B", "T", 6]), ("encoder_out", TensorProto.FLOAT, ["B", "T", 80]),
            ("encoder_out_lens", TensorProto.INT32, ["B"])]], [weights])
    save(encoder, tmp_path / "encoder.onnx")
    names = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "r_hyps_pad_sos_eos", "ctc_score"]
    types = [TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.INT32, TensorProto.INT64,
             TensorProto.FLOAT]
    shapes: list[list[int | str]] = [["B", "T", 80], ["B"], ["B", 3, "L"], ["B", 3], ["B", 3, "L"], ["B", 3]]
    decoder = helper.make_graph(
        [helper.make_node("Identity", ["ctc_score"], ["score"])], "dec",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(names, types, shapes)],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 3])])
    save(decoder, tmp_path / "decoder.onnx")
    (tmp_path / "units.txt").write_text("".join(f"{u} {i}\n" for i, u in enumerate(UNITS)))
    clip = DATA / sorted(p.name for p in DATA.glob("librivox_*.flac"))[0]
    (tmp_path / clip.name).write_bytes(clip.read_bytes())  # manifest paths stay inside the manifest's folder
    line = {"path": clip.name, "duration": 1.0, "sha256": sha256_file(clip), "source": "librivox", "license": "PD",
            "text": "hello world"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    spec = tmp_path / "u2pp.toml"
    spec.write_text(f"""
[model]
name = "u2pp"
task = "asr"
[[graphs]]
role = "encoder"
path = "encoder.onnx"
feeds = [{{ input = "speech", from = "frontend" }}, {{ input = "speech_lengths", from = "frontend:lengths" }}]
[[graphs]]
role = "decoder"
path = "decoder.onnx"
[frontend]
transform = "fbank"
[task]
units = "units.txt"
sos = 2
eos = 2
beam = 3
ctc_weight = 0.0
reverse_weight = {reverse_weight}
[defaults]
calibration_manifest = "manifest.jsonl"
test_manifest = "manifest.jsonl"
""")
    return spec


def test_u2pp_decoder_feeds_have_reversed_hyps_and_the_specs_sos_eos(tmp_path: Path) -> None:
    task = task_for(load_spec(tiny_u2pp(tmp_path, 0.3)))
    (feed,) = list(task.calibration_feeds("decoder"))
    hyps, reverse, lengths = feed["hyps_pad_sos_eos"], feed["r_hyps_pad_sos_eos"], feed["hyps_lens_sos"]
    assert hyps.shape == reverse.shape and hyps.shape[:2] == (1, 3)
    assert np.all(hyps[..., 0] == 2) and np.all(reverse[..., 0] == 2)
    for k in range(3):
        n = int(lengths[0, k]) - 1
        assert n > 0 and hyps[0, k, n + 1] == 2 and np.all(hyps[0, k, n + 1:] == 2)  # eos, then eos padding
        assert hyps[0, k, 1 : n + 1].tolist()[::-1] == reverse[0, k, 1 : n + 1].tolist()
        assert not np.isin(hyps[0, k, 1 : n + 1], [0, 2]).any()  # no blank or sos/eos inside a hypothesis


class SpellingEncoder:
    """CTC log-probs whose n-best is `▁he llo ▁world` first, then `▁he llo`, then others."""

    input_names = ["speech", "speech_lengths"]
    output_names = ["encoder_out", "encoder_out_lens", "ctc_log_probs"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        path = [3, 0, 4, 0, 5, 0]
        log_probs = np.full((1, len(path), 6), np.log(0.02), np.float32)
        for t, token in enumerate(path):
            log_probs[0, t, token] = np.log(0.9)
        log_probs[0, 4, 5], log_probs[0, 4, 0] = np.log(0.47), np.log(0.45)  # `▁world` nearly lost to a blank
        return {"encoder_out": np.zeros((1, 6, 4), np.float32), "encoder_out_lens": np.array([6], np.int32),
                "ctc_log_probs": log_probs}


class BidirectionalDecoder:
    """Token log-probs: left-to-right likes `hello` (2 tokens), right-to-left likes `hello world` (3 tokens)."""

    input_names = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "r_hyps_pad_sos_eos",
                   "ctc_score"]
    output_names = ["decoder_out", "r_decoder_out"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        hyps, lengths = feeds["hyps_pad_sos_eos"], feeds["hyps_lens_sos"]
        assert np.all(hyps[..., 0] == 2) and "r_hyps_pad_sos_eos" in feeds
        out = np.zeros((*hyps.shape[:2], hyps.shape[2] - 1, 6), np.float32)
        r_out = out.copy()
        for k in range(hyps.shape[1]):
            words = int(lengths[0, k]) - 1
            out[0, k, 0, :] = 0.0 if words == 2 else -5.0
            r_out[0, k, 0, :] = 0.0 if words == 3 else -5.0
        return {"decoder_out": out, "r_decoder_out": r_out}


@pytest.mark.parametrize("reverse_weight,expected", [(0.0, "hello"), (0.9, "hello world")])
def test_u2pp_rescoring_weighs_both_directions(tmp_path: Path, reverse_weight: float, expected: str) -> None:
    task = task_for(load_spec(tiny_u2pp(tmp_path, reverse_weight)))
    (transcript,) = task.transcribe(SpellingEncoder(), BidirectionalDecoder(), [np.zeros(16000, np.float32)])
    assert transcript.greedy == "hello world" and transcript.rescored == expected


def test_u2pp_evaluate_scores_without_english_normalization(tmp_path: Path) -> None:
    task = task_for(load_spec(tiny_u2pp(tmp_path, 0.0)))
    result = task.evaluate({"encoder": SpellingEncoder(), "decoder": BidirectionalDecoder()})
    assert result.transcripts[0][2].rescored == "hello"
    assert result.overall.wer == 0.5 and result.overall.wer_greedy == 0.0
