"""calibrate(): keyed reuse, refusal of mismatching caches, the store; the calibrate/cache CLI handlers."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.calib import cache as cc
from quant.calib import histogram as hist
from quant.calib import calibrate as cal
from quant.calib.ranges import RangeOptions
from quant.cli import cache as cli_cache
from quant.cli import calibrate as cli_calibrate
from quant.cli import main
from quant.errors import CacheMismatch, CalibrationError, ManifestError

OPTIONS = cal.CalibrateOptions(ranges=RangeOptions(progress=False), trt_version="8601")


def tiny_model(path: Path, weight: float = 0.5) -> Path:
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
                              [numpy_helper.from_array(np.array(weight, np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def feeds(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(scale=2, size=(2, 4)).astype(np.float32)} for _ in range(4)]


def test_calibrate_writes_cache_and_reuses_on_same_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "m.cache"
    entry = cal.calibrate(model, None, None, "minmax", out, OPTIONS, feeds=feeds())
    x = np.concatenate([feed["x"] for feed in feeds()])
    assert entry.ranges["x"].amax == float(np.abs(x).max())
    assert set(entry.cache.scale_bits) == {"x", "h", "y"}
    assert out.read_bytes().startswith(b"TRT-8601-EntropyCalibration2\n")
    assert entry.key.data_sha256 == cal.feeds_sha256(feeds())
    monkeypatch.setattr(cal, "collect_ranges", lambda *args: pytest.fail("a matching cache must be reused"))
    again = cal.calibrate(model, None, None, "minmax", out, OPTIONS, feeds=feeds())
    assert again.key == entry.key and again.cache == entry.cache


def test_mismatching_cache_is_refused_unless_forced(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "m.cache"
    cal.calibrate(model, None, None, "minmax", out, OPTIONS, feeds=feeds())
    with pytest.raises(CacheMismatch, match="calibration-set sha256 differs.*--force"):
        cal.calibrate(model, None, None, "minmax", out, OPTIONS, feeds=feeds(seed=1))
    with pytest.raises(CacheMismatch, match="method differs: cache minmax, requested entropy"):
        cal.calibrate(model, None, None, "entropy", out, OPTIONS, feeds=feeds())
    other_model = tiny_model(tmp_path / "m2.onnx", weight=0.25)
    with pytest.raises(CacheMismatch, match="model sha256 differs"):
        cal.calibrate(other_model, None, None, "minmax", out, OPTIONS, feeds=feeds())
    forced = cal.calibrate(model, None, None, "entropy", out, cal.CalibrateOptions(
        ranges=RangeOptions(progress=False), force=True), feeds=feeds())
    assert cc.read_entry(out).key == forced.key and forced.key.method == "entropy"


def test_default_output_goes_to_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    options = replace(OPTIONS, out_root=tmp_path / "engines")
    entry = cal.calibrate(model, None, None, "percentile", None, options, feeds=feeds())
    assert entry.path.parent == tmp_path / "engines" / "cache" and entry.path.name.startswith("m-percentile-")
    assert json.loads(entry.key.params) == {"num_bins": 2048, "percentile": 99.99, "collector": hist.COLLECTOR}
    assert cc.lookup(cal.default_store(tmp_path / "engines"), entry.key).hit


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_shuffled_batches_write_the_same_cache_bytes(tmp_path: Path, method: str) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    batches = [{"x": scale * feed["x"]} for scale, feed in zip((1.0, 8.0, 0.1, 3.0), feeds())]  # ranges that grow
    in_order = cal.calibrate(model, None, None, method, tmp_path / "a.cache", OPTIONS, feeds=batches)
    shuffled = cal.calibrate(model, None, None, method, tmp_path / "b.cache", OPTIONS, feeds=batches[::-1][1:] +
                             batches[-1:])
    assert in_order.key.data_sha256 != shuffled.key.data_sha256  # the same feeds in another order
    assert in_order.path.read_bytes() == shuffled.path.read_bytes()


def two_pass_key(key: cc.CacheKey) -> cc.CacheKey:
    """The key the former two-pass collector wrote for the same calibration: no collector among the parameters."""
    params = {name: value for name, value in json.loads(key.params).items() if name != "collector"}
    return cc.CacheKey.create(key.model_sha256, key.data_sha256, key.method, params, json.loads(key.versions))


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_a_cache_of_the_two_pass_collector_is_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           method: str) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    store = tmp_path / "engines"
    fresh = cal.calibrate(model, None, None, method, None, replace(OPTIONS, out_root=store), feeds=feeds())
    old = cc.write_entry(tmp_path / "old.cache", two_pass_key(fresh.key), cal.collect_ranges(model, feeds(), method,
                                                                                             OPTIONS.ranges))
    with pytest.raises(CacheMismatch, match="method parameters differ.*collector"):
        cal.calibrate(model, None, None, method, old.path, OPTIONS, feeds=feeds())
    assert not cc.lookup(cal.default_store(store), old.key).hit  # the store holds only today's key
    monkeypatch.setattr(cal, "read_entry", lambda path: old)  # verify against a manifest-less feed list:
    monkeypatch.setattr(cal, "required_manifest", lambda *args: tmp_path / "none.jsonl")
    monkeypatch.setattr(cal, "reader", lambda *args: feeds())
    reasons = cal.verify(old.path, model)
    assert len(reasons) == 1 and "method parameters differ" in reasons[0] and "re-run quant calibrate" in reasons[0]


def test_batches_split_one_item_at_a_time_give_the_same_ranges(tmp_path: Path) -> None:
    """calibrate_spec splits batch-major offline feeds (max_batch 1) to bound memory: never a change of ranges."""
    model = tiny_model(tmp_path / "m.onnx")
    whole = cal.calibrate(model, None, None, "minmax", tmp_path / "a.cache", OPTIONS, feeds=feeds())
    one = replace(OPTIONS, ranges=replace(OPTIONS.ranges, max_batch=1))
    split = cal.calibrate(model, None, None, "minmax", tmp_path / "b.cache", one, feeds=feeds())
    assert (whole.info["batches"], split.info["batches"]) == (4, 8)  # 4 feeds of batch 2
    assert split.cache == whole.cache


def test_missing_model_and_missing_manifest_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        cal.calibrate(tmp_path / "none.onnx", None, None, "minmax", None, OPTIONS, feeds=feeds())
    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(CalibrationError, match="manifest .* not found"):
        cal.calibrate(model, None, tmp_path / "none.jsonl", "minmax", None, OPTIONS, feeds=feeds())


# ---- CLI handlers (parsers built from our register functions only) ----------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quant")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_calibrate.register(subparsers)
    cli_cache.register(subparsers)
    return parser.parse_args(argv)


def test_cache_cli_list_show_diff_export_rm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # `quant cache` reads the default store, ./engines/cache
    model = tiny_model(tmp_path / "m.onnx")
    first = cal.calibrate(model, None, None, "minmax", None, OPTIONS, feeds=feeds())
    second = cal.calibrate(model, None, None, "entropy", None, OPTIONS, feeds=feeds())

    def run(argv: list[str]) -> str:
        args = parse(argv)
        assert args.handler(args) == 0
        return capsys.readouterr().out

    listing = run(["cache", "list"])
    assert first.path.name in listing and second.path.name in listing and first.key.model_sha256[:12] in listing
    shown = run(["cache", "show", str(first.path), "--tensors"])
    assert "TRT-8601-EntropyCalibration2, 3 tensors" in shown and '"method": "minmax"' in shown
    diffed = run(["cache", "diff", str(first.path), str(second.path)])
    assert "3 tensors" in diffed and "ratio over 3 shared non-zero tensors" in diffed
    run(["cache", "export", str(first.path), "--format", "qdq", "--encoding", "uint8", "-o", str(tmp_path / "q.json")])
    qdq = json.loads((tmp_path / "q.json").read_text())
    assert qdq["encoding"] == "uint8" and set(qdq["tensors"]) == {"x", "h", "y"}
    run(["cache", "export", str(first.path), "--format", "ort-json", "-o", str(tmp_path / "ort.json")])
    assert json.loads((tmp_path / "ort.json").read_text())["CLS"] == "TensorsData"
    run(["cache", "rm", str(first.path)])
    assert not first.path.exists()
    assert first.path.name not in run(["cache", "list"])


def test_cache_cli_show_accepts_tensorrt_cache_without_sidecar(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trt.cache"
    path.write_bytes(b"TRT-8401-EntropyCalibration2\ninput: 3caa54fc\nmask: 0\n")
    args = parse(["cache", "show", str(path)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "2 tensors" in out and "1 zero" in out and "no sidecar" in out


def test_calibrate_cli_parses_options() -> None:
    args = parse(["calibrate", "m.onnx", "--method", "percentile", "--percentile", "99.9", "-o", "c.cache",
                  "--force", "--max-batch", "2"])
    assert (args.method, args.percentile, args.output, args.force, args.max_batch) == (
        "percentile", 99.9, Path("c.cache"), True, 2)
    assert cli_calibrate.resolve_model("some/where.onnx") == (None, Path("some/where.onnx"))
    assert cli_calibrate.reader_options(args) is None
    readers = pytest.importorskip("quant.calib.readers")
    limited = cli_calibrate.reader_options(parse(["calibrate", "m.onnx", "--limit", "3", "--every", "2"]))
    assert limited == readers.ReaderOptions(limit=3, every=2)


def test_reader_path_keys_reader_settings_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readers = pytest.importorskip("quant.calib.readers")
    calls: list[tuple] = []

    def fake_reader_for(onnx_path: Path, manifest: Path, options: object = None) -> list:
        calls.append((Path(onnx_path), Path(manifest)))
        return feeds(seed=0 if "a" in Path(manifest).stem else 1)

    monkeypatch.setattr(readers, "reader_for", fake_reader_for)
    model = tiny_model(tmp_path / "m.onnx")
    lines = (Path(__file__).parent / "data" / "librivox.jsonl").read_text().splitlines()
    data_dir = str((Path(__file__).parent / "data").resolve())
    absolute = [json.dumps(dict(json.loads(line), path=f"{data_dir}/{json.loads(line)['path']}")) for line in lines]
    manifest_a, manifest_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    manifest_a.write_text(absolute[0] + "\n")
    manifest_b.write_text(absolute[0] + "\n" + absolute[1] + "\n")
    with pytest.raises(ManifestError, match=r"a\.jsonl:1: path .* leads outside"):
        cal.calibrate(model, "tiny", manifest_a, "minmax", tmp_path / "m.cache", OPTIONS)
    outside = replace(OPTIONS, reader=readers.ReaderOptions(allow_outside=True))  # absolute paths, allowed
    entry = cal.calibrate(model, "tiny", manifest_a, "minmax", tmp_path / "m.cache", outside)
    assert calls[-1] == (model, manifest_a)
    assert json.loads(entry.key.params)["reader"]["batch_size"] == readers.ReaderOptions().batch_size
    assert cal.verify(entry.path, model, "tiny", manifest_a) == []
    reasons = cal.verify(entry.path, model, "tiny", manifest_b)
    assert len(reasons) == 1 and reasons[0].startswith("calibration-set sha256 differs")
    args = parse(["cache", "verify", str(entry.path), str(model), "--data", str(manifest_b)])
    assert args.handler(args) == 1


def test_method_defaults_to_the_spec_default_when_not_given(tmp_path: Path) -> None:
    from quant.spec import DefaultsSpec

    model = tiny_model(tmp_path / "m.onnx")
    entry = cal.calibrate(model, None, None, None, tmp_path / "other.cache", OPTIONS, feeds=feeds())
    assert entry.key.method == cal.default_method() == DefaultsSpec().calibration_method
    assert cal.default_method() in cal.METHODS
    assert parse(["calibrate", "m.onnx"]).method is None  # the CLI leaves the choice to the spec
    from quant.cli import build as cli_build

    parser = argparse.ArgumentParser()
    cli_build.register(parser.add_subparsers())
    assert parser.parse_args(["build", "dpcrn", "--precision", "int8"]).method is None


def test_calibrate_into_an_unwritable_store_fails_before_calibrating(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    model = tiny_model(tmp_path / "m.onnx")
    monkeypatch.setattr(cal, "collect_ranges", lambda *args: pytest.fail("must fail before calibrating"))

    def read_only(*args: object) -> None:
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fcntl, "flock", read_only)  # the first write step, as a read-only store refuses it
    with pytest.raises(CalibrationError, match="cannot write calibration cache .*Read-only file system"):
        cal.calibrate(model, None, None, "minmax", tmp_path / "ro" / "m.cache", OPTIONS, feeds=feeds())


def test_key_covers_what_shapes_the_feeds(tmp_path: Path) -> None:
    readers = pytest.importorskip("quant.calib.readers")
    data = Path(__file__).parent / "data"
    model = tiny_model(tmp_path / "m.onnx")
    manifest = data / "librivox.jsonl"

    def key(source: object, options: object = None) -> cc.CacheKey:
        return cal.make_key(model, "minmax", RangeOptions(), manifest, source, cal.reader_params(options))

    def audio(limit: int | None = None) -> object:
        return readers.AudioSet.from_manifest(manifest, limit)

    offline, encoder = key(readers.OfflineSegmentReader(audio())), key(readers.FbankBatchReader(audio()))
    assert offline != encoder  # same model, data and options, other reader: other feeds
    assert offline == key(readers.OfflineSegmentReader(audio()))
    assert key(readers.OfflineSegmentReader(audio(2))) != key(readers.OfflineSegmentReader(audio(3)))
    assert json.loads(offline.params)["feeds"]["reader"] == "offline-segments"


def test_verify_reports_changed_feed_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readers = pytest.importorskip("quant.calib.readers")
    data = tmp_path / "set"
    data.mkdir()
    for line in (Path(__file__).parent / "data" / "librivox.jsonl").read_text().splitlines()[:2]:
        name = json.loads(line)["path"]
        (data / name).write_bytes((Path(__file__).parent / "data" / name).read_bytes())
        with open(data / "manifest.jsonl", "a") as handle:
            handle.write(line + "\n")
    model = tiny_model(tmp_path / "m.onnx")
    source = readers.GenericReader(readers.AudioSet.from_manifest(data / "manifest.jsonl"), "x", "waveform")
    key = cal.make_key(model, "minmax", RangeOptions(), data / "manifest.jsonl", source, cal.reader_params(None))
    monkeypatch.setattr(cal, "reader", lambda *args: readers.GenericReader(source.audio, "x", "waveform", 2))
    entry = cc.CacheEntry(tmp_path / "c.cache", key, cc.CalibrationCache("8601", "x", {}), {}, "now")
    monkeypatch.setattr(cal, "read_entry", lambda path: entry)
    reasons = cal.verify(tmp_path / "c.cache", model, None, data / "manifest.jsonl")
    assert len(reasons) == 1 and reasons[0].startswith("method parameters differ")


def test_spec_range_options_split_offline_batch_major_feeds_only() -> None:
    from quant import load_spec
    from quant.tasks.calibration import spec_range_options

    options = RangeOptions(progress=False)
    assert spec_range_options(load_spec("dpcrn"), options).max_batch == 1  # 9 s segments, batch-major
    assert spec_range_options(load_spec("dpcrn-stream"), options) == options  # one frame a feed: kept as fed
    assert spec_range_options(load_spec("dpcrn"), replace(options, max_batch=3)).max_batch == 3  # asked: kept


def test_calibrate_cli_draws_no_progress_bar_into_a_redirected_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """stderr to a file or pipe (here pytest's capture, not a terminal): the log lines, no bar text (tqdm's
    `0batch [00:00, ?batch/s]` and carriage returns), without --no-progress."""
    from test_tasks_check import _streaming_spec

    monkeypatch.chdir(tmp_path)
    spec = _streaming_spec(tmp_path)
    assert main(["calibrate", str(spec), "--limit", "1", "-o", str(tmp_path / "c.cache")]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "c.cache").is_file()
    assert "batch/s" not in err and "\r" not in err, err
