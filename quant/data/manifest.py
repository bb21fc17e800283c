"""JSONL manifests: one utterance per line, paths relative to the manifest.

Fields: path, duration (s), sha256, source, license, text (ASR sets; may be null), and for speech-enhancement sets
the mixing recipe: noise (path), noise_sha256, snr_db, noise_offset (samples at 16 kHz into the looped noise clip).

Trust rules, each failure a ManifestError naming file and line:
- the file is UTF-8 JSONL; texts are strings, numbers finite (JSON's NaN/Infinity extension is refused), snr_db within +-SNR_LIMIT_DB, durations positive, offsets whole >= 0;
- referenced paths stay inside the manifest's folder (no absolute path, no `..` escape) unless the caller passes
  allow_outside=True; the check is on the path as written, so a symlink placed inside the folder is followed;
- every referenced file carries a sha256, checked when its audio is loaded (once per file per process) and, with
  verify=True, already when the manifest is read.

model_input(utt) is THE waveform a model sees at inference for a line: the noisy mixture of an SE line, the speech
itself otherwise. Every calibration reader takes its audio from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from quant.data.audio import load_audio
from quant.data.mix import loop_noise, mix_at_snr
from quant.errors import ManifestError
from quant.fileio import sha256_file

REQUIRED = ("path", "duration", "sha256", "source", "license")
# Beyond +-100 dB one of speech and noise lies below float32 audio's ~144 dB of resolution: such a recipe is a typo
# (1e308 overflowed the mixing gains to inf/NaN audio that then calibrated silently).
SNR_LIMIT_DB = 100.0
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute
    duration: float
    sha256: str
    source: str
    license: str
    text: str | None = None
    noise: Path | None = None  # absolute; set for speech-enhancement sets
    noise_sha256: str | None = None
    snr_db: float | None = None
    noise_offset: int = 0
    origin: str = ""  # "<manifest>:<line>", for error messages

    @property
    def is_mixture(self) -> bool:
        return self.noise is not None


def read_manifest(path: str | os.PathLike[str], verify: bool = False, allow_outside: bool = False
                  ) -> list[Utterance]:
    """Parse every line; with verify, also check each referenced file's sha256 now (loading checks it anyway).

    allow_outside: accept absolute paths and paths leading out of the manifest's folder."""
    manifest = Path(path)
    text = _read_text(manifest)
    utterances = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            utterances.append(_parse_line(manifest, number, line, verify, allow_outside))
    if not utterances:
        raise ManifestError(f"{manifest}: holds no utterances; expected one JSON object per line")
    return utterances


def _read_text(manifest: Path) -> str:
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest; expected a JSONL file (one utterance per line)")
    try:
        data = manifest.read_bytes()
    except OSError as error:
        raise ManifestError(f"{manifest}: cannot read manifest: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ManifestError(f"{manifest}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); save the manifest as "
                            "UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _parse_line(manifest: Path, number: int, line: str, verify: bool, allow_outside: bool) -> Utterance:
    where = f"{manifest}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON ({error.msg}: column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # a 5000-digit integer, deep nesting
        raise ManifestError(f"{where}: not a usable JSON line ({str(error)[:80]})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {missing}; every line needs {list(REQUIRED)}")
    folder = manifest.parent
    audio = _existing(folder, where, row["path"], allow_outside)
    sha256 = _checksum(where, row, "sha256")
    noise = noise_sha256 = snr = None
    if row.get("noise") is not None:
        if row.get("snr_db") is None or row.get("noise_sha256") is None:
            raise ManifestError(f"{where}: has a noise file but no snr_db or noise_sha256; mixtures need all three")
        noise = _existing(folder, where, row["noise"], allow_outside)
        noise_sha256 = _checksum(where, row, "noise_sha256")
        snr = _number(where, row, "snr_db")
        if abs(snr) > SNR_LIMIT_DB:
            raise ManifestError(f"{where}: snr_db {snr:g} is outside -{SNR_LIMIT_DB:g}..{SNR_LIMIT_DB:g} dB")
    duration = _number(where, row, "duration")
    if duration <= 0:
        raise ManifestError(f"{where}: duration must be positive (seconds), got {duration:g}")
    offset = _number(where, row, "noise_offset") if "noise_offset" in row else 0.0
    if offset < 0 or offset != int(offset):
        raise ManifestError(f"{where}: noise_offset must be a whole number of samples >= 0, got {offset:g}")
    utt = Utterance(
        path=audio, duration=duration, sha256=sha256, source=_text(where, row, "source"),
        license=_text(where, row, "license"), text=None if row.get("text") is None else _text(where, row, "text"),
        noise=noise, noise_sha256=noise_sha256,
        snr_db=snr, noise_offset=int(offset), origin=where,
    )
    if verify:
        for file, expected in _files(utt):
            _check_sha256(file, expected, where)
    return utt


