"""What a TensorRT build takes, without importing tensorrt: optimization profiles of the known models, feed
adaptation, the ONNX a precision/mode must come from, and layer precisions.

quant.backends.trt builds engines from these; quant.artifacts.trt_build (one model at one precision, calibration
caches through quant's store) uses them too. Kept apart from trt.py so that both type-check without TensorRT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from quant.errors import BuildError

Feed = Mapping[str, np.ndarray]
Shape = tuple[int, ...]
Range = tuple[Shape, Shape, Shape]
ProfileSpec = dict[str, Range]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

# Realistic ranges: batches of 1..16 utterances; 10 ms fbank frames from 0.16 s to 30 s,
# opt 8 s; after 4x subsampling 4..750 frames; n-best of 10 hypotheses of up to 600 characters (plus sos/eos).
BATCH = (1, 8, 16)
FBANK_FRAMES = (16, 800, 3000)
ENCODER_FRAMES = (4, 200, 750)
HYP_TOKENS = (2, 150, 602)
BEAM = 10
SEGMENT_BATCH = (1, 4, 8)  # DPCRN offline: 9 s segments of one utterance run as a batch
SEGMENT_FRAMES = 563


def _ranges(*dims: tuple[int, int, int] | int) -> Range:
    """Per-dimension (min, opt, max) or fixed ints -> (min shape, opt shape, max shape)."""
    triples = [dim if isinstance(dim, tuple) else (dim, dim, dim) for dim in dims]
    return tuple(tuple(t[i] for t in triples) for i in range(3))  # type: ignore[return-value]


def wenet_encoder_profile() -> ProfileSpec:
    return {"speech": _ranges(BATCH, FBANK_FRAMES, 80), "speech_lengths": _ranges(BATCH)}


def wenet_decoder_profile(d_model: int = 256) -> ProfileSpec:
    hyps = _ranges(BATCH, BEAM, HYP_TOKENS)
    return {
        "encoder_out": _ranges(BATCH, ENCODER_FRAMES, d_model),
        "encoder_out_lens": _ranges(BATCH),
        "hyps_pad_sos_eos": hyps,
        "r_hyps_pad_sos_eos": hyps,
        "hyps_lens_sos": _ranges(BATCH, BEAM),
        "ctc_score": _ranges(BATCH, BEAM),
    }


def dpcrn_profile() -> ProfileSpec:
    return {"mix": _ranges(SEGMENT_BATCH, 257, SEGMENT_FRAMES, 2)}


def _is_dynamic(shape: Shape) -> bool:
    return any(dim < 0 for dim in shape)


def _fit(template: ProfileSpec, inputs: Mapping[str, Shape]) -> ProfileSpec:
    """Keep the template's dynamic inputs; static dimensions of the network override the template."""
    profile: ProfileSpec = {}
    for name, shape in inputs.items():
        if not _is_dynamic(shape):
            continue
        if name not in template or len(template[name][0]) != len(shape):
            raise BuildError(f"no optimization profile for dynamic input {name!r} {shape}: pass profiles explicitly")
        profile[name] = _ranges(*(dim if dim >= 0 else (lo, opt, hi) for dim, lo, opt, hi in zip(shape, *template[name])))
    return profile


def _batch_only(inputs: Mapping[str, Shape], batch: tuple[int, int, int]) -> ProfileSpec:
    for name, shape in inputs.items():
        if any(dim < 0 for dim in shape[1:]):
            raise BuildError(f"input {name!r} {shape} has dynamic dimensions beyond the batch: pass profiles explicitly")
    return {name: _ranges(batch, *shape[1:]) for name, shape in inputs.items() if _is_dynamic(shape)}


def default_profiles(inputs: Mapping[str, Shape]) -> list[ProfileSpec]:
    """Profiles for the known models, recognized by their input names; other models may only have a dynamic batch."""
    if not any(_is_dynamic(shape) for shape in inputs.values()):
        return []
    names = set(inputs)
    if "speech" in names:
        return [_fit(wenet_encoder_profile(), inputs)]
    if "hyps_pad_sos_eos" in names:
        d_model = inputs["encoder_out"][-1] if inputs.get("encoder_out", (-1,))[-1] > 0 else 256
        return [_fit(wenet_decoder_profile(d_model), inputs)]
    if names == {"mix"}:
        return [_fit(dpcrn_profile(), inputs)]
    if "mix" in names:  # streaming DPCRN: one frame of one stream
        return [_batch_only(inputs, (1, 1, 1))]
    return [_batch_only(inputs, BATCH)]


# ---------------------------------------------------------------------------------------------------------------
# Feeds.


def as_feed_dicts(source: Any) -> Iterable[Feed]:
    """Any iterable of {input name: array}; a TrtFeedSource (batches() of arrays in input_order) is zipped to dicts."""
    if hasattr(source, "batches") and hasattr(source, "input_order"):
        return _zip_batches(source)
    return source  # type: ignore[no-any-return]


def _zip_batches(source: Any) -> Iterator[Feed]:
    names = tuple(source.input_order)
    for batch in source.batches():
        yield dict(zip(names, batch))


# ---------------------------------------------------------------------------------------------------------------
# Which ONNX a precision/mode builds from, and its layer precisions.


def onnx_ops(onnx_path: Path) -> tuple[set[str], set[int]]:
    """(op types, initializer data types) of an ONNX file, without loading external weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    return ops, {init.data_type for init in model.graph.initializer}


def onnx_input_names(onnx_path: Path) -> tuple[str, ...]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return tuple(value.name for value in graph.input if value.name not in weights)


def check_onnx_for_mode(onnx_path: Path, precision: str, mode: str) -> None:
    """Explicit INT8 needs Q/DQ nodes; explicit FP16 needs an FP16 ONNX; implicit builds from the FP32 ONNX."""
    import onnx

    if mode != "explicit" or precision == "fp32":
        return
    ops, weight_types = onnx_ops(onnx_path)
    if precision == "int8" and not ops & QDQ_OPS:
        raise BuildError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so explicit INT8 would build a float engine: "
            "build from the Q/DQ ONNX (quant build MODEL --precision int8 writes model_trt_qdq.onnx) or use "
            "--mode implicit (TensorRT <= 10)"
        )
    if precision == "fp16" and onnx.TensorProto.FLOAT16 not in weight_types and "Cast" not in ops:
        raise BuildError(
            f"{onnx_path} is an FP32 ONNX, so a strongly typed FP16 build would run in FP32: build from the FP16 "
            "ONNX (quant build MODEL --precision fp16 writes model.onnx) or use --mode implicit (TensorRT <= 10)"
        )


def load_layer_precisions(source: Mapping[str, str] | Sequence[tuple[str, str]] | Path | None) -> dict[str, str]:
    """ONNX node -> precision, from a mapping, (node, precision) pairs or a JSON file of either."""
    if source is None:
        return {}
    loaded: Any = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    pairs = loaded.items() if isinstance(loaded, Mapping) else loaded
    return {str(node): str(precision) for node, precision in pairs}
