"""Calibration feed sources on short real speech (tests/data) and tiny ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant import features
from quant.calib.readers import (
    AudioSet, DecoderNbestReader, FbankBatchReader, GenericReader, OfflineSegmentReader, OrtCalibrationDataReader,
    ReaderOptions, StreamingStateReader, TrtFeedSource, reader_for, segments,
)
from quant.data.audio import load_audio
from quant.errors import CalibrationError, ModelError

DATA = Path(__file__).parent / "data"
CLIPS = sorted(DATA.glob("librivox_*.flac"))
SPEC = [1, features.FREQ_BINS, 1, 2]


def short_audio(seconds: float = 0.1, count: int = 2) -> AudioSet:
    """The first `seconds` of real clips (fast enough for frame-by-frame rolls)."""
    keep = int(seconds * features.SAMPLE_RATE)
    return AudioSet(tuple(CLIPS[:count]), lambda path: load_audio(path)[:keep], name="short")


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def accumulator_model(path: Path, state_out: str = "acc_out") -> Path:
    """enh = mix; next state = state + mix: the recorded state is the running sum of the utterance's frames."""
    nodes = [helper.make_node("Identity", ["mix"], ["enh"]), helper.make_node("Add", ["acc", "mix"], [state_out])]
    graph = helper.make_graph(
        nodes, "acc",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, SPEC),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, SPEC)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, SPEC),
         helper.make_tensor_value_info(state_out, TensorProto.FLOAT, SPEC)],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def test_segments_zero_pad_the_tail():
    audio = np.ones(features.SEGMENT_SAMPLES + 10, dtype=np.float32)
    parts = segments(audio)
    assert len(parts) == 2 and all(p.shape == (features.SEGMENT_SAMPLES,) for p in parts)
    assert parts[1][:10].sum() == 10 and not parts[1][10:].any()
    assert len(segments(np.ones(features.SEGMENT_SAMPLES, np.float32))) == 1
    assert len(segments(np.ones(5, np.float32))) == 1


def test_offline_segments_batches_and_reiterates():
    reader = OfflineSegmentReader(AudioSet.from_files(CLIPS[:3]), batch_size=2)
    first = list(reader)
    assert [f["mix"].shape for f in first] == [(2, 257, features.SEGMENT_FRAMES, 2), (1, 257, features.SEGMENT_FRAMES, 2)]
    second = list(reader)
    assert all(np.array_equal(a["mix"], b["mix"]) for a, b in zip(first, second))
    clip = load_audio(CLIPS[0])
    padded = np.zeros(features.SEGMENT_SAMPLES, np.float32)
    padded[: len(clip)] = clip
    np.testing.assert_allclose(first[0]["mix"][0], features.stft(padded), atol=1e-5)
    assert not first[0]["mix"][0, :, -5:].any()  # the zero-padded tail is there, as at inference


def test_streaming_records_real_states_and_resets(tmp_path: Path):
    audio = short_audio()
    feeds = list(StreamingStateReader(accumulator_model(tmp_path / "s.onnx"), audio))
    frames = features.frames_for(int(0.1 * features.SAMPLE_RATE))
    assert len(feeds) == 2 * frames
    for start in (0, frames):
        assert not feeds[start]["acc"].any()  # each utterance starts from zero states
        running = np.zeros(SPEC, np.float32)
        for t in range(frames):
            np.testing.assert_allclose(feeds[start + t]["acc"], running, rtol=1e-5, atol=1e-6)
            running = running + feeds[start + t]["mix"]
    assert feeds[3]["acc"].any()  # recorded states are not zeros


