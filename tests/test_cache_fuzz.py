"""Fuzz the calibration-cache parser and the sidecar reader: whatever the bytes, only quant's own QuantError escapes.

Bounded (max_examples) so the suite stays fast; no deadline, the machine is shared."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant.calib import cache as cc
from quant.calib.ranges import RangeResult, TensorRange
from quant.errors import QuantError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADERS = st.sampled_from(["TRT-8401-EntropyCalibration2", "TRT-101300-MinMaxCalibration", "1", "TRT--X", "",
                           "TRT-\u0668\u0664-E", "TRT-8401-"])
NAMES = st.text(st.characters(codec="utf-8"), max_size=12)
VALUES = st.one_of(st.integers(0, 2**32 - 1).map(lambda bits: f"{bits:x}"), st.text(max_size=10))
LINES = st.tuples(NAMES, st.sampled_from([": ", ":", " ", ""]), VALUES).map("".join)
CACHE_TEXTS = st.tuples(HEADERS, st.lists(LINES, max_size=8), st.sampled_from(["\n", "\r\n", "\r"])).map(
    lambda parts: (parts[2].join([parts[0], *parts[1]]) + parts[2]).encode("utf-8", "surrogatepass"))


def parse_or_quant_error(data: bytes) -> cc.CalibrationCache | None:
    try:
        return cc.parse_cache(data, "fuzz.cache")
    except QuantError:
        return None


@FUZZ
@given(st.one_of(st.binary(max_size=300), CACHE_TEXTS))
def test_cache_parser_raises_only_quant_errors_and_round_trips(data: bytes) -> None:
    cache = parse_or_quant_error(data)
    if cache is None:
        return
    try:
        written = cc.format_cache(cache)
    except QuantError:
        return
    again = cc.parse_cache(written)
    assert (again.version, again.algorithm, dict(again.scale_bits)) == (cache.version, cache.algorithm,
                                                                         dict(cache.scale_bits))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _valid_pair() -> tuple[bytes, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.cache"
        key = cc.CacheKey.create("a" * 64, "b" * 64, "minmax", {}, {"quant": "0"})
        tensors = {name: TensorRange(name, amax, -amax, amax, 4, 0) for name, amax in (("x", 1.0), ("y", 0.0))}
        cc.write_entry(path, key, RangeResult("minmax", {}, tensors, (), 1))
        return path.read_bytes(), json.loads(cc.sidecar_path(path).read_text())


CACHE_BYTES, SIDECAR = _valid_pair()


def read_or_quant_error(path: Path) -> None:
    try:
        entry = cc.read_entry(path)
    except QuantError:
        return
    assert entry.cache.scale_bits.keys() == entry.ranges.keys()  # whatever is accepted is a bound pair


@FUZZ
@given(st.data())
def test_sidecar_reader_raises_only_quant_errors(data: st.DataObject) -> None:
    """Valid sidecars with one value (at any depth) replaced by arbitrary JSON, or arbitrary bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path, meta = Path(folder) / "m.cache", json.loads(json.dumps(SIDECAR))
        path.write_bytes(CACHE_BYTES)
        if data.draw(st.booleans(), label="raw bytes"):
            cc.sidecar_path(path).write_bytes(data.draw(st.binary(max_size=200), label="sidecar"))
        else:
            target: Any = meta
            while isinstance(target, dict) and target and data.draw(st.booleans(), label="deeper"):
                child = target[data.draw(st.sampled_from(sorted(target)), label="into")]
                if not isinstance(child, dict) or not child:
                    break
                target = child
            field = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=6), label="field")
            target[field] = data.draw(JSON, label="value")
            cc.sidecar_path(path).write_text(json.dumps(meta))
        read_or_quant_error(path)
