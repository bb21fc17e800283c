"""Audio loading: every broken file raises AudioError naming it; resampling, downmix and trimming behave."""

from __future__ import annotations

import io
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from quant.data.audio import load_audio, resample, save_audio, trim_silence
from quant.errors import AudioError

DATA = Path(__file__).parent / "data"


def _wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_real_librivox_loads_as_float32_mono_16k() -> None:
    audio = load_audio(DATA / "librivox_0880.flac")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / 16000 - 2.99) < 0.01
    assert 0.01 < float(np.abs(audio).max()) <= 1.0


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty"),
        (b"this is not audio at all, just some text bytes" * 10, "not a readable audio file"),
    ],
)
def test_broken_files_raise_audio_error_naming_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=expected) as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "nope.wav")


def test_truncated_wav(tmp_path: Path) -> None:
    data = _wav_bytes(_tone(440, 1.0, 16000))
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated") as info:
        load_audio(path)
    assert "cut.wav" in str(info.value)


def test_header_only_wav_has_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    path.write_bytes(_wav_bytes(np.zeros(0, np.float32)))
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path)


def test_nan_samples_rejected(tmp_path: Path) -> None:
    samples = _tone(300, 0.5, 16000)
    samples[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN") as info:
        load_audio(path)
    assert "nan.wav" in str(info.value)


def test_stereo_downmix_and_resample_8k(tmp_path: Path) -> None:
    left, right = _tone(500, 1.0, 8000), np.zeros(8000, np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 8000, subtype="PCM_16")
    audio = load_audio(path)
    assert len(audio) == 16000
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 500) < 2  # frequency kept
    assert abs(float(np.abs(audio[1000:-1000]).max()) - 0.25) < 0.01  # mean of channels


def test_resample_identity_and_ratio() -> None:
    tone = _tone(1000, 0.5, 44100)
    assert resample(tone, 16000, 16000).shape == tone.shape
    out = resample(tone, 44100, 16000)
    assert len(out) == 8000 and out.dtype == np.float32


def test_save_roundtrip_flac_and_wav(tmp_path: Path) -> None:
    tone = _tone(440, 0.25, 16000)
    for suffix in (".flac", ".wav"):
        back = load_audio(save_audio(tmp_path / f"x{suffix}", tone))
        assert np.max(np.abs(back - tone)) < 1e-4


def test_flac_level_changes_the_size_not_the_samples(tmp_path: Path) -> None:
    """calib_data's added files are written at the highest FLAC level: smaller, the same 16-bit samples."""
    speech = load_audio(DATA / "librivox_0880.flac")
    default = save_audio(tmp_path / "default.flac", speech)
    smallest = save_audio(tmp_path / "smallest.flac", speech, flac_level=1.0)
    assert smallest.stat().st_size < default.stat().st_size
    assert np.array_equal(load_audio(smallest), load_audio(default))


def test_trim_silence_keeps_margin_and_speech() -> None:
    rate = 16000
    silence = np.zeros(rate, np.float32)
    tone = _tone(300, 1.0, rate)
    trimmed = trim_silence(np.concatenate([silence, tone, silence]), rate, margin_ms=100)
    assert abs(len(trimmed) - (rate + 2 * rate // 10)) <= rate // 50
    assert len(trim_silence(np.zeros(rate, np.float32))) == 0


def test_wave_fallback_without_soundfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU training machine has no soundfile: 16-bit WAV still loads, FLAC fails clearly."""
    tone = _tone(440, 0.5, 8000)
    wav = tmp_path / "t.wav"
    wav.write_bytes(_wav_bytes(tone, rate=8000))
    with_sf = load_audio(wav)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    assert np.array_equal(load_audio(wav), with_sf)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[:3000])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut)
    with pytest.raises(AudioError, match="needs the soundfile package"):
        load_audio(DATA / "librivox_0880.flac")
    written = save_audio(tmp_path / "w.wav", with_sf)
    assert np.max(np.abs(load_audio(written) - with_sf)) < 1e-4


def test_wave_fallback_chunk_larger_than_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the fuzz test below: Python's wave raised a bare RuntimeError for a chunk size past the end."""
    path = tmp_path / "chunk.wav"
    path.write_bytes(_wav_bytes(_tone(440, 0.05, 8000), rate=8000)[:36] + b"junk" + (1 << 24).to_bytes(4, "little"))
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(AudioError, match="chunk.wav: not a readable WAV file"):
        load_audio(path)


# ---- fuzz: nothing but AudioError escapes the loader -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = {".wav": _wav_bytes(_tone(440, 0.05, 8000), rate=8000, channels=1),
          ".flac": (DATA / "librivox_0880.flac").read_bytes()[:6000]}


def _mutated(seed: bytes, data: st.DataObject) -> bytes:
    """A real file with a few bytes overwritten (header fields included), then possibly cut or extended."""
    blob = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 6))):
        position = data.draw(st.integers(0, min(len(blob) - 1, 80)) | st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    return bytes(blob[:cut]) + data.draw(st.binary(max_size=16))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".wav", ".flac", ".ogg", ".bin"]), soundfile=st.booleans(), data=st.data())
def test_fuzz_audio_loader_raises_only_audio_errors(tmp_path: Path, suffix: str, soundfile: bool,
                                                    data: st.DataObject) -> None:
    from unittest import mock

    seed = _SEEDS.get(suffix, _SEEDS[".wav"])
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data.draw(st.binary(max_size=300)) if data.draw(st.booleans()) else _mutated(seed, data))
    try:
        with mock.patch.dict(sys.modules, {} if soundfile else {"soundfile": None}):  # None: the wave fallback
            samples = load_audio(path)
    except AudioError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:
        assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) > 0
        assert np.isfinite(samples).all()