def _number(where: str, row: dict[str, Any], key: str) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where}: field {key!r} must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ManifestError(f"{where}: field {key!r} must be a finite number, got {str(value)[:40]}")
    return number


def _text(where: str, row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ManifestError(f"{where}: field {key!r} must be a string, got {str(value)[:40]!r}")
    return value


def _checksum(where: str, row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"{where}: field {key!r} must be a sha256 (64 hex digits), got {str(value)[:70]!r}")
    return value.lower()


def _existing(folder: Path, where: str, relative: Any, allow_outside: bool) -> Path:
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ManifestError(f"{where}: path must be a non-empty string, got {str(relative)[:70]!r}")
    if not allow_outside:
        if PurePosixPath(relative).is_absolute() or PurePosixPath(os.path.normpath(relative)).parts[:1] == ("..",):
            raise ManifestError(f"{where}: path {relative!r} leads outside the manifest's folder {folder}; keep the "
                                "audio beside the manifest, or allow it explicitly (--allow-outside-paths)")
    try:
        file = (folder / relative).resolve()
        exists = file.is_file()
    except (OSError, ValueError, RuntimeError) as error:  # name too long, symlink loop
        raise ManifestError(f"{where}: cannot use path {relative[:70]!r}: {error}") from None
    if not exists:
        raise ManifestError(f"{where}: referenced file {file} does not exist")
    return file


def _files(utt: Utterance) -> list[tuple[Path, str]]:
    files = [(utt.path, utt.sha256)]
    if utt.noise is not None and utt.noise_sha256 is not None:
        files.append((utt.noise, utt.noise_sha256))
    return files


def _check_sha256(file: Path, expected: str, where: str) -> None:
    try:
        actual = _cached_sha256(file)
    except OSError as error:
        raise ManifestError(f"{where}: cannot read {file}: {error.strerror}") from None
    if actual != expected:
        raise ManifestError(f"{where}: checksum mismatch for {file}: manifest says {expected}, file is {actual}; "
                            "the file changed since the manifest was written (restore it or fix the manifest)")


def _cached_sha256(file: Path) -> str:
    """sha256 of a file, hashed once per process while it keeps its inode, size and mtime (noise clips are shared
    by many lines, and every utterance is loaded once per calibration pass)."""
    stat = file.stat()
    return _file_sha256(file, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _file_sha256(file: Path, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(file)


def manifest_sha256(path: str | os.PathLike[str], allow_outside: bool = False) -> str:
    """The calibration-set key: sha256 over the manifest's bytes and the actual sha256 of every file it references."""
    manifest = Path(path)
    digest = hashlib.sha256()
    try:
        digest.update(manifest.read_bytes())
    except OSError as error:
        raise ManifestError(f"{manifest}: cannot read manifest: {error.strerror}") from None
    seen: set[Path] = set()
    for utt in read_manifest(manifest, allow_outside=allow_outside):
        for file, _expected in _files(utt):
            if file not in seen:
                seen.add(file)
                try:
                    digest.update(_cached_sha256(file).encode())
                except OSError as error:
                    raise ManifestError(f"{utt.origin}: cannot read {file}: {error.strerror}") from None
    return digest.hexdigest()


def load_speech(utt: Utterance) -> np.ndarray:
    """The utterance's clean speech, float32 mono 16 kHz (its sha256 checked against the manifest)."""
    return _load(utt.path, utt.sha256, utt.origin)


def load_noisy_clean(utt: Utterance) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) for a mixture utterance, mixed deterministically from its recipe (quant.data.mix)."""
    if utt.noise is None or utt.snr_db is None:
        raise ManifestError(f"{utt.origin or utt.path}: not a speech-enhancement mixture (no noise/snr_db in its "
                            "manifest line)")
    clean = load_speech(utt)
    noise = loop_noise(_load(utt.noise, utt.noise_sha256, utt.origin), len(clean), utt.noise_offset)
    return mix_at_snr(clean, noise, utt.snr_db)


def model_input(utt: Utterance) -> np.ndarray:
    """What a model sees at inference for this line: the noisy mixture of an SE line, else the speech itself."""
    if utt.is_mixture:
        noisy, _clean = load_noisy_clean(utt)
        return noisy
    return load_speech(utt)


def _load(file: Path, expected: str | None, where: str) -> np.ndarray:
    if expected is not None:
        _check_sha256(file, expected, where or str(file))
    return load_audio(file)
