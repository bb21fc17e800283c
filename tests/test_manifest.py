"""Manifest parsing, verification errors, the calibration-set key, and deterministic mixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quant.data.manifest import load_noisy_clean, load_speech, manifest_sha256, read_manifest
from quant.data.mix import snr_db
from quant.errors import ManifestError
from quant.fileio import sha256_file

DATA = Path(__file__).parent / "data"


def _setup(tmp_path: Path) -> tuple[Path, dict]:
    for name in ("librivox_0880.flac", "librivox_0890.flac"):
        shutil.copy(DATA / name, tmp_path / name)
    row = {"path": "librivox_0880.flac", "duration": 2.99, "sha256": sha256_file(tmp_path / "librivox_0880.flac"),
           "text": "he was not an ill disposed young man", "source": "librivox", "license": "public domain"}
    return tmp_path / "manifest.jsonl", row


def _write(manifest: Path, rows: list) -> Path:
    manifest.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return manifest


def test_reads_rows_with_absolute_paths(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    (utt,) = read_manifest(_write(manifest, [row]), verify=True)
    assert utt.path == (tmp_path / "librivox_0880.flac").resolve() and utt.path.is_absolute()
    assert utt.text == row["text"] and utt.noise is None and not utt.is_mixture
    assert len(load_speech(utt)) == pytest.approx(2.99 * 16000, abs=20)


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    _write(manifest, [row, "{not json"])
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:2: not valid JSON"):
        read_manifest(manifest)


@pytest.mark.parametrize("field", ["path", "sha256", "duration", "source", "license"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    manifest, row = _setup(tmp_path)
    del row[field]
    with pytest.raises(ManifestError, match=rf"manifest\.jsonl:1: missing field\(s\) \['{field}'\]"):
        read_manifest(_write(manifest, [row]))


def test_missing_audio_file(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row["path"] = "gone.flac"
    with pytest.raises(ManifestError, match="gone.flac does not exist"):
        read_manifest(_write(manifest, [row]))


def test_checksum_mismatch_only_when_verifying(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row["sha256"] = "0" * 64
    _write(manifest, [row])
    assert len(read_manifest(manifest)) == 1
    with pytest.raises(ManifestError, match=r":1: checksum mismatch for .*librivox_0880\.flac"):
        read_manifest(manifest, verify=True)


def test_non_numeric_duration_and_empty_manifest(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row["duration"] = "long"
    with pytest.raises(ManifestError, match="'duration' must be a number"):
        read_manifest(_write(manifest, [row]))
    with pytest.raises(ManifestError, match="holds no utterances"):
        read_manifest(_write(manifest, []))
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "absent.jsonl")


def test_mixture_needs_snr(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row["noise"] = "librivox_0890.flac"
    with pytest.raises(ManifestError, match="no snr_db"):
        read_manifest(_write(manifest, [row]))


def test_noisy_clean_is_deterministic_at_recipe_snr(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row.update(noise="librivox_0890.flac", noise_sha256=sha256_file(tmp_path / "librivox_0890.flac"),
               snr_db=5.0, noise_offset=12345)
    (utt,) = read_manifest(_write(manifest, [row]), verify=True)
    noisy, clean = load_noisy_clean(utt)
    again, _ = load_noisy_clean(utt)
    assert np.array_equal(noisy, again) and noisy.shape == clean.shape
    assert abs(snr_db(clean, noisy - clean) - 5.0) < 0.01
    with pytest.raises(ManifestError, match="not a speech-enhancement mixture"):
        load_noisy_clean(read_manifest(_write(manifest, [{k: v for k, v in row.items() if k != "noise"}]))[0])


def test_key_changes_with_audio_content(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    _write(manifest, [row])
    before = manifest_sha256(manifest)
    assert before == manifest_sha256(str(manifest))
    audio = tmp_path / "librivox_0880.flac"
    audio.write_bytes(audio.read_bytes() + b"\0")
    assert manifest_sha256(manifest) != before
