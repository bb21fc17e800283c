"""quant.timing on tiny graphs: compared ONNX files timed interleaved with the load recorded (no wall-clock
values asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.errors import ModelError
from quant.timing import format_interleaved, time_interleaved, timing_feeds


def matmul_model(path: Path, width: int) -> Path:
    w = numpy_helper.from_array(np.ones((8, width), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_time_interleaved_reports_every_build_its_ratio_and_the_load(tmp_path: Path):
    models = {"fp32": matmul_model(tmp_path / "a.onnx", 16), "wide": matmul_model(tmp_path / "b.onnx", 64)}
    result = time_interleaved(models, {"x": np.ones((4, 8), np.float32)}, runs=5, warmup=1)
    assert {label: len(values) for label, values in result.seconds.items()} == {"fp32": 5, "wide": 5}
    assert result.load_before >= 0 or np.isnan(result.load_before)
    ratio = result.ratios("fp32")["wide"]
    assert ratio.paired_p10 <= ratio.paired_median <= ratio.paired_p90
    data = result.to_dict("fp32")
    assert set(data["latency_ms"]) == {"fp32", "wide"} and set(data["ratios"]) == {"wide"}  # type: ignore[arg-type]
    text = format_interleaved(result, "fp32")
    assert "(base)" in text and "load average" in text


def test_timing_feeds_names_the_models_it_knows(tmp_path: Path):
    with pytest.raises(ModelError, match="bench_int8.py"):
        timing_feeds("not-a-model", tmp_path / "x.onnx")
