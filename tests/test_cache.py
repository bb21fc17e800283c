"""TensorRT cache format, keyed sidecars, the store, concurrency and exports."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from quant.calib import cache as cc
from quant.calib.ranges import RangeResult, TensorRange
from quant.errors import CacheMismatch, CalibrationError, QuantError

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


# ---- pairs under faults: either the old pair or the new pair, never a mix ------------------------------------------

OLD, NEW = {"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0, "z": 5.0}


def pair_of(path: Path) -> dict[str, float]:
    """The entry's amax, after checking it is one consistent pair (read_entry raises on a mix)."""
    entry = cc.read_entry(path)
    assert entry.cache.amax().keys() == entry.ranges.keys()
    return {name: item.amax for name, item in entry.ranges.items()}


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(item.name for item in folder.iterdir() if item.name not in (name, name + ".json", f".{name}.lock"))


class Fault:
    """Raise OSError(ENOSPC) at the n-th call of os.replace / os.fsync together (every step of a pair write)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
        import os

        self.calls, self.at, self.fired = 0, at, False
        for name in ("replace", "fsync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == self.at:
                import errno

                self.fired = True
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args)
        return call


@pytest.mark.parametrize("at", range(1, 9))
def test_replacing_a_pair_fails_at_any_step_leaving_old_or_new_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    at: int) -> None:
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of(OLD))
    old_bytes = path.read_bytes()
    fault = Fault(monkeypatch, at)
    try:
        cc.write_entry(path, key_of(), result_of(NEW))
    except CalibrationError as error:  # a full disk is one line naming the cache, never an OSError traceback
        assert str(path) in str(error) and "\n" not in str(error) and "No space left" in str(error)
        assert pair_of(path) == OLD and path.read_bytes() == old_bytes
    else:
        assert pair_of(path) == NEW
    monkeypatch.undo()
    assert fault.fired or at > fault.calls
    cc.write_entry(path, key_of(), result_of(NEW))  # the next write finishes or cleans whatever was left
    assert pair_of(path) == NEW and leftovers(tmp_path, path.name) == []


@pytest.mark.parametrize("at", range(1, 9))
def test_a_failed_first_write_blocks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    path = tmp_path / "m.cache"
    Fault(monkeypatch, at)
    try:
        cc.write_entry(path, key_of(), result_of(NEW))
    except CalibrationError:
        assert not cc.entry_exists(path)  # calibrate() sees nothing to refuse or reuse
    else:
        assert pair_of(path) == NEW
    monkeypatch.undo()
    cc.write_entry(path, key_of(), result_of(OLD))
    assert pair_of(path) == OLD and leftovers(tmp_path, path.name) == []


def test_a_committed_pair_not_yet_in_place_reads_as_the_new_pair(tmp_path: Path) -> None:
    """The state a kill between the pending sidecar's rename and the final renames leaves behind."""
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of(OLD))
    staging = tmp_path / "staging" / "m.cache"
    cc.write_entry(staging, key_of(), result_of(NEW))
    (tmp_path / ".m.cache.new").write_bytes(staging.read_bytes())
    (tmp_path / ".m.cache.json.new").write_bytes(cc.sidecar_path(staging).read_bytes())
    assert pair_of(path) == NEW and [entry.path for entry in cc.list_entries(tmp_path)] == [path]
    (tmp_path / ".m.cache.json.new").unlink()  # without its committed sidecar a pending cache is nothing
    assert pair_of(path) == OLD


def _rewriter(path: str) -> None:
    while True:
        for amax in (OLD, NEW):
            cc.write_entry(path, key_of(), result_of(amax))


def test_kill_9_at_random_moments_leaves_a_whole_pair(tmp_path: Path) -> None:
    import os
    import signal
    import time

    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of(OLD))
    context = multiprocessing.get_context("fork")
    rng = np.random.default_rng(9)
    for delay in rng.uniform(0.0, 0.03, size=12):
        writer = context.Process(target=_rewriter, args=(str(path),))
        writer.start()
        time.sleep(float(delay))
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert pair_of(path) in (OLD, NEW)
    cc.write_entry(path, key_of(), result_of(OLD))
    assert leftovers(tmp_path, path.name) == []


# ---- the sidecar is bound to its cache -------------------------------------------------------------------------------


