"""Manifest parsing, verification errors, the calibration-set key, and deterministic mixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quant.data.manifest import load_noisy_clean, load_speech, manifest_sha256, model_input, read_manifest
from quant.data.mix import snr_db
from quant.errors import ManifestError, QuantError
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


def test_a_truncated_line_reads_as_one_sentence(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    _write(manifest, [row, '{"path": "librivox_08'])  # a line cut inside a string, as a partial copy leaves it
    with pytest.raises(ManifestError) as raised:
        read_manifest(manifest)
    assert str(raised.value).endswith("manifest.jsonl:2: not valid JSON (Unterminated string starting at: column 10)")


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


def _mixture(tmp_path: Path, **changes: object) -> tuple[Path, dict]:
    manifest, row = _setup(tmp_path)
    row.update(noise="librivox_0890.flac", noise_sha256=sha256_file(tmp_path / "librivox_0890.flac"), snr_db=5.0,
               noise_offset=0)
    row.update(changes)
    return manifest, row


def test_latin1_manifest_names_file_and_line(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    row["source"] = "Sébastien"
    manifest.write_bytes((json.dumps(row) + "\n").encode("utf-8") + (json.dumps(row, ensure_ascii=False) + "\n")
                         .encode("latin-1"))
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:2: not UTF-8 \(byte 0xe9\)"):
        read_manifest(manifest)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e308", "-1e400", "101", "1" + "0" * 5000])
def test_non_finite_or_absurd_snr_names_file_and_line(tmp_path: Path, text: str) -> None:
    manifest, row = _mixture(tmp_path)
    manifest.write_text(json.dumps(row).replace('"snr_db": 5.0', f'"snr_db": {text}') + "\n")
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:1: ") as info:
        read_manifest(manifest)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("field,value,expected", [
    ("duration", 0, "duration must be positive"), ("duration", -1.5, "duration must be positive"),
    ("noise_offset", -3, "noise_offset must be a whole number"), ("noise_offset", 1.5, "noise_offset must be"),
    ("sha256", "abc", "must be a sha256"), ("noise_sha256", None, "no snr_db or noise_sha256"),
])
def test_bad_numbers_and_checksums_name_the_line(tmp_path: Path, field: str, value: object, expected: str) -> None:
    manifest, row = _mixture(tmp_path, **{field: value})
    with pytest.raises(ManifestError, match=rf"manifest\.jsonl:1: .*{expected}"):
        read_manifest(_write(manifest, [row]))


@pytest.mark.parametrize("path", ["../outside.flac", "sub/../../outside.flac", "ABSOLUTE"])
def test_paths_stay_inside_the_manifests_folder(tmp_path: Path, path: str) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    manifest, row = _setup(folder)
    shutil.copy(DATA / "librivox_0880.flac", tmp_path / "outside.flac")
    row["path"] = str(tmp_path / "outside.flac") if path == "ABSOLUTE" else path
    _write(manifest, [row])
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:1: path .* leads outside the manifest's folder"):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="leads outside"):
        manifest_sha256(manifest)
    (utt,) = read_manifest(manifest, allow_outside=True)
    assert utt.path == (tmp_path / "outside.flac").resolve()
    assert manifest_sha256(manifest, allow_outside=True)


def test_inner_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    manifest, row = _setup(tmp_path)
    (tmp_path / "sub").mkdir()
    row["path"] = "sub/../librivox_0880.flac"
    (utt,) = read_manifest(_write(manifest, [row]))
    assert utt.path == (tmp_path / "librivox_0880.flac").resolve()


@pytest.mark.parametrize("changed", ["librivox_0880.flac", "librivox_0890.flac"])
def test_checksum_is_verified_when_audio_is_loaded(tmp_path: Path, changed: str) -> None:
    manifest, row = _mixture(tmp_path)
    (utt,) = read_manifest(_write(manifest, [row]))
    audio = tmp_path / changed
    shutil.copy(DATA / "librivox_0920.flac", audio)  # another real recording under the recorded name
    for load in (model_input, load_noisy_clean):
        with pytest.raises(ManifestError, match=rf"manifest\.jsonl:1: checksum mismatch for .*{changed}"):
            load(utt)
    if changed == "librivox_0880.flac":
        with pytest.raises(ManifestError, match="checksum mismatch"):
            load_speech(utt)


def test_model_input_is_the_mixture_for_se_lines_and_the_speech_otherwise(tmp_path: Path) -> None:
    manifest, row = _mixture(tmp_path)
    (mixture,) = read_manifest(_write(manifest, [row]))
    noisy, clean = load_noisy_clean(mixture)
    assert np.array_equal(model_input(mixture), noisy) and not np.array_equal(noisy, clean)
    speech_only = {k: v for k, v in row.items() if k not in ("noise", "noise_sha256", "snr_db")}
    (plain,) = read_manifest(_write(manifest, [speech_only]))
    assert np.array_equal(model_input(plain), load_speech(plain))


@pytest.mark.parametrize("name", ["se_calib", "se_test", "asr_calib", "asr_test"])
def test_committed_manifests_stay_valid(name: str) -> None:
    from quant.paths import calib_data_dir

    assert len(read_manifest(calib_data_dir() / name / "manifest.jsonl")) >= 40


# ---- fuzz: nothing but quant's own errors escapes the manifest reader ------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_FIELDS = ("path", "duration", "sha256", "source", "license", "text", "noise", "noise_sha256", "snr_db",
           "noise_offset")
_VALID = {"path": "librivox_0880.flac", "duration": 2.99, "sha256": sha256_file(DATA / "librivox_0880.flac"),
          "source": "s", "license": "l", "text": None, "noise": "librivox_0890.flac",
          "noise_sha256": sha256_file(DATA / "librivox_0890.flac"), "snr_db": 5.0, "noise_offset": 7}
_odd = _json_values | st.sampled_from(["librivox_0880.flac", "librivox_0890.flac", "../x.flac", "/etc/hostname", "",
                                       ".", "a" * 300, "x\0y", "0" * 64, 1e308, -1e308, 10**400, 2**63, -0.0])
# A valid SE line with some fields replaced by odd values and some dropped: reaches every check, and the mixer.
_rows = st.builds(lambda changes, dropped: {k: v for k, v in {**_VALID, **changes}.items() if k not in dropped},
                  st.dictionaries(st.sampled_from(_FIELDS), _odd, max_size=3),
                  st.sets(st.sampled_from(_FIELDS), max_size=2))
_lines = st.one_of(
    _rows.map(lambda row: json.dumps(row).encode()),  # NaN/Infinity appear as JSON's extension tokens
    _rows.map(lambda row: json.dumps(row).encode()).map(lambda b: b[: len(b) // 2]),
    st.binary(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_lines, max_size=4))
def test_fuzz_manifest_reader_raises_only_quant_errors(tmp_path: Path, lines: list[bytes]) -> None:
    _setup(tmp_path)
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_bytes(b"\n".join(lines))
    try:
        for utt in read_manifest(manifest):
            assert np.isfinite(model_input(utt)).all()  # loading verifies each file's sha256
    except QuantError as error:
        assert "\n" not in str(error)
