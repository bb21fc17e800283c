"""Best-effort shape inference: ONNX's own, or ONNX Runtime's symbolic inference (which follows the computed Reshape
shapes of a torch export where ONNX's stops). Callers read types and static dims from the result where inference
knows them and work without them elsewhere, so a failure is logged and answered with None, never raised."""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto, symbolic: bool = False, guess_output_rank: bool = False,
                 consequence: str | None = None) -> onnx.ModelProto | None:
    """A copy of `model` with the value_info shape inference found, or None where it failed. `symbolic` runs ONNX
    Runtime's symbolic inference with auto_merge (`guess_output_rank`: give unknown ops their first input's rank).
    A failure is a warning saying `consequence` when the caller names one (the user loses something), else a
    debug line."""
    try:
        return _symbolic(model, guess_output_rank) if symbolic else onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # noqa: BLE001 - both inferences fail with anything (asserts, KeyErrors) on graphs they do not know
        kind = "symbolic shape inference" if symbolic else "ONNX shape inference"
        if consequence:
            log.warning("%s failed on graph %r (%s); %s", kind, model.graph.name, error, consequence)
        else:
            log.debug("%s failed on graph %r: %s", kind, model.graph.name, error)
        return None


def _symbolic(model: onnx.ModelProto, guess_output_rank: bool) -> onnx.ModelProto:
    """SymbolicShapeInference.infer_shapes without its side effect: where inference is incomplete it saves the model
    as sym_shape_infer_temp.onnx (with a uuid-named data file) in the working directory and raises. These are its
    steps minus that save; tests/test_shapes.py pins them to the installed ONNX Runtime."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

    if (get_opset(model) or 0) < 7:
        raise ValueError("it needs a graph of opset 7 or above")
    inference = SymbolicShapeInference(2**31 - 1, True, guess_output_rank, 0)  # int_max, auto_merge, ..., verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise ValueError("incomplete: some tensors got no shape")
    result: onnx.ModelProto = inference.out_mp_
    return result
