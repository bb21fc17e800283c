"""Front ends: the reference models' features bit-for-bit as quant.features makes them, new transforms against hand
computations, layouts, and STFT/iSTFT and overlap-add round trips on real speech."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quant import features
from quant.data.audio import load_audio
from quant.errors import ModelError
from quant.frontends import FRONTENDS, frontend, pad_batch
from quant.frontends import spectral
from quant.spec import FrontendSpec, load_spec

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(DATA / "librivox_0870.flac")[:48000]  # 3 s of real speech


@pytest.fixture(scope="module")
def speech_pair() -> list[np.ndarray]:
    return [load_audio(DATA / "librivox_0880.flac")[:40000], load_audio(DATA / "librivox_0890.flac")[:23456]]


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    error = max(float(np.sum((reference - estimate) ** 2)), 1e-30)  # an exact rebuild would divide by zero
    return float(10 * np.log10(np.sum(reference**2) / error))


def test_every_spec_transform_has_a_front_end() -> None:
    from typing import get_args

    from quant.spec import Transform

    assert set(FRONTENDS) == set(get_args(Transform))


# ------------------------------------------------------------------------------------------------ reference models


@pytest.mark.parametrize("model", ["dpcrn", "dpcrn-stream"])
def test_reference_stft_is_quant_features_bit_for_bit(model: str, speech: np.ndarray) -> None:
    spec = load_spec(model).frontend
    assert spec is not None
    values = frontend(spec).features(speech)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values[0], features.stft(speech))


def test_reference_stft_batch_and_inverse_match_quant_features(speech: np.ndarray) -> None:
    fe = frontend(load_spec("dpcrn").frontend)  # type: ignore[arg-type]
    batch = np.stack([speech, speech[::-1].copy()])
    values = fe.features(batch)
    np.testing.assert_array_equal(values, features.stft(batch))
    np.testing.assert_array_equal(fe.inverse(values, batch.shape[1]), features.istft(values, batch.shape[1]))


def test_reference_fbank_is_quant_features_bit_for_bit(speech: np.ndarray, speech_pair: list[np.ndarray]) -> None:
    fe = frontend(load_spec("wenet").frontend)  # type: ignore[arg-type]
    np.testing.assert_array_equal(fe.features(speech)[0], features.fbank(speech))
    padded, lengths = pad_batch(fe, speech_pair)
    expected, expected_lengths = features.batch_fbank(speech_pair)
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(lengths, expected_lengths)


def test_numpy_stft_agrees_with_the_torch_reference(speech: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """The general numpy path computes the same STFT definition as quant.features (to float32 rounding)."""
    spec = load_spec("dpcrn").frontend
    assert spec is not None
    reference = frontend(spec).features(speech)
    monkeypatch.setattr(spectral, "is_reference", lambda _spec: False)
    general = frontend(spec).features(speech)
    scale = float(np.abs(reference).max())
    assert np.abs(general - reference).max() < 1e-5 * scale
    assert snr_db(speech, frontend(spec).inverse(general, speech.size)[0]) > 60


# ------------------------------------------------------------------------------------------------ new transforms


def test_magnitude_512_128_no_window_of_a_sinusoid() -> None:
    """A sinusoid on bin 16 of a rectangular 512-sample frame: |X[16]| = A * 512 / 2, other bins ~0."""
    spec = FrontendSpec(transform="magnitude", frame=512, hop=128, window="none", center=False, layout="B T F")
    samples = 512 + 128 * 9
    amplitude = 0.25
    wave = amplitude * np.cos(2 * np.pi * 16 * np.arange(samples) / 512)
    values = frontend(spec).features(wave)
    assert values.shape == (1, 10, 257) == (1, spec.frames(samples), spec.freq_bins)
    np.testing.assert_allclose(values[0, :, 16], amplitude * 256, rtol=1e-5)
    assert np.abs(np.delete(values[0], 16, axis=1)).max() < 1e-3


def test_log10_power_320_160_161_bins_of_a_constant() -> None:
    """DC c under a periodic Hann of 320: X[0] = c * sum(w) = c * 160, so log10(X[0]^2 + floor)."""
    spec = FrontendSpec(transform="log10_power", frame=320, hop=160, window="hann", center=False, bins=161)
    wave = np.full(320 + 160 * 4, 0.1)
    values = frontend(spec).features(wave)
    assert values.shape == (1, 161, 5)
    np.testing.assert_allclose(values[0, 0], np.log10((0.1 * 160) ** 2 + spec.log_floor), rtol=1e-6)
    assert values[0, 5:].max() < -10  # no energy away from DC (down at the log floor)


def test_power_is_magnitude_squared(speech: np.ndarray) -> None:
    spec = FrontendSpec(transform="magnitude", frame=400, hop=100, n_fft=512, window="hann")
    magnitude = frontend(spec).features(speech)
    power = frontend(replace(spec, transform="power")).features(speech)
    np.testing.assert_allclose(power, magnitude.astype(np.float64) ** 2, rtol=1e-5, atol=1e-9)


def test_waveform_frames_are_the_samples() -> None:
    spec = FrontendSpec(transform="waveform_frames", frame=512, hop=128, window="none", center=False)
    wave = np.arange(512 + 128 * 3, dtype=np.float64) / 1000
    values = frontend(spec).features(wave)
    assert values.shape == (1, 4, 512)
    for t in range(4):
        np.testing.assert_array_equal(values[0, t], wave[t * 128 : t * 128 + 512].astype(np.float32))


@pytest.mark.parametrize("layout, from_bft", [
    ("B T F", lambda x: x.transpose(0, 2, 1)), ("B C T F", lambda x: x.transpose(0, 2, 1)[:, None]),
    ("B F T C", lambda x: x[..., None]), ("T B F", lambda x: x.transpose(2, 0, 1)),
])
def test_layouts_reorder_axes(layout: str, from_bft: Any, speech: np.ndarray) -> None:
    base = FrontendSpec(transform="magnitude", frame=512, hop=128, window="none", center=False, layout="B F T")
    wave = speech[: 512 + 128 * 9]
    natural = frontend(base).features(wave)
    assert natural.shape == (1, 257, 10)
    fe = frontend(replace(base, layout=layout))
    values = fe.features(wave)
    np.testing.assert_array_equal(values, from_bft(natural))
    assert values.flags.c_contiguous


def test_frames_formula_matches_the_features(speech: np.ndarray) -> None:
    for spec in (FrontendSpec(transform="stft", frame=320, hop=160),
                 FrontendSpec(transform="magnitude", frame=512, hop=128, window="none", center=False),
                 FrontendSpec(transform="waveform_frames", frame=400, hop=160, center=False),
                 FrontendSpec(transform="fbank", layout="B T F")):
        for samples in (1000, 16000, 23457):
            values = frontend(spec).features(speech[:samples])
            assert values.shape[spec.axes.index("T")] == spec.frames(samples), (spec.transform, samples)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("frame, hop, window, center", [
    (512, 256, "sqrt_hann", True), (512, 128, "none", False), (320, 160, "hann", True), (512, 256, "sine", True),
    (400, 100, "hann", False),
])
def test_stft_round_trip_is_above_60_db(frame: int, hop: int, window: str, center: bool,
                                        speech: np.ndarray) -> None:
    spec = FrontendSpec(transform="stft", frame=frame, hop=hop, window=window, center=center)  # type: ignore[arg-type]
    fe = frontend(spec)
    rebuilt = fe.inverse(fe.features(speech), speech.size)[0]
    inner = slice(frame, speech.size - frame)  # uncentred framing cannot reach the very ends (no frame covers them)
    assert snr_db(speech[inner], rebuilt[inner]) > 60


def test_magnitude_inverse_with_the_noisy_phase_rebuilds_the_waveform(speech: np.ndarray) -> None:
    """mask_magnitude post-processing: magnitude x mask with the input's phase; a mask of ones is the input."""
    spec = FrontendSpec(transform="magnitude", frame=512, hop=128, window="none", center=True, layout="B T F")
    fe = spectral.SpectralFrontend(spec)
    phase = np.angle(fe.complex(speech))
    rebuilt = fe.inverse(fe.features(speech), speech.size, phase=phase)[0]
    assert snr_db(speech, rebuilt) > 60
    with pytest.raises(ModelError, match="phase"):
        fe.inverse(fe.features(speech), speech.size)


