"""calibrate(): model + calibration set -> ranges -> TensorRT cache with keyed sidecar, reusing a matching cache.

The key of a calibration is (model sha256, calibration-set sha256, method + parameters, tool versions). The
calibration-set sha256 is quant.data.manifest.manifest_sha256 of the manifest (manifest lines and the referenced
files' sha256); when there is no manifest module or no manifest (feeds passed in directly, or the reader's default
set), it is the sha256 of the feeds themselves (names, dtypes, shapes and bytes, in order), which costs one pass over
the feeds without inference.

The parameters also hold the reader's options (`reader`, from which `verify` rebuilds the reader) and what shapes the
feeds (`feeds`: the reader's key_settings(): reader kind, front end, batch size, frame stride, state pairs, n-best
settings, what audio of each line, how many lines), so two calibrations on different feeds never share a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from quant.calib.cache import (CacheEntry, CacheKey, check_entry, ensure_writable, entry_exists, read_entry, store_path,
                               write_entry)
from quant.calib.histstore import write_histograms
from quant.calib.ranges import FeedSource, RangeOptions, collect_ranges, collector_params, method_params
from quant.errors import CacheMismatch, CalibrationError
from quant.executor import Executor
from quant.fileio import sha256_file
from quant.paths import DEFAULT_OUT_ROOT

log = logging.getLogger(__name__)

METHODS = ("entropy", "minmax", "percentile")
# The calibration method used when none is asked for is the spec's ([defaults] calibration_method, per-graph
# override; quant.spec.DefaultsSpec holds the one default, percentile). The shipped specs' choice was measured on the trained weights of quant/assets (2026-11-21, 2 CPU cores): calibrated with each
# method on the first utterances of the committed sets (`quant calibrate MODEL --method M --limit N`: se_calib N=8,
# asr_calib N=16), ORT INT8 built from each cache (`quant build MODEL --precision int8 --cache C`), output SNR vs
# FP32 on held-out audio (scripts/compare_calibration.py: se_test noisy N=8, asr_test N=16), dB mean / min / pooled:
#   model          output        minmax              entropy             percentile (99.99)
#   dpcrn          enh           14.7 / 11.6 / 14.0  2.3 /  0.4 /  1.9  15.7 / 10.5 / 14.2
#     (its TensorRT int8-symmetric Q/DQ model, run in ORT: minmax 13.2 / 9.5 / 12.9, entropy 2.4 / 0.6 / 2.0,
#      percentile 13.6 / 9.7 / 12.6)
#   dpcrn-stream   enh (own      15.3 / 11.6 / 14.8  7.7 /  2.9 /  6.3  17.1 /  9.9 / 15.6
#                  states fed back)
#   wenet-encoder  encoder_out   26.6 / 24.8 / 26.6  23.7 / 20.7 / 23.4  27.7 / 25.7 / 27.4
#   wenet-decoder  score         35.7 / 29.9 / 35.3  36.9 / 31.0 / 36.3  36.8 / 27.5 / 35.8
#                  best_index agreement with FP32: minmax 14/16, entropy 15/16, percentile 16/16
# Entropy loses most of the DPCRN output (2-8 dB); minmax and percentile are within ~1-2 dB of
# each other on the SE models (percentile better on mean and pooled, minmax on the worst clip) and percentile is
# best on the encoder; on the decoder entropy and percentile tie on SNR and percentile keeps every rescoring choice.


def default_method() -> str:
    """The method of a calibration with neither a method nor a spec naming one (quant.spec.DefaultsSpec's)."""
    from quant.spec import DefaultsSpec

    return DefaultsSpec().calibration_method


@dataclass(frozen=True)
class CalibrateOptions:
    ranges: RangeOptions = field(default_factory=RangeOptions)
    force: bool = False  # overwrite a cache at the output path whose key differs
    trt_version: str | None = None  # header version digits; default: installed TensorRT or cache.DEFAULT_TRT_VERSION
    reader: Any = None  # quant.calib.readers.ReaderOptions (batch size, frame stride, limit...); part of the key
    out_root: Path = DEFAULT_OUT_ROOT  # the cache store is out_root/cache (when no out_cache is given)
    allow_outside: bool = False  # manifest paths may leave the manifest's folder (a run's subset manifests do)

    def __post_init__(self) -> None:  # anything else in the header makes a cache no reader (quant's, TensorRT's) reads
        if self.trt_version is not None and not re.fullmatch(r"[0-9]+", self.trt_version):
            raise CalibrationError(f"CalibrateOptions: trt_version must be ASCII digits (e.g. 8601), "
                                   f"got {self.trt_version!r}")


def default_store(out_root: Path = DEFAULT_OUT_ROOT) -> Path:
    """The cache store under an output root: engines/cache/ by default."""
    return Path(out_root) / "cache"


def calibrate(
    onnx_path: str | Path,
    model_kind: str | None = None,
    manifest: str | Path | None = None,
    method: str | None = None,
    out_cache: str | Path | None = None,
    options: CalibrateOptions | None = None,
    feeds: FeedSource | None = None,
    executor: Executor | None = None,
) -> CacheEntry:
    """Calibrate `onnx_path` and write its cache (default: the store, named by model, method and key digest).

    Feeds come from `feeds` when given (a model spec's: quant.tasks.calibration.calibrate_spec), else from
    quant.calib.readers.reader_for over `manifest` (streaming ONNX, or options.reader.feature); `model_kind` is a label
    recorded in the sidecar.
    A cache at the output path with the same key is reused; one with another key is refused unless options.force.
    `method` None: default_method(). `executor` (quant.executor) runs the range collection in shards there
    (quant.calib.sharded); the cache is byte-identical to the in-process one (None).
    """
    options = options or CalibrateOptions()
    method = method or default_method()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CalibrationError(f"ONNX model {onnx_path} not found: export it first (quant export) or pass an .onnx")
    if feeds is None:
        manifest = required_manifest(onnx_path, manifest)
        onnx_path = qdq_graph(onnx_path, reader(onnx_path, manifest, options.reader))
        source = reader(onnx_path, manifest, options.reader)
        key = make_key(onnx_path, method, options.ranges, manifest, source, reader_params(options.reader),
                       allow_outside=_allow_outside(options.reader))
    else:
        onnx_path = qdq_graph(onnx_path, feeds)
        source = feeds
        key = make_key(onnx_path, method, options.ranges, manifest, source, allow_outside=options.allow_outside)
    target = Path(out_cache) if out_cache is not None else store_path(default_store(options.out_root), key,
                                                                        onnx_path.stem)
    reused = _reuse(target, key, options.force)
    if reused is not None:
        return reused
    ensure_writable(target)  # a read-only store fails now, not after the calibration
    log.info("calibrating %s with %s on %s", onnx_path, method, manifest or "the reader's default set")
    if executor is None:
        result = collect_ranges(onnx_path, source, method, options.ranges)
    else:
        from quant.calib.sharded import collect_ranges_sharded

        result = collect_ranges_sharded(onnx_path, source, method, options.ranges, executor)
    info = {"model": str(onnx_path), "model_kind": model_kind, "manifest": str(manifest) if manifest else None}
    entry = write_entry(target, key, result, info, options.trt_version)
    write_histograms(entry.path, entry.cache_sha256, result.histograms)  # for the report; bound to the cache bytes
    return entry


def qdq_graph(onnx_path: Path, check_feeds: FeedSource) -> Path:
    """The graph to calibrate: below opset 13 (no per-channel Q/DQ) the upgrade that quant.calib.opset writes beside
    it, checked on the first of `check_feeds`; the build quantizes that same file, so the cache key names it."""
    from quant.calib.opset import MIN_QDQ_OPSET, ensure_opset

    feeds = check_feeds() if callable(check_feeds) else check_feeds
    return ensure_opset(onnx_path, MIN_QDQ_OPSET, onnx_path.parent, feeds).path


def make_key(onnx_path: str | Path, method: str, options: RangeOptions, manifest: str | Path | None = None,
             feeds: FeedSource | None = None, reader: dict[str, Any] | None = None, allow_outside: bool = False
             ) -> CacheKey:
    """The key a calibration of this model on this data with this method (and reader settings) would have; a feed
    source with key_settings() (every quant.calib.readers reader) adds what shapes its feeds."""
    path = Path(onnx_path)
    if not path.is_file():
        raise CalibrationError(f"ONNX model {path} not found: export it first (quant export) or pass an existing .onnx")
    params = method_params(method, options)
    if reader is not None:
        params["reader"] = reader
    settings = feed_settings(feeds)
    if settings is not None:
        params["feeds"] = settings
    return CacheKey.create(sha256_file(path), data_sha256(manifest, feeds, allow_outside), method, params)


def feed_settings(feeds: FeedSource | None) -> dict[str, Any] | None:
    """What shapes a reader's feeds (its key_settings(), as canonical JSON data); None for plain feed lists."""
    key_settings = getattr(feeds, "key_settings", None)
    if key_settings is None:
        return None
    return dict(json.loads(json.dumps(key_settings())))


def _allow_outside(reader_options: Any) -> bool:
    return bool(getattr(reader_options, "allow_outside", False))


def verify(cache_path: str | Path, onnx_path: str | Path, model_kind: str | None = None,
           manifest: str | Path | None = None) -> list[str]:
    """Why the cache at `cache_path` is not valid for this model and data today (empty list: a hit).

    The cache's own method, parameters and reader settings are kept; model sha256, calibration-set sha256, tool
    versions and the statistics collector are today's."""
    entry = read_entry(cache_path)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CalibrationError(f"ONNX model {onnx_path} not found")
    params = {**json.loads(entry.key.params), **collector_params(entry.key.method)}
    options = _reader_options(params.get("reader"))
    data_hash = _manifest_sha256(Path(manifest), _allow_outside(options)) if manifest is not None else None
    if data_hash is None or "feeds" in params:  # the reader as it would be built today, from the recorded options
        source = reader(onnx_path, required_manifest(onnx_path, manifest), options)
        data_hash = data_hash or feeds_sha256(source)
        if "feeds" in params:
            params["feeds"] = feed_settings(source)
    wanted = CacheKey.create(sha256_file(onnx_path), data_hash, entry.key.method, params)
    return entry.key.differences(wanted)


def _reader_options(recorded: dict[str, Any] | None) -> Any:
    if recorded is None:
        return None
    from quant.calib.readers import ReaderOptions

    try:
        recorded = dict(recorded, states=tuple(tuple(pair) for pair in recorded.get("states", ())))
        return ReaderOptions(**recorded)
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"the cache's reader settings {recorded} are not this quant's ReaderOptions ({error}); "
                               "re-run quant calibrate") from None


