"""Model specs: the strict loader (unknown keys, wrong types and values named with their key path), the shipped
reference specs against the code tables they describe, the example specs of docs/specs, and round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

import quant
from quant.errors import ModelError, QuantError
from quant.spec import (AsrTaskSpec, DefaultsSpec, FrontendSpec, SeTaskSpec, SpecError, load_spec, parse_spec,
                        resolve_manifest, shipped_specs)
from quant.tomlschema import from_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "docs" / "specs").glob("*.toml"))

MINIMAL = """
[model]
name = "tiny"
task = "se"

[[graphs]]
role = "enhancer"
path = "tiny.onnx"

[frontend]
transform = "stft"

[output]
name = "enh"
kind = "spectrum"
"""


def write(tmp_path: Path, text: str, name: str = "model.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Any:
    return load_spec(write(tmp_path, text))


# ------------------------------------------------------------------------------------------------ strict loader


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + 'windw = "hann"\n', r"output\.windw: unknown key"),  # keys after [output] belong to it
    (MINIMAL.replace('transform = "stft"', 'transform = "stft"\nwindw = "hann"'),
     r"frontend\.windw: unknown key \(did you mean 'window'\?\); allowed in \[frontend\]: transform, sample_rate"),
    (MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\nfeeds = [{ input = "mix", form = "frontend" }]'),
     r"graphs\[1\]\.feeds\[1\]\.form: unknown key \(did you mean 'from'\?\)"),
    (MINIMAL + "[task]\nbeam = 4\n", r"task\.beam: unknown key; allowed in \[task\]: metrics"),
    ("[modle]\n" + MINIMAL, r"modle: unknown key \(did you mean 'model'\?\); allowed in the top level: model, graphs"),
])
def test_unknown_keys_are_named_with_their_path(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SpecError, match=str(tmp_path / "model.toml").replace(".", r"\.") + ": " + expected):
        load_text(tmp_path, text)


@pytest.mark.parametrize("change, expected", [
    (("hop", "hop = 256"), None),  # itself fine: the control case
    (("hop", 'hop = "256"'), r"frontend\.hop: expected an integer, got a string \('256'\)"),
    (("hop", "hop = true"), r"frontend\.hop: expected an integer, got a boolean \(True\)"),
    (("hop", "hop = 0"), r"frontend\.hop: must be positive, got 0"),
    (("hop", 'window = "hamming"'), r"frontend\.window: 'hamming' is not one of 'none', 'hann', 'sqrt_hann', 'sine'"),
    (("hop", "bins = 161"), r"frontend\.bins: 161 bins, but n_fft 512 gives n_fft // 2 \+ 1 = 257; set n_fft = 320"),
    (("hop", 'layout = "B T F"'), r"frontend\.layout: 'B T F' for stft: needs the axes B F T C once each"),
    (("hop", "fixed_frames = 500\nsegment_samples = 144000"), r"frontend\.fixed_frames: 500, but a segment of 144000"),
])
def test_wrong_types_and_values_are_named(tmp_path: Path, change: tuple[str, str], expected: str | None) -> None:
    text = MINIMAL.replace('transform = "stft"', f'transform = "stft"\n{change[1]}')
    if expected is None:
        assert load_text(tmp_path, text).frontend.hop == 256
        return
    with pytest.raises(SpecError, match=expected):
        load_text(tmp_path, text)


@pytest.mark.parametrize("text, expected", [
    (MINIMAL.replace('task = "se"\n', ""), r"model\.task: required key is missing"),
    (MINIMAL.replace('task = "se"', 'task = "kws"'), r"model\.task: 'kws' is not one of 'se', 'asr'"),
    (MINIMAL.replace('path = "tiny.onnx"', ""), r"graphs\[1\]: graph 'enhancer' needs exactly one of 'path'"),
    (MINIMAL.replace("[output]\nname = \"enh\"\nkind = \"spectrum\"\n", ""), r"output: an SE spec needs an \[output\]"),
    (MINIMAL.replace('kind = "spectrum"', 'kind = "time_frames"\ninverse = "istft"'),
     r"output\.inverse: 'istft' does not invert a 'time_frames' output; use 'overlap_add'"),
    (MINIMAL.replace('task = "se"', 'task = "asr"'), r"task\.units: required key is missing"),
    (MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\nfeeds = [{ input = "mix", from = "stage0:x" }]'),
     r"graphs\[1\]\.feeds: 'stage0:x': 'stage0' is not an earlier graph's role"),
    (MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\noutputs = ["out"]'),
     r"output\.name: 'enh' is not among the graph's declared outputs \(out\)"),
    (MINIMAL + '[streaming]\nframe_input = "mix"\n[[streaming.states]]\ninput = "h"\nshape = [1, 0]\n',
     r"streaming\.states\[1\]\.shape: state 'h': dimensions must be positive"),
    ("[model\n", r"not valid TOML"),
])
def test_structural_errors_are_named(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        load_text(tmp_path, text)


def test_spec_errors_are_quant_errors_for_the_cli(tmp_path: Path) -> None:
    assert issubclass(SpecError, QuantError)
    with pytest.raises(QuantError, match=r"'nosuchmodel' is neither a shipped model \(dpcrn, dpcrn-stream, wenet\)"):
        load_spec("nosuchmodel")
    with pytest.raises(QuantError, match="no such spec file"):
        load_spec(tmp_path / "missing.toml")


def test_asr_task_keys_differ_from_se(tmp_path: Path) -> None:
    text = MINIMAL.replace('task = "se"', 'task = "asr"').replace('role = "enhancer"', 'role = "encoder"')
    spec = load_text(tmp_path, text + '[task]\nunits = "units.txt"\nsos = 2\neos = 2\nreverse_weight = 0.3\n')
    assert isinstance(spec.task, AsrTaskSpec)
    assert spec.task.units == tmp_path / "units.txt"
    assert spec.task.token_ids(30) == (0, 2, 2)
    with pytest.raises(SpecError, match="units, but task ids"):
        spec.task.token_ids(2)
    with pytest.raises(SpecError, match=r"task\.metrics\[1\]: 'pesq_wb' is not one of 'cer', 'wer'"):
        load_text(tmp_path, text + '[task]\nunits = "u.txt"\nmetrics = ["pesq_wb"]\n')


# ------------------------------------------------------------------------------------------------ paths, defaults


def test_paths_are_relative_to_the_spec_and_checked_at_use(tmp_path: Path) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    spec = load_spec(write(folder, MINIMAL.replace("tiny.onnx", "../models/tiny.onnx") +
                           '[defaults]\ncalibration_manifest = "calib/manifest.jsonl"\n'))
    graph = spec.graphs[0]
    assert graph.path == tmp_path / "models" / "tiny.onnx"
    with pytest.raises(ModelError, match=r"models/tiny\.onnx: ONNX file of graph 'enhancer' not found"):
        graph.onnx_path()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.onnx").write_bytes(b"")
    assert graph.onnx_path() == tmp_path / "models" / "tiny.onnx"
    with pytest.raises(SpecError, match=r"calib/manifest\.jsonl: calibration manifest not found"):
        resolve_manifest(spec.defaults.calibration_manifest, "calibration manifest")


@pytest.mark.parametrize("what, key", [("calibration manifest", "calibration_manifest"),
                                       ("test manifest", "test_manifest")])
def test_a_spec_without_a_manifest_says_which_key_to_set(what: str, key: str) -> None:
    with pytest.raises(SpecError) as raised:
        resolve_manifest(None, what)
    assert f"set [defaults] {key} in the spec" in str(raised.value) and "calib_data:" in str(raised.value)


def test_minimal_spec_gets_the_documented_defaults(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL)
    assert spec.defaults == DefaultsSpec()
    assert spec.task == SeTaskSpec()
    assert dataclasses.replace(spec.frontend, transform="stft") == FrontendSpec(transform="stft")
    assert spec.frontend.axes == "BFTC" and spec.frontend.fft_size == 512
    assert spec.graphs[0].name == "tiny" and spec.method(spec.graphs[0]) == "percentile"
    assert spec.streaming is None and spec.feeds is None


@pytest.mark.parametrize("name", ["dpcrn", "dpcrn-stream", "wenet"])
def test_round_trip_through_plain_tables(name: str, tmp_path: Path) -> None:
    spec = load_spec(name)
    again = parse_spec(spec.to_table(), tmp_path / "elsewhere.toml")  # absolute paths survive the move
    assert again == spec


def test_round_trip_of_defaults(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL)
    table = spec.to_table()
    assert table["defaults"] == {"calibration_method": "percentile", "batch_size": 4, "frame_stride": 4, "budgets": {}}
    assert parse_spec(table, tmp_path / "model.toml") == spec
    assert from_table(DefaultsSpec, {}) == DefaultsSpec()


def test_feeds_escape_hatch(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL + '[feeds]\nfunction = "json:dumps"\n')
    import json

    assert spec.feeds is not None and spec.feeds.load_function() is json.dumps
    broken = load_text(tmp_path, MINIMAL + '[feeds]\nfunction = "no_such_module_here:feeds"\n')
    with pytest.raises(SpecError, match="feeds.function 'no_such_module_here:feeds' cannot be imported"):
        broken.feeds.load_function()
    with pytest.raises(SpecError, match="feeds: give exactly one of 'npz' or 'function'"):
        load_text(tmp_path, MINIMAL + '[feeds]\nnpz = "a.npz"\nfunction = "m:f"\n')
    assert load_text(tmp_path, MINIMAL + '[feeds]\nnpz = "a.npz"\n').feeds.npz == tmp_path / "a.npz"


def test_calib_data_manifests_resolve_at_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "se_calib").mkdir()
    (tmp_path / "se_calib" / "manifest.jsonl").write_text("")
    monkeypatch.setenv("QUANT_CALIB_DATA", str(tmp_path))
    assert resolve_manifest(load_spec("dpcrn").defaults.calibration_manifest) == tmp_path / "se_calib" / \
        "manifest.jsonl"


# ------------------------------------------------------------------------------------------------ shipped + examples


def test_package_api_exports_load_spec() -> None:
    assert quant.load_spec is load_spec
    assert shipped_specs() == ("dpcrn", "dpcrn-stream", "wenet")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    for graph in spec.graphs:
        assert graph.path is not None and graph.path.is_relative_to(path.parent)
    if isinstance(spec.task, AsrTaskSpec):
        assert spec.task.units.is_file()


def test_examples_cover_the_five_kinds() -> None:
    specs = {p.stem: load_spec(p) for p in EXAMPLES}
    assert specs["lstm-mask"].streaming.state_pairs()["h1"] == "tf_op_layer_stack_2"
    assert (specs["gru-logpower"].frontend.transform, specs["gru-logpower"].frontend.freq_bins) == ("log10_power", 161)
    assert specs["two-stage"].graphs[1].feeds[0].graph == "stage1"
    assert len(specs["stft-gru-stream"].streaming.states) == 3
    u2pp = specs["u2pp"]
    assert (u2pp.task.sos, u2pp.task.eos) == (2, 2)
    assert "r_hyps_pad_sos_eos" in u2pp.graph("decoder").inputs
    from quant.models.tokenizer import read_units

    assert read_units(u2pp.task.units)[2] == "<sos/eos>"


def test_shipped_specs_are_the_pipelines_models() -> None:
    """The run's default models are the shipped specs; each graph is one quant exports, under a distinct name."""
    from quant import pipeline
    from quant.calib.readers import ReaderOptions
    from quant.spec import EXPORTS, shipped_specs

    assert pipeline.RunOptions().models == shipped_specs() == ("dpcrn", "dpcrn-stream", "wenet")
    names = []
    for model in shipped_specs():
        spec = load_spec(model)
        assert spec.defaults.batch_size == ReaderOptions().batch_size
        assert spec.defaults.frame_stride == ReaderOptions().every
        for graph in spec.graphs:
            assert graph.export in EXPORTS and graph.stem == Path(str(graph.export_file)).stem
            names.append(graph.name)
    assert names == ["dpcrn", "dpcrn-stream", "wenet-encoder", "wenet-decoder"]