def test_log10_power_inverse_round_trip(speech: np.ndarray) -> None:
    spec = FrontendSpec(transform="log10_power", frame=320, hop=160, window="sqrt_hann", bins=161, log_floor=1e-20)
    fe = spectral.SpectralFrontend(spec)
    rebuilt = fe.inverse(fe.features(speech), speech.size, phase=np.angle(fe.complex(speech)))[0]
    assert snr_db(speech, rebuilt) > 60


def test_overlap_add_inverts_raw_frames(speech: np.ndarray) -> None:
    spec = FrontendSpec(transform="waveform_frames", frame=512, hop=128, window="none", center=True)
    fe = frontend(spec)
    rebuilt = fe.inverse(fe.features(speech), speech.size)[0]
    assert snr_db(speech, rebuilt) > 60


def test_window_without_overlap_add_cover_is_refused(speech: np.ndarray) -> None:
    """A periodic Hann is zero at its first sample: hop = frame leaves those samples with no weight (NOLA fails)."""
    spec = FrontendSpec(transform="stft", frame=512, hop=512, window="hann", center=False)
    fe = frontend(spec)
    with pytest.raises(ModelError, match="NOLA"):
        fe.inverse(fe.features(speech), speech.size)


def test_fbank_has_no_inverse(speech: np.ndarray) -> None:
    fe = frontend(FrontendSpec(transform="fbank"))
    with pytest.raises(ModelError, match="fbank"):
        fe.inverse(fe.features(speech), speech.size)


