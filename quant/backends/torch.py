"""PyTorch eager baseline: the project's modules behind the Runner interface, with the ONNX graphs' tensor names.

Graphs (named like the ONNX files of quant.artifacts.export): `dpcrn` (mix -> enh), `dpcrn_stream` (mix + STREAM_STATES
-> enh + <state>_out), `encoder` (WeNet encoder I/O), `decoder` (WeNet rescoring decoder I/O).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from quant.errors import ModelError

logger = logging.getLogger(__name__)

ENCODER_INPUTS = ("speech", "speech_lengths")
ENCODER_OUTPUTS = ("encoder_out", "encoder_out_lens", "ctc_log_probs", "beam_log_probs", "beam_log_probs_idx")
DECODER_INPUTS = ("encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score")
DECODER_OUTPUTS = ("best_index", "score")


class TorchRunner:
    """Runs `module(*inputs in input_names order)` under inference_mode; outputs are mapped to output_names in order."""

    def __init__(
        self, module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str], threads: int = 1
    ) -> None:
        self.module = module.eval()
        self._input_names = list(input_names)
        self._output_names = list(output_names)
        self.threads = threads

    @property
    def input_names(self) -> list[str]:
        return self._input_names

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self._input_names if name not in feeds]
        if missing:
            raise ModelError(f"torch runner: missing feeds {missing}; the graph takes {self._input_names}")
        if self.threads > 0 and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self._input_names]
        with torch.inference_mode():
            result = self.module(*inputs)
        outputs = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        if len(outputs) != len(self._output_names):
            raise ModelError(
                f"torch runner: module returned {len(outputs)} outputs, expected {len(self._output_names)} "
                f"({self._output_names})"
            )
        return {name: out.detach().cpu().numpy() for name, out in zip(self._output_names, outputs)}


def _dpcrn(weights: Path | None) -> tuple[torch.nn.Module, list[str], list[str]]:
    from quant.models.dpcrn import load_dpcrn

    return load_dpcrn(weights), ["mix"], ["enh"]


def _dpcrn_stream(weights: Path | None) -> tuple[torch.nn.Module, list[str], list[str]]:
    from quant.models.dpcrn import STREAM_STATES, StreamingDPCRN, load_dpcrn

    names = [name for name, _ in STREAM_STATES]
    return StreamingDPCRN.from_offline(load_dpcrn(weights)), ["mix", *names], ["enh", *[f"{n}_out" for n in names]]


def _encoder(weights: Path | None) -> tuple[torch.nn.Module, list[str], list[str]]:
    from quant.models.conformer import WenetEncoder, load_conformer

    return WenetEncoder(load_conformer(weights)), list(ENCODER_INPUTS), list(ENCODER_OUTPUTS)


def _decoder(weights: Path | None) -> tuple[torch.nn.Module, list[str], list[str]]:
    from quant.models.conformer import WenetDecoder, load_conformer

    return WenetDecoder(load_conformer(weights)), list(DECODER_INPUTS), list(DECODER_OUTPUTS)


GRAPHS: dict[str, Callable[[Path | None], tuple[torch.nn.Module, list[str], list[str]]]] = {
    "dpcrn": _dpcrn,
    "dpcrn_stream": _dpcrn_stream,
    "encoder": _encoder,
    "decoder": _decoder,
}


def torch_runner(
    graph: str | os.PathLike[str] | torch.nn.Module, threads: int = 1, weights: str | os.PathLike[str] | None = None
) -> TorchRunner:
    """TorchRunner for a graph name, an FP32 ONNX export (its stem names the graph; its I/O names are used) or a
    module with single input `mix` and output `enh`."""
    if isinstance(graph, torch.nn.Module):
        return TorchRunner(graph, ["mix"], ["enh"], threads)
    path = Path(graph)
    name = path.stem if path.suffix == ".onnx" else str(graph)
    if name not in GRAPHS:
        raise ModelError(f"{graph}: no PyTorch module for graph {name!r}; expected one of {sorted(GRAPHS)}")
    module, inputs, outputs = GRAPHS[name](Path(weights) if weights is not None else None)
    if path.suffix == ".onnx" and path.is_file():
        from quant.onnxgraph.graph import graph_interface

        interface = graph_interface(path)
        onnx_inputs, onnx_outputs = list(interface.inputs), list(interface.outputs)
        _check_names(path, inputs, onnx_inputs, "inputs")
        outputs = onnx_outputs[: len(outputs)] if len(onnx_outputs) >= len(outputs) else outputs
    return TorchRunner(module, inputs, outputs, threads)


def _check_names(path: Path, ours: list[str], theirs: list[str], kind: str) -> None:
    if sorted(ours) != sorted(theirs):
        raise ModelError(f"{path}: ONNX {kind} {theirs} differ from the PyTorch module's {ours}")
