"""TensorRT build orchestration without importing tensorrt: optimization profiles of the known models, calibration
cache access through quant's keyed store, feed adaptation, and which ONNX each precision/mode builds from.

quant.backends.trt does the TensorRT work and imports the helpers here lazily; `build_trt` is the entry point a
command or quant.artifacts.artifact calls for one model at one precision.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from quant.errors import BuildError, CacheMismatch, CalibrationError
from quant.fileio import sha256_file
from quant.paths import engines_dir

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
Shape = tuple[int, ...]
Range = tuple[Shape, Shape, Shape]
ProfileSpec = dict[str, Range]

TRT_CALIBRATION_METHOD = "tensorrt-entropy2"  # cache key method of caches that TensorRT's own calibrator wrote
TIMING_CACHE_FILE = "timing.cache"
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
# Calibration caches through quant's store (quant.calib.cache, imported lazily).


def trt_version_digits(version: str) -> str:
    from quant.calib import cache

    return cache.trt_version_digits(version)


@dataclass(frozen=True)
class StoreCacheIO:
    """Reads the store's cache for `key` only on an exact key hit (and matching TensorRT version); writes under it."""

    store_dir: Path
    key: Any  # quant.calib.cache.CacheKey
    name: str = "trt"
    trt_version: str | None = None  # digits, e.g. "101300"; a cache with another header version is a miss

    def read(self) -> bytes | None:
        from quant.calib import cache

        found = cache.lookup(self.store_dir, self.key)
        if found.entry is None:
            log.info("calibration cache miss: %s", found.reason)
            return None
        if self.trt_version is not None and found.entry.cache.version != self.trt_version:
            log.info("calibration cache %s was made for TensorRT %s, not %s: calibrating again",
                     found.entry.path, found.entry.cache.version, self.trt_version)
            return None
        return cache.format_cache(found.entry.cache)

    def write(self, data: bytes) -> None:
        from quant.calib import cache

        parsed = cache.parse_cache(data, "TensorRT's calibration cache")
        result = ranges_from_trt_cache(parsed, self.key.method, json.loads(self.key.params))
        path = cache.store_path(self.store_dir, self.key, self.name)
        cache.write_entry(path, self.key, result, {"source": "tensorrt calibrator"}, parsed.version)


def ranges_from_trt_cache(parsed: Any, method: str, params: Mapping[str, Any]) -> Any:
    """A RangeResult holding a TensorRT cache's scales (amax = scale * 127; min/max unknown, shown as -amax/amax)."""
    from quant.calib.ranges import RangeResult, TensorRange

    tensors = {name: TensorRange(name, amax, -amax, amax, 0, 0) for name, amax in parsed.amax().items()}
    return RangeResult(method=method, params=dict(params), tensors=tensors)


@dataclass(frozen=True)
class FileCacheIO:
    """A cache file the user named (--cache): used only when its sidecar key names this exact ONNX model."""

    path: Path
    onnx_path: Path

    def read(self) -> bytes | None:
        from quant.calib import cache

        entry = cache.read_entry(self.path)
        model_sha256 = sha256_file(self.onnx_path)
        if entry.key.model_sha256 != model_sha256:
            raise CacheMismatch(
                f"{self.path} was calibrated for model sha256 {entry.key.model_sha256[:12]}, but {self.onnx_path} "
                f"is {model_sha256[:12]}: re-run quant calibrate on this export, or pass the matching --cache"
            )
        return cache.format_cache(entry.cache)

    def write(self, data: bytes) -> None:
        raise CalibrationError(f"TensorRT tried to recalibrate although {self.path} was given; nothing was written")


def cache_io_for(onnx_path: Path, cache_key: Any = None, calibration_cache: Path | None = None,
                 trt_version: str | None = None, store_dir: Path | None = None) -> Any:
    """FileCacheIO for a named cache file, StoreCacheIO for a key, else None (calibrate, keep nothing)."""
    if calibration_cache is not None:
        return FileCacheIO(Path(calibration_cache), Path(onnx_path))
    if cache_key is not None:
        digits = trt_version_digits(trt_version) if trt_version else None
        return StoreCacheIO(store_dir or engines_dir() / "cache", cache_key, Path(onnx_path).stem, digits)
    return None


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
# Which ONNX a precision/mode builds from, and whether it fits.


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


def engine_onnx(artifact_dir: Path, source: Path, precision: str, mode: str) -> Path:
    """The ONNX to hand TensorRT: the FP32 source for implicit/fp32 builds, else the FP16 or Q/DQ ONNX that the
    ONNX Runtime build wrote into the same artifact folder (engines/<model>/<precision>/ or build's -o)."""
    if mode == "implicit" or precision == "fp32":
        return source
    name = "model_trt_qdq.onnx" if precision == "int8" else "model.onnx"
    path = Path(artifact_dir) / name
    if not path.is_file():
        raise BuildError(f"{path} is missing: run quant build MODEL --precision {precision} (ONNX Runtime) first")
    return path