def test_shipped_dpcrn_specs_describe_features_and_states() -> None:
    from quant import features
    from quant.artifacts.export import dpcrn_spec
    from quant.models.dpcrn import STREAM_STATES

    offline, stream = load_spec("dpcrn"), load_spec("dpcrn-stream")
    fe = offline.frontend
    assert (fe.sample_rate, fe.fft_size, fe.hop, fe.freq_bins) == (features.SAMPLE_RATE, features.N_FFT,
                                                                   features.HOP, features.FREQ_BINS)
    assert (fe.segment_samples, fe.fixed_frames) == (features.SEGMENT_SAMPLES, features.SEGMENT_FRAMES)
    assert stream.frontend == dataclasses.replace(fe, fixed_frames=None, segment_samples=None)
    assert [(s.input, s.shape) for s in stream.streaming.states] == STREAM_STATES
    assert stream.streaming.state_pairs() == {name: f"{name}_out" for name, _ in STREAM_STATES}
    for spec, streaming in ((offline, False), (stream, True)):
        graph = dpcrn_spec(streaming)
        assert (spec.graphs[0].inputs, spec.graphs[0].outputs) == (graph.input_names, graph.output_names)


def test_shipped_wenet_spec_describes_export_tokenizer_and_decoding() -> None:
    from quant import decoding, features
    from quant.artifacts import wenet_export
    from quant.eval.asr import BEAM
    from quant.models.tokenizer import UNITS_PATH, CharTokenizer

    spec = load_spec("wenet")
    encoder, decoder = spec.graph("encoder"), spec.graph("decoder")
    assert list(encoder.inputs) == wenet_export.ENCODER_INPUTS and list(encoder.outputs) == wenet_export.ENCODER_OUTPUTS
    assert list(decoder.inputs) == wenet_export.DECODER_INPUTS and list(decoder.outputs) == wenet_export.DECODER_OUTPUTS
    task = spec.task
    assert isinstance(task, AsrTaskSpec)
    tokenizer = CharTokenizer()
    assert task.units == UNITS_PATH.resolve()
    assert task.token_ids(tokenizer.vocab_size) == (tokenizer.blank, tokenizer.sos_eos, tokenizer.sos_eos)
    assert (task.ctc_weight, task.beam, task.reverse_weight) == (decoding.CTC_WEIGHT, BEAM, 0.0)
    fbank = spec.frontend.fbank
    assert (fbank.bins, fbank.frame_ms, fbank.shift_ms, fbank.scale) == (
        features.FBANK_BINS, features.FBANK_FRAME_MS, features.FBANK_SHIFT_MS, features.FBANK_SCALE)