def tamper(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    side = cc.sidecar_path(path)
    meta = json.loads(side.read_text())
    change(meta)
    side.write_text(json.dumps(meta))  # json.dumps writes NaN/Infinity as Python's json reads them


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["tensors"]["x"].update(amax=2.0), "tensor 'x' has amax 2"),
        (lambda m: m["tensors"]["x"].update(amax=float("nan")), "tensor 'x' has amax nan"),
        (lambda m: m["tensors"]["x"].update(amax=float("inf")), "tensor 'x' has amax inf"),
        (lambda m: m["tensors"]["x"].update(min=float("-inf")), "each must be finite"),
        (lambda m: m["tensors"]["x"].update(amax=-1.0), "amax >= 0"),
        (lambda m: m["tensors"]["x"].update(amax=1e300), "a float32 scale"),
        (lambda m: m["tensors"].pop("y"), "only in the cache: ['y']"),
        (lambda m: m["tensors"]["x"].update(amax="1.0"), "must be numbers"),
        (lambda m: m["tensors"].update(x=[1.0]), "tensor 'x' is not an object"),
        (lambda m: m["key"].update(model_sha256=7), "key field 'model_sha256'"),
        (lambda m: m.pop("tensors"), "field 'tensors' is missing"),
        (lambda m: m.update(format="other/1"), "format 'other/1'"),
    ],
)
def test_sidecar_that_disagrees_with_its_cache_is_refused(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of({"x": 1.0, "y": 2.0}))
    tamper(path, change)
    with pytest.raises((CacheMismatch, CalibrationError)) as error:
        cc.read_entry(path)
    assert message in str(error.value) and "m.cache" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["[]", '"a string"', "42", "null", "{", "{\"format\": 1}", "[" * 5000])
def test_sidecar_that_is_not_quants_json_object_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of({"x": 1.0}))
    cc.sidecar_path(path).write_text(text)
    with pytest.raises(CalibrationError, match="not the sidecar quant writes"):
        cc.read_entry(path)


def test_scale_within_float32_rounding_of_amax_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of({"x": 1.0}))
    scale = cc.scale_of(1.0)
    near = float(np.nextafter(np.float32(scale), np.float32(1))) * 127  # one float32 step above
    tamper(path, lambda m: m["tensors"]["x"].update(amax=near))
    assert cc.read_entry(path).ranges["x"].amax == near


def test_store_listing_skips_and_names_bad_entries(tmp_path: Path) -> None:
    good = tmp_path / "good.cache"
    cc.write_entry(good, key_of(), result_of({"x": 1.0}))
    for name, text in (("list.cache", "[]"), ("nan.cache", None)):
        bad = tmp_path / name
        cc.write_entry(bad, key_of(), result_of({"x": 1.0}))
        if text is None:
            tamper(bad, lambda m: m["tensors"]["x"].update(amax=float("nan")))
        else:
            cc.sidecar_path(bad).write_text(text)
    listing = cc.scan_store(tmp_path)
    assert [entry.path for entry in listing.entries] == [good]
    assert sorted(path.name for path, _ in listing.bad) == ["list.cache", "nan.cache"]
    assert [entry.path for entry in cc.list_entries(tmp_path)] == [good]


def test_write_refuses_ranges_it_would_not_read(tmp_path: Path) -> None:
    for amax in (float("nan"), -1.0, float("inf")):
        with pytest.raises(QuantError):
            cc.write_entry(tmp_path / "m.cache", key_of(), result_of({"x": amax}))
    assert list(tmp_path.iterdir()) == []


# ---- quant cache rm ------------------------------------------------------------------------------------------------


