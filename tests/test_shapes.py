"""Best-effort shape inference (quant.onnxgraph.shapes): types where inference knows them, None and a log line where
it fails, and nothing written into the working directory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from quant.onnxgraph.shapes import infer_shapes


def _model(first_op: str = "Relu", domain: str = "") -> object:
    """x -> first_op -> h -> Relu -> y with no value_info for h (an op of a custom domain nothing can infer)."""
    nodes = [helper.make_node(first_op, ["x"], ["h"], domain=domain), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def _types(model: object) -> dict[str, int]:
    graph = model.graph  # type: ignore[attr-defined]
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}


@pytest.mark.parametrize("symbolic", [False, True])
def test_infers_the_intermediate_type(symbolic: bool) -> None:
    model = _model()
    inferred = infer_shapes(model, symbolic=symbolic)  # type: ignore[arg-type]
    assert inferred is not None and _types(inferred)["h"] == TensorProto.FLOAT
    assert "h" not in _types(model)  # the caller's model is left as it was


def test_symbolic_failure_is_none_and_writes_nothing_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ONNX Runtime's own infer_shapes saves sym_shape_infer_temp.onnx into the working directory when a custom op
    stops it."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="quant.onnxgraph.shapes"):
        assert infer_shapes(_model("Foo", "custom.domain"), symbolic=True) is None  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] and "probe" in caplog.text


def test_a_failure_with_a_consequence_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("Foo", "custom.domain")
    with caplog.at_level(logging.DEBUG, logger="quant.onnxgraph.shapes"):
        assert infer_shapes(model, symbolic=True, consequence="tensors stay untyped") is None  # type: ignore[arg-type]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage().endswith("; tensors stay untyped")
