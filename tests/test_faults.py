"""kill -9 of a real `quant build` / `quant calibrate` process at chosen points, then the next run: it must not reuse or
leave anything half-done, and its result must equal a clean run's.

The child is the real CLI in its own process; it sends itself SIGKILL right after the chosen function returns for
the n-th time (no exit handler, `finally` or atexit runs: exactly what kill -9 at that moment does), or the test
kills it from outside when a file appears."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quant
from quant.artifacts.artifact import verify_artifact
from quant.fileio import sha256_file

DATA = Path(__file__).parent / "data"
REPO = Path(quant.__file__).resolve().parents[1]

# argv: MODULE:FUNCTION N QUANT-ARGS...; MODULE:FUNCTION "-" runs without a kill point
DRIVER = """
import importlib, os, signal, sys
target, nth, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if target != "-":
    module_name, name = target.split(":")
    module, calls = importlib.import_module(module_name), []
    real = getattr(module, name)
    def killing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, killing)
from quant.cli import main
sys.exit(main(argv))
"""


def run_quant(cwd: Path, argv: list[str], kill_after: str = "-", nth: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, kill_after, str(nth), *argv], cwd=cwd, env=child_env(cwd),
                          capture_output=True, text=True, timeout=120)


def child_env(cwd: Path) -> dict[str, str]:
    (cwd / "system_tmp").mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(cwd / "system_tmp")}  # outputs: cwd/engines


def assert_killed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every artifact file but meta.json (which holds a creation time)."""
    return verify_artifact(folder)["files"]


# ------------------------------------------------------------------------------------------------ quant build


def conv_model(path: Path) -> Path:
    """x -> Conv -> Relu -> Conv -> y: INT8 for ORT with integer kernels in a fraction of a second."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)
             for name, shape in (("w1", (4, 2, 3, 3)), ("b1", (4,)), ("w2", (2, 4, 3, 3)), ("b2", (2,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def write_cache(model: Path, path: Path, scale: float) -> Path:
    from quant.calib import cache
    from quant.calib.ranges import RangeOptions, collect_ranges

    rng = np.random.default_rng(1)
    feeds = [{"x": (scale * rng.standard_normal((1, 2, 8, 8))).astype(np.float32)} for _ in range(4)]
    result = collect_ranges(model, feeds, "minmax", RangeOptions(progress=False))
    return cache.write_entry(path, cache.CacheKey.create(sha256_file(model), "0" * 64, "minmax", {}), result).path


@pytest.fixture(scope="module")
def build_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, dict[str, str]]]:
    """(work folder, caches a and b, the artifact files of a clean INT8 build with each)."""
    work = tmp_path_factory.mktemp("build")
    model = conv_model(work / "conv.onnx")
    caches = {"a": write_cache(model, work / "a.cache", 1.0), "b": write_cache(model, work / "b.cache", 4.0)}
    clean = {}
    for name, cache in caches.items():
        assert_ok(run_quant(work, build_argv(work, cache, f"clean-{name}")))
        clean[name] = folder_files(work / f"clean-{name}")
    assert clean["a"]["model.onnx"] != clean["b"]["model.onnx"]
    return work, caches, clean


def build_argv(work: Path, cache: Path, out: str) -> list[str]:
    return ["build", str(work / "conv.onnx"), "--precision", "int8", "--cache", str(cache), "-o", str(work / out)]


@pytest.mark.parametrize(("kill_after", "nth"), [
    ("os:replace", 1),  # model.onnx written in the temp folder, nothing else yet
    ("os:replace", 3),  # model_trt_qdq.onnx and plan.json too, no meta.json yet
    ("os:replace", 4),  # meta.json too: the whole new folder, not yet swapped in
    ("quant.fileio:_exchange", 1),  # the new folder swapped in, the old one (now at the temp name) not yet removed
])
def test_killed_build_leaves_a_whole_folder_and_the_next_build_is_clean(
        build_case: tuple[Path, dict[str, Path], dict[str, dict[str, str]]], kill_after: str, nth: int) -> None:
    work, caches, clean = build_case
    out = f"{kill_after.rsplit(':', 1)[1]}-{nth}"
    assert_ok(run_quant(work, build_argv(work, caches["a"], out)))
    killed = run_quant(work, build_argv(work, caches["b"], out), kill_after, nth)
    assert_killed(killed)
    assert folder_files(work / out) in (clean["a"], clean["b"])  # the old build or the new one, whole
    assert_ok(run_quant(work, build_argv(work, caches["a"], out)))  # the next run, with the earlier options
    assert folder_files(work / out) == clean["a"]
    assert not [p.name for p in work.iterdir() if p.name.startswith(f".{out}.")]  # no temp folder left


def test_build_killed_from_outside_while_it_writes(
        build_case: tuple[Path, dict[str, Path], dict[str, dict[str, str]]]) -> None:
    """kill -9 from outside as soon as the build's temp folder appears (wherever the build then is)."""
    work, caches, clean = build_case
    child = subprocess.Popen([sys.executable, "-c", DRIVER, "-", "1", *build_argv(work, caches["b"], "outside")],
                             cwd=work, env=child_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".outside.") for p in work.iterdir()) and child.poll() is None:
        assert time.monotonic() < deadline, "the build made no temp folder"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if (work / "outside").exists():  # the kill came after the swap
        assert folder_files(work / "outside") == clean["b"]
    assert_ok(run_quant(work, build_argv(work, caches["a"], "outside")))
    assert folder_files(work / "outside") == clean["a"]
    assert not [p.name for p in work.iterdir() if p.name.startswith(".outside.")]


# ------------------------------------------------------------------------------------------------ quant calibrate


def wave_model(path: Path) -> Path:
    nodes = [helper.make_node("Mul", ["audio", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "wave", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T"])],
                              [numpy_helper.from_array(np.array(3.0, np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def calibrate_argv(work: Path, out: str) -> list[str]:
    return ["calibrate", str(work / "wave.onnx"), "--data", str(DATA / "librivox.jsonl"), "--feature", "waveform",
            "--input-name", "audio", "--method", "entropy", "--limit", "2", "-o", str(work / out), "--no-progress"]


def ranges_temp(work: Path) -> list[str]:
    return [p.name for p in (work / "system_tmp").iterdir() if p.name.startswith("quant-ranges-")]


@pytest.mark.slow
def test_killed_calibration_leaves_no_temp_files_and_the_next_run_is_clean(tmp_path: Path) -> None:
    wave_model(tmp_path / "wave.onnx")
    assert_ok(run_quant(tmp_path, calibrate_argv(tmp_path, "clean.cache")))
    clean = (tmp_path / "clean.cache").read_text()
    # killed while the augmented model sits in the system temp dir
    assert_killed(run_quant(tmp_path, calibrate_argv(tmp_path, "x.cache"), "quant.calib.ranges:_session"))
    assert len(ranges_temp(tmp_path)) == 1
    # the next run removes it, and when killed during its range passes it has already removed its own
    assert_killed(run_quant(tmp_path, calibrate_argv(tmp_path, "x.cache"), "quant.calib.ranges:_run_pass"))
    assert not ranges_temp(tmp_path) and not (tmp_path / "x.cache").exists()
    assert_ok(run_quant(tmp_path, calibrate_argv(tmp_path, "x.cache")))
    assert (tmp_path / "x.cache").read_text() == clean
    assert not ranges_temp(tmp_path) and not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
