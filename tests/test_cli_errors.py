"""Every user-facing failure through the CLI is one line on stderr naming the path or option, exit 2, no traceback:
unwritable or full output, a folder where a file is expected, a non-model --weights file, a calibration set too
short for the WeNet encoder, and out-of-range options (rejected at parse time, before any work)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from quant.calib import cache as cc
from quant.calib.ranges import RangeResult, TensorRange
from quant.cli import main
from quant.errors import FileAccessError


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `quant ARGV` run in-process; argparse's own exit counts as an exit code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code: int, lines: list[str], *needles: str) -> str:
    assert code == 2
    assert lines, "nothing on stderr"
    error = lines[-1]
    assert "error:" in error and "Traceback" not in "\n".join(lines)
    for needle in needles:
        assert needle in error, (needle, error)
    return error


@pytest.fixture()
def cache_file(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "m.cache"
    versions = {"quant": "0", "onnxruntime": "0", "onnx": "0", "numpy": "0"}
    key = cc.CacheKey.create("a" * 64, "b" * 64, "minmax", {}, versions)
    cc.write_entry(path, key, RangeResult("minmax", {}, {"x": TensorRange("x", 3.0, -1.0, 3.0, 10, 0)}, (), 1))
    return path


# ---------------------------------------------------------------------------------------------- files


def test_output_that_is_a_folder_is_named(cache_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    code, lines = run_cli(["cache", "export", str(cache_file), "--format", "qdq", "-o", str(folder)], capsys)
    assert_one_line_error(code, lines, f"cannot write {folder}", "folder")
    assert folder.is_dir() and not list(folder.iterdir()) and not list(tmp_path.glob(".*.tmp"))


def test_full_disk_names_the_target_and_leaves_nothing(cache_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "out" / "ranges.json"
    code, lines = run_cli(["cache", "export", str(cache_file), "--format", "ort-json", "-o", str(target)], capsys)
    assert_one_line_error(code, lines, f"cannot write {target}", "no space left")
    assert list(target.parent.iterdir()) == []  # neither the target nor a temp file


@pytest.fixture()
def read_only_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder nobody may create files in: chmod where that binds; as root (chmod binds nothing) the file system
    refuses, as a read-only mount does."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        real_mkstemp = tempfile.mkstemp

        def read_only_mkstemp(*args: object, dir: str | os.PathLike[str] | None = None, **kwargs: object) -> object:
            if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    else:
        folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


def test_read_only_output_folder_is_named(cache_file: Path, read_only_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = read_only_dir / "ranges.json"
    code, lines = run_cli(["cache", "export", str(cache_file), "--format", "qdq", "-o", str(target)], capsys)
    error = assert_one_line_error(code, lines, f"cannot write {target}")
    assert "read-only" in error or "permission denied" in error
    assert not target.exists()


def test_file_error_outside_the_library_boundary_is_still_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from quant.cli import cache as cache_cli

    def unwritable(args: object) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/store/x.cache.lock")

    monkeypatch.setattr(cache_cli, "run_list", unwritable)
    code, lines = run_cli(["cache", "list"], capsys)
    assert_one_line_error(code, lines, "/data/store/x.cache.lock", "permission denied")


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from quant.cli import cache as cache_cli

    def buggy(args: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(cache_cli, "run_list", buggy)
    with pytest.raises(ValueError, match="a bug"):
        main(["cache", "list"])


def test_file_access_error_says_what_to_do() -> None:
    error = FileAccessError.from_os_error(OSError(errno.EROFS, "Read-only file system", "/tmp/.x.tmp"), "write",
                                          Path("/mnt/ro/x.json"))
    assert str(error) == "cannot write /mnt/ro/x.json: the file system is read-only; choose a writable folder"


# ---------------------------------------------------------------------------------------------- --weights


@pytest.mark.parametrize("model", ["dpcrn", "wenet"])
@pytest.mark.parametrize("content", ["text", "numpy", "state_dict_list", "folder"])
def test_weights_that_are_not_a_checkpoint(model: str, content: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    weights = tmp_path / "weights.pt"
    if content == "text":
        weights.write_text("hello\n")
    elif content == "numpy":
        np.save(weights.with_suffix(".npy"), np.zeros(3))
        weights.with_suffix(".npy").rename(weights)
    elif content == "state_dict_list":
        torch.save({"state_dict": [1, 2], "config": {}}, weights)
    else:
        weights.mkdir()
    code, lines = run_cli(["export", model, "-o", str(tmp_path / "out"), "--weights", str(weights)], capsys)
    assert_one_line_error(code, lines, str(weights))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.onnx"))


# ---------------------------------------------------------------------------------------------- short audio


def subsampling_encoder(path: Path) -> Path:
    """speech (B, T, 80) -> a 3x3 stride-2 Conv as in the WeNet encoder's subsampling, + speech_lengths."""
    weight = numpy_helper.from_array(np.full((1, 1, 3, 3), 0.1, np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Unsqueeze", ["speech", "axes"], ["x4"]),
             helper.make_node("Conv", ["x4", "w"], ["y"], strides=[2, 2]),
             helper.make_node("Identity", ["speech_lengths"], ["lengths"])]
    graph = helper.make_graph(
        nodes, "enc",
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["B", "T", 80]),
         helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, ["B"])],
        initializer=[weight, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


ENCODER_SPEC = """
[model]
name = "enc"
task = "asr"

[[graphs]]
role = "encoder"
path = "encoder.onnx"
inputs = ["speech", "speech_lengths"]
outputs = ["y", "lengths"]
feeds = [{ input = "speech", from = "frontend" }, { input = "speech_lengths", from = "frontend:lengths" }]

[frontend]
transform = "fbank"
layout = "B T F"
min_frames = 7

[task]
units = "units.txt"
metrics = ["cer"]
"""


def one_clip_manifest(folder: Path, samples: int) -> Path:
    audio = folder / "clip.flac"
    sf.write(audio, np.random.default_rng(0).uniform(-0.1, 0.1, samples).astype(np.float32), 16000)
    line = {"path": audio.name, "sha256": hashlib.sha256(audio.read_bytes()).hexdigest(), "duration": samples / 16000,
            "text": "a", "source": "test", "license": "CC0"}
    manifest = folder / "manifest.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    return manifest


@pytest.mark.parametrize("samples", [1, 400])
def test_calibration_set_too_short_for_the_encoder(samples: int, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    subsampling_encoder(tmp_path / "encoder.onnx")
    manifest = one_clip_manifest(tmp_path, samples)
    (tmp_path / "units.txt").write_text("<blank> 0\na 1\n<sos/eos> 2\n")
    spec = tmp_path / "encoder.toml"  # a WeNet-style encoder: fbank 80 x 25/10 ms, two stride-2 convs
    spec.write_text(ENCODER_SPEC)
    code, lines = run_cli(["calibrate", str(spec), "--data", str(manifest),
                           "--method", "minmax", "--no-progress", "-o", str(tmp_path / "x.cache")], capsys)
    assert_one_line_error(code, lines, str(manifest), "shorter than")
    assert not (tmp_path / "x.cache").exists()


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("argv", "option"), [
    (["calibrate", "m.onnx", "--limit", "0"], "--limit"),
    (["calibrate", "m.onnx", "--limit", "-1"], "--limit"),
    (["calibrate", "m.onnx", "--batch-size", "-3"], "--batch-size"),
    (["calibrate", "m.onnx", "--every", "0"], "--every"),
    (["calibrate", "m.onnx", "--threads", "0"], "--threads"),
    (["calibrate", "m.onnx", "--max-batch", "0"], "--max-batch"),
    (["calibrate", "m.onnx", "--trt-version", "86 01"], "--trt-version"),
    (["calibrate", "m.onnx", "--trt-version", "8601\n"], "--trt-version"),
    (["calibrate", "m.onnx", "--trt-version", "8.6.1"], "--trt-version"),
    (["calibrate", "m.onnx", "--percentile", "0"], "--percentile"),
    (["calibrate", "m.onnx", "--percentile", "100.5"], "--percentile"),
    (["calibrate", "m.onnx", "--percentile", "nan"], "--percentile"),
    (["evaluate", "dpcrn", "m.onnx", "--limit", "0"], "--limit"),
    (["evaluate", "dpcrn", "m.onnx", "--threads", "-1"], "--threads"),
    (["cache", "diff", "a", "b", "--top", "-1"], "--top"),
    (["run", "--runs", "0"], "--runs"),
    (["run", "--stream-runs", "-5"], "--stream-runs"),
    (["run", "--calib-utterances", "0"], "--calib-utterances"),
    (["run", "--se-utterances", "-1"], "--se-utterances"),
    (["bench", "--threads", "1,0"], "--threads"),
])
def test_bad_option_values_are_rejected_before_any_work(argv: list[str], option: str, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import quant.pipeline

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{option} was accepted and the pipeline started")

    monkeypatch.setattr(quant.pipeline, "run_all", no_work)
    code, lines = run_cli(argv, capsys)  # m.onnx does not exist: parsing must stop first
    assert_one_line_error(code, lines, f"argument {option}")


def test_library_options_check_their_values_too() -> None:
    from quant.calib.calibrate import CalibrateOptions
    from quant.calib.ranges import RangeOptions
    from quant.calib.readers import ReaderOptions
    from quant.errors import CalibrationError

    for make in (lambda: RangeOptions(percentile=0.0), lambda: RangeOptions(percentile=float("nan")),
                 lambda: RangeOptions(threads=0), lambda: ReaderOptions(limit=0), lambda: ReaderOptions(limit=-1),
                 lambda: ReaderOptions(batch_size=-3), lambda: CalibrateOptions(trt_version="86 01")):
        with pytest.raises(CalibrationError):
            make()


@pytest.mark.parametrize("command", ["run", "bench"])
def test_run_and_bench_refuse_an_unwritable_output_root_before_any_work(
        tmp_path: Path, read_only_dir: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """`quant run|bench --output RO`: one line naming the folder, exit 2, before a model is built or timed (not a
    failed row per precision and then the error at the end)."""
    from test_tasks_common import _spec

    spec = _spec(tmp_path, '["noisy_mag"]')
    out = read_only_dir / "engines"
    code, lines = run_cli([command, "--model", str(spec), "--output", str(out), "--quick", "--no-progress",
                           "--backends", "ort", "--precisions", "fp32", "--no-eager"], capsys)
    assert_one_line_error(code, lines, f"quant {command}: error: cannot write {out}", "read-only")
    assert len(lines) == 1 and list(out.iterdir()) == []


@pytest.mark.parametrize("verbose, library_info", [([], False), (["-v"], True)])
def test_the_cli_logs_quant_at_info_and_other_libraries_only_from_warnings(verbose: list[str], library_info: bool) -> None:
    """ONNX Runtime's quantizer logs an INFO line per tensor it leaves unquantized on the root logger (90 lines in a
    `quant run --quick`): hidden unless -v; quant's own INFO progress stays."""
    import logging

    root, quant_logger = logging.getLogger(), logging.getLogger("quant")
    saved = root.level, quant_logger.level
    try:
        assert main([*verbose, "specs", "list"]) == 0
        assert logging.getLogger("quant.pipeline").isEnabledFor(logging.INFO)
        assert root.isEnabledFor(logging.INFO) is library_info
        assert logging.getLogger("onnxruntime").isEnabledFor(logging.INFO) is library_info
    finally:
        root.setLevel(saved[0])
        quant_logger.setLevel(saved[1])


def test_search_without_budget_and_none_in_the_spec_says_where_to_give_one(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]):
    spec = tmp_path / "masker.toml"
    spec.write_text('[model]\nname = "masker"\ntask = "se"\n\n[[graphs]]\nrole = "masker"\npath = "m.onnx"\n'
                    'inputs = ["features"]\noutputs = ["mask"]\nfeeds = [{ input = "features", from = "frontend" }]\n\n'
                    '[frontend]\ntransform = "log10_power"\nframe = 320\nhop = 160\nn_fft = 320\nwindow = "hann"\n'
                    'layout = "B T F"\n\n[output]\nname = "mask"\nkind = "mask_magnitude"\n\n[defaults]\n'
                    'calibration_manifest = "calib_data:se_calib"\ntest_manifest = "calib_data:se_test"\n')
    code, lines = run_cli(["search", str(spec), "-o", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, lines, "masker: the spec sets no INT8 budget", "--budget METRIC=VALUE")
    assert not (tmp_path / "out").exists()


def test_search_without_budget_searches_to_the_specs_int8_budget(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]):
    import quant.cli.specs
    import quant.search.models
    from quant.errors import QuantError

    seen = {}

    def stop(problem_for, split, options, out_dir, size):  # noqa: ANN001, ANN202 - stands in for the search
        seen["budget"] = options.budget
        raise QuantError("stopped before the search")

    monkeypatch.setattr(quant.cli.specs, "fp32_graphs", lambda spec: {})
    monkeypatch.setattr(quant.search.models, "search_widening", stop)
    code, lines = run_cli(["search", "dpcrn"], capsys)
    assert_one_line_error(code, lines, "stopped before the search")
    assert seen["budget"].text() == "pesq_wb=-0.05"  # dpcrn's [defaults.budgets] int8 = { pesq_wb = 0.05 }


SPEC_MISTAKES = {  # a spec whose tables disagree with its graph's fixed dims -> what the one line must name
    "state": ("[1, 5]", "", "input 'hidden': [[streaming.states]] shape gives (1, 5)", "expects (1, 4)"),
    "frontend": ("[1, 4]", "frame = 320\nhop = 160\n", "input 'frame': [frontend]", "gives (1, 1, 161)",
                 "expects (1, 1, 257)"),
}
SPEC_COMMANDS = {
    "calibrate": ["calibrate", "{spec}", "--limit", "1", "-o", "{out}/c.cache"],
    "evaluate": ["evaluate", "{spec}", "--limit", "1", "--precision", "fp32"],
    "build": ["build", "{spec}", "--precision", "int8", "--limit", "1", "-o", "{out}/int8"],
}


@pytest.mark.parametrize("mistake", sorted(SPEC_MISTAKES))
@pytest.mark.parametrize("command", sorted(SPEC_COMMANDS))
def test_a_spec_table_that_disagrees_with_the_graph_is_named_by_every_command(
        command: str, mistake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The line `quant specs check` gives (tasks.common.check_feed), not ONNX Runtime's, from each command that runs
    the spec's graphs: the spec file, its table, the graph input and expected vs got."""
    from test_tasks_check import _streaming_spec

    monkeypatch.chdir(tmp_path)  # the default output root (./engines) stays in tmp_path
    state_shape, frontend, *needles = SPEC_MISTAKES[mistake]
    spec = _streaming_spec(tmp_path, state_shape=state_shape, frontend=frontend)
    argv = [part.format(spec=spec, out=tmp_path / "out") for part in SPEC_COMMANDS[command]]
    code, lines = run_cli(argv, capsys)
    error = assert_one_line_error(code, lines, f"quant {command}: error: {spec}: graph 'masker'", *needles,
                                  str(tmp_path / "stream.onnx"))
    assert len(error.split(": error: ")) == 2  # no runtime message wrapped inside
    written = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert written in ([], [".c.cache.lock"])  # the cache store's lock file is kept by design (quant.calib.cache)


@pytest.mark.parametrize("command", sorted(SPEC_COMMANDS))
def test_offline_features_that_disagree_with_the_graph_are_named_by_every_command(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from test_tasks_common import _spec

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, '["noisy_mag"]')
    spec.write_text(spec.read_text().replace('layout = "B T F"', 'layout = "B F T"'))  # (1, 257, T): axes swapped
    argv = [part.format(spec=spec, out=tmp_path / "out") for part in SPEC_COMMANDS[command]]
    code, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, f"{spec}: graph 'masker' input 'noisy_mag': [frontend]",
                          f"but {tmp_path / 'tiny.onnx'} expects (1, 'T', 257)")
