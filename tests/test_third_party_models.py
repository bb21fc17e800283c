"""The five small third-party-style models (tests/models) with their specs: each spec loads and names what the
export has, each graph runs in ONNX Runtime on features from quant.frontends in the declared layout, streaming
models frame by frame equal the whole utterance, the two-stage chain runs end to end, the trained SE models beat
the noisy input on held-out mixtures, and the U2++ decoder rescoring is deterministic and well-formed.

Built once per session by the `third_party_model` fixture (conftest.py): about 35 s of training and export in all.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import quant
from models import KINDS, OPSETS, common, u2pp
from models.run import enhance, graph_feeds, initial_states, model_output, run_offline, run_streaming, session
from quant.calib.cache import CacheKey, write_entry
from quant.calib.ranges import RangeOptions, collect_ranges, method_params
from quant.cli import main as cli_main
from quant.data.manifest import load_speech, read_manifest
from quant.eval.metrics import si_sdr
from quant.fileio import sha256_file
from quant.frontends import frontend, pad_batch
from quant.paths import calib_data_dir

SE_KINDS = ("lstm-mask", "gru-logpower", "two-stage", "stft-gru-stream")
STREAMING = ("lstm-mask", "stft-gru-stream")
LOW_SNR_DB = 5.0  # the held-out mixtures where a 4-frame-context mask has something to remove
MIN_GAIN_DB = 2.0

pytestmark = pytest.mark.slow


def _spec(third_party_model, kind: str, opset: int = 13) -> quant.spec.ModelSpec:
    return quant.load_spec(third_party_model(kind).specs[opset])


def _noisy_clean() -> tuple[np.ndarray, np.ndarray]:
    return common.held_out_mixtures()[0]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", KINDS)
def test_spec_loads_and_names_the_export(third_party_model, kind: str, opset: int) -> None:
    spec = _spec(third_party_model, kind, opset)
    assert spec.name == kind
    for graph in spec.graphs:
        model = onnx.load(str(graph.onnx_path()))
        assert common.onnx_opset(model) == opset
        assert tuple(i.name for i in model.graph.input) == graph.inputs
        assert tuple(o.name for o in model.graph.output) == graph.outputs
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("kind", SE_KINDS)
def test_frontend_feeds_run_in_declared_layout(third_party_model, kind: str) -> None:
    spec = _spec(third_party_model, kind)
    fe = frontend(spec.frontend)
    noisy, _ = _noisy_clean()
    features = fe.features(noisy)
    first = session(spec.graphs[0])
    declared = first.get_inputs()[[i.name for i in first.get_inputs()].index(spec.graphs[0].feeds[0].input)].shape
    assert features.ndim == len(declared)
    for axis, size in zip(spec.frontend.axes, declared):
        if isinstance(size, int) and axis != "T":
            assert features.shape[spec.frontend.axes.index(axis)] == size, (axis, features.shape, declared)
    assert features.shape[spec.frontend.axes.index("T")] == fe.frames(len(noisy))
    enhanced = enhance(spec, noisy)
    assert enhanced.shape == noisy.shape and np.isfinite(enhanced).all()


def test_lstm_mask_states_have_unrelated_names(third_party_model) -> None:
    spec = _spec(third_party_model, "lstm-mask")
    pairs = spec.streaming.state_pairs()
    assert pairs == {"h1": "tf_op_layer_stack_2", "c1": "tf_op_layer_stack_3", "h2": "tf_op_layer_stack_5",
                     "c2": "tf_op_layer_stack_6"}
    assert (spec.frontend.frame, spec.frontend.hop, spec.frontend.window) == (512, 128, "none")


@pytest.mark.parametrize("opset", OPSETS)
def test_lstm_mask_streaming_equals_whole_utterance(third_party_model, opset: int) -> None:
    # the export keeps T dynamic, so the same graph runs the whole utterance at once from the initial states
    spec = _spec(third_party_model, "lstm-mask", opset)
    features = frontend(spec.frontend).features(_noisy_clean()[0][:16000])
    streamed = run_streaming(spec, features)
    whole = run_offline(spec, features)["masker:mask"]
    assert streamed.shape == whole.shape == features.shape
    np.testing.assert_allclose(streamed, whole, atol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_stft_gru_streaming_equals_offline_module(third_party_model, opset: int) -> None:
    # three caches carried by the `_out` convention (no output names in the spec) give the causal offline result
    built = third_party_model("stft-gru-stream")
    spec = quant.load_spec(built.specs[opset])
    assert spec.streaming.state_pairs() == {f"{name}": f"{name}_out" for name in
                                            ("conv_cache", "gru_cache", "deconv_cache")}
    assert {k: v.shape for k, v in initial_states(spec).items()} == built.modules["enhancer"].cache_shapes()
    features = frontend(spec.frontend).features(_noisy_clean()[0][:16000])  # (1, 2, T, 257)
    streamed = run_streaming(spec, features)
    with torch.no_grad():
        offline = built.modules["enhancer"].offline(torch.from_numpy(features)).numpy()
    assert streamed.shape == offline.shape == features.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-4)


def test_two_stage_chain_runs_end_to_end(third_party_model) -> None:
    built = third_party_model("two-stage")
    spec = quant.load_spec(built.specs[13])
    assert spec.graph("stage2").feeds[0].source == "stage1:enh_frames"
    features = frontend(spec.frontend).features(_noisy_clean()[0])  # (1, T, 512) raw frames
    values = run_offline(spec, features)
    with torch.no_grad():
        stage1 = built.modules["stage1"](torch.from_numpy(features))
        final = built.modules["stage2"](stage1).numpy()
    np.testing.assert_allclose(values["stage1:enh_frames"], stage1.numpy(), atol=1e-4)
    np.testing.assert_allclose(values["stage2:out_frames"], final, atol=1e-4)
    assert not np.allclose(values["stage2:out_frames"], values["stage1:enh_frames"], atol=1e-3)  # stage 2 acts


def test_gru_logpower_frontend(third_party_model) -> None:
    spec = _spec(third_party_model, "gru-logpower")
    features = frontend(spec.frontend).features(np.zeros(16000, dtype=np.float32) + 0.01)
    assert features.shape == (1, 101, 161)  # 320/160 centred: 1 + 16000 // 160 frames of 161 bins
    np.testing.assert_allclose(model_output(spec, features).shape, features.shape)


@pytest.mark.parametrize("kind", SE_KINDS)
def test_trained_model_beats_the_noisy_input(third_party_model, kind: str) -> None:
    spec = _spec(third_party_model, kind)
    low = [(noisy, clean) for noisy, clean in common.held_out_mixtures() if si_sdr(clean, noisy) < LOW_SNR_DB]
    assert low, "the held-out se_calib mixtures include low-SNR ones"
    for noisy, clean in low:
        gain = si_sdr(clean, enhance(spec, noisy)) - si_sdr(clean, noisy)
        assert gain > MIN_GAIN_DB, f"{kind}: SI-SDR gain {gain:.2f} dB"


# ------------------------------------------------------------------------------------------------ U2++


def _asr_batch(spec: quant.spec.ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    utterances = read_manifest(calib_data_dir() / "asr_test" / "manifest.jsonl")[:3]
    return pad_batch(frontend(spec.frontend), [load_speech(utt) for utt in utterances])


def _encoder(spec: quant.spec.ModelSpec) -> dict[str, np.ndarray]:
    speech, lengths = _asr_batch(spec)
    sess = session(spec.graph("encoder"))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"speech": speech, "speech_lengths": lengths})))


def test_u2pp_units_and_token_ids(third_party_model) -> None:
    spec = _spec(third_party_model, "u2pp")
    lines = spec.task.units.read_text(encoding="utf-8").splitlines()
    assert lines[2] == "<sos/eos> 2" and len(lines) == len(u2pp.UNITS)
    assert spec.task.token_ids(len(lines)) == (0, 2, 2)
    assert spec.task.reverse_weight == u2pp.REVERSE_WEIGHT and spec.task.ctc_weight == u2pp.CTC_WEIGHT


@pytest.mark.parametrize("opset", OPSETS)
def test_u2pp_encoder_outputs_are_well_formed(third_party_model, opset: int) -> None:
    spec = _spec(third_party_model, "u2pp", opset)
    speech, lengths = _asr_batch(spec)
    out = _encoder(spec)
    expected = u2pp.subsampled_lengths(torch.from_numpy(lengths)).numpy()
    np.testing.assert_array_equal(out["encoder_out_lens"], expected)
    assert out["encoder_out"].shape[:2] == out["ctc_log_probs"].shape[:2] == (len(lengths), expected.max())
    np.testing.assert_allclose(np.log(np.exp(out["ctc_log_probs"]).sum(-1)), 0.0, atol=1e-4)
    picked = np.take_along_axis(out["ctc_log_probs"], out["beam_log_probs_idx"], axis=2)
    np.testing.assert_allclose(picked, out["beam_log_probs"], atol=1e-6)
    assert (np.diff(out["beam_log_probs"], axis=2) <= 0).all()


@pytest.mark.parametrize("opset", OPSETS)
def test_u2pp_decoder_rescoring_is_deterministic(third_party_model, opset: int) -> None:
    built = third_party_model("u2pp")
    spec = quant.load_spec(built.specs[opset])
    feeds = u2pp.decoder_feeds(_encoder(spec), spec.task.beam, spec.task.token_ids(len(u2pp.UNITS))[1])
    decoder = session(spec.graph("decoder"))
    ordered = {name: feeds[name] for name in spec.graph("decoder").inputs}
    first, = decoder.run(None, ordered)
    second, = session(spec.graph("decoder")).run(None, ordered)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.int64 and first.shape == (3,) and ((0 <= first) & (first < spec.task.beam)).all()
    with torch.no_grad():
        scores = built.modules["decoder"].scores(*(torch.from_numpy(v) for v in ordered.values())).numpy()
    np.testing.assert_array_equal(first, scores.argmax(axis=1))
    # the reversed hyps really are [sos] + reversed hyp + [eos]: the right-to-left decoder reads them
    hyps, lens, r_hyps = feeds["hyps_pad_sos_eos"], feeds["hyps_lens_sos"], feeds["r_hyps_pad_sos_eos"]
    for b, k in np.ndindex(*lens.shape):
        n = int(lens[b, k])
        assert list(r_hyps[b, k, 1:n]) == list(hyps[b, k, 1:n][::-1]) and r_hyps[b, k, n] == u2pp.SOS_EOS


# ------------------------------------------------------------------------------------------------ INT8 / FP16


def _calibration_feeds(spec: quant.spec.ModelSpec) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph role, one feed per training clip: front-end features, or the FP32 outputs of the earlier graph
    (stage 2 is calibrated on what stage 1 gives it), streaming graphs from their initial states."""
    fe = frontend(spec.frontend)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {graph.role: [] for graph in spec.graphs}
    for clip in common.training_mixtures(count=6).noisy:
        values = {"frontend": fe.features(clip)}
        for graph in spec.graphs:
            feeds[graph.role].append(graph_feeds(spec, graph, values))
            values.update(run_offline_graph(graph, feeds[graph.role][-1]))
    return feeds