def reader_params(reader_options: Any) -> dict[str, Any]:
    """Reader settings that change the feeds (batch size pads WeNet batches, frame stride, limit): part of the key."""
    if reader_options is None:
        try:
            from quant.calib.readers import ReaderOptions
        except ImportError:
            return {}
        reader_options = ReaderOptions()
    if is_dataclass(reader_options) and not isinstance(reader_options, type):
        return dict(json.loads(json.dumps(asdict(reader_options))))
    return dict(json.loads(json.dumps(dict(reader_options))))


def data_sha256(manifest: str | Path | None, feeds: FeedSource | None, allow_outside: bool = False) -> str:
    if manifest is not None:
        manifest_hash = _manifest_sha256(Path(manifest), allow_outside)
        if manifest_hash is not None:
            return manifest_hash
    if feeds is None:
        raise CalibrationError("cannot key the calibration set: no manifest and no feeds")
    return feeds_sha256(feeds)


def _manifest_sha256(manifest: Path, allow_outside: bool = False) -> str | None:
    if not manifest.is_file():
        raise CalibrationError(f"calibration manifest {manifest} not found")
    try:
        from quant.data.manifest import manifest_sha256
    except ImportError:
        log.warning("quant.data.manifest is not available: keying the calibration set by its feeds' bytes")
        return None
    return str(manifest_sha256(manifest, allow_outside))