def test_streaming_every_kth_frame_and_explicit_mapping(tmp_path: Path):
    path = accumulator_model(tmp_path / "s.onnx", state_out="next_acc")
    with pytest.raises(ModelError, match="state inputs"):
        list(StreamingStateReader(path, short_audio(count=1)))
    all_frames = list(StreamingStateReader(path, short_audio(count=1), states=(("acc", "next_acc"),)))
    sparse = list(StreamingStateReader(path, short_audio(count=1), states=(("acc", "next_acc"),), every=3))
    assert len(sparse) == -(-len(all_frames) // 3)
    np.testing.assert_array_equal(sparse[1]["acc"], all_frames[3]["acc"])


def test_fbank_batches():
    feeds = list(FbankBatchReader(AudioSet.from_files(CLIPS[:3]), batch_size=2))
    assert len(feeds) == 2
    speech, lengths = feeds[0]["speech"], feeds[0]["speech_lengths"]
    assert speech.shape[0] == 2 and speech.shape[2] == 80 and lengths.dtype == np.int32
    assert speech.shape[1] == lengths.max()
    short = int(np.argmin(lengths))
    assert not speech[short, lengths[short]:].any()


def tiny_encoder(path: Path, vocab: int = 6) -> Path:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["speech", "w_ctc"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["ctc_log_probs"], axis=-1),
        helper.make_node("MatMul", ["speech", "w_enc"], ["encoder_out"]),
        helper.make_node("Identity", ["speech_lengths"], ["encoder_out_lens"]),
    ]
    graph = helper.make_graph(
        nodes, "enc",
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["B", "T", 80]),
         helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info("encoder_out", TensorProto.FLOAT, ["B", "T", 4]),
         helper.make_tensor_value_info("encoder_out_lens", TensorProto.INT32, ["B"]),
         helper.make_tensor_value_info("ctc_log_probs", TensorProto.FLOAT, ["B", "T", vocab])],
        [numpy_helper.from_array((rng.standard_normal((80, vocab)) * 0.05).astype(np.float32), "w_ctc"),
         numpy_helper.from_array(rng.standard_normal((80, 4)).astype(np.float32), "w_enc")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def test_decoder_nbest_layout(tmp_path: Path):
    names = ("encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score")
    audio = short_audio(seconds=0.5, count=3)
    feeds = list(DecoderNbestReader(tiny_encoder(tmp_path / "encoder.onnx"), names, audio, batch_size=2, beam=4))
    assert [f["hyps_pad_sos_eos"].shape[:2] for f in feeds] == [(2, 4), (1, 4)]
    first = feeds[0]
    assert tuple(first) == names
    assert first["hyps_pad_sos_eos"].dtype == np.int64 and first["hyps_lens_sos"].dtype == np.int32
    assert (first["hyps_pad_sos_eos"][:, :, 0] == 5).all()  # sos = last vocabulary id
    assert first["ctc_score"].dtype == np.float32 and np.isfinite(first["ctc_score"]).all()
    with pytest.raises(ModelError, match="r_hyps"):
        next(iter(DecoderNbestReader(tmp_path / "encoder.onnx", names + ("r_hyps_pad_sos_eos",), audio)))


@pytest.mark.parametrize("feature,shape", [("waveform", (2, 1600)), ("fbank", (2, 8, 80)),
                                           ("stft", (2, 257, 7, 2))])
def test_generic_features(feature: str, shape: tuple[int, ...]):
    reader = GenericReader(short_audio(seconds=0.1), "input", feature, batch_size=2, length_name="lengths")
    (feed,) = list(reader)
    assert feed["input"].shape == shape and feed["input"].dtype == np.float32
    assert feed["lengths"].dtype == np.int32 and feed["lengths"].max() == shape[1 if feature != "stft" else 2]
    with pytest.raises(CalibrationError, match="feature"):
        GenericReader(short_audio(), "input", "mfcc")


def test_ort_reader_protocol_drives_quantize_static(tmp_path: Path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 1600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
        [numpy_helper.from_array(rng.standard_normal((1600, 8)).astype(np.float32), "w")],
    )
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "m.onnx")
    reader = OrtCalibrationDataReader(GenericReader(short_audio(), "input", "waveform"))
    assert reader.get_next() is not None and reader.get_next() is not None and reader.get_next() is None
    reader.rewind()
    quantize_static(path, tmp_path / "q.onnx", reader, quant_format=QuantFormat.QDQ)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops


def test_trt_feed_source_regroups_batches():
    feeds = [{"a": np.full((3, 2), i, np.float32), "b": np.full((3,), i, np.int32)} for i in range(3)]
    batches = list(TrtFeedSource(feeds, ("b", "a"), batch_size=4).batches())
    assert len(batches) == 2  # 9 rows -> two batches of 4, one row dropped
    assert [x.shape for x in batches[0]] == [(4,), (4, 2)]
    np.testing.assert_array_equal(batches[1][0], [1, 1, 2, 2])
    assert all(x.flags["C_CONTIGUOUS"] for batch in batches for x in batch)
    as_feeds = list(TrtFeedSource(feeds, ("b", "a"), batch_size=4))
    assert [list(f) for f in as_feeds] == [["b", "a"], ["b", "a"]]
    np.testing.assert_array_equal(as_feeds[1]["a"], batches[1][1])
    with pytest.raises(CalibrationError, match="lacks"):
        list(TrtFeedSource(feeds, ("c",), 1).batches())


