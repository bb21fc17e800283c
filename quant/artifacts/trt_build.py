"""TensorRT build orchestration without importing tensorrt: calibration cache access through quant's keyed store,
which ONNX each precision/mode builds from, and `build_trt`, the entry point a command or quant.artifacts.artifact
calls for one model at one precision. quant.backends.trt does the TensorRT work (profiles, feeds and ONNX checks:
quant.backends.trt_inputs); it never imports this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, cast

from quant.backends.trt_inputs import Feed, as_feed_dicts, onnx_input_names
from quant.errors import BuildError, CacheMismatch, CalibrationError
from quant.fileio import sha256_file
from quant.paths import DEFAULT_OUT_ROOT

log = logging.getLogger(__name__)

TRT_CALIBRATION_METHOD = "tensorrt-entropy2"  # cache key method of caches that TensorRT's own calibrator wrote
TIMING_CACHE_FILE = "timing.cache"


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
    """FileCacheIO for a named cache file, StoreCacheIO for a key (in `store_dir`, default the store under
    DEFAULT_OUT_ROOT), else None (calibrate, keep nothing)."""
    if calibration_cache is not None:
        return FileCacheIO(Path(calibration_cache), Path(onnx_path))
    if cache_key is not None:
        digits = trt_version_digits(trt_version) if trt_version else None
        from quant.calib.calibrate import default_store

        return StoreCacheIO(store_dir or default_store(), cache_key, Path(onnx_path).stem, digits)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Which ONNX a precision/mode builds from, and whether it fits.


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


# ---------------------------------------------------------------------------------------------------------------
# Orchestration: one model at one precision.


@dataclass(frozen=True)
class TrtBuildOptions:
    precision: str = "fp32"
    mode: str = "implicit"  # implicit: TensorRT <= 10 flags/calibrator/layer precision; explicit: Q/DQ or FP16 ONNX
    constraints: str = "obey"
    calibrator: str = "quant"  # implicit INT8: "quant" (quant's ranges, from `cache`) | "tensorrt" (its own)
    cache: Path | None = None  # calibrator "quant": the calibration cache of quant's ranges (quant.tasks.calibration)
    # calibrator "tensorrt": re-iterable calibration feeds, e.g. quant.tasks' task_for(spec).calibration_feeds(role)
    feeds: Iterable[Feed] | None = field(default=None, compare=False)
    rules: Path | None = None
    rules_off: tuple[str, ...] = ()  # rules of that set left out (a spec graph's `rules_off`)
    batch_size: int = 4  # calibration batch (TensorRT calibrates at this one shape)
    out_root: Path = DEFAULT_OUT_ROOT  # the cache store (cache/) and TensorRT's timing cache live here


def timing_cache_path(out_root: Path = DEFAULT_OUT_ROOT) -> Path:
    return Path(out_root) / TIMING_CACHE_FILE


def build_trt(model: str, source: Path, out_dir: Path, options: TrtBuildOptions) -> Path:
    """Build engines/<model>/<precision>/model.engine (+ model.engine.json) for a known model or any ONNX."""
    from quant.backends import trt as backend

    backend.require_tensorrt()  # fail before any slow work when TensorRT is missing
    onnx_path = engine_onnx(Path(out_dir), source, options.precision, options.mode)
    layer_precisions = _layer_precisions(onnx_path, options)
    cache_io, feeds = _calibration(model, onnx_path, options) if _implicit_int8(options) else (None, None)
    return backend.build_engine(
        onnx_path, out_dir, options.precision, options.mode, feeds=feeds, cache_io=cache_io,
        layer_precisions=layer_precisions, constraints=options.constraints, timing_cache_path=timing_cache_path(options.out_root),
        meta={"model": model, "source_sha256": sha256_file(onnx_path), "rules": str(options.rules or "default")},
    )


def _implicit_int8(options: TrtBuildOptions) -> bool:
    return options.precision == "int8" and options.mode == "implicit"


def _layer_precisions(onnx_path: Path, options: TrtBuildOptions) -> dict[str, str]:
    if options.mode != "implicit" or options.precision == "fp32":
        return {}
    import onnx

    from quant.artifacts.ort_build import streaming_states
    from quant.precision import load_rules, plan, trt_layer_precisions, without_rules

    model = onnx.load(str(onnx_path))
    rules = without_rules(load_rules(options.rules), options.rules_off, f"{onnx_path}: rules_off")
    trt_plan = plan(model, rules, options.precision, "trt", streaming_states(model))
    return dict(trt_layer_precisions(trt_plan))


def _calibration(model: str, onnx_path: Path, options: TrtBuildOptions) -> tuple[Any, Iterable[Feed] | None]:
    """(cache IO, feeds): quant's ranges from the given cache, or TensorRT's own calibrator on the caller's feeds.
    Builds never calibrate with quant: the spec's task does that first (quant.tasks.calibration.calibrate_spec)."""
    if options.cache is not None:  # a named cache wins over either calibrator
        return FileCacheIO(options.cache, onnx_path), None
    if options.calibrator == "tensorrt":
        return _tensorrt_calibration(model, onnx_path, options)
    if options.calibrator != "quant":
        raise BuildError(f"unknown calibrator {options.calibrator!r}: choose quant or tensorrt")
    raise BuildError(f"{onnx_path}: implicit INT8 needs quant's calibration cache; `quant build SPEC --precision "
                     f"int8 --backend trt` calibrates first, or pass --cache from `quant calibrate SPEC`")


def _tensorrt_calibration(model: str, onnx_path: Path, options: TrtBuildOptions) -> tuple[Any, Any]:
    from quant.backends import trt as backend
    from quant.calib.cache import CacheKey
    from quant.calib.calibrate import default_store, feeds_sha256
    from quant.calib.readers import TrtFeedSource

    if options.feeds is None:
        raise BuildError(f"{onnx_path}: TensorRT's calibrator needs calibration feeds (quant.tasks: "
                         f"task_for(spec).calibration_feeds(role))")
    version = str(backend.require_tensorrt().__version__)
    key = CacheKey.create(sha256_file(onnx_path), feeds_sha256(options.feeds), TRT_CALIBRATION_METHOD,
                          {"batch_size": options.batch_size, "tensorrt": version})
    cache_io = cache_io_for(onnx_path, key, trt_version=version, store_dir=default_store(options.out_root))
    source = TrtFeedSource(cast(Iterable[dict[str, Any]], options.feeds), onnx_input_names(onnx_path),
                           options.batch_size)
    return cache_io, as_feed_dicts(source)
