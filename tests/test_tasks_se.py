"""quant.tasks.se: the same feeds and metrics as today's readers and evaluation for the shipped SE specs, and spec-only
behaviour (a two-graph chain, states named unrelated to their outputs, the .npz escape hatch) on tiny graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.backends import open_runner
from quant.calib.readers import AudioSet, OfflineSegmentReader, StreamingStateReader
from quant.data.manifest import load_noisy_clean, read_manifest
from quant.errors import ModelError
from quant.eval import se
from quant.paths import calib_data_dir
from quant.spec import load_spec
from quant.tasks import FeedOptions, task_for

SE_CALIB = str(calib_data_dir() / "se_calib" / "manifest.jsonl")
SE_TEST = str(calib_data_dir() / "se_test" / "manifest.jsonl")
F = 257


def assert_same_feeds(ours: Iterable[dict[str, np.ndarray]], theirs: Iterable[dict[str, np.ndarray]]) -> int:
    a, b = list(ours), list(theirs)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name
    return len(a)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quant.artifacts.export import export_model

    out = tmp_path_factory.mktemp("export")
    return {name: export_model(name, out / name)[0] for name in ("dpcrn", "dpcrn-stream")}


# ------------------------------------------------------------------------------------------------ shipped specs


@pytest.mark.slow  # exports the reference DPCRN graphs (~40 s on 2 cores, once per module)
def test_offline_feeds_equal_todays_reader(exported: dict[str, Path]) -> None:
    options = FeedOptions(limit=3, graphs={"enhancer": exported["dpcrn"]})
    ours = task_for(load_spec("dpcrn")).calibration_feeds("enhancer", SE_CALIB, options)
    theirs = OfflineSegmentReader(AudioSet.from_manifest(SE_CALIB, 3))  # the first wave's DPCRN reader
    assert assert_same_feeds(ours, theirs) >= 1
    assert assert_same_feeds(ours, theirs) >= 1  # re-iterable: a second pass gives the same feeds


@pytest.mark.slow  # exports the reference DPCRN graphs (~40 s on 2 cores, once per module)
def test_streaming_feeds_equal_todays_reader_on_noisy_mixtures(exported: dict[str, Path]) -> None:
    path = exported["dpcrn-stream"]
    ours = list(task_for(load_spec("dpcrn-stream")).calibration_feeds(
        "enhancer", SE_CALIB, FeedOptions(limit=1, graphs={"enhancer": path})))
    # today's dpcrn-stream reader already rolls the noisy mixtures (its generic streaming path does not)
    assert assert_same_feeds(ours, StreamingStateReader(path, AudioSet.from_manifest(SE_CALIB, 1), every=4)) > 10
    noisy, clean = load_noisy_clean(read_manifest(SE_CALIB)[0])
    first = ours[0]["mix"][0, :, 0, 0]  # DC bin of the first frame: the noisy mixture's, not the clean speech's
    from quant.features import stft

    assert np.array_equal(first, stft(noisy)[:, 0, 0]) and not np.array_equal(first, stft(clean)[:, 0, 0])


@pytest.mark.slow  # exports the reference DPCRN graphs (~40 s on 2 cores, once per module)
@pytest.mark.parametrize("name", ["dpcrn", "dpcrn-stream"])
def test_evaluate_equals_todays_evaluation(exported: dict[str, Path], name: str) -> None:
    runner = open_runner(exported[name])
    enhance = se.enhance_offline if name == "dpcrn" else se.enhance_streaming
    ours = task_for(load_spec(name)).evaluate({"enhancer": exported[name]}, SE_TEST, limit=2)
    theirs = se.evaluate_se(lambda audio: enhance(runner, audio), se.load_pairs(SE_TEST, 2))
    assert ours.per_utterance == theirs.per_utterance and ours.utterances == 2
    assert ours.per_utterance_columns() == theirs.per_utterance_columns()


@pytest.mark.slow  # exports the reference DPCRN graphs (~40 s on 2 cores, once per module)
def test_speed_workloads(exported: dict[str, Path]) -> None:
    offline = task_for(load_spec("dpcrn")).speed_workload(
        "enhancer", SE_TEST, FeedOptions(graphs={"enhancer": exported["dpcrn"]}))
    assert offline.feeds is not None and offline.feeds["mix"].shape == (1, F, 563, 2) and offline.audio_seconds == 9
    stream = task_for(load_spec("dpcrn-stream")).speed_workload(
        "enhancer", SE_TEST, FeedOptions(graphs={"enhancer": exported["dpcrn-stream"]}))
    assert stream.streaming and stream.frames[0].shape == (1, F, 1, 2) and len(stream.states or {}) == 14
    assert stream.audio_seconds == 256 / 16000


# ------------------------------------------------------------------------------------------------ tiny graphs


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def value(name: str, shape: list[int | str], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def tiny_manifest(tmp_path: Path, seconds: float = 0.5) -> Path:
    """The first utterance of se_test, cut short (recipe kept: the task mixes it again)."""
    import json

    line = json.loads(Path(SE_TEST).read_text().splitlines()[0])
    base = Path(SE_TEST).parent
    from quant.data.audio import load_audio, save_audio
    from quant.fileio import sha256_file

    speech = save_audio(tmp_path / "speech.wav", load_audio(base / line["path"])[: int(seconds * 16000)])
    noise = tmp_path / Path(line["noise"]).name  # manifest paths stay inside the manifest's folder
    noise.write_bytes((base / line["noise"]).read_bytes())
    line.update(path="speech.wav", sha256=sha256_file(speech), duration=seconds, noise=noise.name)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    return manifest


def test_two_graph_chain_feeds_stage_two_from_stage_one(tmp_path: Path) -> None:
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    save(helper.make_graph([helper.make_node("Mul", ["mag", "half"], ["coarse"])], "s1",
                           [value("mag", ["B", F, "T"])], [value("coarse", ["B", F, "T"])], [half]),
         tmp_path / "stage1.onnx")
    save(helper.make_graph([helper.make_node("Div", ["coarse_in", "mag2"], ["mask"])], "s2",
                           [value("coarse_in", ["B", F, "T"]), value("mag2", ["B", F, "T"])],
                           [value("mask", ["B", F, "T"])]), tmp_path / "stage2.onnx")
    (tmp_path / "chain.toml").write_text(f"""