def run_offline_graph(graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(graph)
    names = [o.name for o in sess.get_outputs()]
    return {f"{graph.role}:{name}": value for name, value in zip(names, sess.run(names, feeds))}


def _built_spec(spec: quant.spec.ModelSpec, tmp_path: Path, precision: str) -> quant.spec.ModelSpec:
    """The spec with each graph replaced by its `quant build` artifact (INT8 from a cache of frontend feeds)."""
    folder = tmp_path / precision
    shutil.copytree(spec.source.parent, folder)
    feeds = _calibration_feeds(spec) if precision == "int8" else {}
    for graph in spec.graphs:
        source = graph.onnx_path()
        args = ["build", str(source), "--precision", precision, "-o", str(tmp_path / f"{graph.role}-{precision}")]
        if precision == "int8":
            ranges = collect_ranges(source, feeds[graph.role], "percentile", RangeOptions(progress=False))
            cache = tmp_path / f"{graph.role}.cache"
            key = CacheKey.create(sha256_file(source), "tests:frontend-feeds", "percentile",
                                  method_params("percentile", RangeOptions()))
            write_entry(cache, key, ranges)
            args += ["--cache", str(cache)]
        assert cli_main(args) == 0
        target = folder / source.relative_to(spec.source.parent)
        shutil.copyfile(tmp_path / f"{graph.role}-{precision}" / "model.onnx", target)
    return quant.load_spec(folder / spec.source.name)


# FP16 of the RNN models is left out: `quant build --precision fp16` of gru-logpower keeps the GRU in FP32 between
# Casts, and ONNX Runtime 1.32's graph optimizer then crashes (segfault) creating the session; it loads with
# optimizations disabled. A segfault would take the whole pytest run down, so it is not an xfail here.
@pytest.mark.parametrize(("kind", "precision"), [("gru-logpower", "int8"), ("two-stage", "int8"),
                                                 ("lstm-mask", "int8"), ("two-stage", "fp16")])
def test_built_precision_keeps_the_gain(third_party_model, kind: str, precision: str, tmp_path: Path) -> None:
    spec = _spec(third_party_model, kind)
    built = _built_spec(spec, tmp_path, precision)
    for noisy, clean in common.held_out_mixtures():
        if si_sdr(clean, noisy) >= LOW_SNR_DB:
            continue
        fp32, low = si_sdr(clean, enhance(spec, noisy)), si_sdr(clean, enhance(built, noisy))
        print(f"{kind} {precision}: noisy {si_sdr(clean, noisy):.2f} fp32 {fp32:.2f} {precision} {low:.2f} dB")
        assert abs(low - fp32) < 1.0


@pytest.mark.parametrize("kind", STREAMING)
def test_published_size_spec_declares_the_wider_states(kind: str) -> None:
    """A published-size streaming model (scripts/bench_test_models.py --size published) is described by a spec whose
    state shapes are the wider module's, the rest of the docs spec unchanged; the test size keeps the docs spec."""
    import models
    from models import se

    size = dict(models.SIZES["published"][kind])
    module = se.LstmMask(**size) if kind == "lstm-mask" else se.StftGruStream(**size)
    text = models._sized_spec(kind, {"graph": module})
    spec = quant.spec.parse_spec(tomllib.loads(text), models.DOCS_SPECS / f"{kind}.toml")
    docs = models.docs_spec(kind)
    assert spec.streaming is not None and docs.streaming is not None
    expected = ([tuple(s.shape) for s in module.states()] if isinstance(module, se.LstmMask)
                else list(module.cache_shapes().values()))
    assert [tuple(s.shape) for s in spec.streaming.states] == expected
    assert [s.input for s in spec.streaming.states] == [s.input for s in docs.streaming.states]
    assert [tuple(s.shape) for s in spec.streaming.states] != [tuple(s.shape) for s in docs.streaming.states]
    with pytest.raises(ValueError, match="no 'published' size"):
        models.build("u2pp", Path("unused"), size="published")
