"""The executor seam: shards give the same cache bytes and the same metrics as the in-process run, locally and on a
2-CPU local Ray cluster (skipped when Ray is not installed: pip install -e '.[ray]')."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

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


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayExecutor]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    # workers import this module's shard functions by name: give them the tests folder too
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()


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


# ------------------------------------------------------------------------------------------------ evaluation


SE_TEST = Path(__file__).parent.parent / "calib_data" / "se_test" / "manifest.jsonl"


def soft_mask_model(path: Path) -> Path:
    """enh = mix * sigmoid(3 * mix): a fixed-T offline SE toy whose scores differ per utterance."""
    from quant.features import FREQ_BINS, SEGMENT_FRAMES

    shape: list[str | int] = ["B", FREQ_BINS, SEGMENT_FRAMES, 2]
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["mix", "three"], ["scaled"]), helper.make_node("Sigmoid", ["scaled"], ["mask"]),
         helper.make_node("Mul", ["mix", "mask"], ["enh"])], "soft_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)], [three])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def local_se(model: Path, limit: int) -> Any:
    from quant.backends import open_runner
    from quant.eval import se

    runner = open_runner(model, "ort", 1)
    return se.evaluate_se(lambda audio: se.enhance_offline(runner, audio), se.load_pairs(str(SE_TEST), limit))


def test_local_shards_give_the_same_se_metrics(tmp_path: Path) -> None:
    from quant.eval.sharded import evaluate_se_sharded

    model = soft_mask_model(tmp_path / "se.onnx")
    sharded = evaluate_se_sharded(model, False, SE_TEST, 3, LocalExecutor(), shards=2)
    assert sharded == local_se(model, 3)
    assert sharded.utterances == 3 and len(sharded.per_utterance_columns()["ids"]) == 3


def test_ray_gives_the_same_se_metrics(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    from quant.eval.sharded import evaluate_se_sharded

    model = soft_mask_model(tmp_path / "se.onnx")
    on_ray = evaluate_se_sharded(model, False, SE_TEST, 3, ray_cluster, shards=3)
    assert on_ray == local_se(model, 3)
    assert on_ray.per_utterance_columns() == local_se(model, 3).per_utterance_columns()


def test_ray_names_the_shard_whose_utterance_fails(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    from quant.eval.sharded import evaluate_se_sharded

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ShardError, match=r"shard 1 of 2 \(utterance 1, utterance 2\) failed on ray"):
        evaluate_se_sharded(broken, False, SE_TEST, 3, ray_cluster, shards=2)


# ------------------------------------------------------------------------------------------------ CLI, imports


def test_local_runs_never_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, argparse, quant.cli, quant.executor, quant.calib.sharded, quant.eval.sharded, quant.pipeline; "
            "from quant.cli.executor_options import executor_from_args; "
            "assert executor_from_args(argparse.Namespace(executor='local', ray_address=None)) is None; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_commands_take_the_executor_options() -> None:
    import argparse

    from quant.cli import calibrate as cli_calibrate, evaluate as cli_evaluate, run as cli_run
    from quant.cli.executor_options import executor_changes, executor_from_args

    parser = argparse.ArgumentParser(prog="quant")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (cli_calibrate, cli_evaluate, cli_run):
        module.register(subparsers)
    args = parser.parse_args(["calibrate", "m.onnx", "--executor", "ray", "--ray-address", "auto"])
    executor = executor_from_args(args)
    assert isinstance(executor, RayExecutor) and executor.address == "auto"
    args = parser.parse_args(["evaluate", "dpcrn", "m.onnx"])
    assert not hasattr(args, "executor")  # evaluation from a spec runs in process (not sharded yet)
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
