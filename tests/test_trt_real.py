"""The TensorRT backend on a real TensorRT and a real NVIDIA GPU (skipped elsewhere, with the reason).

Run on a GPU machine after `pip install 'quant[trt]'`:  python -m pytest -m trt tests/test_trt_real.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trt_double import graphs


def _unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (pip install 'quant[trt]' on a machine with an NVIDIA GPU)"
    if not hasattr(tensorrt, "Builder"):
        return "only the tensorrt type stubs are installed, not TensorRT"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA GPU"
    except Exception as error:  # ImportError, or a CUDA driver error without a GPU
        return f"pycuda/CUDA not usable: {type(error).__name__}: {error}"
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.trt, pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _major() -> int:
    import tensorrt

    return int(str(tensorrt.__version__).split(".")[0])


def _feeds(count: int, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"zeta": rng.standard_normal((batch, 3)).astype(np.float32),
             "alpha": rng.standard_normal((batch, 3)).astype(np.float32)} for _ in range(count)]


class _MemoryCache:
    def __init__(self, data: bytes | None = None) -> None:
        self.data, self.writes = data, []

    def read(self) -> bytes | None:
        return self.data

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def test_fp32_engine_runs_by_name(tmp_path: Path) -> None:
    from quant.backends import trt as backend

    engine = backend.build_engine(graphs.two_input_model(tmp_path / "two.onnx"), tmp_path / "fp32")
    meta = json.loads(backend.meta_path_of(engine).read_text())
    assert meta["gpu_name"] and meta["compute_capability"]
    runner = backend.TrtRunner(engine)
    for feed in _feeds(2, batch=3):
        expected = graphs.reference_two_input(feed["zeta"], feed["alpha"])
        np.testing.assert_allclose(runner.run(feed)["y"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(REASON is None and _major() >= 11, reason="TensorRT 11 removed builder precision flags")
def test_fp16_with_fp32_layer(tmp_path: Path) -> None:
    from quant.backends import trt as backend

    engine = backend.build_engine(graphs.two_input_model(tmp_path / "two.onnx"), tmp_path / "fp16", "fp16",
                                  layer_precisions={"soft": "fp32"})
    feed = _feeds(1)[0]
    expected = graphs.reference_two_input(feed["zeta"], feed["alpha"])
    np.testing.assert_allclose(backend.TrtRunner(engine).run(feed)["y"], expected, atol=2e-3)


@pytest.mark.skipif(REASON is None and _major() >= 11, reason="TensorRT 11 removed implicit INT8 calibration")
def test_implicit_int8_calibrates_then_reuses_the_cache(tmp_path: Path) -> None:
    from quant.backends import trt as backend

    model = graphs.two_input_model(tmp_path / "two.onnx")
    cache = _MemoryCache()
    backend.build_engine(model, tmp_path / "a", "int8", feeds=_feeds(4), cache_io=cache)
    assert len(cache.writes) == 1 and cache.writes[0].startswith(b"TRT-")
    engine = backend.build_engine(model, tmp_path / "b", "int8", cache_io=_MemoryCache(cache.writes[0]))
    assert json.loads(backend.meta_path_of(engine).read_text())["calibration"]["cache_hit"] is True
    assert backend.TrtRunner(engine).run(_feeds(1)[0])["y"].shape == (4, 3)


def test_explicit_int8_from_qdq(tmp_path: Path) -> None:
    from quant.backends import trt as backend

    engine = backend.build_engine(graphs.qdq_model(tmp_path / "q.onnx"), tmp_path / "int8", "int8", "explicit")
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    expected = np.clip(np.round(x / 0.05), -128, 127) * 0.05 * 2
    np.testing.assert_allclose(backend.TrtRunner(engine).run({"x": x})["y"], expected, atol=1e-5)


def test_streaming_runner_keeps_states_on_the_gpu(tmp_path: Path) -> None:
    from quant.backends import trt as backend

    engine = backend.build_engine(graphs.streaming_model(tmp_path / "s.onnx"), tmp_path / "stream")
    runner = backend.runner_for(engine)
    state = np.zeros((1, 4), np.float32)
    for frame in np.random.default_rng(0).standard_normal((5, 1, 4)).astype(np.float32):
        np.testing.assert_allclose(runner.run({"frame": frame})["out"], frame + state, rtol=1e-5, atol=1e-6)
        state = 0.5 * state + frame