def test_remove_refuses_anything_but_a_cache_with_its_own_sidecar(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    cc.sidecar_path(text).write_text('{"mine": true}\n')
    trt_only = tmp_path / "trt.cache"
    trt_only.write_bytes(TRT_WRITTEN)
    foreign = tmp_path / "foreign.cache"
    foreign.write_bytes(TRT_WRITTEN)
    cc.write_entry(tmp_path / "other.cache", key_of(), result_of({"x": 1.0}))
    cc.sidecar_path(foreign).write_bytes(cc.sidecar_path(tmp_path / "other.cache").read_bytes())
    folder = tmp_path / "folder.cache"
    folder.mkdir()
    before = sorted(item.name for item in tmp_path.iterdir())
    for path in (text, trt_only, foreign, folder, cc.sidecar_path(tmp_path / "other.cache")):
        with pytest.raises(CalibrationError, match="refusing to remove|not found|is a folder"):
            cc.remove_entry(path)
    assert sorted(item.name for item in tmp_path.iterdir()) == before


def test_remove_of_a_missing_path_creates_nothing(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.cache", tmp_path / "no" / "such" / "folder" / "m.cache"):
        with pytest.raises(CalibrationError, match="not found"):
            cc.remove_entry(path)
    assert list(tmp_path.iterdir()) == []


def test_remove_takes_a_committed_pending_pair_too(tmp_path: Path) -> None:
    path = tmp_path / "m.cache"
    cc.write_entry(path, key_of(), result_of(OLD))
    (tmp_path / ".m.cache.json.new").write_bytes(cc.sidecar_path(path).read_bytes())
    cc.remove_entry(path)
    assert leftovers(tmp_path, path.name) == [] and not path.exists() and not cc.sidecar_path(path).exists()


# ---- parser meaning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"TRT-8401-EntropyCalibration2\nx: 3c010a14\ny: 0\nx: 3c000000\n",
         "bad.cache:4: tensor 'x' appears again (first on line 2)"),
        (b"TRT-8401-EntropyCalibration2\nx: 3c010a14\nnan_t: 7fc00000\n", "bad.cache:3: tensor 'nan_t' has scale nan"),
        (b"TRT-8401-EntropyCalibration2\nneg: bf800000\n", "bad.cache:2: tensor 'neg' has scale -1"),
        (b"TRT-8401-EntropyCalibration2\nnegzero: 80000000\n", "tensor 'negzero'"),
        ("TRT-\u0668\u0664\u0660\u0661-EntropyCalibration2\nx: 0\n".encode(), "bad.cache:1:"),
        ("TRT-8401-Entropy\u00e9\nx: 0\n".encode(), "bad.cache:1:"),
        (b"TRT-8401-EntropyCalibration2\nx: \xd9\xa3c\n", "bad.cache:2:"),
    ],
)
def test_parser_rejects_meaningless_caches_naming_tensor_and_line(text: bytes, message: str) -> None:
    with pytest.raises(CalibrationError) as error:
        cc.parse_cache(text, "bad.cache")
    assert message in str(error.value)


def test_infinite_scale_reads_with_a_warning_naming_tensor_and_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="quant.calib.cache"):
        cache = cc.parse_cache(b"TRT-8401-EntropyCalibration2\nx: 3c010a14\nbig: 7f800000\n", "inf.cache")
    assert cache.scales()["big"] == float("inf")
    assert "inf.cache:3" in caplog.text and "'big'" in caplog.text


def test_tensorrt_4_cache_with_header_1_reads_and_round_trips() -> None:
    text = b"1\ndata: 3c010a14\n(Unnamed Layer* 0) [Convolution]_output: 3d3e0880\n"
    cache = cc.parse_cache(text, "trt4.cache")
    assert (cache.header, cache.algorithm) == ("1", "")
    assert cache.scale_bits["data"] == 0x3C010A14 and len(cache.scale_bits) == 2
    assert cc.format_cache(cache) == text


@pytest.mark.parametrize("version", ["8 401", "8401\nx: 0", "8.4.1", "\u0668\u0664\u0660\u0661"])
def test_header_that_cannot_be_read_back_is_not_written(tmp_path: Path, version: str) -> None:
    with pytest.raises(CalibrationError, match="ASCII digits"):
        cc.format_cache(cc.cache_from_amax({"x": 1.0}, version))
    with pytest.raises(CalibrationError):
        cc.write_entry(tmp_path / "m.cache", key_of(), result_of({"x": 1.0}), version=version)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a\nb", "", "a\rb", "x\u2028y"])
def test_tensor_name_that_cannot_be_read_back_is_not_written(name: str) -> None:
    with pytest.raises(CalibrationError, match="read back"):
        cc.format_cache(cc.cache_from_amax({name: 1.0}, "8401"))


# ---- read-only stores: reading never writes ------------------------------------------------------------------------


