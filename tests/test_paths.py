"""The output root is a parameter of every stage (`out_root`; the CLI's --output), never an environment variable."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quant.calib.calibrate import CalibrateOptions, calibrate
from quant.calib.ranges import RangeOptions
from quant.paths import DEFAULT_OUT_ROOT


def relu_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_the_cache_store_follows_out_root_and_ignores_quant_engines(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANT_ENGINES", str(tmp_path / "from_env"))  # the variable quant used to read
    monkeypatch.chdir(tmp_path)
    model = relu_model(tmp_path / "m.onnx")
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}]
    ranges = RangeOptions(progress=False)
    passed = calibrate(model, None, None, "minmax", None, CalibrateOptions(ranges=ranges, out_root=tmp_path / "out"),
                       feeds=feeds)
    default = calibrate(model, None, None, "minmax", None, CalibrateOptions(ranges=ranges), feeds=feeds)
    assert passed.path.parent == tmp_path / "out" / "cache"
    assert default.path.parent.resolve() == (tmp_path / DEFAULT_OUT_ROOT / "cache").resolve()
    assert not (tmp_path / "from_env").exists()
