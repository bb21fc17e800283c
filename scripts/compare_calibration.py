"""INT8 output SNR vs FP32 of ORT INT8 builds made from different calibration caches, on held-out test audio.

    python scripts/compare_calibration.py MODEL FP32_ONNX LABEL=INT8_ONNX [LABEL=INT8_ONNX ...] [--limit N]

MODEL is dpcrn | dpcrn-stream | wenet-encoder | wenet-decoder. Test feeds: se_test noisy mixtures (SE) or asr_test
speech (ASR), the first --limit utterances. Compared output: dpcrn `enh` per 9 s segment; dpcrn-stream `enh` of the
whole utterance, each model rolling its OWN states frame by frame (quantization error feeds back as in deployment);
wenet-encoder `encoder_out`; wenet-decoder `score` (and best_index agreement) on the FP32 encoder's n-best.
Prints one line per INT8 model: mean / min SNR over items and the pooled SNR (all items' energy together), in dB.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from quant.backends.ort import OrtRunner
from quant.calib.readers import AudioSet, DecoderNbestReader, FbankBatchReader, OfflineSegmentReader
from quant.features import stft
from quant.paths import calib_data_dir

OUTPUT = {"dpcrn": "enh", "dpcrn-stream": "enh", "wenet-encoder": "encoder_out", "wenet-decoder": "score"}


def held_out_audio(model: str, limit: int) -> AudioSet:
    se = model.startswith("dpcrn")
    manifest = calib_data_dir() / ("se_test" if se else "asr_test") / "manifest.jsonl"
    return AudioSet.from_manifest(manifest, limit=limit)


def feeds(model: str, fp32: Path, audio: AudioSet) -> Iterable[dict[str, np.ndarray]]:
    if model == "dpcrn":
        return OfflineSegmentReader(audio, batch_size=1)
    if model == "wenet-encoder":
        return FbankBatchReader(audio, batch_size=1)
    if model == "wenet-decoder":
        decoder_inputs = tuple(OrtRunner(fp32).input_names)
        return DecoderNbestReader(fp32.with_name("encoder.onnx"), decoder_inputs, audio, batch_size=1)
    raise ValueError(model)


def stream(runner: OrtRunner, audio: np.ndarray) -> np.ndarray:
    """The streaming model's `enh` over a whole utterance, feeding back its own states."""
    from quant.eval.se import stream_frames, zero_states

    frames = [out["enh"] for _, out in stream_frames(runner, stft(audio), zero_states(runner))]
    return np.concatenate(frames, axis=2)


def outputs(model: str, fp32: Path, runner: OrtRunner, audio: AudioSet) -> Iterator[dict[str, np.ndarray]]:
    if model == "dpcrn-stream":
        for clip in audio:
            yield {"enh": stream(runner, clip)}
        return
    for feed in feeds(model, fp32, audio):
        yield runner.run(feed)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    error = float(((reference - test) ** 2).sum())
    return float(10 * np.log10(float((reference**2).sum()) / max(error, 1e-30)))


def compare(model: str, fp32: Path, int8: Path, limit: int) -> str:
    audio = held_out_audio(model, limit)
    name = OUTPUT[model]
    refs = list(outputs(model, fp32, OrtRunner(fp32), audio))
    gots = list(outputs(model, fp32, OrtRunner(int8), audio))
    values = [snr_db(r[name], g[name]) for r, g in zip(refs, gots)]
    pooled = snr_db(np.concatenate([r[name].ravel() for r in refs]), np.concatenate([g[name].ravel() for g in gots]))
    line = f"{len(values)} items, {name} SNR mean {np.mean(values):.1f} dB, min {min(values):.1f}, pooled {pooled:.1f}"
    if model == "wenet-decoder":
        agree = np.mean([np.array_equal(r["best_index"], g["best_index"]) for r, g in zip(refs, gots)])
        line += f", best_index agreement {agree:.2f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(OUTPUT))
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", nargs="+", help="LABEL=PATH of an INT8 ONNX")
    parser.add_argument("--limit", type=int, default=8, help="test utterances (default 8)")
    args = parser.parse_args()
    for item in args.int8:
        label, _, path = item.partition("=")
        print(f"{args.model} {label}: {compare(args.model, args.fp32, Path(path), args.limit)}", flush=True)


if __name__ == "__main__":
    main()