# ------------------------------------------------------------------------------------------------ budgets


def test_budgets_are_typed_per_precision_and_metric(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL + "[defaults.budgets]\nint8 = { pesq_wb = 0.05 }\nfp16 = { stoi = 0.01 }\n")
    int8, fp16 = spec.defaults.budgets.int8, spec.defaults.budgets.fp16
    assert int8 is not None and int8.to_row() == {"metric": "pesq_wb", "limit": 0.05, "higher_is_better": True}
    assert fp16 is not None and (fp16.metric, fp16.limit) == ("stoi", 0.01)
    assert spec.defaults.budgets.get("fp32") is None
    assert parse_spec(spec.to_table(), tmp_path / "model.toml") == spec


@pytest.mark.parametrize("budgets, expected", [
    ("int8 = { pesq = 0.05 }", r"defaults\.budgets\.int8\.pesq: unknown key .*allowed in \[defaults\.budgets\.int8\]: "
                               r"pesq_wb, pesq_nb, stoi, si_sdr, cer, wer"),
    ("int4 = { pesq_wb = 0.05 }",
     r"defaults\.budgets\.int4: unknown key .*allowed in \[defaults\.budgets\]: int8, fp16"),
    ("int8 = { cer = 0.003 }", r"defaults\.budgets\.int8: 'cer' is not a metric of this task"),
    ("int8 = { pesq_wb = 0.05, stoi = 0.01 }", r"defaults\.budgets\.int8: name exactly one metric"),
    ("int8 = { pesq_wb = -0.05 }", r"defaults\.budgets\.int8: the allowed loss is a size"),
])
def test_wrong_budgets_are_named(tmp_path: Path, budgets: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        load_text(tmp_path, MINIMAL + "[defaults.budgets]\n" + budgets + "\n")


def test_shipped_budgets_are_the_reports_former_table() -> None:
    """The values report/targets.py ACCURACY_BUDGETS held (CER in points there, a fraction here)."""
    former = {("dpcrn", "int8"): ("pesq_wb", 0.05), ("dpcrn", "fp16"): ("pesq_wb", 0.01),
              ("dpcrn-stream", "int8"): ("pesq_wb", 0.05), ("dpcrn-stream", "fp16"): ("pesq_wb", 0.01),
              ("wenet", "int8"): ("cer", 0.003), ("wenet", "fp16"): ("cer", 0.0005)}
    for (model, precision), (metric, limit) in former.items():
        budget = load_spec(model).defaults.budgets.get(precision)
        assert budget is not None and budget.metric == metric and budget.limit == pytest.approx(limit)


# ------------------------------------------------------------------------------------------------ graph rewrites


def test_graph_rewrites_are_parsed_in_order(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\nrewrites = ["split-concat-conv", "deconv-to-conv"]')
    assert load_text(tmp_path, text).graph("enhancer").rewrites == ("split-concat-conv", "deconv-to-conv")
    assert load_text(tmp_path, MINIMAL).graph("enhancer").rewrites == ()  # the one default: none


@pytest.mark.parametrize("rewrites, expected", [
    ('["deconv-to-conv", "fold-bn"]', r"graphs\[1\]\.rewrites\[2\]: 'fold-bn' is not one of 'deconv-to-conv', "
                                      r"'split-concat-conv', 'prelu-to-leakyrelu', "
                                      r"'gru-step-to-matmul'"),
    ('["deconv-to-conv", "deconv-to-conv"]', r"graphs\[1\]\.rewrites: graph 'enhancer' names a rewrite twice"),
    ('"deconv-to-conv"', r"graphs\[1\]\.rewrites: expected an array"),
])
def test_wrong_rewrites_are_named(tmp_path: Path, rewrites: str, expected: str) -> None:
    text = MINIMAL.replace('path = "tiny.onnx"', f'path = "tiny.onnx"\nrewrites = {rewrites}')
    with pytest.raises(SpecError, match=expected):
        load_text(tmp_path, text)


def test_spec_rewrite_names_are_the_implemented_rewrites() -> None:
    from typing import get_args

    from quant.rewrite import REWRITES
    from quant.spec import Rewrite

    assert list(get_args(Rewrite)) == list(REWRITES)


# ------------------------------------------------------------------------------------------------ rules_off


def test_rules_off_is_parsed_and_refuses_a_repeated_name(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\nrules_off = ["skip-concat", "leakyrelu-float"]')
    assert load_text(tmp_path, text).graph("enhancer").rules_off == ("skip-concat", "leakyrelu-float")
    assert load_text(tmp_path, MINIMAL).graph("enhancer").rules_off == ()  # the one default: the shipped rules
    twice = MINIMAL.replace('path = "tiny.onnx"', 'path = "tiny.onnx"\nrules_off = ["skip-concat", "skip-concat"]')
    with pytest.raises(SpecError, match=r"graphs\[1\]\.rules_off: graph 'enhancer' names a rule twice"):
        load_text(tmp_path, twice)


def test_shipped_specs_leave_out_only_shipped_rules() -> None:
    """The spec loader cannot see the rules (it sits below them); the names are checked here and at build time."""
    from quant.precision import load_rules

    names = {rule.name for rule in load_rules()}
    for spec in map(load_spec, shipped_specs()):
        for graph in spec.graphs:
            assert set(graph.rules_off) <= names, (spec.name, graph.role, graph.rules_off)