def load_layer_precisions(source: Mapping[str, str] | Sequence[tuple[str, str]] | Path | None) -> dict[str, str]:
    """ONNX node -> precision, from a mapping, (node, precision) pairs or a JSON file of either."""
    if source is None:
        return {}
    loaded: Any = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    pairs = loaded.items() if isinstance(loaded, Mapping) else loaded
    return {str(node): str(precision) for node, precision in pairs}


# ---------------------------------------------------------------------------------------------------------------
# Orchestration: one model at one precision.


@dataclass(frozen=True)
class TrtBuildOptions:
    precision: str = "fp32"
    mode: str = "implicit"  # implicit: TensorRT <= 10 flags/calibrator/layer precision; explicit: Q/DQ or FP16 ONNX
    constraints: str = "obey"
    calibrator: str = "quant"  # implicit INT8: "quant" (quant's entropy ranges) | "tensorrt" (its own calibrator)
    cache: Path | None = None  # a calibration cache file to use as is
    manifest: Path | None = None  # calibration audio (default: the model's committed calibration set)
    rules: Path | None = None
    batch_size: int = 4  # calibration batch (TensorRT calibrates at this one shape)
    method: str | None = None  # calibrator "quant": range method; None: quant.calib.calibrate.default_method(model)


def timing_cache_path() -> Path:
    return engines_dir() / TIMING_CACHE_FILE


def build_trt(model: str, source: Path, out_dir: Path, options: TrtBuildOptions) -> Path:
    """Build engines/<model>/<precision>/model.engine (+ model.engine.json) for a known model or any ONNX."""
    from quant.backends import trt as backend

    backend.require_tensorrt()  # fail before any slow work when TensorRT is missing
    onnx_path = engine_onnx(Path(out_dir), source, options.precision, options.mode)
    layer_precisions = _layer_precisions(onnx_path, options)
    cache_io, feeds = _calibration(model, onnx_path, options) if _implicit_int8(options) else (None, None)
    return backend.build_engine(
        onnx_path, out_dir, options.precision, options.mode, feeds=feeds, cache_io=cache_io,
        layer_precisions=layer_precisions, constraints=options.constraints, timing_cache_path=timing_cache_path(),
        meta={"model": model, "source_sha256": sha256_file(onnx_path), "rules": str(options.rules or "default")},
    )


def _implicit_int8(options: TrtBuildOptions) -> bool:
    return options.precision == "int8" and options.mode == "implicit"


def _layer_precisions(onnx_path: Path, options: TrtBuildOptions) -> dict[str, str]:
    if options.mode != "implicit" or options.precision == "fp32":
        return {}
    import onnx

    from quant.artifacts.ort_build import streaming_states
    from quant.precision import load_rules, plan, trt_layer_precisions

    model = onnx.load(str(onnx_path))
    trt_plan = plan(model, load_rules(options.rules), options.precision, "trt", streaming_states(model))
    return dict(trt_layer_precisions(trt_plan))


def _calibration(model: str, onnx_path: Path, options: TrtBuildOptions) -> tuple[Any, Iterable[Feed] | None]:
    """(cache IO, feeds): a named cache; quant's ranges (store, calibrating on a miss); or TensorRT's own."""
    if options.cache is not None:
        return FileCacheIO(options.cache, onnx_path), None
    from quant.calib.readers import default_manifest

    manifest = options.manifest or default_manifest(model)
    if options.calibrator == "quant":
        from quant.calib.calibrate import calibrate

        entry = calibrate(onnx_path, model, manifest, options.method)
        return FileCacheIO(entry.path, onnx_path), None
    if options.calibrator != "tensorrt":
        raise BuildError(f"unknown calibrator {options.calibrator!r}: choose quant or tensorrt")
    return _tensorrt_calibration(model, onnx_path, manifest, options)


def _tensorrt_calibration(model: str, onnx_path: Path, manifest: Path, options: TrtBuildOptions) -> tuple[Any, Any]:
    from quant.backends import trt as backend
    from quant.calib.cache import CacheKey
    from quant.calib.calibrate import data_sha256
    from quant.calib.readers import TrtFeedSource, reader_for

    version = str(backend.require_tensorrt().__version__)
    key = CacheKey.create(sha256_file(onnx_path), data_sha256(manifest, None), TRT_CALIBRATION_METHOD,
                          {"batch_size": options.batch_size, "tensorrt": version})
    cache_io = cache_io_for(onnx_path, key, trt_version=version)
    source = TrtFeedSource(reader_for(model, onnx_path, manifest), onnx_input_names(onnx_path), options.batch_size)
    return cache_io, as_feed_dicts(source)
