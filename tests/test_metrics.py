from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quant.data.audio import load_audio
from quant.errors import AudioError, ModelError
from quant.eval import metrics

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(DATA / "librivox_0880.flac")


def test_si_sdr_is_scale_invariant_and_drops_with_noise(speech: np.ndarray) -> None:
    assert metrics.si_sdr(speech, 0.3 * speech) > 100.0
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(speech.size) * np.std(speech)
    # noise at the same power as the speech: SI-SDR close to 0 dB
    assert metrics.si_sdr(speech, speech + noise) == pytest.approx(0.0, abs=0.3)
    assert metrics.si_sdr(speech, speech + 0.1 * noise) == pytest.approx(20.0, abs=0.3)


def test_si_sdr_rejects_length_mismatch_and_silence(speech: np.ndarray) -> None:
    with pytest.raises(AudioError, match="utt1"):
        metrics.si_sdr(speech, speech[:-1], name="utt1")
    with pytest.raises(AudioError, match="silent"):
        metrics.si_sdr(np.zeros(100), np.ones(100), name="quiet")


def test_pesq_and_stoi_of_identical_speech_are_high(speech: np.ndarray) -> None:
    assert metrics.pesq_wb(speech, speech) > 4.5
    assert metrics.pesq_nb(speech, speech) > 4.4
    assert metrics.stoi(speech, speech) > 0.99


def test_pesq_and_stoi_drop_with_noise(speech: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    noisy = speech + rng.standard_normal(speech.size).astype(np.float32) * 0.5 * np.std(speech)
    assert metrics.pesq_wb(speech, noisy) < 2.5
    assert metrics.stoi(speech, noisy) < 0.95


def test_pesq_on_silence_names_the_utterance() -> None:
    silence = np.zeros(16000 * 2, dtype=np.float32)
    with pytest.raises(AudioError, match="quiet_clip"):
        metrics.pesq_wb(silence, silence, name="quiet_clip")


def test_cer_and_wer_of_known_strings() -> None:
    # one substituted character of 11 ("hello world"), one of two words
    assert metrics.cer(["Hello, World!"], ["hello wurld"]) == pytest.approx(1 / 11)
    assert metrics.wer(["Hello, World!"], ["hello wurld"]) == pytest.approx(1 / 2)
    assert metrics.cer(["abc"], ["abc"]) == 0.0
    assert metrics.wer(["a b c"], [""]) == pytest.approx(1.0)


def test_error_rates_add_over_subsets() -> None:
    first = metrics.character_errors(["abcd"], ["abxd"])
    second = metrics.character_errors(["ef"], ["ef"])
    total = first + second
    assert (total.errors, total.reference_length) == (1, 6)
    assert total.rate == pytest.approx(metrics.cer(["abcd", "ef"], ["abxd", "ef"]))


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(ModelError, match="empty"):
        metrics.cer(["!!!"], ["a"])
    with pytest.raises(ModelError, match="hypotheses"):
        metrics.cer(["a", "b"], ["a"])


def test_tensor_error_statistics() -> None:
    ref = np.array([1.0, -2.0, 4.0, 0.5], dtype=np.float32)
    test = ref + np.array([0.1, 0.0, -0.4, 0.0], dtype=np.float32)
    err = metrics.tensor_error(ref, test)
    assert err.abs_max == pytest.approx(0.4, rel=1e-5)
    assert err.abs_mean == pytest.approx(0.125, rel=1e-5)
    assert err.abs_median == pytest.approx(0.05, rel=1e-5)
    assert err.rel_max == pytest.approx(0.1, rel=1e-4)
    expected_snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / (0.1**2 + 0.4**2))
    assert err.snr_db == pytest.approx(expected_snr, rel=1e-4)
    assert metrics.tensor_error(ref, ref).snr_db == float("inf")


def test_compare_outputs_checks_names_and_shapes() -> None:
    ref = {"enh": np.ones((2, 3), np.float32), "lens": np.array([3], np.int32)}
    errors = metrics.compare_outputs(ref, {"enh": np.ones((2, 3), np.float32) * 1.01, "lens": np.array([3])})
    assert set(errors) == {"enh"}
    assert errors["enh"].rel_mean == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ModelError, match="enh"):
        metrics.compare_outputs(ref, {"lens": np.array([3])})
    with pytest.raises(ModelError, match="shape"):
        metrics.compare_outputs(ref, {"enh": np.ones((3, 2), np.float32), "lens": np.array([3])})
