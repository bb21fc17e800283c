"""Inference backends behind one tiny interface: a `Runner` binds feeds and outputs by tensor name.

- ort: `quant.backends.ort.OrtRunner` (ONNX Runtime sessions, made in one place)
- trt: `quant.backends.trt.TrtRunner` (the only module importing tensorrt/pycuda)
- torch: `quant.backends.torch.TorchRunner` (PyTorch eager baseline with the ONNX graphs' names)
- trt-sim: `quant.backends.ort.trt_sim_runner` (TensorRT's numerics predicted on the CPU: ONNX Runtime running the
  ONNX TensorRT's explicit mode builds from, Q/DQ kept as fake quantization; accuracy only, never timed)

Backends are imported lazily, so `import quant.backends` works without any optional backend installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from quant.errors import BackendUnavailable

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "ort", "trt", "trt-sim")


@runtime_checkable
class Runner(Protocol):
    """Anything that runs one graph: named numpy feeds in, named numpy outputs out."""

    @property
    def input_names(self) -> Sequence[str]: ...

    @property
    def output_names(self) -> Sequence[str]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class BoundRun(Protocol):
    """One graph with its tensors bound once (BindingRunner.bind): `run()` runs it on the bound inputs, nothing else;
    state inputs are fed from their outputs of the previous run inside the backend."""

    def set_input(self, name: str, value: np.ndarray) -> None: ...

    def run(self) -> None: ...

    def outputs(self) -> dict[str, np.ndarray]: ...


@runtime_checkable
class BindingRunner(Runner, Protocol):
    """A Runner that can also bind its tensors once for repeated runs, as a deployed streaming loop does (ONNX
    Runtime's IOBinding): the timing harness uses it where a backend offers it, so a timed call measures the graph
    and not per-call checks, dict building and state copies. `carry`: state input -> the output feeding it next run."""

    def bind(self, feeds: Mapping[str, np.ndarray], carry: Mapping[str, str] | None = None) -> BoundRun: ...


def open_runner(
    path_or_model: str | os.PathLike[str] | "torch.nn.Module", backend: str = "ort", threads: int = 1
) -> Runner:
    """A runner for an ONNX file (ort), an engine file (trt), a graph for PyTorch eager (torch), or the ONNX file
    TensorRT's explicit mode builds from (trt-sim: int8 model_trt_qdq.onnx, or an FP16/FP32 model.onnx).

    For torch, `path_or_model` is an nn.Module, a graph name (dpcrn, dpcrn_stream, encoder, decoder) or the FP32
    ONNX export of that graph (its file stem names the graph and its I/O names are reused).
    """
    if backend == "ort":
        from quant.backends.ort import OrtRunner

        return OrtRunner(_as_path(path_or_model, backend), threads=threads)
    if backend == "trt":
        from quant.backends.trt import TrtRunner

        return TrtRunner(_as_path(path_or_model, backend))
    if backend == "trt-sim":
        from quant.backends.ort import trt_sim_runner

        return trt_sim_runner(_as_path(path_or_model, backend), threads=threads)
    if backend == "torch":
        from quant.backends.torch import torch_runner

        return torch_runner(path_or_model, threads=threads)
    raise BackendUnavailable(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _as_path(path_or_model: object, backend: str) -> Path:
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise BackendUnavailable(f"backend {backend} runs a file (ONNX model or engine), got {type(path_or_model)}")
    return Path(path_or_model)
