"""A strict test double of TensorRT and pycuda, installed into sys.modules for one test.

    double = trt_double.install(monkeypatch, version="10.13.0.35")
    double.trt      # the fake `tensorrt` module
    double.state    # what the fake TensorRT saw (builds, calibrator calls, batches, errors)
    double.device   # the fake GPU: memory, copy counters, name and compute capability

Nothing here talks to a GPU; execute_async_v3 runs the ONNX with onnxruntime on the fake device buffers.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

from .fake_pycuda import DeviceState, FakeCudaError, make_pycuda
from .fake_tensorrt import TrtState, make_tensorrt

MODULE_NAMES = ("tensorrt", "pycuda", "pycuda.driver", "pycuda.autoinit")


@dataclass
class Double:
    trt: types.ModuleType
    state: TrtState
    device: DeviceState
    cuda: types.ModuleType


def install(monkeypatch: Any, version: str = "10.13.0.35", with_pycuda: bool = True) -> Double:
    """Put a fake TensorRT `version` (and pycuda unless with_pycuda=False) into sys.modules for this test."""
    device = DeviceState()
    trt, state = make_tensorrt(version, device)
    cuda_modules = make_pycuda(device)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    for name in MODULE_NAMES[1:]:
        if with_pycuda:
            monkeypatch.setitem(sys.modules, name, cuda_modules[name])
        else:
            monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` raise ImportError
    return Double(trt, state, device, cuda_modules["pycuda.driver"])


def hide_tensorrt(monkeypatch: Any) -> None:
    """Make `import tensorrt` and `import pycuda` fail, as on a machine without them."""
    for name in MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, None)


__all__ = ["Double", "DeviceState", "FakeCudaError", "TrtState", "hide_tensorrt", "install"]