def test_pad_batch_keeps_each_utterance_independent(speech_pair: list[np.ndarray]) -> None:
    spec = FrontendSpec(transform="log10_power", frame=320, hop=160, window="hann", layout="B T F")
    fe = frontend(spec)
    padded, lengths = pad_batch(fe, speech_pair)
    assert lengths.tolist() == [spec.frames(c.size) for c in speech_pair]
    assert padded.shape == (2, int(lengths.max()), 161)
    np.testing.assert_array_equal(padded[1, : lengths[1]], fe.features(speech_pair[1])[0])
    assert not padded[1, lengths[1]:].any()


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("transform, kind, layout, identity", [
    ("stft", "spectrum", None, "features"),
    ("stft", "mask_magnitude", None, "ones"),
    ("stft", "mask_complex", "B C T F", "complex_one"),
    ("magnitude", "mask_magnitude", "B T F", "ones"),
    ("log10_power", "spectrum", None, "features"),
    ("waveform_frames", "time_frames", None, "features"),
])
def test_identity_outputs_give_back_the_noisy_input(transform: str, kind: str, layout: str | None, identity: str,
                                                    speech: np.ndarray) -> None:
    """A model that changes nothing (mask 1, spectrum = its input) must return the noisy waveform."""
    from quant.frontends.output import output_axes, to_waveform
    from quant.spec import OutputSpec

    spec = FrontendSpec(transform=transform, frame=512, hop=128, window="none", center=True)  # type: ignore[arg-type]
    fe = frontend(spec)
    output = OutputSpec(name="out", kind=kind, layout=layout)  # type: ignore[arg-type]
    features_ = fe.features(speech)
    if identity == "features":
        values = features_
    elif identity == "ones":
        values = np.ones([features_.shape[spec.axes.index(a)] for a in output_axes(output, fe)], np.float32)
    else:  # a complex mask 1 + 0j, (B, 2, T, F)
        values = np.zeros((1, 2, features_.shape[2], features_.shape[1]), np.float32)
        values[:, 0] = 1.0
    assert snr_db(speech, to_waveform(output, fe, values, speech)[0]) > 60


def test_a_half_magnitude_mask_halves_the_waveform(speech: np.ndarray) -> None:
    from quant.frontends.output import to_waveform
    from quant.spec import OutputSpec

    fe = frontend(FrontendSpec(transform="magnitude", frame=320, hop=160, window="sqrt_hann", layout="B T F"))
    mask = np.full(fe.features(speech).shape, 0.5, np.float32)
    enhanced = to_waveform(OutputSpec(name="mask", kind="mask_magnitude"), fe, mask, speech)[0]
    assert snr_db(0.5 * speech, enhanced) > 60
