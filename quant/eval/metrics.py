"""Task and tensor metrics: PESQ (WB/NB), STOI, SI-SDR, CER/WER and error statistics of outputs against FP32.

Every function takes plain numpy arrays / strings and an optional `name` (the utterance or tensor) that failures
quote, so a bad clip is reported by name instead of as a bare library exception.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from quant.errors import AudioError, ModelError
from quant.features import SAMPLE_RATE

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _check_pair(reference: np.ndarray, estimate: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    est = np.asarray(estimate, dtype=np.float64).reshape(-1)
    if ref.shape != est.shape:
        raise AudioError(
            f"{name or 'signal'}: reference has {ref.size} samples but the estimate has {est.size}; "
            "metrics compare equal-length signals"
        )
    if ref.size == 0:
        raise AudioError(f"{name or 'signal'}: empty signal; metrics need at least one sample")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(est))):
        raise AudioError(f"{name or 'signal'}: contains NaN or infinite samples")
    return ref, est


def _pesq(reference: np.ndarray, estimate: np.ndarray, mode: str, sample_rate: int, name: str) -> float:
    import pesq as pesq_lib

    ref, est = _check_pair(reference, estimate, name)
    if not np.any(ref):
        raise AudioError(f"{name or 'signal'}: PESQ found no speech in the reference; the clip is all zeros")
    try:
        return float(pesq_lib.pesq(sample_rate, ref, est, mode))
    except pesq_lib.NoUtterancesError:
        raise AudioError(
            f"{name or 'signal'}: PESQ found no speech in the reference; the clip is silent or too quiet"
        ) from None
    except pesq_lib.BufferTooShortError:
        raise AudioError(f"{name or 'signal'}: too short for PESQ ({ref.size} samples at {sample_rate} Hz)") from None
    except pesq_lib.InvalidSampleRateError:
        raise AudioError(f"{name or 'signal'}: PESQ needs 8 or 16 kHz (WB: 16 kHz), got {sample_rate} Hz") from None
    except pesq_lib.PesqError as error:
        raise AudioError(f"{name or 'signal'}: PESQ failed: {error}") from None


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE, name: str = "") -> float:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO, about 1.0-4.64); needs 16 kHz."""
    return _pesq(reference, estimate, "wb", sample_rate, name)


def pesq_nb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE, name: str = "") -> float:
    """Narrow-band PESQ (ITU-T P.862, MOS-LQO mapping)."""
    return _pesq(reference, estimate, "nb", sample_rate, name)


def stoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE, name: str = "") -> float:
    """Short-time objective intelligibility (0..1)."""
    from pystoi import stoi as stoi_fn

    ref, est = _check_pair(reference, estimate, name)
    return float(stoi_fn(ref, est, sample_rate, extended=False))


def si_sdr(reference: np.ndarray, estimate: np.ndarray, name: str = "") -> float:
    """Scale-invariant signal-to-distortion ratio in dB (zero-mean signals, optimal scaling of the reference)."""
    ref, est = _check_pair(reference, estimate, name)
    ref = ref - ref.mean()
    est = est - est.mean()
    ref_energy = _inner(ref, ref)
    if ref_energy <= _EPS:
        raise AudioError(f"{name or 'signal'}: reference is silent; SI-SDR is undefined")
    target = (_inner(est, ref) / ref_energy) * ref
    noise = est - target
    return float(10.0 * np.log10((_inner(target, target) + _EPS) / (_inner(noise, noise) + _EPS)))


def _inner(a: np.ndarray, b: np.ndarray) -> float:
    # numpy's pairwise sum, not np.dot: BLAS splits a dot product across its threads, so the last bits of np.dot
    # depend on the thread count (a Ray worker runs BLAS on 1 thread), and a score must not depend on where it ran
    return float(np.sum(a * b))


# ----------------------------------------------------------------------------------------------- text error rates


@dataclass(frozen=True)
class ErrorRate:
    """Edit errors over a corpus: rate = errors / reference_length (so sums over subsets stay exact)."""

    errors: int
    reference_length: int

    @property
    def rate(self) -> float:
        return self.errors / self.reference_length if self.reference_length else float("nan")

    def __add__(self, other: ErrorRate) -> ErrorRate:
        return ErrorRate(self.errors + other.errors, self.reference_length + other.reference_length)


