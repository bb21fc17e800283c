"""Export the conformer as WeNet's GPU-export pair, encoder.onnx + decoder.onnx, and verify it with ONNX Runtime.

I/O (WeNet wenet/bin/export_onnx_gpu.py, offline encoder + left-to-right rescoring decoder):
- encoder.onnx: speech (B,T,80) f32, speech_lengths (B) i32 -> encoder_out (B,T',D), encoder_out_lens (B) i32,
  ctc_log_probs (B,T',V), beam_log_probs (B,T',10) f32, beam_log_probs_idx (B,T',10) i64.
- decoder.onnx: encoder_out, encoder_out_lens, hyps_pad_sos_eos (B,10,T2+1) i64, hyps_lens_sos (B,10) i32,
  ctc_score (B,10) f32 -> best_index (B) i64, score (B,10) f32 (the rescoring score; an addition to WeNet's
  single output, so accuracy under quantization can be measured before the argmax).
Dynamic: B, T, T' and T2. Legacy TorchScript exporter (dynamo=False), so opset 13/17 is real; single file.

Verification runs both graphs with ONNX Runtime against PyTorch on real speech at B=1 and B=3 (padded):
|ort - torch| <= ATOL + RTOL * |torch| on every float output, lengths equal, the top-k ids select the same
log-probs, and best_index equal wherever the two best scores differ by more than the tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from quant.decoding import ctc_prefix_beam_search_topk, hyps_to_decoder_inputs
from quant.errors import ModelError
from quant.features import fbank, pad_features
from quant.fileio import atomic_write_json, sha256_file, temp_path_beside
from quant.models.conformer import WEIGHTS_PATH, Conformer, WenetDecoder, WenetEncoder, load_conformer
from quant.paths import REPO_DIR

logger = logging.getLogger(__name__)

BEAM = 10
ATOL = 1e-3
RTOL = 1e-3
ENCODER_INPUTS = ["speech", "speech_lengths"]
ENCODER_OUTPUTS = ["encoder_out", "encoder_out_lens", "ctc_log_probs", "beam_log_probs", "beam_log_probs_idx"]
DECODER_INPUTS = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score"]
DECODER_OUTPUTS = ["best_index", "score"]
ENCODER_AXES = {
    "speech": {0: "B", 1: "T"},
    "speech_lengths": {0: "B"},
    "encoder_out": {0: "B", 1: "T_OUT"},
    "encoder_out_lens": {0: "B"},
    "ctc_log_probs": {0: "B", 1: "T_OUT"},
    "beam_log_probs": {0: "B", 1: "T_OUT"},
    "beam_log_probs_idx": {0: "B", 1: "T_OUT"},
}
DECODER_AXES = {
    "encoder_out": {0: "B", 1: "T_OUT"},
    "encoder_out_lens": {0: "B"},
    "hyps_pad_sos_eos": {0: "B", 2: "T2"},
    "hyps_lens_sos": {0: "B"},
    "ctc_score": {0: "B"},
    "best_index": {0: "B"},
    "score": {0: "B"},
}
SUPPORTED_OPSETS = range(13, 21)


def export_wenet(
    out_dir: str | os.PathLike[str],
    opset: int = 17,
    weights: str | os.PathLike[str] | None = None,
    verify_audio: Sequence[str | os.PathLike[str]] | None = None,
) -> list[Path]:
    """Write DIR/encoder.onnx, DIR/decoder.onnx and DIR/meta.json; verify both graphs with ORT on real speech."""
    if opset not in SUPPORTED_OPSETS:
        raise ModelError(f"opset {opset} not supported for the conformer; use 13..20 (17 keeps LayerNormalization)")
    out = Path(out_dir)
    model = load_conformer(weights)
    encoder_path, decoder_path = out / "encoder.onnx", out / "decoder.onnx"
    encoder_tmp, decoder_tmp = temp_path_beside(encoder_path), temp_path_beside(decoder_path)
    try:
        _export(WenetEncoder(model, BEAM).eval(), _encoder_dummy(model), encoder_tmp, opset, ENCODER_INPUTS,
                ENCODER_OUTPUTS, ENCODER_AXES)
        _export(WenetDecoder(model).eval(), _decoder_dummy(model), decoder_tmp, opset, DECODER_INPUTS,
                DECODER_OUTPUTS, DECODER_AXES)
        for path in (encoder_tmp, decoder_tmp):
            check_onnx_file(path, opset)
        verify_wenet(model, encoder_tmp, decoder_tmp, _verification_audio(verify_audio))
        os.replace(encoder_tmp, encoder_path)
        os.replace(decoder_tmp, decoder_path)
    finally:
        encoder_tmp.unlink(missing_ok=True)
        decoder_tmp.unlink(missing_ok=True)
    meta = _write_meta(out, model, _weights_sha256(weights), opset, [encoder_path, decoder_path])
    logger.info("exported %s and %s (opset %d), verified with ONNX Runtime", encoder_path, decoder_path, opset)
    return [encoder_path, decoder_path, meta]


def _encoder_dummy(model: Conformer) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    speech = torch.randn(2, 160, model.config.input_dim, generator=generator)
    return speech, torch.tensor([160, 117], dtype=torch.int32)


def _decoder_dummy(model: Conformer) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    encoder_out = torch.randn(2, 39, model.config.d_model, generator=generator)
    hyps = torch.randint(1, model.sos_eos, (2, BEAM, 8), generator=generator)
    hyps[:, :, 0] = model.sos_eos
    lens = torch.randint(1, 8, (2, BEAM), generator=generator).to(torch.int32)
    return encoder_out, torch.tensor([39, 30], dtype=torch.int32), hyps, lens, torch.randn(2, BEAM, generator=generator)


def _export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int, inputs: list[str],
    outputs: list[str], axes: dict[str, dict[int, str]],
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def check_onnx_file(path: Path, opset: int) -> None:
    """The file holds the asked opset, all weights inline (no external data), and passes onnx.checker."""
    model = onnx.load(str(path), load_external_data=False)
    found = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if found != opset:
        raise ModelError(f"{path}: exported with opset {found}, expected {opset}")
    external = [init.name for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelError(f"{path}: weights {external[:3]} stored outside the file; expected a self-contained export")
    onnx.checker.check_model(model)


def _verification_audio(paths: Sequence[str | os.PathLike[str]] | None) -> list[np.ndarray]:
    from quant.data.audio import load_audio

    if paths is None:
        paths = sorted((REPO_DIR / "tests" / "data").glob("librivox_*.flac"))[:3]
    if len(paths) < 1:
        raise ModelError("no real speech to verify the export with: pass verify_audio (16 kHz speech files)")
    return [load_audio(p) for p in paths]


def verify_wenet(model: Conformer, encoder_path: Path, decoder_path: Path, audios: Sequence[np.ndarray]) -> None:
    """ORT vs PyTorch at B=1 (first utterance) and B=len(audios) (padded); ModelError naming the tensor on failure."""
    encoder_session, decoder_session = _session(encoder_path), _session(decoder_path)
    features = [fbank(audio) for audio in audios]
    for batch in ([features[0]], features):
        speech, lengths = pad_features(batch)
        enc_torch = _run_torch(WenetEncoder(model, BEAM), ENCODER_OUTPUTS, speech, lengths)
        enc_ort = dict(zip(ENCODER_OUTPUTS, encoder_session.run(None, {"speech": speech, "speech_lengths": lengths})))
        _compare_encoder(encoder_path, enc_torch, enc_ort, len(batch))
        feeds = _decoder_feeds(model, enc_torch)
        dec_torch = _run_torch(WenetDecoder(model), DECODER_OUTPUTS, *[feeds[n] for n in DECODER_INPUTS])
        dec_ort = dict(zip(DECODER_OUTPUTS, decoder_session.run(None, feeds)))
        _compare_decoder(decoder_path, dec_torch, dec_ort, len(batch))


def _session(path: Path) -> Any:
    from quant.backends.ort import make_session

    return make_session(path, threads=1, providers=["CPUExecutionProvider"])


def _run_torch(module: torch.nn.Module, names: list[str], *arrays: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = module.eval()(*[torch.from_numpy(a) for a in arrays])
    return {name: out.numpy() for name, out in zip(names, outputs)}


def _decoder_feeds(model: Conformer, enc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    nbests = [
        ctc_prefix_beam_search_topk(enc["beam_log_probs"][b], enc["beam_log_probs_idx"][b],
                                    int(enc["encoder_out_lens"][b]), BEAM)
        for b in range(enc["encoder_out"].shape[0])
    ]
    inputs = hyps_to_decoder_inputs(nbests, model.sos_eos, BEAM)
    return {"encoder_out": enc["encoder_out"], "encoder_out_lens": enc["encoder_out_lens"], **inputs.feeds()}


def _assert_close(path: Path, name: str, batch: int, ours: np.ndarray, theirs: np.ndarray) -> None:
    if ours.shape != theirs.shape:
        raise ModelError(f"{path}: output {name} at B={batch} has shape {theirs.shape}, PyTorch gives {ours.shape}")
    excess = np.abs(theirs - ours) - (ATOL + RTOL * np.abs(ours))
    if not np.all(np.isfinite(theirs)) or excess.max(initial=-1.0) > 0:
        worst = float(np.abs(theirs - ours).max(initial=0.0))
        raise ModelError(
            f"{path}: output {name} at B={batch} differs from PyTorch by up to {worst:.3g} "
            f"(allowed {ATOL} + {RTOL} * |value|); the export does not reproduce the model"
        )


def _compare_encoder(path: Path, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], batch: int) -> None:
    for name in ("encoder_out", "ctc_log_probs", "beam_log_probs"):
        _assert_close(path, name, batch, ours[name], theirs[name])
    if not np.array_equal(ours["encoder_out_lens"], theirs["encoder_out_lens"]):
        raise ModelError(f"{path}: encoder_out_lens at B={batch}: {theirs['encoder_out_lens']}, "
                         f"PyTorch gives {ours['encoder_out_lens']}")
    picked = np.take_along_axis(ours["ctc_log_probs"], theirs["beam_log_probs_idx"].astype(np.int64), axis=2)
    _assert_close(path, "beam_log_probs_idx (log-probs it selects)", batch, picked, theirs["beam_log_probs"])


def _compare_decoder(path: Path, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], batch: int) -> None:
    _assert_close(path, "score", batch, ours["score"], theirs["score"])
    top2 = np.sort(ours["score"], axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > ATOL + RTOL * np.abs(top2[:, 1])
    if not np.array_equal(ours["best_index"][decisive], theirs["best_index"][decisive]):
        raise ModelError(f"{path}: best_index at B={batch} is {theirs['best_index']}, PyTorch gives "
                         f"{ours['best_index']}")


def _weights_sha256(weights: str | os.PathLike[str] | None) -> str | None:
    path = Path(weights) if weights is not None else WEIGHTS_PATH
    return sha256_file(path) if path.is_file() else None


def _write_meta(out: Path, model: Conformer, weights_sha256: str | None, opset: int, paths: list[Path]) -> Path:
    """meta.json through quant.artifacts.export.write_export_meta, plus the facts a WeNet runtime needs to decode."""
    from quant.artifacts.export import write_export_meta

    meta_path = write_export_meta(out, "wenet", model.config.to_dict(), weights_sha256, opset, paths)
    meta = json.loads(meta_path.read_text())
    meta["decoding"] = {
        "beam": BEAM,
        "sos": model.sos_eos,
        "eos": model.sos_eos,
        "blank": 0,
        "ctc_weight": model.config.ctc_weight,
        "subsampling": 4,
        "hyps_pad": "eos (negative ids are also accepted and treated as eos)",
        "units": "quant/assets/units.txt",
    }
    meta["verified"] = {"atol": ATOL, "rtol": RTOL, "batches": [1, 3], "audio": "real speech (LibriVox)"}
    return atomic_write_json(meta_path, meta)
