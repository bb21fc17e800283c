"""ONNX export of quant's models, checked and verified before a file is put in place.

Every export goes to a temp file beside its target, is checked (opset as asked, one self-contained file, recurrent
start states not baked in as constants, LayerNorm as one op at opset >= 17 and decomposed below), verified against
PyTorch with ONNX Runtime on real speech, and only then renamed into place. DIR/meta.json records what was exported.

Tolerances (float32 on both sides; the error of a correct export grows with the output's magnitude):
- dpcrn: ORT vs PyTorch on 9 s segments of real speech, at batch 1 and batch 3,
  max abs error <= VERIFY_ATOL + VERIFY_RTOL * peak |enh|.
- dpcrn-stream: ORT frame by frame (zero start states) vs the PyTorch offline model over >= 5 s of real speech,
  max abs error <= STREAM_ATOL (the issue's 1e-4).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch

from quant.errors import ModelError
from quant.fileio import atomic_write_json, sha256_file, temp_path_beside
from quant.models.dpcrn import DEFAULT_WEIGHTS, DPCRN, STREAM_STATES, StreamingDPCRN, load_dpcrn
from quant.paths import REPO_DIR, calib_data_dir

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = (13, 17)
META_NAME = "meta.json"
OFFLINE_FRAMES = 563  # 9 s at 16 kHz, hop 256, centred framing (quant.features.SEGMENT_FRAMES)
SAMPLE_RATE = 16000
HOP = 256
STREAM_VERIFY_SECONDS = 6.0
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-6
STREAM_ATOL = 1e-4
DECOMPOSED_LAYER_NORM_OPS = ("ReduceMean", "Sub", "Pow", "Sqrt", "Div")
# Harmless notes of the TorchScript exporter for these graphs (no variable-length LSTM input here; a Slice left
# unfolded costs nothing): silenced so a user sees only what matters. The checks below catch real problems.
KNOWN_EXPORTER_WARNINGS = (
    r"Constant folding - Only steps=1 can be constant folded",
    r"Exporting a model to ONNX with a batch_size other than 1, with a variable length with LSTM",
)


@dataclass(frozen=True)
class GraphSpec:
    """What one exported graph must look like."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    layer_norms: int  # LayerNorm count in the model (one op each at opset >= 17)
    state_inputs: tuple[str, ...] = ()  # graph inputs that must feed LSTM initial states


