"""build_artifact (the implementation behind quant.artifacts.build_artifact): one model at one precision -> engines/<model>/<precision>/ with model.onnx and meta.json.

The folder is replaced whole (quant.fileio.atomic_folder) and meta.json records the sha256 of every file beside it;
verify_artifact checks a folder against it before quant reuses it.

meta.json records what the artifact was built from (source sha256, the graph rewrites that made it), with which rules (file, sha256, per-op summary),
which ranges (cache file and its key), by which tool versions, and which integer kernels ORT really runs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quant import __version__
from quant.artifacts.calibration import TensorRange, ranges_from_cache
from quant.artifacts.ort_build import (
    build_fp16, build_fp32, build_int8_ort, build_int8_trt_qdq, check_int8_kernels, kernel_report, streaming_states,
)
from quant.calib.opset import MIN_QDQ_OPSET, UpgradeResult, ensure_opset
from quant.errors import BuildError, ModelError
from quant.fileio import atomic_folder, atomic_write_json, sha256_bytes, sha256_file
from quant.onnxgraph.graph import load_model
from quant.paths import DEFAULT_OUT_ROOT
from quant.precision import DEFAULT_RULES_PATH, load_rules, plan, without_rules
from quant.rewrite import rewrite_meta

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TRT_QDQ_FILE = "model_trt_qdq.onnx"
META_FILE = "meta.json"
# every file a build may write into its folder (TensorRT adds the engine and its own record)
ARTIFACT_FILES = frozenset({MODEL_FILE, TRT_QDQ_FILE, META_FILE, "plan.json", "model.engine", "model.engine.json"})
# what builds of older quant versions left in a folder when killed: ORT work folders and temp files
_LEFTOVER = re.compile(r"^(tmp[A-Za-z0-9_]{8}|\..+\.tmp(\.[A-Za-z0-9_]+)?)$")


@dataclass(frozen=True)
class BuildOptions:
    precision: str
    backend: str = "ort"
    mode: str = "explicit"  # TensorRT: explicit (Q/DQ) | implicit (calibration cache + layer precision, TRT <= 10)
    cache: Path | None = None
    rules: Path | None = None
    rules_off: tuple[str, ...] = ()  # shipped rules left out (a spec graph's `rules_off`); see rules_left_out
    out_dir: Path | None = None  # default out_root/<model>/<precision>
    out_root: Path = DEFAULT_OUT_ROOT  # exports of known models (export/), the cache store (cache/), artifacts
    optimize_fp32: bool = False
    activation_uint8: bool = True
    per_channel: bool = True
    unwrap_kernel_outputs: bool = False  # ORT: True gives protected float nodes un-quantized inputs, fewer fusions
    reduce_range: bool | None = None  # ORT: 7-bit weights; None = exactly when this CPU lacks VNNI
    method: str | None = None  # calibration method when no cache is given; None: the model's default
    constraints: str = "obey"  # TensorRT implicit: obey | prefer the rule layer precisions

    def __post_init__(self) -> None:
        for label, value, allowed in (("precision", self.precision, ("fp32", "fp16", "int8")),
                                      ("backend", self.backend, ("ort", "trt")),
                                      ("mode", self.mode, ("explicit", "implicit")),
                                      ("method", self.method or "entropy", ("entropy", "minmax", "percentile")),
                                      ("constraints", self.constraints, ("obey", "prefer"))):
            if value not in allowed:
                raise BuildError(f"{label} {value!r} is not one of {', '.join(allowed)}")

    @property
    def rules_left_out(self) -> tuple[str, ...]:
        """rules_off as it applies: to the shipped rules only; a `rules` file is a whole plan of its own (a user's
        --rules, a searched rules.toml) and is used as it is."""
        return self.rules_off if self.rules is None else ()


def check_source(source: str | Path) -> Path:
    """The ONNX file an artifact is built from; it must exist."""
    path = Path(source)
    if path.suffix != ".onnx" or not path.is_file():
        raise ModelError(f"{path}: not an existing .onnx file; give a model spec (quant build SPEC) or an ONNX file")
    return path


def build_artifact(source: str | Path, precision: str, backend: str = "ort", name: str | None = None,
                   **options: Any) -> Path:
    """Build one artifact of the ONNX file `source`, named `name` (default its stem; a spec's GraphSpec.name);
    returns its folder (default engines/<name>/<precision>). Options are BuildOptions fields.

    The folder is produced whole or not at all: everything is built in a temp sibling that replaces the folder only
    once meta.json (with the sha256 of every file) is written; a failed or killed build leaves the previous one."""
    opts = BuildOptions(precision=precision, backend=backend, **options)
    if backend == "trt":
        from quant.backends.trt import require_tensorrt

        require_tensorrt()  # a missing TensorRT fails before any export, calibration or ORT build
    source = check_source(source)
    name = name or source.stem
    out_dir = opts.out_dir or opts.out_root / name / precision
    check_replaceable(out_dir)
    with atomic_folder(out_dir) as work:
        meta = _build_into(work, name, source, opts)
        if "trt" in meta:  # TensorRT recorded paths inside the temp folder: name them where they will live
            meta["trt"] = {key: str(_relocated(Path(value), work, out_dir)) if key in ("engine", "onnx") else value
                           for key, value in meta["trt"].items()}
        meta["files"] = file_hashes(work)
        atomic_write_json(work / META_FILE, meta)
    log.info("built %s %s (%s) in %s", name, precision, backend, out_dir)
    return out_dir


def _build_into(work: Path, name: str, source: Path, opts: BuildOptions) -> dict[str, Any]:
    onnx_model = load_model(source)
    rules = without_rules(load_rules(opts.rules), opts.rules_left_out, f"{name}: rules_off")
    meta = _base_meta(name, source, opts, rules_text_sha(opts.rules))
    if opts.precision == "fp32":
        meta["fp32"] = build_fp32(source, work / MODEL_FILE, opts.optimize_fp32)
    elif opts.precision == "fp16":
        fp16_plan = plan(onnx_model, rules, "fp16", opts.backend, streaming_states(onnx_model))
        meta["plan"] = fp16_plan.summary()
        meta["fp16"] = build_fp16(onnx_model, fp16_plan, work / MODEL_FILE)
    else:
        upgrade = ensure_opset(source, MIN_QDQ_OPSET, source.parent)  # the graph calibration also saw
        source = upgrade.path
        meta.update(_build_int8(name, upgrade, onnx_model, rules, opts, work))
    if opts.backend == "trt":
        used_cache = (meta.get("cache") or {}).get("path")
        meta["trt"] = _build_trt(name, source, work, opts, Path(used_cache) if used_cache else opts.cache)
    return meta


def _relocated(path: Path, work: Path, out_dir: Path) -> Path:
    return out_dir / path.relative_to(work) if path.is_relative_to(work) else path


# ------------------------------------------------------------------------------------------------ folder integrity


def check_replaceable(out_dir: Path) -> None:
    """A build replaces its whole folder, so the folder may hold only what builds write (and leftovers of killed
    builds): anything else means -o names a folder of other files, which must not be deleted."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir} is a file: give a folder for the artifact (-o DIR)")
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ARTIFACT_FILES and not _LEFTOVER.match(p.name))
    if foreign:
        raise BuildError(f"{out_dir} holds files a build did not write ({', '.join(foreign[:5])}): a build replaces "
                         "its whole folder, so give a new or empty folder with -o")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of an artifact folder except meta.json (which records them)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != META_FILE}


