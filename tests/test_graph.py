"""quant.onnxgraph.graph.load_model: the one reader of an ONNX file, whose every failure names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.errors import ModelError
from quant.onnxgraph.graph import load_model


def _save(path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="w.data",
              size_threshold=0)


def test_loads_with_or_without_external_weights(tmp_path: Path) -> None:
    _save(tmp_path / "m.onnx")
    assert numpy_helper.to_array(load_model(tmp_path / "m.onnx").graph.initializer[0]).sum() == 64 * 64
    light = load_model(tmp_path / "m.onnx", external_data=False).graph.initializer[0]
    assert light.data_location == TensorProto.EXTERNAL and not light.raw_data


@pytest.mark.parametrize("content", [None, b"not a protobuf \xff\xff"])
def test_a_missing_or_foreign_file_is_a_model_error_naming_it(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=f"^{path}: not a readable ONNX model"):
        load_model(path)
