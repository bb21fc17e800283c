"""Calibration caches: TensorRT's file format on disk, a JSON sidecar with the key, a keyed store, exports.

Cache file (exactly TensorRT's): line 1 `TRT-<version digits>-<algorithm>`, then one `name: hex` line per tensor,
hex = the big-endian float32 bit pattern of scale = amax / 127, lowercase, no 0x and no leading zeros (a zero scale is
`0`), every line ending in a newline. Files written by TensorRT are read as they are, and reading then writing gives
the same bytes; so are TensorRT 4's, whose first line is just `1` (no version, no algorithm). A tensor named twice,
a NaN or negative scale, or a header version that is not ASCII digits is an error naming the line; an infinite scale
(an activation that overflowed during TensorRT's calibration) reads with a warning, so `quant cache show|diff` can
inspect such a cache, but no build uses it (its sidecar would need an infinite amax, which is refused). format_cache
refuses to write what parse_cache could not read back (e.g. a version with spaces, a tensor name with a newline).

Header decision: we always write `EntropyCalibration2`, whatever method produced the ranges. TensorRT (<= 10) only
reuses a cache whose algorithm matches the calibrator that loads it, and the project's TensorRT backend loads caches
through an IInt8EntropyCalibrator2; writing `MinMaxCalibration` for minmax ranges would make TensorRT silently
recalibrate. The real method and its parameters live in the sidecar. The version digits are those of the installed
TensorRT when there is one, else DEFAULT_TRT_VERSION.

Sidecar `<cache>.json`: the key (model sha256, calibration-set sha256, method, parameters, tool versions), when and
from what it was made, the sha256 of the cache file it belongs to, and the full ranges (min, max, amax, counts), so
nothing is lost to the division by 127. A cache is reused only when every key field matches; otherwise the miss says
which field differs and how to fix it.

Pairs, replaced as one (kill -9, a full disk, a failing rename): a cache and its sidecar are two files and no rename
replaces two files at once, so a writer switches the pair through two fixed pending names beside the cache, under an
exclusive fcntl lock on `.<name>.lock`:
  1. the new cache bytes go to `.<name>.new` (temp file, fsync, rename; quant.fileio.atomic_write_bytes);
  2. the new sidecar, which records the sha256 of those bytes, goes to `.<name>.json.new` the same way. This rename is
     the commit point: before it the entry is the old pair, after it the new pair;
  3. `.<name>.new` is renamed over `<name>`, then `.<name>.json.new` over `<name>.json`.
Readers resolve an entry by one rule (_resolve): a pending sidecar together with a cache file (final or pending) whose
sha256 it records is the entry; otherwise `<name>` with `<name>.json`, which must match each other. So a failure
before step 2 leaves the old pair (a stray `.<name>.new` is no entry: a failed first write blocks nothing), a failure
in step 3 leaves the committed new pair, which readers already see; the next writer, holding the lock, first finishes
a committed pair and deletes everything uncommitted (pending files, temp files of killed writers).

Reading never writes: readers take the shared lock only when the lock file already exists, and otherwise read
unlocked and re-read under the lock if a writer appeared meanwhile, so a read-only store can be listed, shown,
verified and built from.

The sidecar is bound to its cache in both directions: its cache_sha256 must be the cache bytes' sha256, it must list
exactly the cache's tensors, and each tensor's float32(amax / 127) must equal the cache's scale to within one float32
step; every amax, min and max is finite (amax >= 0). quant checks what it writes by the same rules it reads with.

Beside an entry calibrate() may keep `<cache>.hist.npz`, the |x| histograms its ranges came from
(quant.calib.histstore): derived and optional, bound to the cache bytes by sha256, never part of the pair;
remove_entry deletes it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from quant.calib.histstore import histogram_path
from quant.calib.ranges import RangeResult, TensorRange
from quant.errors import CacheMismatch, CalibrationError, FileAccessError, QuantError
from quant.fileio import atomic_write_bytes, sha256_bytes

log = logging.getLogger(__name__)

ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "101300"  # TensorRT 10.13.0, the last line of releases with implicit INT8 calibration
INT8_MAX = 127
SIDECAR_FORMAT = "quant-calibration-cache/1"
LEGACY_HEADER = "1"  # TensorRT 4: the first line is only this; such a cache has algorithm ""
_HEADER = re.compile(r"TRT-([0-9]+)-([A-Za-z0-9_]+)", re.ASCII)  # ASCII only: \d would accept e.g. Arabic digits
_VERSION = re.compile(r"[0-9]+", re.ASCII)
_HEX = re.compile(r"[0-9a-fA-F]{1,8}", re.ASCII)
_SIGN_BIT = 0x80000000


# ---- TensorRT cache format -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationCache:
    """A TensorRT calibration cache: header and, per tensor in file order, the float32 bits of its scale."""

    version: str  # TensorRT's version digits ("1" for a TensorRT 4 cache)
    algorithm: str  # "" for a TensorRT 4 cache (header `1`)
    scale_bits: Mapping[str, int]

    @property
    def header(self) -> str:
        return LEGACY_HEADER if not self.algorithm else f"TRT-{self.version}-{self.algorithm}"

    def scales(self) -> dict[str, float]:
        return {name: bits_to_float(bits) for name, bits in self.scale_bits.items()}

    def amax(self) -> dict[str, float]:
        return {name: scale * INT8_MAX for name, scale in self.scales().items()}



def _os_reason(error: BaseException) -> str:
    """The operating system's words for a failed write, also when fileio already wrapped the OSError."""
    cause = error if isinstance(error, OSError) else error.__cause__
    return str(cause.strerror or cause) if isinstance(cause, OSError) else str(error)

