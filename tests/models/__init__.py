"""Small third-party-style models the tests build themselves, each with its spec (docs/specs/<kind>.toml).

    built = build("lstm-mask", tmp_path)      # trains (a few seconds) once, exports at opsets 11 and 13
    spec = quant.load_spec(built.specs[13])   # docs/specs/lstm-mask.toml, copied beside models/*.onnx

The docs' example specs are the source of truth: each graph is exported to the path its spec names (relative to the
spec), with the input and output names the spec declares, so a spec that disagrees with a real export fails here.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

import quant
from quant.frontends import frontend
from quant.spec import GraphSpec, ModelSpec
from models import common, se, u2pp

DOCS_SPECS = Path(__file__).resolve().parents[2] / "docs" / "specs"
OPSETS = (11, 13)
KINDS = ("lstm-mask", "gru-logpower", "two-stage", "stft-gru-stream", "u2pp")
# built on demand only (the search test), not run through every per-kind test
EXTRA_KINDS = ("two-stage-outlier",)
# full-batch Adam steps on 16 x 2 s mixtures: a few seconds per model on one CPU core
TRAINING_STEPS = {"lstm-mask": 100, "gru-logpower": 100, "two-stage": 60, "stft-gru-stream": 60}
OUTLIER_SPIKE = 1e5  # two-stage-outlier: stage 2's outlier bin (see se.OutlierFrameMasker)
# `size`: "test" (what every test builds: 7-13 k parameters) or "published", the SE models at widths of the published
# models they imitate (NSNet2's GRU masker, DTLN's 128 units, LSTM maskers of 256 units), for speed measurements only
# (scripts/bench_test_models.py --size published); u2pp has only the test size
SIZES: Mapping[str, Mapping[str, Mapping[str, int]]] = {
    "test": {},
    "published": {"lstm-mask": {"hidden": 256}, "gru-logpower": {"hidden": 256}, "two-stage": {"hidden": 128},
                  "stft-gru-stream": {"hidden": 128, "channels": 16}},
}


@dataclass(frozen=True)
class BuiltModel:
    kind: str
    specs: Mapping[int, Path]  # opset -> the spec file, beside the exported graphs
    modules: Mapping[str, torch.nn.Module]  # graph role -> the torch module exported (eval mode)
    parameters: int  # trainable parameters of all graphs
    losses: tuple[float, ...] = ()  # training loss before each step (SE)


def docs_spec(kind: str) -> ModelSpec:
    return quant.load_spec(DOCS_SPECS / f"{kind}.toml")


def build(kind: str, root: Path, opsets: tuple[int, ...] = OPSETS, size: str = "test") -> BuiltModel:
    """Train (SE) and export `kind` once per opset under root/opset<N>/, with its spec copied there; `size` one of
    SIZES (the tests build "test")."""
    spec = docs_spec(kind)
    if size != "test" and kind not in SIZES[size]:
        raise ValueError(f"{kind} has no {size!r} size; sizes: {sorted(SIZES)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (and the CI box is shared)
    try:
        modules, losses = TRAINERS[kind](spec, dict(SIZES[size].get(kind, {})))
    finally:
        torch.set_num_threads(threads)
    specs = {}
    for opset in opsets:
        folder = root / f"opset{opset}"
        folder.mkdir(parents=True, exist_ok=True)
        for graph in spec.graphs:
            EXPORTERS[kind](modules[graph.role], graph, folder / _relative(graph), opset)
        target = folder / f"{kind}.toml"
        if size == "test":
            shutil.copyfile(DOCS_SPECS / f"{kind}.toml", target)
        else:  # a wider model's streaming states are wider: the spec's state shapes follow the module
            target.write_text(_sized_spec(kind, modules), encoding="utf-8")
        if kind == "u2pp":
            u2pp.write_units(folder / spec.task.units.name)  # type: ignore[union-attr]
        specs[opset] = target
    parameters = sum(common.parameter_count(module) for module in modules.values())
    return BuiltModel(kind, specs, modules, parameters, tuple(losses))


def _sized_spec(kind: str, modules: Mapping[str, torch.nn.Module]) -> str:
    """The docs spec with each `[[streaming.states]]` shape (in the spec's order) set to the built module's."""
    text = (DOCS_SPECS / f"{kind}.toml").read_text(encoding="utf-8")
    module = next(iter(modules.values()))
    if isinstance(module, se.LstmMask):
        shapes = [tuple(state.shape) for state in module.states()]
    elif isinstance(module, se.StftGruStream):
        shapes = list(module.cache_shapes().values())
    else:
        return text
    found = iter(shapes)
    sized = re.sub(r"(?m)^shape = \[[0-9, ]*\]$", lambda _: f"shape = {list(next(found))}", text)
    if next(found, None) is not None:
        raise AssertionError(f"{kind}: the spec lists fewer states than the module has")
    return sized


def _relative(graph: GraphSpec) -> Path:
    assert graph.path is not None
    return graph.path.relative_to(DOCS_SPECS)


# ------------------------------------------------------------------------------------------------ training


def _mixtures() -> common.Mixtures:
    return common.training_mixtures()


def _train_lstm(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    model, losses = se.train_lstm_mask(frontend(spec.frontend), _mixtures(), TRAINING_STEPS["lstm-mask"], **size)
    return {"masker": model}, losses


def _train_gru(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    model, losses = se.train_gru_logpower(frontend(spec.frontend), _mixtures(), TRAINING_STEPS["gru-logpower"],
                                          **size)
    return {"masker": model}, losses


def _train_two_stage(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    model, losses = se.train_two_stage(frontend(spec.frontend), _mixtures(), TRAINING_STEPS["two-stage"], **size)
    return {"stage1": model.stage1, "stage2": model.stage2}, losses


def _train_two_stage_outlier(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    """two-stage, then stage 2 given an outlier bin: a deliberately fragile INT8 layer in the second stage."""
    modules, losses = _train_two_stage(spec, size)
    stage2 = modules["stage2"]
    assert isinstance(stage2, se.FrameMasker)
    return {**modules, "stage2": se.OutlierFrameMasker(stage2, OUTLIER_SPIKE).eval()}, losses


def _train_stft_gru(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    model, losses = se.train_stft_gru(frontend(spec.frontend), _mixtures(), TRAINING_STEPS["stft-gru-stream"],
                                      **size)
    return {"enhancer": model}, losses


def _untrained_u2pp(spec: ModelSpec, size: dict[str, int]) -> tuple[dict[str, torch.nn.Module], list[float]]:
    torch.manual_seed(0)
    encoder, decoder = u2pp.Encoder().eval(), u2pp.BidirectionalDecoder().eval()
    return {"encoder": encoder, "decoder": decoder}, []


TRAINERS: Mapping[str, Callable[[ModelSpec, dict[str, int]], tuple[dict[str, torch.nn.Module], list[float]]]] = {
    "lstm-mask": _train_lstm, "gru-logpower": _train_gru, "two-stage": _train_two_stage,
    "two-stage-outlier": _train_two_stage_outlier,
    "stft-gru-stream": _train_stft_gru, "u2pp": _untrained_u2pp,
}


# ------------------------------------------------------------------------------------------------ export


def _export_lstm(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    assert isinstance(module, se.LstmMask)
    # T is dynamic so the same graph also runs a whole utterance (the offline reference of the streaming test)
    common.export(module, (torch.rand(1, 1, 257), *module.states()), path, graph.inputs, graph.outputs, opset,
                  {"magnitude": {1: "T"}, "mask": {1: "T"}})


def _export_gru(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    common.export(module, (torch.randn(2, 20, 161) - 4,), path, graph.inputs, graph.outputs, opset,
                  {"features": {0: "B", 1: "T"}, "mask": {0: "B", 1: "T"}})


def _export_stage(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    (name,), (out,) = graph.inputs, graph.outputs
    common.export(module, (torch.randn(2, 10, 512) * 0.1,), path, graph.inputs, graph.outputs, opset,
                  {name: {0: "B", 1: "T"}, out: {0: "B", 1: "T"}})


def _export_stft_gru(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    assert isinstance(module, se.StftGruStream)
    caches = tuple(torch.zeros(shape) for shape in module.cache_shapes().values())
    common.export(module, (torch.randn(1, 2, 1, 257), *caches), path, graph.inputs, graph.outputs, opset)


def _export_u2pp(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    encoder_args, decoder_args = u2pp.example_inputs()
    if graph.role == "encoder":
        common.export(module, encoder_args, path, graph.inputs, graph.outputs, opset, u2pp.ENCODER_AXES)
    else:
        common.export(module, decoder_args, path, graph.inputs, graph.outputs, opset, u2pp.DECODER_AXES)


EXPORTERS: Mapping[str, Callable[[torch.nn.Module, GraphSpec, Path, int], None]] = {
    "lstm-mask": _export_lstm, "gru-logpower": _export_gru, "two-stage": _export_stage,
    "two-stage-outlier": _export_stage,
    "stft-gru-stream": _export_stft_gru, "u2pp": _export_u2pp,
}
