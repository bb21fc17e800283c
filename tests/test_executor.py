"""The executor seam: shards give the same cache bytes as the in-process run, locally and on a 2-CPU local Ray
cluster (conftest `ray_cluster`; skipped when Ray is not installed: pip install -e '.[ray]'). Evaluation in shards:
tests/test_tasks_sharded.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.calib import calibrate as cal
from quant.calib.ranges import RangeOptions
from quant.calib.readers import GenericReader, ReaderOptions, reader_for
from quant.calib.sharded import collect_ranges_sharded, feed_shards
from quant.errors import CalibrationError
from quant.executor import Executor, LocalExecutor, RayExecutor, Shard, ShardError, make_executor, split

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "librivox.jsonl"
RNG = np.random.default_rng(7)


def waveform_model(path: Path) -> Path:
    """x (B, samples) -> frames of 400 with hop 160 via a strided Conv -> Relu -> MatMul -> Tanh: a tiny waveform
    model with activations of real speech statistics."""
    kernel = numpy_helper.from_array((RNG.standard_normal((8, 1, 400)) * 0.05).astype(np.float32), "k")
    proj = numpy_helper.from_array((RNG.standard_normal((8, 4)) * 0.5).astype(np.float32), "p")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
        helper.make_node("Conv", ["x3", "k"], ["frames"], strides=[160]),
        helper.make_node("Relu", ["frames"], ["relu"]),
        helper.make_node("Transpose", ["relu"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "p"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "wave", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [kernel, proj, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def calibrate_with(tmp_path: Path, name: str, executor: Executor | None, method: str = "percentile",
                   batch_size: int = 1) -> tuple[bytes, dict[str, Any]]:
    model = waveform_model(tmp_path / "wave.onnx") if not (tmp_path / "wave.onnx").exists() else tmp_path / "wave.onnx"
    reader = ReaderOptions(feature="waveform", input_name="x", limit=3, batch_size=batch_size)
    options = cal.CalibrateOptions(ranges=RangeOptions(progress=False), reader=reader)
    entry = cal.calibrate(model, None, MANIFEST, method, tmp_path / f"{name}.cache", options, executor=executor)
    sidecar = json.loads(Path(f"{entry.path}.json").read_text())
    sidecar.pop("created")  # the only field that may differ: when it was written
    return entry.path.read_bytes(), sidecar


# ------------------------------------------------------------------------------------------------ seam, no Ray


def test_split_is_contiguous_deterministic_and_aligned() -> None:
    items = list(range(7))
    assert split(items, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert split(items, 2, unit=2) == [range(0, 4), range(4, 7)]
    assert [i for part in split(items, 5, unit=3) for i in part] == items
    assert split([], 4) == []


def double(shard: Shard[int], context: int) -> int:
    return shard.payload * context


def explode(shard: Shard[int], context: int) -> int:
    if shard.index == 1:
        raise CalibrationError("feed has NaN everywhere")
    return shard.payload


SHARDS = [Shard(i, i + 1, (f"utt{i}a", f"utt{i}b")) for i in range(3)]


def test_local_executor_keeps_order_and_names_a_failed_shard() -> None:
    assert LocalExecutor().map(double, SHARDS, 10) == [10, 20, 30]
    with pytest.raises(ShardError, match=r"shard 2 of 3 \(utt1a, utt1b\) failed: CalibrationError: feed has NaN"):
        LocalExecutor().map(explode, SHARDS, 0)


def test_make_executor_refuses_an_address_without_ray() -> None:
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(Exception, match="--ray-address needs --executor ray"):
        make_executor("local", "auto")


def test_an_address_nobody_listens_on_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init retries an unreachable HOST:PORT for minutes (measured: over 11 minutes); quant checks the port first
    and refuses in one line, without ever handing the address to ray.init."""
    import socket

    from quant.errors import QuantError

    ray = pytest.importorskip("ray")

    def no_init(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ray.init must not be reached with an address nobody answers on")

    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with socket.socket() as free:  # a port that was free a moment ago: nothing listens on it
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(QuantError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        RayExecutor(f"127.0.0.1:{port}")._ray()
    with pytest.raises(QuantError, match="expected HOST:PORT"):
        RayExecutor("head-node")._ray()


@pytest.mark.parametrize("method", ["percentile", "entropy", "minmax"])
def test_local_shards_write_the_same_cache_bytes(tmp_path: Path, method: str) -> None:
    whole = calibrate_with(tmp_path, f"whole-{method}", None, method)
    sharded = calibrate_with(tmp_path, f"sharded-{method}", LocalExecutor(), method)
    assert sharded[0] == whole[0]
    assert {**sharded[1], "cache_file": ""} == {**whole[1], "cache_file": ""}


def test_reader_shards_start_at_batch_boundaries(tmp_path: Path) -> None:
    reader = reader_for(waveform_model(tmp_path / "w.onnx"), MANIFEST,
                        ReaderOptions(feature="waveform", input_name="x", batch_size=2))
    assert isinstance(reader, GenericReader)
    shards = feed_shards(reader, 3)
    assert [len(shard.covers) for shard in shards] == [2, 2, 1]
    assert [shard.covers[0] for shard in shards] == ["librivox_0870.flac", "librivox_0890.flac", "librivox_0930.flac"]
    feeds = [feed["x"] for shard in shards for feed in shard.payload]
    assert all(np.array_equal(a["x"], b) for a, b in zip(reader, feeds)) and len(feeds) == len(list(reader))


def test_driver_shards_ship_the_feeds_in_order(tmp_path: Path) -> None:
    feeds = [{"x": RNG.standard_normal((1, 4000)).astype(np.float32)} for _ in range(6)]
    shards = feed_shards(feeds, 8, feeds_per_shard=4)
    assert [shard.covers for shard in shards] == [("feed 1", "feed 2", "feed 3", "feed 4"), ("feed 5", "feed 6")]
    model = waveform_model(tmp_path / "w.onnx")
    from quant.calib.ranges import collect_ranges

    options = RangeOptions(progress=False)
    assert collect_ranges_sharded(model, feeds, "entropy", options, LocalExecutor()) == collect_ranges(
        model, feeds, "entropy", options)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_shards_of_different_ranges_merge_exactly(tmp_path: Path, method: str) -> None:
    """Each shard's histograms cover another power-of-two range (levels 2^-3 .. 2^5): merged, they equal one pass over
    every feed in process, in either order of the feeds."""
    from quant.calib.ranges import collect_ranges

    levels = [2.0**exponent for exponent in (5, -3, 0, 2, -1, 3)]
    feeds = [{"x": level * RNG.standard_normal((1, 4000)).astype(np.float32)} for level in levels]
    model = waveform_model(tmp_path / "w.onnx")
    options = RangeOptions(progress=False)
    whole = collect_ranges(model, feeds, method, options)
    assert collect_ranges_sharded(model, feeds, method, options, LocalExecutor()) == whole
    assert collect_ranges_sharded(model, feeds[::-1], method, options, LocalExecutor(), shards=2) == whole


# ------------------------------------------------------------------------------------------------ on Ray


def test_ray_keeps_order_and_names_a_failed_shard(ray_cluster: RayExecutor) -> None:
    assert ray_cluster.map(double, SHARDS, 10) == [10, 20, 30]
    with pytest.raises(ShardError, match=r"shard 2 of 3 \(utt1a, utt1b\) failed on ray: CalibrationError: feed"):
        ray_cluster.map(explode, SHARDS, 0)


def die_once(shard: Shard[str], context: int) -> int:
    """Kills its worker process the first time (as an OOM kill would), succeeds when Ray re-runs it."""
    marker = Path(shard.payload)
    if not marker.exists():
        marker.write_text("died once")
        os._exit(1)
    return shard.index + context


def test_ray_retries_a_task_whose_worker_died(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    shards = [Shard(i, str(tmp_path / f"died-{i}"), (f"utt{i}",)) for i in range(2)]
    assert ray_cluster.map(die_once, shards, 100) == [100, 101]
    assert all((tmp_path / f"died-{i}").exists() for i in range(2))


def test_ray_cache_is_byte_identical_to_local(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    whole = calibrate_with(tmp_path, "whole", None, "entropy", batch_size=2)
    on_ray = calibrate_with(tmp_path, "ray", ray_cluster, "entropy", batch_size=2)
    assert on_ray[0] == whole[0]
    assert {**on_ray[1], "cache_file": ""} == {**whole[1], "cache_file": ""}


# ------------------------------------------------------------------------------------------------ CLI, imports


def test_local_runs_never_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, argparse, quant.cli, quant.executor, quant.calib.sharded, quant.tasks.sharded, quant.pipeline; "
            "from quant.cli.executor_options import executor_from_args; "
            "assert executor_from_args(argparse.Namespace(executor='local', ray_address=None)) is None; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_commands_take_the_executor_options() -> None:
    import argparse

    from quant.cli import calibrate as cli_calibrate, evaluate as cli_evaluate, run as cli_run, search as cli_search
    from quant.cli.executor_options import executor_changes, executor_from_args

    parser = argparse.ArgumentParser(prog="quant")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (cli_calibrate, cli_evaluate, cli_run, cli_search):
        module.register(subparsers)
    args = parser.parse_args(["calibrate", "m.onnx", "--executor", "ray", "--ray-address", "auto"])
    executor = executor_from_args(args)
    assert isinstance(executor, RayExecutor) and executor.address == "auto"
    args = parser.parse_args(["evaluate", "dpcrn", "m.onnx", "--executor", "ray"])
    assert isinstance(executor_from_args(args), RayExecutor)
    args = parser.parse_args(["search", "dpcrn", "--budget", "pesq_wb=-0.05", "--executor", "ray"])
    assert isinstance(executor_from_args(args), RayExecutor)
    assert cli_search._argv(args, "pesq_wb=-0.05")[-2:] == ["--executor", "ray"]  # search.json's command reproduces the run
    args = parser.parse_args(["run", "--quick", "--executor", "ray"])
    assert executor_changes(args) == {"executor": "ray", "ray_address": None}
    with pytest.raises(Exception, match="--ray-address needs --executor ray"):
        executor_changes(parser.parse_args(["run", "--ray-address", "auto"]))


def test_streaming_reader_shards_by_utterance_on_ray(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    from quant.calib.ranges import collect_ranges
    from quant.calib.readers import StreamingStateReader
    from test_readers import accumulator_model

    model = accumulator_model(tmp_path / "stream.onnx")
    source = reader_for(model, MANIFEST, ReaderOptions(limit=3, every=8))
    assert isinstance(source, StreamingStateReader)
    shards = feed_shards(source, 8)
    assert [shard.covers for shard in shards] == [("librivox_0870.flac",), ("librivox_0880.flac",),
                                                  ("librivox_0890.flac",)]
    options = RangeOptions(progress=False)
    whole = collect_ranges(model, source, "entropy", options)
    assert collect_ranges_sharded(model, source, "entropy", options, ray_cluster) == whole
    assert collect_ranges_sharded(model, source, "entropy", options, LocalExecutor()) == whole
