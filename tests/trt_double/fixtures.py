"""Fixtures shared by the TensorRT test modules (imported there by name, so pytest finds them)."""

from __future__ import annotations

from pathlib import Path

import pytest

import trt_double
from trt_double import graphs


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> trt_double.Double:
    """The strict TensorRT + pycuda double, installed as TensorRT 10.13."""
    return trt_double.install(monkeypatch, "10.13.0.35")


@pytest.fixture
def two_inputs(tmp_path: Path) -> Path:
    return graphs.two_input_model(tmp_path / "two.onnx")