def test_reader_for_generic_choices(tmp_path: Path):
    path = accumulator_model(tmp_path / "third_party.onnx", state_out="next_acc")
    with pytest.raises(CalibrationError, match="feature"):
        reader_for(path, DATA / "librivox.jsonl")
    pytest.importorskip("quant.data.manifest")
    mapped = reader_for(path, DATA / "librivox.jsonl", ReaderOptions(states=(("acc", "next_acc"),)))
    assert isinstance(mapped, StreamingStateReader)
    generic = reader_for(path, DATA / "librivox.jsonl", ReaderOptions(feature="stft", input_name="mix"))
    assert isinstance(generic, GenericReader)


def test_generic_stft_pads_and_cuts_to_a_fixed_time():
    audio = short_audio(seconds=0.1)  # 7 frames per clip
    padded = next(iter(GenericReader(audio, "mix", "stft", batch_size=2, length_name="n", time_steps=10)))
    assert padded["mix"].shape == (2, 257, 10, 2) and padded["n"].tolist() == [7, 7]
    assert np.abs(padded["mix"][:, :, :7]).max() > 0 and not padded["mix"][:, :, 7:].any()
    free = next(iter(GenericReader(audio, "mix", "stft", batch_size=2)))
    cut = next(iter(GenericReader(audio, "mix", "stft", batch_size=2, length_name="n", time_steps=5)))
    assert cut["mix"].shape == (2, 257, 5, 2) and cut["n"].tolist() == [5, 5]
    np.testing.assert_array_equal(cut["mix"], free["mix"][:, :, :5])


def fixed_time_model(path: Path, frames: int = features.SEGMENT_FRAMES) -> Path:
    """A third-party offline SE-like model whose single input has a fixed T (like the offline DPCRN's 563)."""
    shape = ["B", features.FREQ_BINS, frames, 2]
    nodes = [helper.make_node("Mul", ["mix", "gain"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["enh"])]
    graph = helper.make_graph(nodes, "fixed_t", [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "gain")])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def test_reader_for_generic_stft_fits_the_models_fixed_time(tmp_path: Path):
    pytest.importorskip("quant.data.manifest")
    path = fixed_time_model(tmp_path / "offline_se.onnx")
    source = reader_for(path, DATA / "librivox.jsonl", ReaderOptions(feature="stft", limit=2))
    feed = next(iter(source))  # no input name: the model's only input
    assert list(feed) == ["mix"] and feed["mix"].shape[2] == features.SEGMENT_FRAMES
    with pytest.raises(CalibrationError, match="rank"):
        next(iter(reader_for(path, DATA / "librivox.jsonl", ReaderOptions(feature="fbank", limit=1))))


