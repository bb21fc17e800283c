"""quant.tasks.check (`quant specs check`): a spec tried on one utterance; each mistake named by its spec table."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from quant import load_spec
from quant.cli import main
from quant.spec import SpecError
from quant.tasks.check import check_spec
from test_tasks_common import _spec

STREAMING = """[model]
name = "tiny-stream"
task = "se"

[[graphs]]
role = "masker"
path = "stream.onnx"
inputs = ["frame", "hidden"]
outputs = ["gain", "hidden_next"]

[frontend]
transform = "magnitude"
layout = "B T F"
{frontend}
[streaming]
frame_input = "frame"

[[streaming.states]]
input = "hidden"
output = "hidden_next"
shape = {state_shape}

[output]
name = "gain"
kind = "mask_magnitude"

[defaults]
calibration_manifest = "calib_data:se_calib"
test_manifest = "calib_data:se_test"
"""


def _streaming_spec(tmp_path: Path, state_shape: str = "[1, 4]", frontend: str = "") -> Path:
    """frame (1, 1, 257) -> Sigmoid -> gain; hidden (1, 4) -> Identity -> hidden_next."""
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["frame"], ["gain"]), helper.make_node("Identity", ["hidden"], ["hidden_next"])],
        "stream", [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 1, 257]),
                   helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1, 1, 257]),
         helper.make_tensor_value_info("hidden_next", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "stream.onnx"))
    (tmp_path / "stream.toml").write_text(STREAMING.format(state_shape=state_shape, frontend=frontend))
    return tmp_path / "stream.toml"


def _check(path: Path) -> list[str]:
    spec = load_spec(path)
    return check_spec(spec, {g.role: g.onnx_path() for g in spec.graphs}).lines()


def test_a_good_spec_runs_its_first_feed_and_one_test_utterance(tmp_path: Path) -> None:
    lines = _check(_streaming_spec(tmp_path))
    assert lines[0].endswith("tiny-stream (se), 1 graph(s): ok")
    assert "    first calibration feed ran: frame (1, 1, 257), hidden (1, 4)" in lines
    metrics = lines[-1].split(": ", 1)[1]
    assert [part.split()[0] for part in metrics.split(", ")] == ["pesq_wb", "pesq_nb", "stoi", "si_sdr"]


def test_a_state_shape_the_graph_refuses_names_the_streaming_table(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as raised:
        _check(_streaming_spec(tmp_path, state_shape="[1, 5]"))
    message = str(raised.value)
    assert message.startswith(str(tmp_path / "stream.toml")) and "input 'hidden'" in message
    assert "[[streaming.states]] shape gives (1, 5)" in message and "expects (1, 4)" in message


def test_features_the_graph_refuses_name_the_frontend_table(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as raised:  # 320-point frames: 161 bins where the graph takes 257
        _check(_streaming_spec(tmp_path, frontend="frame = 320\nhop = 160\n"))
    message = str(raised.value)
    assert message.startswith(str(tmp_path / "stream.toml")) and "input 'frame': [frontend]" in message
    assert "gives (1, 1, 161)" in message and "expects (1, 1, 257)" in message


def test_offline_features_are_checked_before_the_graph_runs(tmp_path: Path) -> None:
    spec = _spec(tmp_path, '["noisy_mag"]')
    spec.write_text(spec.read_text().replace('layout = "B T F"', 'layout = "B F T"'))
    with pytest.raises(SpecError, match=r"input 'noisy_mag': \[frontend\] \(transform, frame / n_fft, bins, layout\) "
                                        r"gives \(1, 257, \d+\), but .*tiny.onnx expects \(1, 'T', 257\)"):
        _check(spec)


def test_cli_check_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["specs", "check", str(_streaming_spec(tmp_path))]) == 0
    assert "1 graph(s): ok" in capsys.readouterr().out
    assert main(["specs", "check", str(_streaming_spec(tmp_path, state_shape="[1, 5]"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("quant specs: error: ")
    assert main(["specs", "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["dpcrn", "dpcrn-stream", "wenet"]