def export_model(
    name: str, out_dir: str | os.PathLike[str], opset: int = 17, weights: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Export `name` ("dpcrn", "dpcrn-stream" or "wenet": a spec's `export` key) into out_dir; returns the ONNX files
    written."""
    exporter = _exporter(name)
    if opset not in SUPPORTED_OPSETS:
        raise ModelError(f"opset {opset} is not supported; expected one of {SUPPORTED_OPSETS}")
    return exporter.export(Path(out_dir), opset, weights)


def default_weights(name: str) -> Path:
    """The shipped weights `export_model(name)` exports when given none (part of the pipeline's export stamp)."""
    return _exporter(name).default_weights()


@dataclass(frozen=True)
class Exporter:
    """How one reference model is exported (the code behind a spec's `export = ...`) and its shipped weights."""

    export: Callable[[Path, int, str | os.PathLike[str] | None], list[Path]]
    default_weights: Callable[[], Path]


def _exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def _dpcrn_export(name: str, write: Callable[[DPCRN, Path, int], Path]
                  ) -> Callable[[Path, int, str | os.PathLike[str] | None], list[Path]]:
    """An exporter of one DPCRN graph (offline or streaming) from the same weights, with its meta.json."""

    def export(target_dir: Path, opset: int, weights: str | os.PathLike[str] | None) -> list[Path]:
        model = load_dpcrn(weights)
        path = write(model, target_dir, opset)
        write_export_meta(target_dir, name, model.config.to_dict(), _weights_sha256(weights), opset, [path])
        return [path]

    return export


def _export_wenet(target_dir: Path, opset: int, weights: str | os.PathLike[str] | None) -> list[Path]:
    wenet_export = importlib.import_module("quant.artifacts.wenet_export")  # imports the conformer only when asked
    paths: list[Path] = wenet_export.export_wenet(target_dir, opset, weights)
    return paths


def _wenet_weights() -> Path:
    from quant.models.conformer import WEIGHTS_PATH

    return Path(WEIGHTS_PATH)


def _weights_sha256(weights: str | os.PathLike[str] | None) -> str | None:
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    return sha256_file(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- DPCRN graphs


def dpcrn_spec(streaming: bool) -> GraphSpec:
    layer_norms = 4
    if not streaming:
        return GraphSpec(("mix",), ("enh",), {"mix": {0: "batch"}, "enh": {0: "batch"}}, layer_norms)
    names = tuple(state for state, _ in STREAM_STATES)
    rnn_states = tuple(state for state in names if state.startswith("rnn_cache"))
    outputs = ("enh", *(f"{state}_out" for state in names))
    return GraphSpec(("mix", *names), outputs, {}, layer_norms, rnn_states)


def _export_dpcrn(model: DPCRN, out_dir: Path, opset: int) -> Path:
    spec = dpcrn_spec(streaming=False)
    example = (torch.zeros(1, model.config.freq_bins, OFFLINE_FRAMES, 2),)
    target = out_dir / "dpcrn.onnx"
    return export_checked(model, example, target, spec, opset, lambda path, label: verify_dpcrn(model, path, label))


def _export_dpcrn_stream(model: DPCRN, out_dir: Path, opset: int) -> Path:
    spec = dpcrn_spec(streaming=True)
    stream = StreamingDPCRN.from_offline(model)
    example = (torch.zeros(1, model.config.freq_bins, 1, 2), *stream.initial_states())
    target = out_dir / "dpcrn_stream.onnx"
    return export_checked(
        stream, example, target, spec, opset, lambda path, label: verify_dpcrn_stream(model, path, label)
    )


# ---------------------------------------------------------------------------------------------- export + checks


def export_checked(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    target: Path,
    spec: GraphSpec,
    opset: int,
    verify: Callable[[Path, str], None],
) -> Path:
    """Export to a temp file beside `target`, check its structure, verify it numerically, then rename into place."""
    tmp = temp_path_beside(target)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            for message in KNOWN_EXPORTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            torch.onnx.export(
                module.eval(),
                example,
                str(tmp),
                dynamo=False,
                external_data=False,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes or None,
                do_constant_folding=True,
            )
            outputs = module(*example)
        _declare_output_shapes(tmp, spec, outputs if isinstance(outputs, tuple) else (outputs,))
        check_graph(tmp, spec, opset, label=target.name)
        verify(tmp, target.name)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (opset %d)", target, opset)
    return target


def _declare_output_shapes(path: Path, spec: GraphSpec, outputs: Sequence[torch.Tensor]) -> None:
    """Replace the exporter's inferred output dims (often unnamed symbols) by the real ones, named where dynamic."""
    model = onnx.load(str(path))
    for value, tensor in zip(model.graph.output, outputs):
        dynamic = spec.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(tensor.shape):
            dim = dims.add()
            if axis in dynamic:
                dim.dim_param = dynamic[axis]
            else:
                dim.dim_value = int(size)
    onnx.save(model, str(path))


def check_graph(path: Path, spec: GraphSpec, opset: int, label: str) -> None:
    """Structural checks of an export; raises ModelError naming `label` and what was expected."""
    _check_self_contained(path, label)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    _check_opset(model, opset, label)
    _check_io_names(model, spec, label)
    _check_lstm_states(model, spec, label)
    _check_layer_norm(model, spec.layer_norms, opset, label)


def _check_self_contained(path: Path, label: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelError(f"{label}: weights {external[:3]} live in external files; expected one self-contained file")
    strays = [p.name for p in path.parent.glob(path.name + "*.data")]
    if strays:
        raise ModelError(f"{label}: the exporter wrote side files {strays}; expected one self-contained file")


def onnx_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError(f"{model.graph.name}: no default-domain opset in the model")


def _check_opset(model: onnx.ModelProto, opset: int, label: str) -> None:
    found = onnx_opset(model)
    if found != opset:
        raise ModelError(f"{label}: exported at opset {found}, but opset {opset} was asked for")


def _check_io_names(model: onnx.ModelProto, spec: GraphSpec, label: str) -> None:
    inputs = tuple(value.name for value in model.graph.input)
    outputs = tuple(value.name for value in model.graph.output)
    if inputs != spec.input_names or outputs != spec.output_names:
        raise ModelError(
            f"{label}: graph I/O is {inputs} -> {outputs}; expected {spec.input_names} -> {spec.output_names}"
        )


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    return names | {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}


def _check_lstm_states(model: onnx.ModelProto, spec: GraphSpec, label: str) -> None:
    """LSTM initial_h/initial_c (inputs 5, 6) must be graph inputs or computed from shapes, never constants."""
    constants = _constant_names(model)
    fed_states: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "LSTM":
            continue
        states = [name for name in node.input[5:7] if name]
        baked = [name for name in states if name in constants]
        if baked:
            raise ModelError(f"{label}: LSTM {node.name} starts from constant states {baked}; expected inputs")
        fed_states.update(states)
    missing = set(spec.state_inputs) - fed_states
    if missing:
        raise ModelError(f"{label}: state inputs {sorted(missing)} do not feed any LSTM initial state")


def _check_layer_norm(model: onnx.ModelProto, expected: int, opset: int, label: str) -> None:
    ops = [node.op_type for node in model.graph.node]
    fused = ops.count("LayerNormalization")
    if opset >= 17 and fused != expected:
        raise ModelError(f"{label}: {fused} LayerNormalization ops at opset {opset}; expected {expected}")
    if opset < 17:
        missing = [op for op in DECOMPOSED_LAYER_NORM_OPS if op not in ops]
        if fused or (expected and missing):
            raise ModelError(
                f"{label}: opset {opset} should hold the decomposed LayerNorm ({', '.join(DECOMPOSED_LAYER_NORM_OPS)});"
                f" found {fused} LayerNormalization ops, missing {missing}"
            )


# ---------------------------------------------------------------------------------------------- verification


def _make_session(path: Path) -> Any:
    from quant.backends.ort import make_session  # the one place ORT sessions are made

    return make_session(path, threads=1)


def verification_speech(samples: int) -> np.ndarray:
    """`samples` of real speech (tests/data LibriVox clips, then calib_data/), concatenated, float32.

    When less is available the speech found is repeated, as long as there is at least half of what was asked."""
    audio = _speech_files_audio(samples)
    if 2 * audio.shape[0] < samples:
        raise ModelError(
            f"need {samples / SAMPLE_RATE:.1f} s of real speech to verify the export, found "
            f"{audio.shape[0] / SAMPLE_RATE:.1f} s under {REPO_DIR / 'tests' / 'data'} and {calib_data_dir()}; "
            "restore tests/data/librivox_*.flac"
        )
    return np.resize(audio, samples)


@functools.lru_cache(maxsize=4)
def _speech_files_audio(samples: int) -> np.ndarray:
    from quant.data.audio import load_audio

    files = sorted((REPO_DIR / "tests" / "data").glob("librivox_*.flac"))
    files += sorted(calib_data_dir().glob("*/audio/*.flac")) + sorted(calib_data_dir().glob("*/audio/*.wav"))
    chunks: list[np.ndarray] = []
    for file in files:
        chunks.append(load_audio(file))
        if sum(len(chunk) for chunk in chunks) >= samples:
            break
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    audio.setflags(write=False)
    return audio


def speech_spectra(batch: int, frames: int) -> np.ndarray:
    """(batch, 257, frames, 2) STFTs of distinct stretches of real speech (frames = samples / HOP + 1)."""
    from quant.features import stft

    samples = (frames - 1) * HOP
    audio = verification_speech(batch * samples).reshape(batch, samples)
    return np.asarray(stft(audio), dtype=np.float32)


def _assert_close(label: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    if got.shape != want.shape:
        raise ModelError(f"{label}: ONNX Runtime output has shape {got.shape}; PyTorch gives {want.shape}")
    error = float(np.max(np.abs(got - want)))
    if not np.isfinite(error) or error > atol:
        raise ModelError(f"{label}: ONNX Runtime output differs from PyTorch by max abs {error:.3g} (> {atol:.3g})")
    return error


def verify_dpcrn(model: DPCRN, path: Path, label: str) -> None:
    """ORT vs PyTorch on 9 s segments of real speech at batch 3 and batch 1 (dynamic batch)."""
    session = _make_session(path)
    mix = speech_spectra(3, OFFLINE_FRAMES)
    with torch.no_grad():
        want = model(torch.from_numpy(mix)).numpy()
    atol = VERIFY_ATOL + VERIFY_RTOL * float(np.abs(want).max())
    for batch in (3, 1):
        got = session.run(["enh"], {"mix": mix[:batch]})[0]
        error = _assert_close(f"{label} at batch {batch}", got, want[:batch], atol)
        log.info("%s batch %d: max abs error %.3g vs PyTorch (tolerance %.3g)", label, batch, error, atol)


def run_stream(session: Any, mix: np.ndarray) -> np.ndarray:
    """Roll the streaming ONNX model over mix (1, 257, T, 2) from zero states; returns (1, 257, T, 2)."""
    states = {name: np.zeros(shape, dtype=np.float32) for name, shape in STREAM_STATES}
    out_names = ["enh", *(f"{name}_out" for name, _ in STREAM_STATES)]
    frames = []
    for t in range(mix.shape[2]):
        results = dict(zip(out_names, session.run(out_names, {"mix": mix[:, :, t : t + 1], **states})))
        frames.append(results["enh"])
        states = {name: results[f"{name}_out"] for name in states}
    return np.concatenate(frames, axis=2)


def verify_dpcrn_stream(model: DPCRN, path: Path, label: str) -> None:
    """ORT streaming frame by frame vs the PyTorch offline model over >= 5 s of real speech."""
    session = _make_session(path)
    mix = speech_spectra(1, int(STREAM_VERIFY_SECONDS * SAMPLE_RATE) // HOP + 1)
    with torch.no_grad():
        want = model(torch.from_numpy(mix)).numpy()
    error = _assert_close(f"{label} (frame by frame vs offline)", run_stream(session, mix), want, STREAM_ATOL)
    log.info("%s: max abs error %.3g vs offline PyTorch over %d frames", label, error, mix.shape[2])


# ---------------------------------------------------------------------------------------------- meta.json


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [dim.dim_param if dim.dim_param else int(dim.dim_value) for dim in tensor.shape.dim]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    return {"name": value.name, "shape": shape, "dtype": dtype}


def describe_onnx(path: Path) -> dict[str, Any]:
    """sha256, opset and the inputs/outputs (name, shape with symbolic dims as strings, dtype) of one ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        "sha256": sha256_file(path),
        "opset": onnx_opset(model),
        "inputs": [_value_info(value) for value in model.graph.input],
        "outputs": [_value_info(value) for value in model.graph.output],
    }


def _tool_versions() -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_export_meta(
    out_dir: str | os.PathLike[str],
    model: str,
    config: dict[str, Any],
    weights_sha256: str | None,
    opset: int,
    onnx_paths: Sequence[str | os.PathLike[str]],
) -> Path:
    """Write DIR/meta.json describing the export; entries of other files already described there are kept."""
    meta_path = Path(out_dir) / META_NAME
    files = _previous_file_entries(meta_path, {Path(p).name for p in onnx_paths})
    for onnx_path in onnx_paths:
        entry = {"model": model, "weights_sha256": weights_sha256, "config": config, **describe_onnx(Path(onnx_path))}
        files[Path(onnx_path).name] = entry
    meta = {
        "model": model,
        "config": config,
        "weights_sha256": weights_sha256,
        "weights": "trained" if weights_sha256 else "random initialisation (seed 0)",
        "opset": opset,
        "tools": _tool_versions(),
        "files": files,
    }
    return atomic_write_json(meta_path, meta)


def _previous_file_entries(meta_path: Path, replaced: set[str]) -> dict[str, Any]:
    if not meta_path.is_file():
        return {}
    try:
        previous = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); rewriting it", meta_path, error)
        return {}
    entries = previous.get("files", {}) if isinstance(previous, dict) else {}
    return {
        name: entry
        for name, entry in entries.items()
        if name not in replaced and (meta_path.parent / name).is_file() and isinstance(entry, dict)
    }


EXPORTERS: dict[str, Exporter] = {
    "dpcrn": Exporter(_dpcrn_export("dpcrn", _export_dpcrn), lambda: DEFAULT_WEIGHTS),
    "dpcrn-stream": Exporter(_dpcrn_export("dpcrn-stream", _export_dpcrn_stream), lambda: DEFAULT_WEIGHTS),
    "wenet": Exporter(_export_wenet, _wenet_weights),
}
MODELS = tuple(EXPORTERS)  # the names a spec's `export` key may take


__all__ = [
    "GraphSpec",
    "EXPORTERS",
    "MODELS",
    "check_graph",
    "describe_onnx",
    "export_checked",
    "export_model",
    "onnx_opset",
    "run_stream",
    "write_export_meta",
]