def _normalizer() -> Callable[[str], str]:
    from quant.models.tokenizer import normalize_text

    return normalize_text


Normalizer = Callable[[str], str]


def _normalized_pairs(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer | None = None
) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise ModelError(f"{len(references)} reference texts but {len(hypotheses)} hypotheses; expected one each")
    normalize = normalize or _normalizer()
    refs = [normalize(text) for text in references]
    hyps = [normalize(text) for text in hypotheses]
    for index, ref in enumerate(refs):
        if not ref:
            raise ModelError(f"reference text #{index} ({references[index]!r}) is empty after normalization")
    return refs, hyps


def character_errors(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer | None = None
) -> ErrorRate:
    """Character edit errors on normalized text (spaces between words count as characters); `normalize` defaults
    to the English normalizer (quant.models.tokenizer.normalize_text)."""
    import jiwer

    return _edit_errors(jiwer.process_characters, references, hypotheses, normalize)


def word_errors(references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer | None = None) -> ErrorRate:
    """Word edit errors on normalized text."""
    import jiwer

    return _edit_errors(jiwer.process_words, references, hypotheses, normalize)


def _edit_errors(align: Callable[..., Any], references: Sequence[str], hypotheses: Sequence[str],
                 normalize: Normalizer | None = None) -> ErrorRate:
    """Corpus edit errors from a jiwer alignment (process_characters / process_words) of normalized texts."""
    refs, hyps = _normalized_pairs(references, hypotheses, normalize)
    if not refs:
        return ErrorRate(0, 0)
    out = align(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    return ErrorRate(int(errors), int(out.substitutions + out.deletions + out.hits))


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate (0..), on normalized text."""
    return character_errors(references, hypotheses).rate


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate (0..), on normalized text."""
    return word_errors(references, hypotheses).rate


# ----------------------------------------------------------------------------------------- tensor error statistics


@dataclass(frozen=True)
class TensorError:
    """Error of one output against its FP32 reference. rel = |test - ref| / (|ref| + 1e-6 * max|ref|)."""

    abs_max: float
    abs_mean: float
    abs_median: float
    rel_max: float
    rel_mean: float
    rel_median: float
    snr_db: float
    elements: int

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def tensor_error(reference: np.ndarray, test: np.ndarray, name: str = "") -> TensorError:
    """Error statistics of `test` against `reference` (same shape); SNR = 10 log10(sum ref^2 / sum err^2)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ModelError(f"output {name or '?'}: shape {out.shape} differs from the FP32 reference {ref.shape}")
    if ref.size == 0:
        return TensorError(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float("inf"), 0)
    diff = np.abs(out - ref).reshape(-1)
    magnitude = np.abs(ref).reshape(-1)
    floor = 1e-6 * float(magnitude.max()) + _EPS
    rel = diff / (magnitude + floor)
    noise = float(np.sum(diff**2))
    signal = float(np.sum(magnitude**2))
    snr = float("inf") if noise == 0.0 else 10.0 * float(np.log10((signal + _EPS) / noise))
    return TensorError(
        abs_max=float(diff.max()),
        abs_mean=float(diff.mean()),
        abs_median=float(np.median(diff)),
        rel_max=float(rel.max()),
        rel_mean=float(rel.mean()),
        rel_median=float(np.median(rel)),
        snr_db=snr,
        elements=int(diff.size),
    )


def compare_outputs(
    reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> dict[str, TensorError]:
    """tensor_error for every output name of `reference` (or `names`); a missing output is an error."""
    result: dict[str, TensorError] = {}
    for name in names if names is not None else list(reference):
        if name not in test:
            raise ModelError(f"output {name}: missing from the compared model's outputs {sorted(test)}")
        if not np.issubdtype(np.asarray(reference[name]).dtype, np.floating):
            continue
        result[name] = tensor_error(reference[name], test[name], name)
    return result
