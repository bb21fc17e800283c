"""Audio loading: any file soundfile reads (WAV/FLAC/OGG), downmixed to mono and resampled to 16 kHz.

Every failure names the file: an empty, truncated, non-audio or NaN-containing file never reaches a model.
"""

from __future__ import annotations

import io
import os
import struct
import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from quant.errors import AudioError
from quant.fileio import atomic_write_bytes

SAMPLE_RATE = 16000


def load_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return float32 mono samples in [-1, 1] at `sample_rate`."""
    file = Path(path)
    if not file.is_file():
        raise AudioError(f"{file}: no such audio file")
    if file.stat().st_size == 0:
        raise AudioError(f"{file}: file is empty (0 bytes); expected WAV, FLAC or OGG audio")
    samples, file_rate = _read(file)
    if samples.shape[0] == 0:
        raise AudioError(f"{file}: holds no samples; expected at least one frame of audio")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{file}: contains NaN or infinite samples; re-encode the file from a clean source")
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    return resample(mono.astype(np.float32), file_rate, sample_rate)


def _read(file: Path) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf  # lazy: training machines may lack it; 16-bit WAV is then read with `wave`
    except ImportError:
        return _read_wave(file)
    try:
        with sf.SoundFile(file) as handle:
            declared_frames = handle.frames
            samples = handle.read(dtype="float32", always_2d=True)
            file_rate = handle.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{file}: not a readable audio file (WAV, FLAC or OGG expected): {error}") from None
    if samples.shape[0] < declared_frames:
        raise AudioError(
            f"{file}: truncated: header declares {declared_frames} frames but only {samples.shape[0]} could be read"
        )
    if _wav_data_is_short(file, declared_frames, handle.channels, handle.subtype):
        raise AudioError(f"{file}: truncated: the WAV data chunk is shorter than its header says")
    return samples, file_rate


def _read_wave(file: Path) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV with Python's wave module (used only where the soundfile package is missing)."""
    if file.suffix.lower() != ".wav":
        raise AudioError(f"{file}: reading {file.suffix or 'this'} audio needs the soundfile package; "
                         f"install it or convert the file to 16-bit WAV")
    try:
        with wave.open(str(file), "rb") as handle:
            width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            declared = handle.getnframes()
            raw = handle.readframes(declared)
    except (wave.Error, EOFError, RuntimeError, struct.error) as error:  # wave raises bare RuntimeError on bad chunks
        raise AudioError(f"{file}: not a readable WAV file: {error or type(error).__name__}") from None
    if width != 2:
        raise AudioError(f"{file}: {8 * width}-bit WAV needs the soundfile package; expected 16-bit PCM")
    if len(raw) < declared * 2 * channels:
        raise AudioError(f"{file}: truncated: header declares {declared} frames but only "
                         f"{len(raw) // (2 * channels)} could be read")
    pcm = np.frombuffer(raw, "<i2").reshape(-1, channels)
    return pcm.astype(np.float32) / 32768.0, rate


def _wav_data_is_short(file: Path, frames: int, channels: int, subtype: str) -> bool:
    """libsndfile quietly shortens a WAV whose data chunk was cut; compare the declared chunk size with the bytes on disk."""
    bytes_per_sample = {"PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8, "PCM_U8": 1}.get(subtype)
    if bytes_per_sample is None or file.suffix.lower() != ".wav":
        return False
    with open(file, "rb") as handle:
        head = handle.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return False
        while chunk := handle.read(8):
            if len(chunk) < 8:
                return False
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                remaining = file.stat().st_size - handle.tell()
                return remaining < size
            handle.seek(size + (size & 1), os.SEEK_CUR)
    return False


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (anti-aliased); a no-op when the rates agree."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    divisor = gcd(from_rate, to_rate)
    return resample_poly(samples, to_rate // divisor, from_rate // divisor).astype(np.float32)


def save_audio(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int = SAMPLE_RATE,
               flac_level: float | None = None) -> Path:
    """Write 16-bit PCM WAV or FLAC (by suffix) atomically; samples are clipped to [-1, 1]. flac_level: FLAC
    compression 0..1 (1: smallest file, same samples); None keeps libsndfile's default."""
    target = Path(path)
    clipped = np.clip(samples, -1.0, 1.0)
    buffer = io.BytesIO()
    try:
        import soundfile as sf
    except ImportError:
        if target.suffix.lower() == ".flac":
            raise AudioError(f"{target}: writing FLAC needs the soundfile package; write .wav instead") from None
        with wave.open(buffer, "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(sample_rate)
            handle.writeframes(np.round(clipped * 32767.0).astype("<i2").tobytes())
        return atomic_write_bytes(target, buffer.getvalue())
    fmt = "FLAC" if target.suffix.lower() == ".flac" else "WAV"
    level = {"compression_level": flac_level} if fmt == "FLAC" and flac_level is not None else {}
    sf.write(buffer, clipped, sample_rate, format=fmt, subtype="PCM_16", **level)
    return atomic_write_bytes(target, buffer.getvalue())


def trim_silence(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, floor_db: float = -40.0, margin_ms: float = 100.0
) -> np.ndarray:
    """Cut leading/trailing stretches whose 20 ms frame energy is `floor_db` below the loudest frame.

    Keeps `margin_ms` of context either side; an all-silent input comes back empty.
    """
    frame = max(1, sample_rate // 50)
    count = len(samples) // frame
    if count == 0:
        return samples[:0]
    energy = np.square(samples[: count * frame].astype(np.float64)).reshape(count, frame).mean(axis=1)
    peak = energy.max()
    if peak <= 0.0:
        return samples[:0]
    loud = np.flatnonzero(10.0 * np.log10(np.maximum(energy / peak, 1e-20)) > floor_db)
    margin = int(sample_rate * margin_ms / 1000.0)
    start = max(0, int(loud[0]) * frame - margin)
    stop = min(len(samples), (int(loud[-1]) + 1) * frame + margin)
    return samples[start:stop]
