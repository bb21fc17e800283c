"""Calibration caches: TensorRT's file format on disk, a JSON sidecar with the key, a keyed store, exports.

Cache file (exactly TensorRT's): line 1 `TRT-<version digits>-<algorithm>`, then one `name: hex` line per tensor,
hex = the big-endian float32 bit pattern of scale = amax / 127, lowercase, no 0x and no leading zeros (a zero scale is
`0`), every line ending in a newline. Files written by TensorRT are read as they are, and reading then writing gives
the same bytes.

Header decision: we always write `EntropyCalibration2`, whatever method produced the ranges. TensorRT (<= 10) only
reuses a cache whose algorithm matches the calibrator that loads it, and the project's TensorRT backend loads caches
through an IInt8EntropyCalibrator2; writing `MinMaxCalibration` for minmax ranges would make TensorRT silently
recalibrate. The real method and its parameters live in the sidecar. The version digits are those of the installed
TensorRT when there is one, else DEFAULT_TRT_VERSION.

Sidecar `<cache>.json`: the key (model sha256, calibration-set sha256, method, parameters, tool versions), when and
from what it was made, the sha256 of the cache file it belongs to, and the full ranges (min, max, amax, counts), so
nothing is lost to the division by 127. A cache is reused only when every key field matches; otherwise the miss says
which field differs and how to fix it.

Concurrency: writers hold an exclusive fcntl lock on `.<cache name>.lock` beside the cache while they replace the cache
and then the sidecar (each atomically: temp file + rename); readers hold the shared lock. The sidecar records the cache
sha256, so a pair from two different runs can never pass as one entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from quant.calib.ranges import RangeResult, TensorRange
from quant.errors import CacheMismatch, CalibrationError
from quant.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes

log = logging.getLogger(__name__)

ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "101300"  # TensorRT 10.13.0, the last line of releases with implicit INT8 calibration
INT8_MAX = 127
SIDECAR_FORMAT = "quant-calibration-cache/1"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


# ---- TensorRT cache format -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationCache:
    """A TensorRT calibration cache: header and, per tensor in file order, the float32 bits of its scale."""

    version: str
    algorithm: str
    scale_bits: Mapping[str, int]

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def scales(self) -> dict[str, float]:
        return {name: bits_to_float(bits) for name, bits in self.scale_bits.items()}

    def amax(self) -> dict[str, float]:
        return {name: scale * INT8_MAX for name, scale in self.scales().items()}


def float_to_bits(value: float) -> int:
    return int(struct.unpack(">I", struct.pack(">f", value))[0])


def bits_to_float(bits: int) -> float:
    return float(struct.unpack(">f", struct.pack(">I", bits))[0])


def scale_of(amax: float) -> float:
    """float32(amax / 127): the scale TensorRT stores."""
    return float(np.float32(amax / INT8_MAX))


def trt_version_digits(version: str) -> str:
    """'8.4.1' -> '8401', '10.14.1' -> '101401' (TensorRT's NV_TENSORRT_VERSION)."""
    parts = [int(part) for part in re.findall(r"\d+", version)[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def installed_trt_version() -> str:
    from importlib import metadata

    try:  # the distribution's version; importing tensorrt is quant.backends.trt's business
        return trt_version_digits(metadata.version("tensorrt"))
    except metadata.PackageNotFoundError:
        return DEFAULT_TRT_VERSION


def cache_from_amax(amax: Mapping[str, float], version: str | None = None, algorithm: str = ALGORITHM
                    ) -> CalibrationCache:
    bits = {name: float_to_bits(scale_of(value)) for name, value in amax.items()}
    return CalibrationCache(version or installed_trt_version(), algorithm, bits)


def format_cache(cache: CalibrationCache) -> bytes:
    lines = [cache.header] + [f"{name}: {bits:x}" for name, bits in cache.scale_bits.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_cache(data: bytes, source: str = "<bytes>") -> CalibrationCache:
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CalibrationError(f"{source} is not a TensorRT calibration cache (not text): {error}") from error
    match = _HEADER.match(lines[0].strip()) if lines else None
    if match is None:
        raise CalibrationError(f"{source}: first line {lines[0][:60] if lines else ''!r} is not a TensorRT cache "
                               "header like TRT-8401-EntropyCalibration2")
    bits: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        parsed = _parse_hex(value.strip()) if sep and name else None
        if parsed is None:
            raise CalibrationError(f"{source}:{number}: expected 'tensor_name: <hex float32 scale>', got {line!r}")
        bits[name] = parsed
    return CalibrationCache(match.group(1), match.group(2), bits)


def _parse_hex(text: str) -> int | None:
    if not re.fullmatch(r"[0-9a-fA-F]{1,8}", text):
        return None
    return int(text, 16)


def read_cache(path: str | Path) -> CalibrationCache:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration cache {path} not found")
    return parse_cache(path.read_bytes(), str(path))


# ---- key and sidecar -----------------------------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import quant

    return {"quant": quant.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__}


def _canonical(mapping: Mapping[str, Any]) -> str:
    return json.dumps(dict(mapping), sort_keys=True)


@dataclass(frozen=True)
class CacheKey:
    """Everything a cache's ranges depend on. Two caches are interchangeable only when all fields are equal."""

    model_sha256: str
    data_sha256: str
    method: str
    params: str = "{}"  # canonical JSON of the method parameters
    versions: str = field(default_factory=lambda: _canonical(tool_versions()))  # canonical JSON

    @classmethod
    def create(cls, model_sha256: str, data_sha256: str, method: str, params: Mapping[str, Any],
               versions: Mapping[str, str] | None = None) -> "CacheKey":
        return cls(model_sha256, data_sha256, method, _canonical(params),
                   _canonical(versions if versions is not None else tool_versions()))

    def to_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "data_sha256": self.data_sha256, "method": self.method,
                "params": json.loads(self.params), "versions": json.loads(self.versions)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CacheKey":
        try:
            return cls.create(data["model_sha256"], data["data_sha256"], data["method"], data["params"],
                              data["versions"])
        except (KeyError, TypeError) as error:
            raise CalibrationError(f"sidecar key is incomplete ({error}); re-run quant calibrate") from error

    def digest(self) -> str:
        return sha256_bytes(_canonical(self.to_dict()).encode("utf-8"))

    def differences(self, wanted: "CacheKey") -> list[str]:
        """Why this (cached) key is not `wanted`, one reason per differing field, with the fix."""
        reasons = []
        if self.model_sha256 != wanted.model_sha256:
            reasons.append(f"model sha256 differs: cache {self.model_sha256[:12]}, model {wanted.model_sha256[:12]} "
                           "-> the ONNX export changed; re-run quant calibrate")
        if self.data_sha256 != wanted.data_sha256:
            reasons.append(f"calibration-set sha256 differs: cache {self.data_sha256[:12]}, data "
                           f"{wanted.data_sha256[:12]} -> re-run quant calibrate on this data")
        if self.method != wanted.method:
            reasons.append(f"method differs: cache {self.method}, requested {wanted.method}")
        elif self.params != wanted.params:
            reasons.append(f"method parameters differ: cache {self.params}, requested {wanted.params}")
        if self.versions != wanted.versions:
            mine, theirs = json.loads(self.versions), json.loads(wanted.versions)
            changed = [f"{tool} {mine.get(tool)} -> {theirs.get(tool)}" for tool in sorted(set(mine) | set(theirs))
                       if mine.get(tool) != theirs.get(tool)]
            reasons.append(f"tool versions differ ({', '.join(changed)}) -> re-run quant calibrate")
        return reasons


@dataclass(frozen=True)
class CacheEntry:
    """A cache file with its sidecar: the key, the TensorRT cache and the full ranges."""

    path: Path
    key: CacheKey
    cache: CalibrationCache
    ranges: Mapping[str, TensorRange]
    created: str
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def sidecar_path(cache_path: str | Path) -> Path:
    path = Path(cache_path)
    return path.with_name(path.name + ".json")


@contextlib.contextmanager
def locked(cache_path: str | Path, exclusive: bool = True) -> Iterator[None]:
    """fcntl lock on `.<name>.lock` beside the cache (the lock file is kept: deleting it would race)."""
    path = Path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_entry(cache_path: str | Path, key: CacheKey, result: RangeResult, info: Mapping[str, Any] | None = None,
                version: str | None = None) -> CacheEntry:
    """Write the TensorRT cache and then its sidecar, atomically and under the lock."""
    path = Path(cache_path)
    if key.method != result.method:
        raise CalibrationError(f"key method {key.method} does not match the ranges' method {result.method}")
    cache = cache_from_amax(result.amax, version)
    data = format_cache(cache)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sidecar = {
        "format": SIDECAR_FORMAT, "key": key.to_dict(), "created": created, "cache_file": path.name,
        "cache_sha256": sha256_bytes(data), "header": cache.header, "batches": result.batches,
        "skipped": list(result.skipped), "info": dict(info or {}),
        "tensors": {name: _range_to_dict(item) for name, item in result.tensors.items()},
    }
    with locked(path):
        atomic_write_bytes(path, data)
        atomic_write_json(sidecar_path(path), sidecar)
    log.info("wrote %s (%d tensors, %s) and its sidecar", path, len(cache.scale_bits), key.method)
    entry_info = dict(info or {}, batches=result.batches, skipped=list(result.skipped))
    return CacheEntry(path, key, cache, dict(result.tensors), created, entry_info)


def read_entry(cache_path: str | Path) -> CacheEntry:
    """Read a cache and its sidecar; they must belong together."""
    path = Path(cache_path)
    with locked(path, exclusive=False):
        if not path.is_file():
            raise CalibrationError(f"calibration cache {path} not found")
        data = path.read_bytes()
        side = sidecar_path(path)
        if not side.is_file():
            raise CacheMismatch(f"{path} has no sidecar {side.name}: its key (model, data, method) is unknown, so "
                                "it cannot be reused safely -> re-run quant calibrate")
        meta = json.loads(side.read_text())
    if meta.get("format") != SIDECAR_FORMAT:
        raise CacheMismatch(f"{side}: unknown sidecar format {meta.get('format')!r}, expected {SIDECAR_FORMAT}")
    if meta.get("cache_sha256") != sha256_bytes(data):
        raise CacheMismatch(f"{path} does not match its sidecar {side.name} (cache sha256 differs): the pair was "
                            "not written by one run -> re-run quant calibrate --force")
    ranges = {name: _range_from_dict(name, item) for name, item in meta["tensors"].items()}
    info = dict(meta.get("info", {}), batches=meta.get("batches", 0), skipped=meta.get("skipped", []))
    return CacheEntry(path, CacheKey.from_dict(meta["key"]), parse_cache(data, str(path)), ranges,
                      str(meta.get("created", "")), info)


def check_entry(cache_path: str | Path, key: CacheKey) -> CacheEntry:
    """The entry at `cache_path` if its key equals `key`; else CacheMismatch naming each differing field."""
    entry = read_entry(cache_path)
    reasons = entry.key.differences(key)
    if reasons:
        raise CacheMismatch(f"{cache_path}: " + "; ".join(reasons))
    return entry


def remove_entry(cache_path: str | Path) -> None:
    path = Path(cache_path)
    with locked(path):
        if not path.exists() and not sidecar_path(path).exists():
            raise CalibrationError(f"calibration cache {path} not found")
        sidecar_path(path).unlink(missing_ok=True)  # sidecar first: a cache without sidecar is never reused
        path.unlink(missing_ok=True)


def _range_to_dict(item: TensorRange) -> dict[str, Any]:
    return {"amax": item.amax, "min": item.minimum, "max": item.maximum, "count": item.count,
            "nonfinite": item.nonfinite}


def _range_from_dict(name: str, item: Mapping[str, Any]) -> TensorRange:
    return TensorRange(name, float(item["amax"]), float(item["min"]), float(item["max"]), int(item["count"]),
                       int(item["nonfinite"]))


# ---- the store -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    entry: CacheEntry | None
    reason: str  # why it is a miss ("" on a hit)

    @property
    def hit(self) -> bool:
        return self.entry is not None


def store_path(store_dir: str | Path, key: CacheKey, name: str = "calib") -> Path:
    """Where the store keeps the cache of `key`: `<store>/<name>-<method>-<key digest 12>.cache`."""
    return Path(store_dir) / f"{name}-{key.method}-{key.digest()[:12]}.cache"


def list_entries(store_dir: str | Path) -> list[CacheEntry]:
    entries = []
    for side in sorted(Path(store_dir).glob("*.json")):
        cache = side.with_name(side.name[: -len(".json")])
        if not cache.is_file():
            continue
        try:
            entries.append(read_entry(cache))
        except (CacheMismatch, CalibrationError, ValueError, KeyError) as error:
            log.warning("skipping %s: %s", cache, error)
    return entries


def lookup(store_dir: str | Path, key: CacheKey) -> Lookup:
    """A hit only when every key field matches; a miss says how the closest entry differs."""
    entries = list_entries(store_dir)
    for entry in entries:
        if entry.key == key:
            return Lookup(entry, "")
    if not entries:
        return Lookup(None, f"no calibration caches in {store_dir}")
    closest = min(entries, key=lambda entry: len(entry.key.differences(key)))
    return Lookup(None, f"closest cache {closest.path.name}: " + "; ".join(closest.key.differences(key)))


# ---- comparison and exports ----------------------------------------------------------------------------------------


def diff_caches(first: CalibrationCache, second: CalibrationCache) -> list[tuple[str, float | None, float | None]]:
    """Per tensor (union, first file's order first): (name, scale in first, scale in second); None where absent."""
    a, b = first.scales(), second.scales()
    names = list(dict.fromkeys([*a, *b]))
    return [(name, a.get(name), b.get(name)) for name in names]


def to_ort_json(entry: CacheEntry, symmetric: bool = True, method: str = "MinMax") -> dict[str, Any]:
    """ONNX Runtime's calibration cache (TensorsData JSON, what quantize_static(calibration_cache_path=) loads).

    symmetric: [-amax, amax] per tensor (what TensorRT and ActivationSymmetric use); otherwise the observed
    [min, max] clipped to [-amax, amax]. `method` must equal the calibrate_method passed to quantize_static.
    """
    data = {}
    for name, (lowest, highest) in _export_ranges(entry, symmetric).items():
        data[name] = {"lowest": _ort_array(lowest), "highest": _ort_array(highest), "CLS": "TensorData"}
    return {"CLS": "TensorsData", "data": data, "smooth_quant": False,
            "calibration_method": {"CLS": "CalibrationMethod", "value": f"CalibrationMethod.{method}"}}


def to_qdq_params(entry: CacheEntry, encoding: str = "int8") -> dict[str, dict[str, Any]]:
    """(scale, zero_point) per tensor: 'int8' symmetric (zero point 0, TensorRT) or 'uint8' asymmetric (ORT CPU).

    A zero range gets scale 1.0 and zero point 0, as ONNX Runtime does (a zero scale is not a valid Q/DQ scale).
    """
    if encoding not in ("int8", "uint8"):
        raise CalibrationError(f"unknown Q/DQ encoding {encoding!r}; expected int8 or uint8")
    params = {}
    for name, (lowest, highest) in _export_ranges(entry, symmetric=encoding == "int8").items():
        if encoding == "int8":
            scale, zero_point = scale_of(highest), 0
        else:
            lowest, highest = min(lowest, 0.0), max(highest, 0.0)
            scale = float(np.float32((highest - lowest) / 255.0))
            zero_point = int(np.clip(round(-lowest / scale), 0, 255)) if scale > 0 else 0
        params[name] = {"scale": scale if scale > 0 else 1.0, "zero_point": zero_point, "dtype": encoding}
    return params


def _export_ranges(entry: CacheEntry, symmetric: bool) -> dict[str, tuple[float, float]]:
    ranges = {}
    for name, amax in entry.cache.amax().items():
        item = entry.ranges.get(name)
        if symmetric or item is None:
            amax = item.amax if item is not None else amax
            ranges[name] = (-amax, amax)
        else:
            ranges[name] = (max(item.minimum, -item.amax), min(item.maximum, item.amax))
    return ranges


def _ort_array(value: float) -> dict[str, Any]:
    return {"data": float(np.float32(value)), "dtype": "float32", "CLS": "numpy.array"}