[model]
name = "chain"
task = "se"
[[graphs]]
role = "stage1"
path = "stage1.onnx"
feeds = [{{ input = "mag", from = "frontend" }}]
[[graphs]]
role = "stage2"
path = "stage2.onnx"
feeds = [{{ input = "coarse_in", from = "stage1:coarse" }}, {{ input = "mag2", from = "frontend" }}]
[frontend]
transform = "magnitude"
frame = 512
hop = 128
window = "none"
[output]
name = "mask"
kind = "mask_magnitude"
[defaults]
calibration_manifest = "{tiny_manifest(tmp_path)}"
batch_size = 2
""")
    task = task_for(load_spec(tmp_path / "chain.toml"))
    (feed,) = list(task.calibration_feeds("stage2"))
    assert np.array_equal(feed["coarse_in"], feed["mag2"] * np.float32(0.5))
    assert feed["mag2"].shape[1] == F and feed["mag2"].min() >= 0
    # mask = 0.5 everywhere: the enhanced waveform is half the noisy one (rectangular frames, hop 128 reconstruct)
    noisy, _ = load_noisy_clean(read_manifest(tmp_path / "manifest.jsonl")[0])
    runners = task.runners({"stage1": tmp_path / "stage1.onnx", "stage2": tmp_path / "stage2.onnx"})
    enhanced = task.enhancer(runners)(noisy)
    np.testing.assert_allclose(enhanced, 0.5 * noisy, atol=1e-5)


def test_streaming_states_named_unrelated_to_their_outputs(tmp_path: Path) -> None:
    """A Keras-style export: state `h0` comes back as `tf_op_layer_stack_2` (no `_out` convention), starts at 0.5."""
    nodes = [helper.make_node("Identity", ["frame"], ["enh"]),
             helper.make_node("Add", ["h0", "frame"], ["tf_op_layer_stack_2"])]
    save(helper.make_graph(nodes, "acc", [value("frame", [1, F, 1]), value("h0", [1, F, 1])],
                           [value("enh", [1, F, 1]), value("tf_op_layer_stack_2", [1, F, 1])]), tmp_path / "acc.onnx")
    (tmp_path / "acc.toml").write_text(f"""