def verify_artifact(folder: Path) -> dict[str, Any]:
    """meta.json of an artifact folder, after checking that its files are exactly the ones it describes (same names,
    same sha256): a folder changed after its build never passes for what meta.json says."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{meta_path}: no readable meta.json ({error}); rebuild with `quant build`") from None
    recorded = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        raise ModelError(f"{meta_path} records no file sha256 (built by an older quant); rebuild with `quant build`")
    actual = file_hashes(folder)
    changed = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
    if changed:
        raise ModelError(f"{folder}: {', '.join(changed)} differ from what {META_FILE} records (changed after the "
                         "build); rebuild with `quant build`")
    return meta


def rules_text_sha(rules: Path | None) -> str:
    return sha256_file(rules if rules is not None else DEFAULT_RULES_PATH)


def _build_int8(name: str, upgrade: UpgradeResult, source_model: onnx.ModelProto, rules: Any, opts: BuildOptions,
                out_dir: Path) -> dict[str, Any]:
    """INT8 of `upgrade.path` (the source, or its opset upgrade); per-tensor weights where opset < 13."""
    model = load_model(upgrade.path) if upgrade.upgraded else source_model
    per_channel = opts.per_channel and upgrade.per_channel
    ranges, cache_meta = load_ranges(name, upgrade.path, opts.cache, opts.method, opts.out_root)
    states = streaming_states(model)
    ort_plan = plan(model, rules, "int8", "ort", states)
    trt_plan = plan(model, rules, "int8", "trt", states)
    meta: dict[str, Any] = {"cache": cache_meta, "plan": ort_plan.summary(), "plan_trt": trt_plan.summary(),
                            "opset_upgrade": upgrade.to_meta()}
    meta["ort_int8"] = build_int8_ort(model, ort_plan, ranges, out_dir / MODEL_FILE, opts.activation_uint8,
                                      per_channel, opts.unwrap_kernel_outputs, opts.reduce_range)
    report = kernel_report(out_dir / MODEL_FILE)
    check_int8_kernels(report, ort_plan)
    meta.update(report)
    meta["trt_qdq"] = build_int8_trt_qdq(model, trt_plan, ranges, out_dir / TRT_QDQ_FILE, per_channel)
    atomic_write_json(out_dir / "plan.json", {"ort": ort_plan.to_json(), "trt": trt_plan.to_json()})
    return meta


def load_ranges(name: str, source: Path, cache: Path | None, method: str | None = None,
                out_root: Path = DEFAULT_OUT_ROOT) -> tuple[dict[str, TensorRange], dict[str, Any]]:
    """Ranges (amax with the observed min/max of the cache's sidecar) from the given calibration cache (its key must
    name this model file). Calibrating is the caller's step (quant.tasks.calibration.calibrate_spec): builds never
    import calibration."""
    if cache is not None:
        return ranges_from_cache(cache, source)
    raise BuildError(f"{source}: INT8 needs calibration ranges; `quant build SPEC --precision int8` calibrates "
                     f"first, or pass --cache from `quant calibrate {source}`")


def _base_meta(name: str, source: Path, opts: BuildOptions, rules_sha: str) -> dict[str, Any]:
    import onnxruntime

    try:
        import onnxconverter_common

        converter_version = str(onnxconverter_common.__version__)
    except ImportError:
        converter_version = None
    return {
        "model": name, "source": str(source), "source_sha256": sha256_file(source),
        "precision": opts.precision, "backend": opts.backend,
        # the exact graph rewrites `source` was made with (quant.rewrite's record beside it); None: as exported
        "rewrites": rewrite_meta(source),
        "rules": {"path": str(opts.rules or DEFAULT_RULES_PATH), "sha256": rules_sha, "off": list(opts.rules_left_out)},
        "versions": {"quant": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnxconverter_common": converter_version, "numpy": np.__version__},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cache_key": sha256_bytes((f"{sha256_file(source)}:{opts.precision}:{rules_sha}"
                                   + (f":off={','.join(opts.rules_left_out)}" if opts.rules_left_out else "")).encode()),
    }


def _build_trt(name: str, source: Path, out_dir: Path, opts: BuildOptions, cache: Path | None) -> dict[str, Any]:
    """Hand the artifact to quant.artifacts.trt_build.build_trt (TensorRT imported lazily, in quant.backends.trt).

    explicit: the ONNX carries the precisions (int8: model_trt_qdq.onnx; fp16: the FP16 model.onnx just written);
    implicit (TensorRT <= 10): the FP32 source, builder flags, the rules' layer precisions and, for INT8, the
    calibration cache this build's ranges came from (quant's ranges, so TensorRT does not calibrate again)."""
    from quant.artifacts.trt_build import TrtBuildOptions, build_trt, engine_onnx

    trt_opts = TrtBuildOptions(precision=opts.precision, mode=opts.mode, constraints=opts.constraints, cache=cache,
                               rules=opts.rules, rules_off=opts.rules_left_out, out_root=opts.out_root)
    engine = build_trt(name, source, out_dir, trt_opts)
    onnx_path = engine_onnx(out_dir, source, opts.precision, opts.mode)
    return {"engine": str(engine), "onnx": str(onnx_path), "mode": opts.mode}
