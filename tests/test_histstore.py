"""Calibration histograms beside the cache: written by calibrate, bound to the cache bytes, removed by cache rm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quant.calib import cache as cc
from quant.calib import calibrate as cal
from quant.calib import histstore
from quant.calib.histogram import AbsHistogram
from quant.calib.ranges import collect_ranges
from tests.test_calibrate import OPTIONS, feeds, parse, tiny_model


def test_calibrate_stores_the_histograms_of_its_ranges(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    entry = cal.calibrate(model, None, None, "percentile", tmp_path / "m.cache", OPTIONS, feeds=feeds())
    assert histstore.histogram_path(entry.path) == tmp_path / "m.cache.hist.npz"
    stored = histstore.read_histograms(entry.path, entry.cache_sha256)
    expected = collect_ranges(model, feeds(), "percentile", OPTIONS.ranges).histograms
    assert stored.note == "" and set(stored.tensors) == set(expected) == {"x", "h", "y"}
    for name, item in expected.items():
        assert stored.tensors[name].amax == item.amax
        np.testing.assert_array_equal(stored.tensors[name].counts, item.counts)
    total = sum(f["x"].size for f in feeds())
    assert int(stored.tensors["x"].counts.sum()) == total


def test_minmax_stores_none_and_the_reader_says_so(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    entry = cal.calibrate(model, None, None, "minmax", tmp_path / "m.cache", OPTIONS, feeds=feeds())
    assert not histstore.histogram_path(entry.path).exists()
    found = histstore.read_histograms(entry.path, entry.cache_sha256)
    assert not found.tensors and "no histograms stored for m.cache" in found.note


def test_a_file_of_another_cache_is_ignored_with_a_note(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "m.cache"
    cal.calibrate(model, None, None, "percentile", out, OPTIONS, feeds=feeds())
    stale = histstore.histogram_path(out).read_bytes()
    forced = cal.calibrate(model, None, None, "percentile", out, cal.CalibrateOptions(
        ranges=OPTIONS.ranges, trt_version="8601", force=True), feeds=feeds(seed=1))
    assert histstore.read_histograms(out, forced.cache_sha256).tensors  # the new calibration wrote its own
    histstore.histogram_path(out).write_bytes(stale)  # e.g. a replacement that wrote no histograms
    found = histstore.read_histograms(out, forced.cache_sha256)
    assert not found.tensors and "belongs to another cache" in found.note
    assert cc.read_entry(out).cache_sha256 == forced.cache_sha256  # the pair itself is untouched


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04broken"])
def test_an_unreadable_file_is_ignored_with_a_note(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.cache"
    histstore.histogram_path(path).write_bytes(content)
    found = histstore.read_histograms(path, "0" * 64)
    assert not found.tensors and "not readable" in found.note


def test_cache_rm_removes_the_histograms_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = tiny_model(tmp_path / "m.onnx")
    entry = cal.calibrate(model, None, None, "entropy", None, OPTIONS, feeds=feeds())
    assert histstore.histogram_path(entry.path).is_file()
    args = parse(["cache", "rm", str(entry.path)])
    assert args.handler(args) == 0
    assert sorted(p.name for p in entry.path.parent.iterdir() if not p.name.endswith(".lock")) == []


def test_share_above_counts_the_split_bin_pro_rata() -> None:
    histogram = AbsHistogram(4.0, num_bins=4)
    histogram.add(np.array([0.5, 1.5, 2.5, 3.5], np.float32))
    stored = histstore.StoredHistogram(histogram.amax, histogram.counts)
    assert stored.share_above(2.0) == pytest.approx(0.5)
    assert stored.share_above(2.5) == pytest.approx(0.375)
    assert stored.share_above(4.0) == 0.0 and stored.share_above(0.0) == pytest.approx(1.0)


def test_sharded_collection_gives_the_same_histograms(tmp_path: Path) -> None:
    from quant.calib.sharded import collect_ranges_sharded
    from quant.executor import LocalExecutor

    model = tiny_model(tmp_path / "m.onnx")
    whole = collect_ranges(model, feeds(), "entropy", OPTIONS.ranges).histograms
    sharded = collect_ranges_sharded(model, feeds(), "entropy", OPTIONS.ranges, LocalExecutor()).histograms
    assert set(whole) == set(sharded) == {"x", "h", "y"}
    for name, item in whole.items():
        assert sharded[name].amax == item.amax
        np.testing.assert_array_equal(sharded[name].counts, item.counts)
