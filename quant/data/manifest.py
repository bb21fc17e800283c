"""JSONL manifests: one utterance per line, paths relative to the manifest.

Fields: path, duration (s), sha256, source, license, text (ASR sets; may be null), and for speech-enhancement sets
the mixing recipe: noise (path), noise_sha256, snr_db, noise_offset (samples at 16 kHz into the looped noise clip).
A malformed line, a missing file or (with verify=True) a checksum mismatch raises ManifestError naming file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.data.audio import load_audio
from quant.data.mix import loop_noise, mix_at_snr
from quant.errors import ManifestError
from quant.fileio import sha256_file

REQUIRED = ("path", "duration", "sha256", "source", "license")


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

    @property
    def is_mixture(self) -> bool:
        return self.noise is not None


def read_manifest(path: str | os.PathLike[str], verify: bool = False) -> list[Utterance]:
    """Parse every line; with verify, also check each referenced file's sha256."""
    manifest = Path(path)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest; expected a JSONL file (one utterance per line)")
    utterances = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            utterances.append(_parse_line(manifest, number, line, verify))
    if not utterances:
        raise ManifestError(f"{manifest}: holds no utterances; expected one JSON object per line")
    return utterances


def _parse_line(manifest: Path, number: int, line: str, verify: bool) -> Utterance:
    where = f"{manifest}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {missing}; every line needs {list(REQUIRED)}")
    audio = _existing(manifest, where, row["path"], verify, row["sha256"])
    noise = None
    if row.get("noise") is not None:
        if row.get("snr_db") is None:
            raise ManifestError(f"{where}: has a noise file but no snr_db; mixtures need both")
        noise = _existing(manifest, where, row["noise"], verify, row.get("noise_sha256"))
    return Utterance(
        path=audio,
        duration=_number(where, row, "duration"),
        sha256=str(row["sha256"]),
        source=str(row["source"]),
        license=str(row["license"]),
        text=None if row.get("text") is None else str(row["text"]),
        noise=noise,
        noise_sha256=row.get("noise_sha256"),
        snr_db=None if row.get("snr_db") is None else _number(where, row, "snr_db"),
        noise_offset=int(_number(where, row, "noise_offset")) if "noise_offset" in row else 0,
    )


def _number(where: str, row: dict[str, Any], key: str) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where}: field {key!r} must be a number, got {value!r}")
    return float(value)


def _existing(manifest: Path, where: str, relative: Any, verify: bool, expected: Any) -> Path:
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: path must be a non-empty string, got {relative!r}")
    file = (manifest.parent / relative).resolve()
    if not file.is_file():
        raise ManifestError(f"{where}: referenced file {file} does not exist")
    if verify:
        if not isinstance(expected, str):
            raise ManifestError(f"{where}: no sha256 recorded for {relative}; cannot verify it")
        actual = sha256_file(file)
        if actual != expected:
            raise ManifestError(f"{where}: checksum mismatch for {file}: manifest says {expected}, file is {actual}")
    return file


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """The calibration-set key: sha256 over the manifest's bytes and the actual sha256 of every file it references."""
    manifest = Path(path)
    digest = hashlib.sha256()
    try:
        digest.update(manifest.read_bytes())
    except OSError as error:
        raise ManifestError(f"{manifest}: cannot read manifest: {error.strerror}") from None
    seen: set[Path] = set()
    for utt in read_manifest(manifest):
        for file in (utt.path, utt.noise):
            if file is not None and file not in seen:
                seen.add(file)
                digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def load_speech(utt: Utterance) -> np.ndarray:
    """The utterance's clean speech, float32 mono 16 kHz."""
    return load_audio(utt.path)


def load_noisy_clean(utt: Utterance) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) for a mixture utterance, mixed deterministically from its recipe (quant.data.mix)."""
    if utt.noise is None or utt.snr_db is None:
        raise ManifestError(f"{utt.path}: not a speech-enhancement mixture (no noise/snr_db in its manifest line)")
    clean = load_audio(utt.path)
    noise = loop_noise(load_audio(utt.noise), len(clean), utt.noise_offset)
    return mix_at_snr(clean, noise, utt.snr_db)
