"""The IInt8EntropyCalibrator2 subclass and implicit INT8 builds, driven by the strict test double the way TensorRT
drives a calibrator; caches through quant's keyed store (a matching cache skips calibration, a mismatching one is
never used)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import trt_double
from quant.artifacts import trt_build
from quant.backends import trt as backend
from quant.errors import CacheMismatch, CalibrationError
from trt_double import graphs
from trt_double.fixtures import double, two_inputs  # noqa: F401  (pytest fixtures)


class MemoryCache:
    """An in-memory CalibrationCacheIO."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.writes: list[bytes] = []

    def read(self) -> bytes | None:
        return self.data

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def _feeds(count: int, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"alpha": rng.uniform(-1, 1, (batch, 3)).astype(np.float32) * (i + 1),
             "zeta": rng.uniform(-1, 1, (batch, 3)).astype(np.float32) * 10 * (i + 1)} for i in range(count)]


def _device_array(double: trt_double.Double, pointer: int, like: np.ndarray) -> np.ndarray:
    return np.frombuffer(double.device.read(pointer, like.nbytes), like.dtype).reshape(like.shape)


# ---- the calibrator object ---------------------------------------------------------------------------------------


def test_double_enforces_the_base_init(double: trt_double.Double) -> None:
    class Forgetful(double.trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            self.batches = []

    with pytest.raises(TypeError, match=r"IInt8EntropyCalibrator2.__init__\(\) must be called"):
        Forgetful()
    calibrator = backend.make_calibrator(_feeds(1))  # ours calls it
    assert isinstance(calibrator, double.trt.IInt8EntropyCalibrator2)


def test_pointers_follow_the_order_of_names(double: trt_double.Double) -> None:
    feeds = _feeds(2)  # dicts in order alpha, zeta
    calibrator = backend.make_calibrator(feeds)
    assert calibrator.get_batch_size() == 4
    for feed in feeds:
        pointers = calibrator.get_batch(["zeta", "alpha"])
        assert len(pointers) == 2 and all(isinstance(p, int) for p in pointers)
        np.testing.assert_array_equal(_device_array(double, pointers[0], feed["zeta"]), feed["zeta"])
        np.testing.assert_array_equal(_device_array(double, pointers[1], feed["alpha"]), feed["alpha"])
    assert calibrator.get_batch(["zeta", "alpha"]) is None
    calibrator.raise_pending()  # nothing went wrong
    calibrator.close()
    assert double.device.memory == {}


def test_missing_name_is_kept_and_raised_after_the_build(double: trt_double.Double) -> None:
    calibrator = backend.make_calibrator([{"alpha": np.zeros((1, 3), np.float32)}])
    assert calibrator.get_batch(["zeta", "alpha"]) is None  # TensorRT must not see a Python exception
    with pytest.raises(CalibrationError, match="no input 'zeta'"):
        calibrator.raise_pending()


def test_feeds_of_another_shape_are_skipped_not_fed(double: trt_double.Double) -> None:
    feeds = [{"x": np.full((4, 3), i, np.float32)} for i in range(3)]
    feeds.insert(1, {"x": np.zeros((2, 3), np.float32)})  # a short batch: TensorRT calibrates at one shape
    calibrator = backend.make_calibrator(feeds)
    fed = [_device_array(double, calibrator.get_batch(["x"])[0], feeds[0]["x"])[0, 0] for _ in range(3)]
    assert fed == [0, 1, 2] and calibrator.get_batch(["x"]) is None
    assert (calibrator.cursor.count, calibrator.cursor.skipped) == (3, 1)
    calibrator.raise_pending()


# ---- implicit INT8 builds ----------------------------------------------------------------------------------------


def test_build_calibrates_in_names_order_at_the_feed_shape(double: trt_double.Double, two_inputs: Path,
                                                           tmp_path: Path) -> None:
    double.state.reverse_calibration_names = True  # TensorRT's order need not be the graph's or the dict's
    feeds, cache = _feeds(3), MemoryCache()
    engine = backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=feeds, cache_io=cache)
    assert double.state.calibration_names[0] == ["alpha", "zeta"]
    assert len(double.state.calibration_batches) == 3
    for seen, fed in zip(double.state.calibration_batches, feeds):
        for name in fed:
            np.testing.assert_array_equal(seen[name], fed[name])  # batch 4 although the profile's OPT batch is 8
    assert double.state.calibrator_calls[0] == "read_calibration_cache"
    assert double.state.calibrator_calls[-1] == "write_calibration_cache"
    assert cache.writes == [double.state.cache_written]
    assert cache.writes[0].startswith(b"TRT-101300-EntropyCalibration2\n")
    meta = __import__("json").loads(backend.meta_path_of(engine).read_text())
    assert meta["calibration"] == {"cache_hit": False, "batches": 3, "skipped_batches": 0}