[model]
name = "acc"
task = "se"
[[graphs]]
role = "enhancer"
path = "acc.onnx"
inputs = ["frame", "h0"]
outputs = ["enh", "tf_op_layer_stack_2"]
[frontend]
transform = "magnitude"
frame = 512
hop = 256
window = "sqrt_hann"
[streaming]
frame_input = "frame"
[[streaming.states]]
input = "h0"
output = "tf_op_layer_stack_2"
init = 0.5
[output]
name = "enh"
kind = "spectrum"
[defaults]
calibration_manifest = "{tiny_manifest(tmp_path)}"
frame_stride = 1
""")
    task = task_for(load_spec(tmp_path / "acc.toml"))
    feeds = list(task.calibration_feeds("enhancer"))
    assert len(feeds) == 1 + 8000 // 256  # every frame of the 0.5 s mixture (frame_stride 1)
    frames = np.stack([f["frame"] for f in feeds])
    states = np.stack([f["h0"] for f in feeds])
    expected = np.float32(0.5) + np.concatenate([np.zeros_like(frames[:1]), np.cumsum(frames, axis=0)[:-1]])
    np.testing.assert_allclose(states, expected, rtol=1e-6)
    assert np.all(states[0] == 0.5)
    # a magnitude "spectrum" output with the noisy phase: the enhancer gives the noisy input back
    noisy, _ = load_noisy_clean(read_manifest(tmp_path / "manifest.jsonl")[0])
    enhanced = task.enhancer(task.runners({"enhancer": tmp_path / "acc.onnx"}))(noisy)
    np.testing.assert_allclose(enhanced, noisy, atol=1e-4)


def test_npz_escape_hatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "feeds.npz", x=np.arange(12, dtype=np.float32).reshape(3, 1, 4))
    (tmp_path / "hatch.toml").write_text("""
[model]
name = "hatch"
task = "se"
[[graphs]]
role = "enhancer"
path = "missing.onnx"
[feeds]
npz = "feeds.npz"
[output]
name = "y"
kind = "waveform"
""")
    task = task_for(load_spec(tmp_path / "hatch.toml"))
    feeds = list(task.calibration_feeds("enhancer", SE_CALIB, FeedOptions(limit=1)))
    assert [f["x"].tolist() for f in feeds] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 10, 11]]]


@pytest.mark.parametrize("content, expected", [
    (b"input,value\n1,2\n", "not a .npz archive of arrays"),  # text (numpy would try to unpickle it)
    (b"PK\x03\x04truncated", "not a .npz archive of arrays"),  # a zip cut short
    (None, "one .npy array, not a .npz archive of arrays named by input"),  # np.save'd under a .npz name
])
def test_npz_escape_hatch_refuses_a_file_that_is_no_npz_in_one_line(tmp_path: Path, content: bytes | None,
                                                                     expected: str) -> None:
    path = tmp_path / "feeds.npz"
    if content is None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3, dtype=np.float32))
    else:
        path.write_bytes(content)
    (tmp_path / "hatch.toml").write_text('[model]\nname = "hatch"\ntask = "se"\n[[graphs]]\nrole = "enhancer"\n'
                                         'path = "missing.onnx"\n[feeds]\nnpz = "feeds.npz"\n[output]\nname = "y"\n'
                                         'kind = "waveform"\n')
    task = task_for(load_spec(tmp_path / "hatch.toml"))
    with pytest.raises(ModelError) as raised:
        list(task.calibration_feeds("enhancer", SE_CALIB, FeedOptions(limit=1)))
    message = str(raised.value)
    assert message.startswith(f"{path}: {expected}") and "numpy.savez" in message and len(message.splitlines()) == 1