def float_to_bits(value: float) -> int:
    return int(struct.unpack(">I", struct.pack(">f", value))[0])


def bits_to_float(bits: int) -> float:
    return float(struct.unpack(">f", struct.pack(">I", bits))[0])


def scale_of(amax: float) -> float:
    """float32(amax / 127): the scale TensorRT stores (inf when amax / 127 exceeds float32)."""
    with np.errstate(over="ignore"):
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
    """The cache file's bytes; CalibrationError if parse_cache would not read exactly this cache back."""
    if cache.algorithm and not (_VERSION.fullmatch(cache.version) and _HEADER.fullmatch(cache.header)):
        raise CalibrationError(f"cannot write cache header {cache.header!r}: the TensorRT version must be ASCII digits "
                               "(e.g. 8401, 101300) and the algorithm a word (e.g. EntropyCalibration2)")
    lines = [cache.header] + [f"{name}: {bits:x}" for name, bits in cache.scale_bits.items()]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    try:
        parsed = _parse(data, "the cache being written", warn=False)
    except CalibrationError as error:
        raise CalibrationError(f"cannot write a cache quant could not read back: {error}") from None
    unreadable = [name for name in cache.scale_bits if parsed.scale_bits.get(name) != cache.scale_bits[name]]
    if unreadable or len(parsed.scale_bits) != len(cache.scale_bits):
        raise CalibrationError(f"cannot write a cache quant could not read back: tensor names {unreadable[:3]!r} "
                               "must be one non-empty line each")
    return data


def parse_cache(data: bytes, source: str = "<bytes>") -> CalibrationCache:
    """Read a TensorRT calibration cache; CalibrationError naming the line for anything TensorRT would not write."""
    return _parse(data, source, warn=True)


def _parse(data: bytes, source: str, warn: bool) -> CalibrationCache:
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CalibrationError(f"{source} is not a TensorRT calibration cache (not text): {error}") from error
    first = lines[0].strip() if lines else ""
    match = _HEADER.fullmatch(first)
    if match is not None:
        version, algorithm = match.group(1), match.group(2)
    elif first == LEGACY_HEADER:
        version, algorithm = LEGACY_HEADER, ""
    else:
        raise CalibrationError(f"{source}:1: {first[:60]!r} is not a TensorRT cache header like "
                               "TRT-8401-EntropyCalibration2 (version in ASCII digits)")
    bits: dict[str, int] = {}
    lines_of: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        parsed = _parse_hex(value.strip()) if sep and name else None
        if parsed is None:
            raise CalibrationError(f"{source}:{number}: expected 'tensor_name: <hex float32 scale>', got {line[:80]!r}")
        if name in lines_of:
            raise CalibrationError(f"{source}:{number}: tensor {name!r} appears again (first on line "
                                   f"{lines_of[name]}); a cache holds one scale per tensor")
        scale = bits_to_float(parsed)
        if math.isnan(scale) or parsed & _SIGN_BIT:
            raise CalibrationError(f"{source}:{number}: tensor {name!r} has scale {scale} (bits {value.strip()}); a "
                                   "scale must be a number >= 0")
        if math.isinf(scale) and warn:
            log.warning("%s:%d: tensor %r has an infinite scale: it cannot be quantized", source, number, name)
        bits[name] = parsed
        lines_of[name] = number
    return CalibrationCache(version, algorithm, bits)


