"""TensorRT cache format, keyed sidecars, the store, concurrency and exports."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from quant.calib import cache as cc
from quant.calib.ranges import RangeResult, TensorRange
from quant.errors import CacheMismatch, CalibrationError

TRT_WRITTEN = (
    b"TRT-8401-EntropyCalibration2\n"
    b"input: 3caa54fc\n"
    b"(Unnamed Layer* 3) [Convolution]_output: 3c009976\n"
    b"mask: 0\n"
    b"enh: 3b86e2c1\n"
)


def result_of(amax: dict[str, float], method: str = "entropy") -> RangeResult:
    tensors = {name: TensorRange(name, value, -value / 2, value, 10, 1 if name == "mask" else 0)
               for name, value in amax.items()}
    return RangeResult(method, {"num_bins": 2048}, tensors, (), 3)


def key_of(model: str = "a" * 64, data: str = "b" * 64, method: str = "entropy", num_bins: int = 2048,
           numpy_version: str = "2.0") -> cc.CacheKey:
    versions = {"quant": "0.1.0", "onnxruntime": "1.31.0", "onnx": "1.23.0", "numpy": numpy_version}
    return cc.CacheKey.create(model, data, method, {"num_bins": num_bins}, versions)


def test_reads_tensorrt_written_cache() -> None:
    cache = cc.parse_cache(TRT_WRITTEN)
    assert (cache.version, cache.algorithm) == ("8401", "EntropyCalibration2")
    scales = cache.scales()
    assert scales["input"] == pytest.approx(0.020792, rel=1e-4)
    assert scales["(Unnamed Layer* 3) [Convolution]_output"] == pytest.approx(0.0078491, rel=1e-4)
    assert scales["mask"] == 0.0
    assert list(scales) == ["input", "(Unnamed Layer* 3) [Convolution]_output", "mask", "enh"]


def test_round_trip_is_byte_for_byte() -> None:
    assert cc.format_cache(cc.parse_cache(TRT_WRITTEN)) == TRT_WRITTEN
    written = cc.format_cache(cc.cache_from_amax({"x": 2.6406, "zero": 0.0, "tiny": 1e-30}, "101401"))
    assert cc.format_cache(cc.parse_cache(written)) == written


def test_write_format_matches_tensorrt_conventions() -> None:
    amax = cc.bits_to_float(0x3CAA54FC) * 127  # scale 0.020792 (REFERENCE example)
    text = cc.format_cache(cc.cache_from_amax({"input": amax, "mask": 0.0}, "8401")).decode()
    assert text == "TRT-8401-EntropyCalibration2\ninput: 3caa54fc\nmask: 0\n"
    assert cc.float_to_bits(cc.scale_of(amax)) == 0x3CAA54FC


def test_small_scales_have_no_leading_zeros() -> None:
    cache = cc.cache_from_amax({"t": 127 * 1e-39}, "8401")  # a subnormal scale: bits below 0x01000000
    line = cc.format_cache(cache).decode().splitlines()[1]
    assert line == f"t: {cache.scale_bits['t']:x}" and not line.split(": ")[1].startswith("0")
    assert cc.parse_cache(cc.format_cache(cache)).scale_bits == cache.scale_bits


@pytest.mark.parametrize("bad", [b"", b"not a cache\n", b"TRT-8401-EntropyCalibration2\nx 3caa54fc\n",
                                 b"TRT-8401-EntropyCalibration2\nx: 0x3caa\n", b"TRT-1-E\nx: 123456789\n"])
def test_malformed_caches_are_rejected(bad: bytes) -> None:
    with pytest.raises(CalibrationError):
        cc.parse_cache(bad, "bad.cache")


def test_trt_version_digits() -> None:
    assert cc.trt_version_digits("8.4.1") == "8401"
    assert cc.trt_version_digits("10.14.1.48") == "101401"
    assert cc.trt_version_digits("8.6.1.post1") == "8601"


def test_entry_round_trip_keeps_full_ranges(tmp_path: Path) -> None:
    path = tmp_path / "m.cache"
    key = key_of()
    written = cc.write_entry(path, key, result_of({"x": 3.0, "mask": 0.0}), info={"model": "m.onnx"}, version="8401")
    entry = cc.read_entry(path)
    assert entry.key == key and entry.cache == written.cache
    assert entry.ranges["x"] == TensorRange("x", 3.0, -1.5, 3.0, 10, 0)
    assert entry.ranges["mask"].nonfinite == 1
    assert entry.info["model"] == "m.onnx"
    side = json.loads(cc.sidecar_path(path).read_text())
    assert side["key"]["method"] == "entropy" and side["key"]["versions"]["onnxruntime"] == "1.31.0"
    assert path.read_bytes().startswith(b"TRT-8401-EntropyCalibration2\nx: ")


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (key_of(model="c" * 64), "model sha256 differs: cache aaaaaaaaaaaa, model cccccccccccc"),
        (key_of(data="d" * 64), "calibration-set sha256 differs"),
        (key_of(method="minmax"), "method differs: cache entropy, requested minmax"),
        (key_of(num_bins=1024), "method parameters differ"),
        (key_of(numpy_version="2.1"), "tool versions differ (numpy 2.0 -> 2.1)"),
    ],
)
def test_partial_key_match_is_a_miss_naming_the_field(tmp_path: Path, other: cc.CacheKey, message: str) -> None:
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of({"x": 1.0}))
    with pytest.raises(CacheMismatch) as error:
        cc.check_entry(path, other)
    assert message in str(error.value)
    assert str(error.value).count("differ") == 1  # only the field that differs is named
    assert cc.check_entry(path, key_of()).key == key_of()


def test_store_lookup_hit_and_explained_miss(tmp_path: Path) -> None:
    assert not cc.lookup(tmp_path, key_of()).hit
    key = key_of()
    path = cc.store_path(tmp_path, key, "dpcrn")
    cc.write_entry(path, key, result_of({"x": 1.0}))
    hit = cc.lookup(tmp_path, key)
    assert hit.hit and hit.entry is not None and hit.entry.path == path
    miss = cc.lookup(tmp_path, key_of(model="e" * 64))
    assert not miss.hit and "model sha256 differs" in miss.reason and path.name in miss.reason
    assert [entry.path for entry in cc.list_entries(tmp_path)] == [path]
    cc.remove_entry(path)
    assert not path.exists() and not cc.sidecar_path(path).exists()
    with pytest.raises(CalibrationError, match="not found"):
        cc.remove_entry(path)


def test_cache_without_or_with_foreign_sidecar_is_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "m.cache"
    path.write_bytes(TRT_WRITTEN)
    with pytest.raises(CacheMismatch, match="no sidecar"):
        cc.read_entry(path)
    other = tmp_path / "o.cache"
    cc.write_entry(other, key_of(), result_of({"x": 1.0}))
    cc.sidecar_path(path).write_bytes(cc.sidecar_path(other).read_bytes())
    with pytest.raises(CacheMismatch, match="does not match its sidecar"):
        cc.read_entry(path)


def _writer(path: str, seed: int, rounds: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        amax = {f"t{i}": float(rng.uniform(0.1, 10)) for i in range(200)}
        cc.write_entry(path, key_of(), result_of(amax))


def test_two_concurrent_writers_never_leave_a_torn_pair(tmp_path: Path) -> None:
    path = tmp_path / "store" / "same-key.cache"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(str(path), seed, 15)) for seed in (1, 2)]
    for process in writers:
        process.start()
    reads = 0
    while any(process.is_alive() for process in writers):
        if cc.sidecar_path(path).exists():
            entry = cc.read_entry(path)  # raises CacheMismatch on a torn pair
            assert entry.cache.amax().keys() == entry.ranges.keys()
            reads += 1
    for process in writers:
        process.join()
        assert process.exitcode == 0
    entry = cc.read_entry(path)
    for name, item in entry.ranges.items():
        assert entry.cache.scale_bits[name] == cc.float_to_bits(cc.scale_of(item.amax))
    assert not [name for name in path.parent.iterdir() if name.suffix == ".tmp"]


def test_export_ort_json_loads_in_onnxruntime(tmp_path: Path) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, load_tensors_data

    path = tmp_path / "m.cache"
    entry = cc.write_entry(path, key_of(), result_of({"x": 3.0, "mask": 0.0}))
    target = tmp_path / "ort.json"
    target.write_text(json.dumps(cc.to_ort_json(entry)))
    loaded = load_tensors_data(target)
    assert loaded.calibration_method == CalibrationMethod.MinMax
    assert tuple(map(float, loaded["x"].range_value)) == (-3.0, 3.0)
    asymmetric = cc.to_ort_json(entry, symmetric=False)["data"]["x"]
    assert (asymmetric["lowest"]["data"], asymmetric["highest"]["data"]) == (-1.5, 3.0)


def test_export_qdq_params() -> None:
    entry = cc.CacheEntry(Path("m.cache"), key_of(), cc.cache_from_amax({"x": 2.54, "z": 0.0}, "8401"),
                          {"x": TensorRange("x", 2.54, -1.0, 5.0, 4, 0), "z": TensorRange("z", 0.0, 0.0, 0.0, 4, 0)},
                          "")
    int8 = cc.to_qdq_params(entry, "int8")
    assert int8["x"] == {"scale": pytest.approx(0.02), "zero_point": 0, "dtype": "int8"}
    assert int8["z"]["scale"] == 1.0
    uint8 = cc.to_qdq_params(entry, "uint8")["x"]  # range [-1, 2.54] (max clipped to amax)
    assert uint8["scale"] == pytest.approx(3.54 / 255, rel=1e-6)
    assert uint8["zero_point"] == round(1.0 / uint8["scale"])
    with pytest.raises(CalibrationError):
        cc.to_qdq_params(entry, "int4")


def test_diff_caches_aligns_names() -> None:
    first = cc.cache_from_amax({"a": 1.27, "b": 2.54}, "8401")
    second = cc.cache_from_amax({"b": 1.27, "c": 1.0}, "8401")
    rows = cc.diff_caches(first, second)
    assert [row[0] for row in rows] == ["a", "b", "c"]
    assert rows[0][2] is None and rows[2][1] is None
    assert rows[1][1] == pytest.approx(0.02) and rows[1][2] == pytest.approx(0.01)