def feeds_sha256(feeds: FeedSource) -> str:
    """sha256 over every feed's input names, dtypes, shapes and bytes, in iteration order."""
    digest = hashlib.sha256()
    for feed in feeds() if callable(feeds) else feeds:
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def reader(onnx_path: Path, manifest: Path, reader_options: Any = None) -> FeedSource:
    """The feed source of quant.calib.readers for an ONNX file given without a spec (imported lazily)."""
    try:
        from quant.calib.readers import reader_for
    except ImportError as error:
        raise CalibrationError(f"no calibration reader available ({error}); pass feeds explicitly") from None
    source: FeedSource = reader_for(onnx_path, manifest, reader_options)
    return source


def required_manifest(onnx_path: Path, manifest: str | Path | None) -> Path:
    """The calibration manifest of an ONNX file given without a spec: it has to be named."""
    if manifest is None:
        raise CalibrationError(f"{onnx_path}: no calibration manifest; pass --data MANIFEST, or calibrate from a model "
                               "spec (quant calibrate SPEC), whose defaults name one")
    return Path(manifest)


def _reuse(target: Path, key: CacheKey, force: bool) -> CacheEntry | None:
    if not entry_exists(target):  # a stray uncommitted `.<name>.new` of a killed first write counts as nothing
        return None
    try:
        entry = check_entry(target, key)
    except (CacheMismatch, CalibrationError) as error:
        if force:
            log.warning("overwriting %s (--force): %s", target, error)
            return None
        raise CacheMismatch(f"{error} (refusing to overwrite {target}; pass --force or choose another -o)") from None
    log.info("reusing %s: key matches (model, data, method, versions)", target)
    return entry
