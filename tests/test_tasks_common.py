"""quant.tasks.common: the graph file a spec names is checked against the names the spec declares for it."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from quant import load_spec
from quant.errors import ModelError
from quant.spec import SpecError
from quant.tasks.common import graph_file, io_names

SPEC = """[model]
name = "tiny"
task = "se"

[[graphs]]
role = "masker"
path = "tiny.onnx"
inputs = {inputs}
outputs = {outputs}

[frontend]
transform = "magnitude"
layout = "B T F"

[output]
name = "gain"
kind = "mask_magnitude"

[defaults]
calibration_manifest = "calib_data:se_calib"
test_manifest = "calib_data:se_test"
"""


def _tiny_graph(path: Path) -> None:
    """noisy_mag (1, T, 257) -> Sigmoid -> gain; a constant weight as initializer (not an input)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["noisy_mag", "w"], ["scaled"]), helper.make_node("Sigmoid", ["scaled"], ["gain"])],
        "tiny", [helper.make_tensor_value_info("noisy_mag", TensorProto.FLOAT, [1, "T", 257]),
                 helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1, "T", 257])], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _spec(tmp_path: Path, inputs: str, outputs: str = '["gain"]') -> Path:
    _tiny_graph(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.toml").write_text(SPEC.format(inputs=inputs, outputs=outputs))
    return tmp_path / "tiny.toml"


def test_io_names_leave_out_initializers(tmp_path: Path) -> None:
    _tiny_graph(tmp_path / "tiny.onnx")
    assert io_names(tmp_path / "tiny.onnx") == (("noisy_mag",), ("gain",))


def test_graph_file_accepts_the_declared_names(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, '["noisy_mag"]'))
    assert graph_file(spec, spec.graph("masker")) == tmp_path / "tiny.onnx"


@pytest.mark.parametrize("inputs, outputs, wrong", [('["noisy_spec"]', '["gain"]', "inputs ['noisy_spec']"),
                                                    ('["noisy_mag"]', '["gain", "state_out"]', "outputs ['state_out']")])
def test_graph_file_names_a_declared_tensor_the_file_lacks(tmp_path: Path, inputs: str, outputs: str,
                                                           wrong: str) -> None:
    spec = load_spec(_spec(tmp_path, inputs, outputs))
    with pytest.raises(SpecError) as raised:
        graph_file(spec, spec.graph("masker"))
    message = str(raised.value)
    assert str(tmp_path / "tiny.toml") in message and str(tmp_path / "tiny.onnx") in message
    assert wrong in message and "'masker'" in message and len(message.splitlines()) == 1


def test_a_file_that_is_no_onnx_model_is_named(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, '["noisy_mag"]'))
    (tmp_path / "tiny.onnx").write_text("not an ONNX model")
    with pytest.raises(ModelError, match=f"^{tmp_path / 'tiny.onnx'}: not a readable ONNX model"):
        graph_file(spec, spec.graph("masker"))


def test_io_names_reads_a_file_written_again(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    _tiny_graph(path)
    assert io_names(path)[0] == ("noisy_mag",)
    model = onnx.load(str(path))
    model.graph.input[0].name = model.graph.node[0].input[0] = "features"  # a re-export with another input name
    onnx.save(model, str(path))
    assert io_names(path)[0] == ("features",)