def test_cache_hit_skips_get_batch(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    first = MemoryCache()
    backend.build_engine(two_inputs, tmp_path / "a", "int8", feeds=_feeds(2), cache_io=first)
    calls_before = len(double.state.calibrator_calls)
    backend.build_engine(two_inputs, tmp_path / "b", "int8", cache_io=MemoryCache(first.writes[0]))
    assert double.state.calibrator_calls[calls_before:] == ["read_calibration_cache"]


def test_cache_from_another_tensorrt_is_ignored_by_tensorrt(double: trt_double.Double, two_inputs: Path,
                                                           tmp_path: Path) -> None:
    old = MemoryCache(b"TRT-8601-EntropyCalibration2\nalpha: 3c010204\nzeta: 3c010204\n")
    backend.build_engine(two_inputs, tmp_path / "a", "int8", feeds=_feeds(1), cache_io=old)
    assert "get_batch" in double.state.calibrator_calls and old.writes  # recalibrated and rewritten


def test_failing_feed_source_is_never_swallowed(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    def broken() -> Iterator[dict[str, np.ndarray]]:
        yield _feeds(1)[0]
        raise OSError("calibration audio vanished")

    with pytest.raises(CalibrationError, match="OSError: calibration audio vanished"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=broken())
    assert not (tmp_path / "out" / "model.engine").exists()


def test_wrong_feed_names_fail_the_build_with_the_name(double: trt_double.Double, two_inputs: Path,
                                                      tmp_path: Path) -> None:
    feeds = [{"alpha": np.zeros((2, 3), np.float32), "zeta_typo": np.zeros((2, 3), np.float32)}]
    with pytest.raises(CalibrationError, match="no input 'zeta'"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=feeds)


def test_no_feeds_and_no_cache(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="needs calibration feeds or a matching calibration cache"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8")
    with pytest.raises(CalibrationError, match="feed source is empty"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=[])


def test_trt_feed_source_is_accepted(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    class Batches:  # the shape of quant.calib.readers.TrtFeedSource
        input_order = ("zeta", "alpha")
        batch_size = 4

        def batches(self) -> Iterator[list[np.ndarray]]:
            for feed in _feeds(2):
                yield [feed["zeta"], feed["alpha"]]

    backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=Batches())
    np.testing.assert_array_equal(double.state.calibration_batches[1]["zeta"], _feeds(2)[1]["zeta"])


def test_tensorrt_8_calibrates_too(monkeypatch: pytest.MonkeyPatch, two_inputs: Path, tmp_path: Path) -> None:
    fake = trt_double.install(monkeypatch, "8.6.1")
    cache = MemoryCache()
    backend.build_engine(two_inputs, tmp_path / "out", "int8", feeds=_feeds(2), cache_io=cache)
    assert cache.writes[0].startswith(b"TRT-8601-EntropyCalibration2")
    assert fake.state.builds[-1]["flags"] == ["FP16", "INT8"]


# ---- quant's cache store -----------------------------------------------------------------------------------------


def _key(onnx_path: Path, data: str) -> object:
    from quant.calib.cache import CacheKey
    from quant.fileio import sha256_file

    return CacheKey.create(sha256_file(onnx_path), data, trt_build.TRT_CALIBRATION_METHOD, {"batch_size": 4},
                           versions={"quant": "test"})


def _store(onnx_path: Path, key: object, store: Path) -> object:
    """The cache IO quant's TensorRT builds use for a key (the backend itself knows no store)."""
    return trt_build.cache_io_for(onnx_path, key, trt_version=str(backend.require_tensorrt().__version__),
                                  store_dir=store)


def test_store_round_trip_and_mismatch(double: trt_double.Double, two_inputs: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("quant.calib.cache")
    store = tmp_path / "engines" / "cache"
    key = _key(two_inputs, "a" * 64)
    backend.build_engine(two_inputs, tmp_path / "a", "int8", feeds=_feeds(2), cache_io=_store(two_inputs, key, store))
    stored = list((tmp_path / "engines" / "cache").glob("*.cache"))
    assert len(stored) == 1 and stored[0].read_bytes() == double.state.cache_written
    assert stored[0].with_name(stored[0].name + ".json").is_file()

    calls = len(double.state.calibrator_calls)
    engine = backend.build_engine(two_inputs, tmp_path / "b", "int8", cache_io=_store(two_inputs, key, store),
                                  meta={"cache_key": key.to_dict()})  # hit: no feeds needed
    assert double.state.calibrator_calls[calls:] == ["read_calibration_cache"]
    assert __import__("json").loads(backend.meta_path_of(engine).read_text())["cache_key"]["data_sha256"] == "a" * 64

    other = _key(two_inputs, "b" * 64)  # another calibration set: the stored cache must not be used
    with pytest.raises(CalibrationError, match="needs calibration feeds"):
        backend.build_engine(two_inputs, tmp_path / "c", "int8", cache_io=_store(two_inputs, other, store))
    calls = len(double.state.calibrator_calls)
    backend.build_engine(two_inputs, tmp_path / "c", "int8", feeds=_feeds(1), cache_io=_store(two_inputs, other, store))
    assert "get_batch" in double.state.calibrator_calls[calls:]
    assert len(list((tmp_path / "engines" / "cache").glob("*.cache"))) == 2


def test_store_ignores_a_cache_made_by_another_tensorrt(double: trt_double.Double, two_inputs: Path,
                                                       tmp_path: Path) -> None:
    pytest.importorskip("quant.calib.cache")
    key = _key(two_inputs, "c" * 64)
    trt_build.StoreCacheIO(tmp_path, key, "two", "101300").write(b"TRT-101300-EntropyCalibration2\nalpha: 3c010204\n")
    assert trt_build.StoreCacheIO(tmp_path, key, "two", "101300").read() is not None
    assert trt_build.StoreCacheIO(tmp_path, key, "two", "100001").read() is None


def test_named_cache_file_must_belong_to_the_model(double: trt_double.Double, two_inputs: Path, tmp_path: Path) -> None:
    pytest.importorskip("quant.calib.cache")
    from quant.calib.cache import CacheKey

    key = CacheKey.create("0" * 64, "d" * 64, trt_build.TRT_CALIBRATION_METHOD, {}, versions={"quant": "test"})
    trt_build.StoreCacheIO(tmp_path, key, "other").write(b"TRT-101300-EntropyCalibration2\nalpha: 3c010204\n")
    cache_file = next(tmp_path.glob("*.cache"))
    with pytest.raises(CacheMismatch, match="re-run quant calibrate"):
        backend.build_engine(two_inputs, tmp_path / "out", "int8",
                             cache_io=trt_build.cache_io_for(two_inputs, calibration_cache=cache_file))
