"""Graphs below the opset that per-channel Q/DQ needs (DequantizeLinear's `axis` arrived in opset 13).

`ensure_opset` upgrades such a graph with ONNX's version converter into `<stem>.opset<N>.onnx` (+ a JSON record)
in the given folder, runs both graphs in ONNX Runtime on the same inputs (calibration feeds when the caller has them,
else deterministic random inputs of the declared shapes) and uses the copy only when every output agrees within float
tolerance. Calibration and build both call it, so the calibration cache's key names the graph the build quantizes.
When the upgrade or the check fails, the original graph comes back with `per_channel` False: Q/DQ is then per
tensor, which opset 10 already has. A copy is reused while its record names the current source's sha256.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import version_converter

from quant.errors import BuildError, ModelError
from quant.onnxgraph.graph import default_opset, load_model
from quant.fileio import atomic_write_bytes, atomic_write_json, sha256_file, temp_path_beside

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

MIN_QDQ_OPSET = 13  # DequantizeLinear/QuantizeLinear `axis` (per-channel scales)
CHECK_FEEDS = 2  # calibration feeds run through both graphs
RELATIVE_TOLERANCE = 1e-4  # max |upgraded - original| allowed, times max(1, max |original|), per output
RANDOM_DIM = 8  # a symbolic dimension of a random check input (axis 0, the batch, gets 1)
CALIBRATION_FEEDS = "calibration feeds"
RANDOM_INPUTS = "deterministic random inputs of the declared shapes"


@dataclass(frozen=True)
class UpgradeResult:
    """The graph to calibrate and quantize (`path`) and how it relates to the one given (`source`)."""

    path: Path
    source: Path
    source_opset: int
    opset: int
    max_abs_error: float | None = None  # of the check, when an upgrade was made
    check_inputs: str | None = None  # CALIBRATION_FEEDS or RANDOM_INPUTS
    fallback: str | None = None  # why the upgrade is not used

    @property
    def upgraded(self) -> bool:
        return self.path != self.source

    @property
    def per_channel(self) -> bool:
        """Whether per-channel Q/DQ is valid on `path`."""
        return self.opset >= MIN_QDQ_OPSET

    def to_meta(self) -> dict[str, Any]:
        return {"path": str(self.path), "source_opset": self.source_opset, "opset": self.opset,
                "max_abs_error": self.max_abs_error, "check_inputs": self.check_inputs, "fallback": self.fallback}


def ensure_opset(model_path: str | Path, min_opset: int = MIN_QDQ_OPSET, out_dir: str | Path | None = None,
                 feeds: Iterable[Feed] | None = None) -> UpgradeResult:
    """`model_path` itself when its opset is at least `min_opset`, else its checked upgrade written to `out_dir`
    (default: beside it), else (upgrade or check failed: a warning says why) `model_path` for per-tensor Q/DQ.
    `feeds`: real inputs for the check (the first CHECK_FEEDS are used); None: random inputs, logged as such."""
    source = Path(model_path)
    model = load_model(source)
    opset = default_opset(model)
    if opset >= min_opset:
        return UpgradeResult(source, source, opset, opset)
    target = Path(out_dir or source.parent) / f"{source.stem}.opset{min_opset}.onnx"
    try:
        source_sha = sha256_file(source)
        result = _reuse(source, source_sha, target, feeds) or _upgrade(source, source_sha, model, target, min_opset,
                                                                         feeds)
    except (BuildError, ModelError, OSError) as error:
        log.warning("%s: opset %d is below the %d that per-channel Q/DQ needs and the upgrade failed (%s); falling "
                    "back to per-tensor Q/DQ on the original graph", source, opset, min_opset, error)
        return UpgradeResult(source, source, opset, opset, fallback=str(error))
    log.info("%s: opset %d -> %d in %s (max abs error %.3g vs the original on %s)", source, opset, result.opset,
             result.path, result.max_abs_error, result.check_inputs)
    return result


def _record_path(target: Path) -> Path:
    return target.with_suffix(".json")


def _upgrade(source: Path, source_sha: str, model: onnx.ModelProto, target: Path, min_opset: int,
             feeds: Iterable[Feed] | None) -> UpgradeResult:
    upgraded = _convert(model, min_opset)
    temp = temp_path_beside(target)
    try:
        atomic_write_bytes(temp, upgraded.SerializeToString())  # fsynced, ordinary file mode
        error, inputs = check_equivalent(source, temp, feeds)
        temp.replace(target)
    finally:
        temp.unlink(missing_ok=True)
    result = UpgradeResult(target, source, default_opset(model), min_opset, error, inputs)
    _write_record(result, source_sha)
    return result


def _convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """ONNX's version converter, then the checker: a BuildError on either failure (ensure_opset's warning names the
    file). The equivalence check in ONNX Runtime that follows is the stronger test."""
    try:
        upgraded = version_converter.convert_version(model, opset)
        onnx.checker.check_model(upgraded)
    except (version_converter.ConvertError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            RuntimeError) as error:  # the C++ converter also raises bare RuntimeError on an op it cannot adapt
        reason = " ".join(str(error).split())[:400] or type(error).__name__
        raise BuildError(f"ONNX's version converter to opset {opset}: {reason}") from None
    return upgraded


def check_equivalent(original: Path, upgraded: Path, feeds: Iterable[Feed] | None) -> tuple[float, str]:
    """(max abs error over all outputs, which inputs) of `upgraded` against `original` in ONNX Runtime; a
    BuildError when an output differs by more than RELATIVE_TOLERANCE * max(1, max |original output|)."""
    from quant.backends.ort import make_session

    reference = make_session(original, optimization="disable")
    candidate = make_session(upgraded, optimization="disable")
    inputs, label = _check_inputs(reference, feeds)
    worst = 0.0
    for feed in inputs:
        got = _run(candidate, feed)
        for name, want in _run(reference, feed).items():
            error = _abs_error(want, got.get(name))
            if not error <= RELATIVE_TOLERANCE * max(1.0, float(np.nanmax(np.abs(want), initial=0.0))):
                raise BuildError(f"{upgraded}: output {name!r} differs from the original graph's by {error:.3g} "
                                 f"on {label}")
            worst = max(worst, error)
    return worst, label


def _run(session: Any, feed: Feed) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [name for name in names if name not in feed]
    if missing:
        raise BuildError(f"the check feeds lack inputs {missing}")
    try:
        values = session.run(None, {name: feed[name] for name in names})
    except Exception as error:  # ORT's own Fail/InvalidArgument/... (e.g. random inputs of a shape it rejects)
        raise BuildError(f"ONNX Runtime could not run the check: {' '.join(str(error).split())[:300]}") from None
    return dict(zip((o.name for o in session.get_outputs()), values))


def _check_inputs(session: Any, feeds: Iterable[Feed] | None) -> tuple[list[Feed], str]:
    if feeds is not None:
        taken = list(itertools.islice(iter(feeds), CHECK_FEEDS))
        if taken:
            return taken, CALIBRATION_FEEDS
    log.info("checking the opset upgrade on %s (no calibration feeds here)", RANDOM_INPUTS)
    return [random_inputs(session)], RANDOM_INPUTS


def random_inputs(session: Any) -> Feed:
    """One feed for every input of an ORT session: float N(0, 1) from a fixed seed, integers 1, booleans False;
    a symbolic dimension is 1 on axis 0 (the batch) and RANDOM_DIM elsewhere (one value per dimension name)."""
    from quant.backends.ort import ORT_DTYPES

    rng = np.random.default_rng(0)
    named: dict[str, int] = {}
    feed = {}
    for spec in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else named.setdefault(str(d), 1 if axis == 0 else RANDOM_DIM)
                      for axis, d in enumerate(spec.shape))
        dtype = np.dtype(ORT_DTYPES.get(spec.type, np.float32))
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[spec.name] = (np.zeros if dtype.kind == "b" else np.ones)(shape, dtype=dtype)
    return feed


def _abs_error(want: np.ndarray, got: np.ndarray | None) -> float:
    """Max |want - got| (NaN where both are NaN counts as equal); inf for a missing output or another shape."""
    if got is None or np.shape(want) != np.shape(got):
        return float("inf")
    want64, got64 = np.asarray(want, np.float64), np.asarray(got, np.float64)
    both_nan = np.isnan(want64) & np.isnan(got64)
    diff = np.where(both_nan, 0.0, np.abs(want64 - got64))
    worst = float(np.max(diff, initial=0.0))
    return worst if not np.isnan(worst) else float("inf")


def _write_record(result: UpgradeResult, source_sha: str) -> None:
    atomic_write_json(_record_path(result.path), {
        "source": str(result.source), "source_sha256": source_sha, "sha256": sha256_file(result.path),
        "source_opset": result.source_opset, "opset": result.opset, "onnx": onnx.__version__,
        "max_abs_error": result.max_abs_error, "check_inputs": result.check_inputs})


def _reuse(source: Path, source_sha: str, target: Path, feeds: Iterable[Feed] | None) -> UpgradeResult | None:
    """The upgrade at `target` when its record names this source and this copy (re-checked on real feeds when it
    was checked on random inputs and real feeds are here now); None when it must be made again."""
    try:
        record = json.loads(_record_path(target).read_text())
        if (record.get("source_sha256") != source_sha or record.get("onnx") != onnx.__version__
                or record.get("sha256") != sha256_file(target)):
            return None
        result = UpgradeResult(target, source, int(record["source_opset"]), int(record["opset"]),
                               float(record["max_abs_error"]), str(record["check_inputs"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or not quant's record
        return None
    if result.check_inputs == RANDOM_INPUTS and feeds is not None:
        try:
            error, inputs = check_equivalent(source, target, feeds)
        except BuildError:
            _record_path(target).unlink(missing_ok=True)  # failed on real inputs: no later build may reuse it
            raise
        result = UpgradeResult(target, source, result.source_opset, result.opset, error, inputs)
        _write_record(result, source_sha)
    log.debug("reusing %s: its record names source sha256 %s", target, source_sha[:12])
    return result