def make_read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 0o555; as root (where chmod does not stop writes) also make every write call under `folder` fail as a
    read-only folder would, so the tests mean the same for every user."""
    import builtins
    import errno
    import io
    import os

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    inside = str(folder.resolve())

    def under(path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(inside)

    def refuse(path: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(file) and any(flag in mode for flag in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "File exists", str(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guard(real):  # type: ignore[no-untyped-def]
        def call(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if under(path):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    for name in ("replace", "rename", "unlink", "remove"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {item.name: (item.stat().st_mtime_ns, item.stat().st_size) for item in folder.iterdir()}


@pytest.fixture()
def read_only_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    cc.write_entry(cc.store_path(store, key_of()), key_of(), result_of({"x": 1.0}))
    (store / "trt.cache").write_bytes(TRT_WRITTEN)
    for item in store.iterdir():
        if item.name.endswith(".lock"):
            item.unlink()  # a store copied without lock files (e.g. shipped read-only)
    before = snapshot(store)
    make_read_only(store, monkeypatch)
    yield store
    monkeypatch.undo()
    store.chmod(0o755)
    assert snapshot(store) == before  # nothing created, changed or removed


def test_reads_of_a_read_only_store_write_nothing(read_only_store: Path) -> None:
    path = cc.store_path(read_only_store, key_of())
    assert cc.read_entry(path).ranges["x"].amax == 1.0
    assert cc.check_entry(path, key_of()).path == path
    assert cc.read_cache(read_only_store / "trt.cache").header == "TRT-8401-EntropyCalibration2"
    assert [entry.path for entry in cc.list_entries(read_only_store)] == [path]
    assert cc.lookup(read_only_store, key_of()).hit


def test_writes_to_a_read_only_store_fail_in_one_line(read_only_store: Path) -> None:
    path = cc.store_path(read_only_store, key_of())
    for action in (lambda: cc.write_entry(path, key_of(), result_of({"x": 2.0})),
                   lambda: cc.write_entry(read_only_store / "new.cache", key_of(), result_of({"x": 2.0})),
                   lambda: cc.remove_entry(path)):
        with pytest.raises(CalibrationError) as error:
            action()
        assert "Permission denied" in str(error.value) and "\n" not in str(error.value)
    assert cc.read_entry(path).ranges["x"].amax == 1.0


# ---- through the CLI: one line, exit 2 -----------------------------------------------------------------------------


def quant_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from quant.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_refuses_a_sidecar_that_disagrees_with_its_cache(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    from quant.fileio import sha256_file

    model = tmp_path / "relu.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    path = tmp_path / "relu.cache"
    cc.write_entry(path, cc.CacheKey.create(sha256_file(model), "0" * 64, "entropy", {}),
                   result_of({"x": 1.0, "y": 1.0}))
    tamper(path, lambda m: m["tensors"]["y"].update(amax=0.5))
    code, _, err = quant_cli(["build", str(model), "--precision", "int8", "--cache", str(path),
                              "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "tensor 'y' has amax 0.5" in err
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_cli_list_names_bad_entries_and_rm_refuses_other_files(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.cache", tmp_path / "bad.cache"
    for path in (good, bad):
        cc.write_entry(path, key_of(), result_of({"x": 1.0}))
    cc.sidecar_path(bad).write_text("[]")
    code, out, _ = quant_cli(["cache", "list", "--store", str(tmp_path)], capsys)
    assert code == 0 and "good.cache" in out and "skipped bad.cache: sidecar" in out
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    code, _, err = quant_cli(["cache", "rm", str(notes)], capsys)
    assert code == 2 and err.count("\n") == 1 and "refusing to remove" in err and notes.exists()
    code, _, err = quant_cli(["cache", "rm", str(tmp_path / "gone" / "x.cache")], capsys)
    assert code == 2 and "not found" in err and not (tmp_path / "gone").exists()


def test_cli_diff_and_show_of_caches_with_infinite_scales_print_no_nan(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.cache", tmp_path / "b.cache"
    first.write_bytes(b"TRT-8401-EntropyCalibration2\nx: 3c010a14\ny: 7f800000\nz: 3c010a14\n")
    second.write_bytes(b"TRT-8401-EntropyCalibration2\nx: 3c810a14\ny: 7f800000\nz: 7f800000\n")
    code, out, _ = quant_cli(["cache", "diff", str(first), str(second)], capsys)
    assert code == 0 and "nan" not in out.lower()
    assert "ratio over 1 shared non-zero tensors" in out and "2 shared tensors with an infinite scale" in out
    code, out, _ = quant_cli(["cache", "show", str(second)], capsys)
    assert code == 0 and "nan" not in out.lower() and "2 tensors with an infinite scale" in out