def test_calibrate_cli_on_a_fixed_time_stft_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("quant.data.manifest")
    from quant.calib.cache import read_entry
    from quant.cli import main

    monkeypatch.chdir(tmp_path)  # the CLI's default output root (./engines) lands under tmp_path
    path = fixed_time_model(tmp_path / "offline_se.onnx")
    code = main(["calibrate", str(path), "--feature", "stft", "--method", "minmax", "--limit", "2",
                 "--data", str(DATA / "librivox.jsonl"), "-o", str(tmp_path / "se.cache"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    entry = read_entry(tmp_path / "se.cache")
    assert entry.ranges["mix"].amax > 0 and entry.ranges["enh"].amax > 0


# ------------------------------------------------------------------------------------------------ model input


def se_manifest(folder: Path) -> Path:
    """A one-line speech-enhancement manifest: real speech + real 'noise' (another reader's clip) at 0 dB."""
    import json
    import shutil

    from quant.fileio import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("librivox_0880.flac", "librivox_0890.flac"):
        shutil.copy(DATA / name, folder / name)
    row = {"path": "librivox_0880.flac", "duration": 2.99, "sha256": sha256_file(folder / "librivox_0880.flac"),
           "source": "librivox", "license": "public domain", "text": None, "noise": "librivox_0890.flac",
           "noise_sha256": sha256_file(folder / "librivox_0890.flac"), "snr_db": 0.0, "noise_offset": 0}
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    return folder / "manifest.jsonl"


def noisy_and_clean(manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    from quant.data.manifest import load_noisy_clean, read_manifest

    return load_noisy_clean(read_manifest(manifest)[0])


def test_streaming_reader_feeds_the_noisy_mixture_of_an_se_manifest(tmp_path: Path):
    manifest = se_manifest(tmp_path / "set")
    noisy, clean = noisy_and_clean(manifest)
    source = reader_for(accumulator_model(tmp_path / "s.onnx"), manifest, ReaderOptions(every=1))
    assert isinstance(source, StreamingStateReader)
    first = next(iter(source))["mix"]
    np.testing.assert_allclose(first, features.stft(noisy)[None, :, :1], atol=1e-5)
    assert not np.allclose(first, features.stft(clean)[None, :, :1], atol=1e-3)


@pytest.mark.parametrize("kind,options", [("generic", ReaderOptions(feature="stft", input_name="mix")),
                                          ("generic", ReaderOptions(feature="waveform", input_name="mix")),
                                          ("offline", ReaderOptions())])
def test_every_reader_feeds_the_noisy_mixture_of_an_se_manifest(tmp_path: Path, kind: str, options: ReaderOptions):
    manifest = se_manifest(tmp_path / "set")
    noisy, clean = noisy_and_clean(manifest)
    frames = features.frames_for(len(noisy))
    if options.feature == "waveform":
        graph = helper.make_graph([helper.make_node("Identity", ["mix"], ["y"])], "w",
                                  [helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["B", "S"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S"])])
        model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                     tmp_path / "w.onnx")
        expected, wrong = noisy[None], clean[None]
    else:
        model = fixed_time_model(tmp_path / "m.onnx")
        expected, wrong = features.stft(noisy)[None], features.stft(clean)[None]
    source = (OfflineSegmentReader(AudioSet.from_manifest(manifest)) if kind == "offline"
              else reader_for(model, manifest, options))
    feed = next(iter(source))["mix"]
    cut = feed[..., :frames, :] if feed.ndim == 4 else feed
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    assert not np.allclose(cut, wrong, atol=1e-3)


def test_asr_readers_feed_the_model_input_too(tmp_path: Path):
    manifest = se_manifest(tmp_path / "set")
    noisy, _clean = noisy_and_clean(manifest)
    feed = next(iter(FbankBatchReader(AudioSet.from_manifest(manifest))))
    np.testing.assert_allclose(feed["speech"][0], features.fbank(noisy), atol=1e-4)


def test_reader_key_settings_differ_exactly_when_feeds_differ(tmp_path: Path):
    manifest = se_manifest(tmp_path / "set")
    stream = accumulator_model(tmp_path / "s.onnx")
    fixed = fixed_time_model(tmp_path / "f.onnx")
    audio = AudioSet.from_manifest(manifest)
    sources = {
        "offline": OfflineSegmentReader(audio),
        "offline b2": OfflineSegmentReader(audio, batch_size=2),
        "stream": reader_for(stream, manifest),
        "stream every 2": reader_for(stream, manifest, ReaderOptions(every=2)),
        "stream mapped": reader_for(stream, manifest, ReaderOptions(states=(("acc", "acc_out"),))),
        "fbank": FbankBatchReader(audio),
        "generic stft": reader_for(fixed, manifest, ReaderOptions(feature="stft")),
        "generic stft b2": reader_for(fixed, manifest, ReaderOptions(feature="stft", batch_size=2)),
        "generic stft T": GenericReader(audio, "mix", "stft", batch_size=4),
        "generic fbank": GenericReader(audio, "mix", "fbank", batch_size=4),
        "other audio": OfflineSegmentReader(AudioSet.from_files([DATA / "librivox_0880.flac"])),
    }
    settings = {name: repr(sorted(source.key_settings().items())) for name, source in sources.items()}
    assert len(set(settings.values())) == len(settings)
    again = reader_for(fixed, manifest, ReaderOptions(feature="stft"))
    assert again.key_settings() == sources["generic stft"].key_settings()
    assert sources["offline"].key_settings()["audio"] == {"signal": "model-input", "utterances": 1}


def test_calibrate_cli_refuses_bad_manifests_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    import json

    from quant.cli import main

    monkeypatch.chdir(tmp_path)  # the CLI's default output root (./engines) lands under tmp_path
    model = fixed_time_model(tmp_path / "offline_se.onnx")
    manifest = se_manifest(tmp_path / "set")
    row = json.loads(manifest.read_text())
    args = ["calibrate", str(model), "--feature", "stft", "--method", "minmax", "--no-progress"]

    def run(rows: list[dict], *extra: str) -> tuple[int, str]:
        bad = tmp_path / "set" / "bad.jsonl"
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows).replace('"snr_db": "NaN"', '"snr_db": NaN'))
        code = main(args + ["--data", str(bad), "-o", str(tmp_path / f"{len(extra)}.cache"), *extra])
        return code, capsys.readouterr().err

    code, err = run([row, dict(row, snr_db="NaN")])
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:2: field 'snr_db' must be a finite number" in err
    outside = dict(row, path="../set/librivox_0880.flac")
    code, err = run([outside])
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:1: path '../set/librivox_0880.flac' leads outside" in err
    code, err = run([outside], "--allow-outside-paths")
    assert code == 0, err
