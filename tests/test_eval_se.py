from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quant.data.audio import load_audio
from quant.errors import ModelError
from quant.eval import se
from quant.features import FREQ_BINS, SEGMENT_FRAMES, SEGMENT_SAMPLES

DATA = Path(__file__).parent / "data"


class SessionRunner:
    """Minimal ORT runner for the tests (the project's OrtRunner is tested by its own module)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))


def identity_mask_model(frames: str | int) -> onnx.ModelProto:
    """enh = mix * 1 (a unit real mask), dynamic batch."""
    shape: list[str | int] = ["B", FREQ_BINS, frames, 2]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["mix", "one"], ["enh"])],
        "identity_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)],
        [one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def delay_stream_model() -> onnx.ModelProto:
    """Streaming toy: enh = previous frame (state x), x_out = mix, count_out = count + 1."""
    frame = [1, FREQ_BINS, 1, 2]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["enh"]),
            helper.make_node("Identity", ["mix"], ["x_out"]),
            helper.make_node("Add", ["count", "one"], ["count_out"]),
        ],
        "delay",
        [
            helper.make_tensor_value_info("mix", TensorProto.FLOAT, frame),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, frame),
            helper.make_tensor_value_info("count", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("enh", TensorProto.FLOAT, frame),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, frame),
            helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [1]),
        ],
        [one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(DATA / "librivox_0880.flac")


def test_segment_pads_the_tail() -> None:
    audio = np.arange(SEGMENT_SAMPLES + 10, dtype=np.float32)
    segments = se.segment(audio)
    assert segments.shape == (2, SEGMENT_SAMPLES)
    assert np.array_equal(segments.reshape(-1)[: audio.size], audio)
    assert not segments[1, 10:].any()
    assert se.segment(np.zeros(0, np.float32)).shape == (1, SEGMENT_SAMPLES)


@pytest.mark.parametrize("max_batch", [None, 1])
def test_offline_identity_returns_the_input(speech: np.ndarray, max_batch: int | None) -> None:
    # 2 segments (one padded) so reassembly across segment borders is exercised
    audio = np.concatenate([speech, speech, speech, speech])[: SEGMENT_SAMPLES + 20000]
    runner = SessionRunner(identity_mask_model(SEGMENT_FRAMES))
    out = se.enhance_offline(runner, audio, max_batch=max_batch)
    assert out.shape == audio.shape
    assert np.max(np.abs(out - audio)) < 1e-4


def test_streaming_identity_matches_input(speech: np.ndarray) -> None:
    runner = SessionRunner(identity_mask_model(1))
    out = se.enhance_streaming(runner, speech[:16000], state_shapes={})
    assert out.shape == (16000,)
    assert np.max(np.abs(out - speech[:16000])) < 1e-4


def test_streaming_carries_states_by_name(speech: np.ndarray) -> None:
    runner = SessionRunner(delay_stream_model())
    assert se.state_names(runner) == ["x", "count"]
    audio = speech[:8000]
    spec = se.stft(audio)
    states = se.zero_states(runner, {"x": (1, FREQ_BINS, 1, 2), "count": (1,)})
    steps = list(se.stream_frames(runner, spec, states))
    assert len(steps) == spec.shape[1]
    # the counter state advanced once per frame, and enh is the previous frame
    assert [float(feeds["count"][0]) for feeds, _ in steps] == list(range(spec.shape[1]))
    assert np.array_equal(steps[5][1]["enh"][0, :, 0], spec[:, 4])
    assert not steps[0][1]["enh"].any()


def test_streaming_state_dtype_mismatch_is_an_error() -> None:
    class HalfStates(SessionRunner):
        def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().run(feeds)
            out["x_out"] = out["x_out"].astype(np.float16)
            return out

    runner = HalfStates(delay_stream_model())
    with pytest.raises(ModelError, match="x_out"):
        se.enhance_streaming(runner, np.ones(2000, np.float32), {"x": (1, FREQ_BINS, 1, 2), "count": (1,)})


def test_missing_state_output_is_an_error() -> None:
    class Broken:
        input_names = ["mix", "h"]
        output_names = ["enh"]

    with pytest.raises(ModelError, match="h"):
        se.state_names(Broken())  # type: ignore[arg-type]


def test_evaluate_se_scores_noisy_and_enhanced(speech: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = speech + 0.3 * np.std(speech) * rng.standard_normal(speech.size).astype(np.float32)
    # an "oracle" enhancer that halves the noise must beat the noisy input on every metric
    result = se.evaluate_se(lambda x: (x + speech) / 2, [("u1", noisy, speech)])
    assert result.utterances == 1
    assert result.enhanced.pesq_wb > result.noisy.pesq_wb
    assert result.enhanced.si_sdr == pytest.approx(result.noisy.si_sdr + 6.0, abs=0.2)
    assert result.to_dict()["pesq_wb"] == result.enhanced.pesq_wb


def test_per_utterance_columns_keep_every_utterance(speech: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    half = speech.size // 2
    pairs = [(name, clip + 0.3 * np.std(clip) * rng.standard_normal(clip.size).astype(np.float32), clip)
             for name, clip in (("u1", speech[:half]), ("u2", speech[half:]))]
    result = se.evaluate_se(lambda x: x, pairs)
    columns = result.per_utterance_columns()
    assert columns["ids"] == ["u1", "u2"]
    assert set(columns) == {"ids", "pesq_wb", "pesq_nb", "stoi", "si_sdr"}
    for key in ("pesq_wb", "pesq_nb", "stoi", "si_sdr"):
        assert len(columns[key]) == 2
        assert np.mean(columns[key]) == pytest.approx(getattr(result.enhanced, key))  # the row's mean, unrounded


def test_torch_streaming_matches_offline(speech: np.ndarray) -> None:
    from quant.backends.torch import torch_runner

    audio = speech[:12000]
    offline = se.enhance_offline(torch_runner("dpcrn"), audio)
    streaming = se.enhance_streaming(torch_runner("dpcrn_stream"), audio)
    assert streaming.shape == offline.shape == audio.shape
    assert np.max(np.abs(streaming - offline)) < 1e-4 * max(1.0, float(np.max(np.abs(offline))))


def test_torch_runner_takes_names_from_the_onnx_export(tmp_path: Path) -> None:
    from quant.backends import open_runner
    from quant.errors import BackendUnavailable

    path = tmp_path / "dpcrn.onnx"
    onnx.save(identity_mask_model(SEGMENT_FRAMES), str(path))
    runner = open_runner(path, "torch", threads=1)
    assert list(runner.input_names) == ["mix"] and list(runner.output_names) == ["enh"]
    spec = np.zeros((1, FREQ_BINS, SEGMENT_FRAMES, 2), np.float32)
    assert runner.run({"mix": spec})["enh"].shape == spec.shape
    with pytest.raises(ModelError, match="mix"):
        runner.run({"wrong": spec})
    with pytest.raises(ModelError, match="no PyTorch module"):
        open_runner(tmp_path / "other.onnx", "torch")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        open_runner(path, "tflite")