def _parse_hex(text: str) -> int | None:
    if not _HEX.fullmatch(text):
        return None
    return int(text, 16)


def read_cache(path: str | Path) -> CalibrationCache:
    """The cache at `path` (as quant's store resolves it: a committed pending pair counts)."""
    path = Path(path)
    with _shared_lock(path):
        data = _resolve(path).data
    if data is None:
        raise CalibrationError(f"calibration cache {path} not found")
    return parse_cache(data, str(path))


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
            reasons.append(f"method parameters differ: cache {self.params}, requested {wanted.params} -> re-run "
                           "quant calibrate")
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
    cache_sha256: str = ""  # sha256 of the cache file's bytes (the sidecar's record, checked on read)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def sidecar_path(cache_path: str | Path) -> Path:
    path = Path(cache_path)
    return path.with_name(path.name + ".json")


def _pending_cache(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def _pending_sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.json.new")


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def has_sidecar(cache_path: str | Path) -> bool:
    """Is there a sidecar (in place or committed pending) for the cache at `cache_path`?"""
    path = Path(cache_path)
    return os.path.lexists(sidecar_path(path)) or os.path.lexists(_pending_sidecar(path))


def entry_exists(cache_path: str | Path) -> bool:
    """Is there anything at `cache_path` that reads as (part of) an entry? A stray uncommitted `.<name>.new` is not."""
    return os.path.lexists(cache_path) or has_sidecar(cache_path)


def ensure_writable(cache_path: str | Path) -> None:
    """Fail early, in one line, when the entry at `cache_path` could not be written (read-only store, no folder
    permission): before minutes of calibration rather than after. Creates the folder and the lock file only."""
    path = Path(cache_path)
    try:
        with _exclusive_lock(path):
            pass
    except (OSError, FileAccessError) as error:
        raise CalibrationError(f"cannot write calibration cache {path}: {_os_reason(error)} -> choose a "
                               "writable -o/--store") from None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Writers: fcntl lock on `.<name>.lock` beside the cache (the lock file is kept: deleting it would race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(path), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[bool]:
    """Readers: the shared lock if the lock file exists (opened read-only: never created); yields whether it is held."""
    try:
        handle = open(_lock_path(path), "rb")
    except OSError:  # no writer has been here (or the lock is unreadable): read unlocked, read_entry re-checks
        yield False
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise CalibrationError(f"{path} is a folder, not a calibration cache file") from None
    except OSError as error:
        raise CalibrationError(f"cannot read {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class _Pair:
    """What the files beside `path` say the entry is (see the module docstring's rule)."""

    cache_file: Path
    data: bytes | None
    sidecar_file: Path
    sidecar: bytes | None

    @property
    def pending(self) -> bool:
        return self.sidecar_file.name.endswith(".json.new")


def _recorded_sha(sidecar: bytes) -> str | None:
    try:
        meta = json.loads(sidecar)
    except (ValueError, RecursionError):
        return None
    value = meta.get("cache_sha256") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _resolve(path: Path) -> _Pair:
    """The entry at `path`: a committed pending pair if there is one, else the cache file with its sidecar."""
    pending = _read_bytes(_pending_sidecar(path))
    wanted = _recorded_sha(pending) if pending is not None else None
    if wanted is not None:
        for candidate in (path, _pending_cache(path)):
            data = _read_bytes(candidate)
            if data is not None and sha256_bytes(data) == wanted:
                return _Pair(candidate, data, _pending_sidecar(path), pending)
    side = sidecar_path(path)
    return _Pair(path, _read_bytes(path), side, _read_bytes(side))


def write_entry(cache_path: str | Path, key: CacheKey, result: RangeResult, info: Mapping[str, Any] | None = None,
                version: str | None = None) -> CacheEntry:
    """Replace the entry at `cache_path` with this cache and sidecar as one pair (module docstring), under the lock.

    CalibrationError (one line) when the store cannot be written (read-only, full disk); the previous pair stays."""
    path = Path(cache_path)
    if key.method != result.method:
        raise CalibrationError(f"key method {key.method} does not match the ranges' method {result.method}")
    # quant writes nothing it would refuse to read: the same checks as read_entry, before touching the disk
    tensors = {name: _range_to_dict(item) for name, item in result.tensors.items()}
    try:
        ranges = _ranges_of({"tensors": tensors}, sidecar_path(path))
    except QuantError as error:
        raise CalibrationError(f"not writing {path}: its sidecar would be refused when read: {error}") from None
    cache = cache_from_amax(result.amax, version)
    data = format_cache(cache)
    _check_binding(cache, ranges, path, sidecar_path(path))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sidecar = {
        "format": SIDECAR_FORMAT, "key": key.to_dict(), "created": created, "cache_file": path.name,
        "cache_sha256": sha256_bytes(data), "header": cache.header, "batches": int(result.batches),
        "skipped": list(result.skipped), "info": dict(info or {}), "tensors": tensors,
    }
    side_bytes = (json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    try:
        with _exclusive_lock(path):
            _recover(path)
            _commit(path, data, side_bytes)
            try:
                _finish(path)
            except OSError as error:  # committed: readers already see the new pair; the next writer finishes it
                log.warning("%s: new cache committed but not yet renamed into place (%s)", path, error)
    except (OSError, FileAccessError) as error:  # fileio reports its temp file; name the cache the user asked for
        raise CalibrationError(f"cannot write calibration cache {path}: {_os_reason(error)} -> free space or "
                               "choose a writable -o/--store (any previous cache there is unchanged)") from None
    log.info("wrote %s (%d tensors, %s) and its sidecar", path, len(cache.scale_bits), key.method)
    entry_info = dict(info or {}, batches=result.batches, skipped=list(result.skipped))
    return CacheEntry(path, key, cache, dict(result.tensors), created, entry_info, sha256_bytes(data))


def _commit(path: Path, data: bytes, sidecar: bytes) -> None:
    """Steps 1 and 2: the pending cache, then the pending sidecar (the commit point). On failure nothing is left."""
    try:
        atomic_write_bytes(_pending_cache(path), data)
        atomic_write_bytes(_pending_sidecar(path), sidecar)
    except BaseException:
        _pending_sidecar(path).unlink(missing_ok=True)
        _pending_cache(path).unlink(missing_ok=True)
        raise


def _finish(path: Path) -> None:
    """Step 3: move a committed pending pair into place, cache first (the pending sidecar still binds it)."""
    if _pending_cache(path).exists():
        os.replace(_pending_cache(path), path)
    os.replace(_pending_sidecar(path), sidecar_path(path))
    _fsync_dir(path.parent)


def _recover(path: Path) -> None:
    """Under the exclusive lock: finish a committed pair a killed writer left, delete everything uncommitted."""
    if _resolve(path).pending:
        _finish(path)
    _pending_sidecar(path).unlink(missing_ok=True)
    _pending_cache(path).unlink(missing_ok=True)
    names = (path.name, sidecar_path(path).name, _pending_cache(path).name, _pending_sidecar(path).name)
    # quant.fileio temp files are `.<target>.<8 random chars>.tmp`; only writers of this entry (we hold its lock) make them
    temp = re.compile("|".join(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp" for name in names))
    for item in path.parent.iterdir():
        if temp.fullmatch(item.name):
            item.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable across a power cut (a kill needs no fsync: the kernel keeps the renames)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync a folder
            raise
    finally:
        os.close(handle)


def read_entry(cache_path: str | Path) -> CacheEntry:
    """Read a cache and its sidecar; they must belong together (module docstring). Never writes anything."""
    path = Path(cache_path)
    with _shared_lock(path) as held:
        pair = _resolve(path)
    if not held and os.path.exists(_lock_path(path)) and not _binds(pair):
        with _shared_lock(path):  # a writer started while we read unlocked: read again under its lock
            pair = _resolve(path)
    return _entry_of(path, pair)


def _binds(pair: _Pair) -> bool:
    return pair.data is not None and pair.sidecar is not None and _recorded_sha(pair.sidecar) == sha256_bytes(pair.data)


def _entry_of(path: Path, pair: _Pair) -> CacheEntry:
    if pair.data is None:
        raise CalibrationError(f"calibration cache {path} not found")
    side = sidecar_path(path)
    if pair.sidecar is None:
        raise CacheMismatch(f"{path} has no sidecar {side.name}: its key (model, data, method) is unknown, so "
                            "it cannot be reused safely -> re-run quant calibrate")
    meta = _load_sidecar(pair.sidecar, pair.sidecar_file)
    if meta["cache_sha256"] != sha256_bytes(pair.data):
        raise CacheMismatch(f"{path} does not match its sidecar {side.name} (cache sha256 differs): the pair was "
                            "not written by one run -> re-run quant calibrate --force")
    cache = parse_cache(pair.data, str(path))
    ranges = _ranges_of(meta, pair.sidecar_file)
    _check_binding(cache, ranges, path, pair.sidecar_file)
    key = _key_of(meta, pair.sidecar_file)
    info = dict(meta["info"], batches=meta["batches"], skipped=meta["skipped"])
    return CacheEntry(path, key, cache, ranges, meta["created"], info, meta["cache_sha256"])


def check_entry(cache_path: str | Path, key: CacheKey) -> CacheEntry:
    """The entry at `cache_path` if its key equals `key`; else CacheMismatch naming each differing field."""
    entry = read_entry(cache_path)
    reasons = entry.key.differences(key)
    if reasons:
        raise CacheMismatch(f"{cache_path}: " + "; ".join(reasons))
    return entry


def remove_entry(cache_path: str | Path) -> None:
    """Remove a calibration cache with its own sidecar (and its derived histograms); anything else (another file, a cache whose sidecar is
    missing or not its own) is refused. A missing path is an error that creates nothing (no lock file, no folder)."""
    path = Path(cache_path)
    if not entry_exists(path):
        raise CalibrationError(f"calibration cache {path} not found")
    with _shared_lock(path):
        pair = _resolve(path)
    why = ""
    if pair.data is None:
        why = "there is no cache file, only a sidecar"
    else:
        try:
            parse_cache(pair.data, str(path))
        except CalibrationError as error:
            why = f"it is not a TensorRT calibration cache ({error})"
    if not why and pair.sidecar is None:
        why = f"it has no sidecar {sidecar_path(path).name}, so quant did not write it"
    if not why:
        try:
            read_entry(path)
        except (CacheMismatch, CalibrationError) as error:
            why = f"its sidecar is not its own ({error})"
    if why:
        raise CalibrationError(f"refusing to remove {path}: {why}; quant cache rm removes only a calibration cache "
                               "with its own sidecar (delete other files yourself)")
    try:
        with _exclusive_lock(path):
            # sidecars first: a cache left without its sidecar is never reused; its derived histograms last
            for item in (_pending_sidecar(path), sidecar_path(path), _pending_cache(path), path, histogram_path(path)):
                item.unlink(missing_ok=True)
    except OSError as error:
        raise CalibrationError(f"cannot remove calibration cache {path}: {error.strerror or error}") from None


# ---- sidecar checks (what quant writes; read_entry and write_entry both apply them) ---------------------------------


def _bad_sidecar(side: Path, what: str) -> CalibrationError:
    return CalibrationError(f"sidecar {side}: {what}; it is not the sidecar quant writes -> re-run quant calibrate "
                            "--force")


def _load_sidecar(data: bytes, side: Path) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise _bad_sidecar(side, f"not JSON ({str(error)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _bad_sidecar(side, f"format {str(found)[:40]!r}, expected a JSON object of format {SIDECAR_FORMAT}")
    for name, kind in (("cache_sha256", str), ("created", str), ("key", dict), ("tensors", dict), ("info", dict),
                       ("skipped", list)):
        if not isinstance(meta.get(name), kind):
            raise _bad_sidecar(side, f"field {name!r} is missing or not a {kind.__name__}")
    if not _is_count(meta.get("batches")):
        raise _bad_sidecar(side, "field 'batches' is missing or not a count")
    return meta


def _key_of(meta: Mapping[str, Any], side: Path) -> CacheKey:
    key = meta["key"]
    for name, kind in (("model_sha256", str), ("data_sha256", str), ("method", str), ("params", dict),
                       ("versions", dict)):
        if not isinstance(key.get(name), kind):
            raise _bad_sidecar(side, f"key field {name!r} is missing or not a {kind.__name__}")
    return CacheKey.from_dict(key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ranges_of(meta: Mapping[str, Any], side: Path) -> dict[str, TensorRange]:
    ranges = {}
    for name, item in meta["tensors"].items():
        if not isinstance(item, dict):
            raise _bad_sidecar(side, f"tensor {name!r} is not an object")
        values = {field_: item.get(field_) for field_ in ("amax", "min", "max")}
        if not all(_is_number(value) for value in values.values()):
            raise _bad_sidecar(side, f"tensor {name!r}: amax, min and max must be numbers, got {values}")
        amax, low, high = (float(item[field_]) for field_ in ("amax", "min", "max"))
        if not all(math.isfinite(value) for value in (amax, low, high)) or amax < 0 or math.isinf(scale_of(amax)):
            raise CacheMismatch(f"sidecar {side}: tensor {name!r} has amax {amax}, min {low}, max {high}; each must "
                                "be finite and amax >= 0 (a float32 scale) -> re-run quant calibrate --force")
        if not (_is_count(item.get("count")) and _is_count(item.get("nonfinite"))):
            raise _bad_sidecar(side, f"tensor {name!r}: count and nonfinite must be counts")
        ranges[name] = TensorRange(name, amax, low, high, int(item["count"]), int(item["nonfinite"]))
    return ranges


def _check_binding(cache: CalibrationCache, ranges: Mapping[str, TensorRange], path: Path, side: Path) -> None:
    """The sidecar's ranges are the cache's scales: same tensors, float32(amax / 127) within one float32 step."""
    if set(cache.scale_bits) != set(ranges):
        only_cache = sorted(set(cache.scale_bits) - set(ranges))[:3]
        only_side = sorted(set(ranges) - set(cache.scale_bits))[:3]
        raise CacheMismatch(f"{path} and its sidecar {side.name} list different tensors (only in the cache: "
                            f"{only_cache}, only in the sidecar: {only_side}) -> re-run quant calibrate --force")
    for name, item in ranges.items():
        bits = cache.scale_bits[name]
        # both scales are >= 0, and the bit patterns of non-negative floats are ordered like their values
        if abs(float_to_bits(scale_of(item.amax)) - bits) > 1:
            raise CacheMismatch(f"sidecar {side}: tensor {name!r} has amax {item.amax:.9g}, so scale "
                                f"{scale_of(item.amax):.9g}, but {path} holds scale {bits_to_float(bits):.9g} "
                                "(amax / 127 must agree) -> re-run quant calibrate --force")


def _range_to_dict(item: TensorRange) -> dict[str, Any]:
    return {"amax": float(item.amax), "min": float(item.minimum), "max": float(item.maximum), "count": int(item.count),
            "nonfinite": int(item.nonfinite)}


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


@dataclass(frozen=True)
class StoreListing:
    entries: tuple[CacheEntry, ...]
    bad: tuple[tuple[Path, str], ...]  # (cache path, why it is skipped)


def scan_store(store_dir: str | Path) -> StoreListing:
    """Every entry of the store (a cache with a sidecar, or a committed pending pair); bad ones named, not raised."""
    store = Path(store_dir)
    names = {side.name[: -len(".json")] for side in store.glob("*.json")}
    names |= {side.name[1: -len(".json.new")] for side in store.glob(".*.json.new")}
    entries, bad = [], []
    for name in sorted(names):
        cache = store / name
        if not (os.path.lexists(cache) or os.path.lexists(_pending_sidecar(cache))):
            continue  # a JSON file that is no sidecar of a cache here
        try:
            entries.append(read_entry(cache))
        except QuantError as error:
            bad.append((cache, str(error)))
    return StoreListing(tuple(entries), tuple(bad))


def list_entries(store_dir: str | Path) -> list[CacheEntry]:
    """The good entries of the store; each bad one is skipped with a warning naming it."""
    listing = scan_store(store_dir)
    for cache, reason in listing.bad:
        log.warning("skipping %s: %s", cache, reason)
    return list(listing.entries)


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
