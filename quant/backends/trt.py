"""TensorRT backend: engine building (FP32/FP16/INT8, implicit and explicit quantization) and engine runners.

This is the only module of quant that imports `tensorrt` or `pycuda`, and it does so lazily: `trt` and `cuda` below
are proxies that import the real modules through `require_tensorrt()` / `require_pycuda()` on first attribute access,
so `import quant.backends.trt` and every `--help` work on machines without TensorRT. Type checkers see the real
modules (tensorrt-stubs; see scripts/setup_trt_stubs.py).

Two TensorRT generations are supported, detected at run time (`capabilities`):
- implicit quantization (TensorRT <= 10): builder FP16/INT8 flags, an IInt8EntropyCalibrator2 fed by quant's
  calibration readers with caches managed by quant's cache store, per-layer precision from quant's precision rules;
- explicit quantization (any version, the only one on 11): build from the Q/DQ ONNX or the FP16 ONNX that the
  ONNX Runtime path produces, as a strongly typed network on TensorRT >= 10.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from quant.backends.trt_inputs import as_feed_dicts, check_onnx_for_mode, default_profiles, load_layer_precisions
from quant.errors import BackendUnavailable, BuildError, CalibrationError, ModelError
from quant.fileio import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import pycuda.driver as cuda
    import tensorrt as trt

log = logging.getLogger(__name__)

TRT_INSTALL_HINT = (
    "TensorRT is not installed: pip install 'quant[trt]' on a machine with an NVIDIA GPU and CUDA; "
    "TensorRT <= 10 for implicit INT8, any version for explicit Q/DQ"
)
PYCUDA_INSTALL_HINT = (
    "pycuda is not installed or finds no CUDA device: pip install 'quant[trt]' (pycuda) on a machine with "
    "an NVIDIA GPU, the CUDA toolkit and its driver"
)
PRECISIONS = ("fp32", "fp16", "int8")
MODES = ("implicit", "explicit")
CONSTRAINTS = ("obey", "prefer")
ENGINE_FILE = "model.engine"
DEFAULT_WORKSPACE_BYTES = 4 << 30

Feed = Mapping[str, np.ndarray]
Shape = tuple[int, ...]
ProfileSpec = Mapping[str, tuple[Shape, Shape, Shape]]


# ---------------------------------------------------------------------------------------------------------------
# Lazy imports: the one place tensorrt and pycuda are imported.


def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or BackendUnavailable saying how to install it."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as error:
        raise BackendUnavailable(f"{TRT_INSTALL_HINT} ({error})") from error
    if not hasattr(module, "Builder"):  # the type stubs alone import as an empty namespace package
        raise BackendUnavailable(f"{TRT_INSTALL_HINT} (found only the tensorrt type stubs)")
    return module


def require_pycuda() -> ModuleType:
    """`pycuda.driver` with a CUDA context made current (pycuda.autoinit), or BackendUnavailable."""
    try:
        importlib.import_module("pycuda.autoinit")
        return importlib.import_module("pycuda.driver")
    except ImportError as error:
        raise BackendUnavailable(f"{PYCUDA_INSTALL_HINT} ({error})") from error
    except Exception as error:  # pycuda.autoinit raises driver errors when no GPU is usable
        raise BackendUnavailable(f"{PYCUDA_INSTALL_HINT} ({type(error).__name__}: {error})") from error


class _LazyModule:
    """Resolves attributes on the module returned by `loader` at each access (so tests can swap in a double)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader(), name)


if not TYPE_CHECKING:
    trt = _LazyModule(require_tensorrt)
    cuda = _LazyModule(require_pycuda)


# ---------------------------------------------------------------------------------------------------------------
# Version capabilities.


@dataclass(frozen=True)
class Capabilities:
    """What the installed TensorRT version can do: implicit INT8 and precision flags were deprecated in 10.1 and
    10.12 and removed in 11.0, where every network is strongly typed."""

    version: str
    implicit_int8: bool  # IInt8EntropyCalibrator2 + INT8 flag: < 11 (deprecated since 10.1)
    precision_flags: bool  # FP16/INT8 builder flags, layer.precision, OBEY/PREFER constraints: < 11 (deprecated 10.12)
    explicit_qdq: bool  # Q/DQ ONNX: every version
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED: >= 10
    strongly_typed_required: bool  # >= 11
    explicit_batch_flag: bool  # < 10 needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH


def parse_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}; reinstall TensorRT")
    return int(match.group(1)), int(match.group(2))


def capabilities(version: str) -> Capabilities:
    major, minor = parse_version(version)
    if (major, minor) >= (10, 1) and major < 11:
        log.debug("TensorRT %s: implicit INT8 calibration is deprecated (since 10.1)", version)
    return Capabilities(
        version=version,
        implicit_int8=major < 11,
        precision_flags=major < 11,
        explicit_qdq=True,
        strongly_typed=major >= 10,
        strongly_typed_required=major >= 11,
        explicit_batch_flag=major < 10,
    )


def check_mode(caps: Capabilities, precision: str, mode: str, has_layer_precisions: bool) -> None:
    """Raise BuildError when this TensorRT version cannot build `precision` in `mode`."""
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if mode not in MODES:
        raise BuildError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "implicit" and precision == "int8" and not caps.implicit_int8:
        raise BuildError(
            f"TensorRT {caps.version} cannot do implicit INT8 (IInt8EntropyCalibrator2 was removed in 11.0): "
            "build with --mode explicit from the Q/DQ ONNX, or install tensorrt<11"
        )
    if mode == "implicit" and precision == "fp16" and not caps.precision_flags:
        raise BuildError(
            f"TensorRT {caps.version} has no FP16 builder flag (removed in 11.0): build with --mode explicit "
            "from the FP16 ONNX, or install tensorrt<11"
        )
    if mode == "implicit" and has_layer_precisions and not caps.precision_flags:
        raise BuildError(
            f"TensorRT {caps.version} has no per-layer precision (removed in 11.0): use --mode explicit, where "
            "the precision rules are already in the Q/DQ / FP16 ONNX"
        )


# ---------------------------------------------------------------------------------------------------------------
# Device buffers (pycuda).


class DeviceBuffers:
    """Named device allocations that grow on demand; freed by close()."""

    def __init__(self) -> None:
        self._allocations: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}

    def ensure(self, name: str, nbytes: int) -> Any:
        if self._sizes.get(name, -1) < nbytes:
            self.free(name)
            self._allocations[name] = cuda.mem_alloc(max(nbytes, 1))
            self._sizes[name] = nbytes
        return self._allocations[name]

    def get(self, name: str) -> Any:
        return self._allocations[name]

    def swap(self, first: str, second: str) -> None:
        """Exchange two buffers (pointers only, no copy)."""
        allocations, sizes = self._allocations, self._sizes
        allocations[first], allocations[second] = allocations[second], allocations[first]
        sizes[first], sizes[second] = sizes[second], sizes[first]

    def free(self, name: str) -> None:
        allocation = self._allocations.pop(name, None)
        self._sizes.pop(name, None)
        if allocation is not None:
            allocation.free()

    def close(self) -> None:
        for name in list(self._allocations):
            self.free(name)


# ---------------------------------------------------------------------------------------------------------------
# Calibration (implicit INT8, TensorRT <= 10).


class CalibrationCacheIO(Protocol):
    """Where the calibrator reads and writes TensorRT's calibration cache (quant's keyed cache store)."""

    def read(self) -> bytes | None:
        """The cache bytes when the stored key matches exactly, else None (never a mismatching cache)."""

    def write(self, data: bytes) -> None:
        """Store `data` under the key, atomically."""


class _FeedCursor:
    """Pulls feeds one at a time. TensorRT calibrates at one shape (the first feed's): a feed of another shape (a
    short last batch, a longer utterance) is skipped with a warning and counted, never passed on."""

    def __init__(self, feeds: Iterable[Feed]) -> None:
        self._iterator: Iterator[Feed] = iter(feeds)
        self._peeked: Feed | None = None
        self.first_shapes: dict[str, Shape] | None = None
        self.count = 0
        self.skipped = 0

    def peek(self) -> Feed | None:
        if self._peeked is None:
            self._peeked = next(self._iterator, None)
        return self._peeked

    def next(self) -> Feed | None:
        while (feed := self.peek()) is not None:
            self._peeked = None
            mismatch = self._mismatch(feed)
            if mismatch is None:
                self.count += 1
                return feed
            self.skipped += 1
            log.warning("calibration: skipping a batch: %s; TensorRT calibrates at the first batch's shape "
                        "(quant.calib.readers.TrtFeedSource regroups feeds into fixed batches)", mismatch)
        return None

    def _mismatch(self, feed: Feed) -> str | None:
        shapes = {name: tuple(np.shape(value)) for name, value in feed.items()}
        if self.first_shapes is None:
            self.first_shapes = shapes
            return None
        for name, shape in shapes.items():
            expected = self.first_shapes.get(name)
            if expected is not None and expected != shape:
                return f"input {name!r} has shape {shape}, the first batch had {expected}"
        return None


def batch_size_of(feed: Feed | None) -> int:
    """The leading dimension shared by the feed's arrays (1 when there is no feed or only scalars)."""
    if not feed:
        return 1
    sizes = {int(np.shape(value)[0]) for value in feed.values() if np.ndim(value) > 0}
    if len(sizes) > 1:
        raise CalibrationError(f"calibration feed arrays disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def make_calibrator(feeds: Iterable[Feed], cache_io: CalibrationCacheIO | None = None) -> Any:
    """An IInt8EntropyCalibrator2 drawing its batches from `feeds` (an iterable of {input name: array})."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Copies each feed to device buffers; TensorRT calls these methods from C++, so errors are kept for later."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cursor = _FeedCursor(feeds)
            self.buffers = DeviceBuffers()
            self.cache_io = cache_io
            self.error: BaseException | None = None
            self.cache_hit = False

        def get_batch_size(self) -> int:
            try:
                return batch_size_of(self.cursor.peek())
            except Exception as error:
                self._fail(error)
                return 1

        def get_batch(self, names: list[str]) -> list[int] | None:  # type: ignore[override]  # None ends calibration
            try:
                return self._next_pointers(names)
            except Exception as error:
                self._fail(error)
                return None

        def read_calibration_cache(self) -> bytes | None:  # None: no usable cache, calibrate
            try:
                data = self.cache_io.read() if self.cache_io is not None else None
            except Exception as error:
                self._fail(error)
                return None
            self.cache_hit = data is not None
            if self.cache_hit:
                log.info("calibration cache hit: TensorRT skips calibration")
            return data

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                if self.cache_io is not None:
                    self.cache_io.write(bytes(cache))
            except Exception as error:
                self._fail(error)

        def _next_pointers(self, names: Sequence[str]) -> list[int] | None:
            feed = self.cursor.next()
            if feed is None:
                log.info("calibration: %d batches fed, %d skipped", self.cursor.count, self.cursor.skipped)
                return None
            missing = [name for name in names if name not in feed]
            if missing:
                raise CalibrationError(
                    f"calibration batch {self.cursor.count} has no input {missing[0]!r} (TensorRT asked for "
                    f"{list(names)}, the feed has {sorted(feed)}): use the reader made for this ONNX model"
                )
            return [self._upload(name, feed[name]) for name in names]

        def _upload(self, name: str, value: np.ndarray) -> int:
            array = np.ascontiguousarray(value)
            buffer = self.buffers.ensure(name, array.nbytes)
            cuda.memcpy_htod(buffer, array)
            return int(buffer)

        def _fail(self, error: BaseException) -> None:
            """Log and keep the error: raising into TensorRT's C++ caller would lose it; build_engine re-raises."""
            log.error("calibrator failed: %s", error)
            if self.error is None:
                self.error = error

        def raise_pending(self) -> None:
            """Re-raise, on the Python side, the first error that happened inside a TensorRT callback."""
            if self.error is not None:
                error, self.error = self.error, None
                if isinstance(error, CalibrationError):
                    raise error
                raise CalibrationError(f"calibration failed: {type(error).__name__}: {error}") from error

        def close(self) -> None:
            self.buffers.close()

    return EntropyCalibrator()


# ---------------------------------------------------------------------------------------------------------------
# Building.


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides how an engine is built (recorded beside it)."""

    precision: str = "fp32"
    mode: str = "implicit"
    constraints: str = "obey"
    layer_precisions: tuple[tuple[str, str], ...] = ()  # (ONNX node name, "fp32" | "fp16")
    profiles: tuple[tuple[tuple[str, tuple[Shape, Shape, Shape]], ...], ...] = ()
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def __post_init__(self) -> None:
        if self.constraints not in CONSTRAINTS:
            raise BuildError(f"unknown constraints {self.constraints!r}: choose obey or prefer")
        for node, precision in self.layer_precisions:
            if precision not in ("fp32", "fp16"):
                raise BuildError(f"layer precision for {node!r} is {precision!r}; TensorRT rules take fp32 or fp16")

    @property
    def implicit_int8(self) -> bool:
        return self.precision == "int8" and self.mode == "implicit"

    @property
    def applies_layer_precisions(self) -> bool:
        return self.mode == "implicit" and self.precision != "fp32" and bool(self.layer_precisions)


def make_spec(
    precision: str = "fp32",
    mode: str = "implicit",
    layer_precisions: Mapping[str, str] | None = None,
    constraints: str = "obey",
    profiles: Sequence[ProfileSpec] = (),
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> EngineSpec:
    """An EngineSpec; rule decisions other than fp32/fp16 (int8: TensorRT chooses) are left unconstrained."""
    frozen_profiles = tuple(
        tuple((name, (tuple(lo), tuple(opt), tuple(hi))) for name, (lo, opt, hi) in profile.items())
        for profile in profiles
    )
    pinned = {node: p for node, p in (layer_precisions or {}).items() if p in ("fp32", "fp16")}
    return EngineSpec(
        precision=precision,
        mode=mode,
        constraints=constraints,
        layer_precisions=tuple(sorted(pinned.items())),
        profiles=frozen_profiles,
        workspace_bytes=workspace_bytes,
    )


def _network_flags(caps: Capabilities, spec: EngineSpec) -> int:
    flags = 0
    if caps.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # may go once implied (11)
    if strongly_typed is not None and (caps.strongly_typed_required or (caps.strongly_typed and spec.mode == "explicit")):
        flags |= 1 << int(strongly_typed)
    return flags


def _parser_errors(parser: trt.OnnxParser, onnx_path: Path) -> str:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node_name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        lines.append(f"node {error.node()} {node_name!r} ({operator}): {error.desc()}")
    return f"TensorRT could not parse {onnx_path}: " + "; ".join(lines)


def parse_onnx(builder: trt.Builder, logger: trt.ILogger, onnx_path: Path, flags: int) -> trt.INetworkDefinition:
    """The network parsed from `onnx_path`; BuildError listing the failing nodes otherwise."""
    if not onnx_path.is_file():
        raise BuildError(f"ONNX model {onnx_path} does not exist: export it first (quant export)")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(_parser_errors(parser, onnx_path))
    return network


def _set_precision_flags(config: trt.IBuilderConfig, caps: Capabilities, spec: EngineSpec) -> None:
    if spec.mode == "explicit" and caps.strongly_typed:
        return  # strongly typed: precisions come from the ONNX itself; builder flags are not allowed
    if spec.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if spec.applies_layer_precisions:
        obey = spec.constraints == "obey"
        flag = trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS if obey else trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS
        config.set_flag(flag)


def _make_profile(builder: trt.Builder, shapes: Iterable[tuple[str, tuple[Shape, Shape, Shape]]]) -> Any:
    profile = builder.create_optimization_profile()
    for name, (lowest, optimal, highest) in shapes:
        profile.set_shape(name, trt.Dims(list(lowest)), trt.Dims(list(optimal)), trt.Dims(list(highest)))
    return profile


def dims_tuple(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    types = {
        trt.float32: np.float32,
        trt.float16: np.float16,
        trt.int8: np.int8,
        trt.int32: np.int32,
        trt.int64: np.int64,
        trt.uint8: np.uint8,
        trt.bool: np.bool_,
    }
    if dtype not in types:
        raise ModelError(f"TensorRT tensor type {dtype} has no numpy equivalent quant can feed")
    return np.dtype(types[dtype])


def network_inputs(network: trt.INetworkDefinition) -> dict[str, Shape]:
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    return {tensor.name: dims_tuple(tensor.shape) for tensor in tensors}


def _check_profiles(inputs: Mapping[str, Shape], spec: EngineSpec) -> None:
    dynamic = sorted(name for name, shape in inputs.items() if any(dim < 0 for dim in shape))
    for index, profile in enumerate(spec.profiles):
        names = {name for name, _ in profile}
        unknown = sorted(names - set(inputs))
        missing = sorted(set(dynamic) - names)
        if unknown or missing:
            raise BuildError(
                f"optimization profile {index}: unknown inputs {unknown}, dynamic inputs without shapes {missing} "
                f"(network inputs: {dict(inputs)})"
            )
    if dynamic and not spec.profiles:
        raise BuildError(f"inputs {dynamic} have dynamic dimensions: give an optimization profile for them")


def add_profiles(builder: trt.Builder, config: trt.IBuilderConfig, spec: EngineSpec, inputs: Mapping[str, Shape]) -> None:
    _check_profiles(inputs, spec)
    for profile_shapes in spec.profiles:
        config.add_optimization_profile(_make_profile(builder, profile_shapes))


def set_calibration_profile(
    builder: trt.Builder, config: trt.IBuilderConfig, inputs: Mapping[str, Shape], first_feed: Feed
) -> None:
    """TensorRT calibrates dynamic-shape networks at one shape: the calibration feeds' (OPT = MIN = MAX)."""
    if not any(dim < 0 for shape in inputs.values() for dim in shape):
        return
    shapes = []
    for name in inputs:
        if name not in first_feed:
            raise CalibrationError(f"the calibration feeds have no input {name!r} (they have {sorted(first_feed)})")
        shape = tuple(int(dim) for dim in np.shape(first_feed[name]))
        shapes.append((name, (shape, shape, shape)))
    config.set_calibration_profile(_make_profile(builder, shapes))


_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.+?)\]")
_SEPARATORS = ("_", ".", "/", " ", "[", ":")


def onnx_node_of(layer_name: str, metadata: str, node_names: Sequence[str]) -> str | None:
    """The ONNX node a TensorRT layer came from: the parser's metadata, the exact name, or a name prefix."""
    match = _ONNX_LAYER.search(metadata or "")
    if match and match.group(1) in node_names:
        return match.group(1)
    if layer_name in node_names:
        return layer_name
    prefixes = [node for node in node_names if layer_name.startswith(node) and layer_name[len(node)] in _SEPARATORS]
    return max(prefixes, key=len) if prefixes else None


def apply_layer_precisions(network: trt.INetworkDefinition, layer_precisions: Mapping[str, str]) -> list[str]:
    """Pin the layers derived from constrained ONNX nodes to fp32/fp16; returns the layer names changed."""
    dtypes = {"fp32": trt.float32, "fp16": trt.float16}
    float_types = (trt.float32, trt.float16)
    node_names = list(layer_precisions)
    changed = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        node = onnx_node_of(layer.name, getattr(layer, "metadata", ""), node_names)
        if node is None:
            continue
        float_outputs = [i for i in range(layer.num_outputs) if layer.get_output(i).dtype in float_types]
        if not float_outputs:
            continue  # shape/index arithmetic: pinning it to a float precision cannot be obeyed
        dtype = dtypes[layer_precisions[node]]
        layer.precision = dtype
        for output in float_outputs:
            layer.set_output_type(output, dtype)
        changed.append(layer.name)
    unmatched = sorted(set(node_names) - {onnx_node_of(name, "", node_names) for name in changed})
    log.info("layer precision: %d layers pinned from %d rule nodes", len(changed), len(node_names))
    if unmatched:
        log.debug("rule nodes with no TensorRT layer (folded or fused away by the parser): %s", unmatched)
    return changed


def load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """Reuse the timing cache at `path` when it belongs to this GPU and TensorRT; otherwise start an empty one."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        usable = config.set_timing_cache(config.create_timing_cache(data), False)
    except Exception as error:  # TensorRT raises on a blob it cannot deserialize
        log.debug("timing cache %s: %s", path, error)
        usable = False
    if not usable:
        log.warning("timing cache %s does not match this GPU/TensorRT; starting an empty one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def save_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    if path is not None:
        atomic_write_bytes(path, bytes(config.get_timing_cache().serialize()))


def gpu_info() -> dict[str, str]:
    """Name and compute capability of the current CUDA device."""
    device = cuda.Context.get_device()
    major, minor = device.compute_capability()
    return {"gpu_name": str(device.name()), "compute_capability": f"{major}.{minor}"}


def _build_config(builder: trt.Builder, caps: Capabilities, spec: EngineSpec, timing_cache: Path | None) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    _set_precision_flags(config, caps, spec)
    load_timing_cache(config, timing_cache)
    return config


def _serialize(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> bytes:
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine: run with -v for TensorRT's log")
    return bytes(serialized)


def _attach_calibrator(
    builder: trt.Builder,
    config: trt.IBuilderConfig,
    inputs: Mapping[str, Shape],
    feeds: Iterable[Feed] | None,
    cache_io: CalibrationCacheIO | None,
) -> Any:
    cached = cache_io.read() if cache_io is not None else None
    if feeds is None and cached is None:
        raise CalibrationError("implicit INT8 needs calibration feeds or a matching calibration cache")
    calibrator = make_calibrator(feeds if feeds is not None else (), cache_io)
    config.int8_calibrator = calibrator
    first_feed = calibrator.cursor.peek()
    if first_feed is None and cached is None:
        raise CalibrationError("the calibration feed source is empty: give calibration audio (a manifest)")
    if first_feed is not None:  # also with a cache: TensorRT may find it incompatible and calibrate after all
        set_calibration_profile(builder, config, inputs, first_feed)
    return calibrator


def build_engine(
    onnx_path: Path,
    out_dir: Path | None = None,
    precision: str = "fp32",
    mode: str = "implicit",
    *,
    engine_path: Path | None = None,
    feeds: Iterable[Feed] | Any = None,
    cache_io: CalibrationCacheIO | None = None,
    layer_precisions: Mapping[str, str] | Sequence[tuple[str, str]] | Path | None = None,
    constraints: str = "obey",
    profiles: Sequence[ProfileSpec] | None = None,
    timing_cache_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Build `out_dir/model.engine` (or `engine_path`) from `onnx_path`, with `<engine>.json` beside it.

    precision fp32 | fp16 | int8; mode implicit (TensorRT <= 10: builder flags, calibrator, layer precision) or
    explicit (the ONNX carries the precisions: Q/DQ or FP16 ONNX; strongly typed on >= 10).
    Implicit INT8 calibration: `feeds` (iterable of {input: array} with fixed shapes, or a TrtFeedSource) and/or
    `cache_io` (read/write of a calibration cache; quant.artifacts.trt_build.cache_io_for makes one for a named
    cache file or quant's keyed store: this backend knows no store).
    `layer_precisions`: ONNX node -> fp32 | fp16 (quant.precision's TensorRT list, or a JSON file of it).
    `profiles`: [{input: (min, opt, max)}]; default: the known models' profiles (trt_inputs.default_profiles).
    `meta` goes into `<engine>.json` (its "cache_key" is None unless the caller names the key it calibrated under).
    """
    version = str(require_tensorrt().__version__)
    onnx_path = Path(onnx_path)
    engine_path = _engine_path(out_dir, engine_path)
    rules = load_layer_precisions(layer_precisions)
    check_mode(capabilities(version), precision, mode, any(p in ("fp32", "fp16") for p in rules.values()))
    check_onnx_for_mode(onnx_path, precision, mode)
    spec = make_spec(precision, mode, rules, constraints, profiles or (), workspace_bytes)
    extra = {"cache_key": None, **dict(meta or {})}
    return _build(onnx_path, engine_path, spec, as_feed_dicts(feeds), cache_io, timing_cache_path, extra)


def _engine_path(out_dir: Path | None, engine_path: Path | None) -> Path:
    if engine_path is not None:
        return Path(engine_path)
    if out_dir is None:
        raise BuildError("build_engine needs out_dir or engine_path")
    return Path(out_dir) / ENGINE_FILE


def _build(
    onnx_path: Path,
    engine_path: Path,
    spec: EngineSpec,
    feeds: Iterable[Feed] | None,
    cache_io: CalibrationCacheIO | None,
    timing_cache_path: Path | None,
    meta: Mapping[str, Any],
) -> Path:
    caps = capabilities(str(trt.__version__))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = parse_onnx(builder, logger, onnx_path, _network_flags(caps, spec))
    inputs = network_inputs(network)
    spec = _with_default_profiles(spec, inputs)
    config = _build_config(builder, caps, spec, timing_cache_path)
    add_profiles(builder, config, spec, inputs)
    if spec.applies_layer_precisions:
        apply_layer_precisions(network, dict(spec.layer_precisions))
    calibrator = _attach_calibrator(builder, config, inputs, feeds, cache_io) if spec.implicit_int8 else None
    try:
        engine_bytes = _serialize(builder, network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
            calibrator.raise_pending()
    save_timing_cache(config, timing_cache_path)
    return write_engine(engine_path, engine_bytes, caps, spec, meta, calibrator)


def _with_default_profiles(spec: EngineSpec, inputs: Mapping[str, Shape]) -> EngineSpec:
    if spec.profiles:
        return spec
    profiles = default_profiles(inputs)
    return make_spec(spec.precision, spec.mode, dict(spec.layer_precisions), spec.constraints, profiles,
                     spec.workspace_bytes)


def _calibration_record(calibrator: Any) -> dict[str, Any]:
    cursor = calibrator.cursor
    return {"cache_hit": calibrator.cache_hit, "batches": cursor.count, "skipped_batches": cursor.skipped}


def meta_path_of(engine_path: Path) -> Path:
    """`model.engine` -> `model.engine.json`: the engine's own record (the artifact folder's meta.json is the build's)."""
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def write_engine(
    engine_path: Path, engine_bytes: bytes, caps: Capabilities, spec: EngineSpec, extra: Mapping[str, Any], calibrator: Any
) -> Path:
    atomic_write_bytes(engine_path, engine_bytes)
    meta = {
        "backend": "tensorrt",
        "tensorrt_version": caps.version,
        **gpu_info(),
        "precision": spec.precision,
        "mode": spec.mode,
        "strongly_typed": caps.strongly_typed_required or (caps.strongly_typed and spec.mode == "explicit"),
        "constraints": spec.constraints if spec.applies_layer_precisions else None,
        "layer_precisions": dict(spec.layer_precisions),
        "profiles": [{name: shapes for name, shapes in profile} for profile in spec.profiles],
        "calibration": None if calibrator is None else _calibration_record(calibrator),
        **dict(extra),
    }
    atomic_write_json(meta_path_of(engine_path), meta)
    log.info("wrote %s (%d bytes)", engine_path, len(engine_bytes))
    return Path(engine_path)


# ---------------------------------------------------------------------------------------------------------------
# Running.


def read_meta(engine_path: Path) -> dict[str, Any]:
    meta_path = meta_path_of(engine_path)
    if not meta_path.is_file():
        raise ModelError(
            f"{meta_path} is missing: quant only runs engines it built (quant build MODEL --backend trt), "
            "or pass check_compatibility=False for an engine you vouch for"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    return meta


def check_compatible(meta: Mapping[str, Any], engine_path: Path) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU."""
    here = {"tensorrt_version": str(trt.__version__), **gpu_info()}
    different = [key for key, value in here.items() if str(meta.get(key)) != value]
    if different:
        built = ", ".join(f"{key}={meta.get(key)}" for key in different)
        now = ", ".join(f"{key}={here[key]}" for key in different)
        raise BackendUnavailable(
            f"engine {engine_path} was built with {built}, but this machine has {now}: TensorRT engines only run "
            "on the GPU and TensorRT version they were built for; rebuild it here with quant build MODEL --backend trt"
        )


class TrtRunner:
    """Runs a serialized engine: inputs bound by name, shapes set per call, execute_async_v3 on a CUDA stream."""

    def __init__(self, engine_path: Path, check_compatibility: bool = True) -> None:
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise ModelError(f"engine {self.engine_path} does not exist: build it with quant build MODEL --backend trt")
        if check_compatibility:
            check_compatible(read_meta(self.engine_path), self.engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT could not load {self.engine_path}: rebuild it with quant build")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.buffers = DeviceBuffers()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self.dtypes = {name: numpy_dtype(self.engine.get_tensor_dtype(name)) for name in names}

    def run(self, feeds: Feed) -> dict[str, np.ndarray]:
        self._check_feed_names(feeds, self.input_names)
        for name in self.input_names:
            self._upload(name, feeds[name])
        return self._execute(self.output_names)

    def _check_feed_names(self, feeds: Feed, expected: Sequence[str]) -> None:
        missing = [name for name in expected if name not in feeds]
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise ModelError(
                f"engine {self.engine_path} takes inputs {list(expected)}; feeds miss {missing}, "
                f"have unknown {unknown}"
            )

    def _upload(self, name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value, dtype=self.dtypes[name])
        if not self.context.set_input_shape(name, array.shape):
            raise ModelError(f"input {name!r} shape {array.shape} is outside the engine's optimization profile")
        buffer = self.buffers.ensure(name, array.nbytes)
        cuda.memcpy_htod_async(buffer, array, self.stream)
        self.context.set_tensor_address(name, int(buffer))

    def _bind_output(self, name: str) -> np.ndarray:
        shape = dims_tuple(self.context.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            raise ModelError(f"output {name!r} shape {shape} is unresolved: set every input shape first")
        host = np.empty(shape, dtype=self.dtypes[name])
        self.context.set_tensor_address(name, int(self.buffers.ensure(name, host.nbytes)))
        return host

    def _execute(self, fetch: Sequence[str]) -> dict[str, np.ndarray]:
        hosts = {name: self._bind_output(name) for name in self.output_names}
        if not self.context.execute_async_v3(self.stream.handle):
            raise ModelError(f"TensorRT failed to execute {self.engine_path}: run with -v for TensorRT's log")
        for name in fetch:
            cuda.memcpy_dtoh_async(hosts[name], self.buffers.get(name), self.stream)
        self.stream.synchronize()
        return {name: hosts[name] for name in fetch}

    def close(self) -> None:
        self.buffers.close()


STATE_OUTPUT_SUFFIX = "_out"


def state_pairs(input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, str]:
    """State input -> its output (`x` <-> `x_out`), for streaming models."""
    outputs = set(output_names)
    return {name: name + STATE_OUTPUT_SUFFIX for name in input_names if name + STATE_OUTPUT_SUFFIX in outputs}


class StreamingTrtRunner(TrtRunner):
    """A frame-by-frame runner whose recurrent states stay on the GPU between frames.

    After each frame the device buffers of the state outputs become the next frame's state inputs by swapping
    pointers: no host copies. `reset()` zeroes the states (call it at each utterance start). `run(feeds)` takes the
    non-state inputs; state inputs given in `feeds` are uploaded (overriding the device states) and state outputs
    are copied back only with return_states=True.
    """

    def __init__(self, engine_path: Path, check_compatibility: bool = True, return_states: bool = False) -> None:
        super().__init__(engine_path, check_compatibility)
        self.states = state_pairs(self.input_names, self.output_names)
        if not self.states:
            raise ModelError(f"engine {self.engine_path} has no state pair (input x with output x_out)")
        self.frame_inputs = [name for name in self.input_names if name not in self.states]
        self.return_states = return_states
        self._needs_reset = True

    def reset(self) -> None:
        """Zero every state on the device (one small upload per state): call it at each utterance start."""
        for name in self.states:
            zeros = np.zeros(self._state_shape(name), dtype=self.dtypes[name])
            self.context.set_input_shape(name, zeros.shape)
            cuda.memcpy_htod_async(self.buffers.ensure(name, zeros.nbytes), zeros, self.stream)
        self._needs_reset = False

    def _state_shape(self, name: str) -> Shape:
        """The state's static shape, or for a dynamic one the OPT shape of profile 0 (batch 1 for streaming)."""
        shape = dims_tuple(self.engine.get_tensor_shape(name))
        if all(dim >= 0 for dim in shape):
            return shape
        return dims_tuple(self.engine.get_tensor_profile_shape(name, 0)[1])

    def run(self, feeds: Feed) -> dict[str, np.ndarray]:
        self._check_feed_names(feeds, self.frame_inputs)
        if self._needs_reset:
            self.reset()
        for name in self.input_names:
            if name in feeds:
                self._upload(name, feeds[name])
            else:
                self.context.set_tensor_address(name, int(self.buffers.get(name)))
        fetch = self.output_names if self.return_states else [n for n in self.output_names if n not in self.states.values()]
        outputs = self._execute(fetch)
        for state_in, state_out in self.states.items():
            self.buffers.swap(state_in, state_out)
        return outputs


def runner_for(engine_path: Path, streaming: bool | None = None, **options: Any) -> TrtRunner:
    """A TrtRunner, or a StreamingTrtRunner when the engine has state pairs (or `streaming` says so)."""
    runner = TrtRunner(engine_path, **options)
    if streaming is False or (streaming is None and not state_pairs(runner.input_names, runner.output_names)):
        return runner
    runner.close()
    return StreamingTrtRunner(engine_path, **options)


__all__ = [
    "Capabilities",
    "EngineSpec",
    "StreamingTrtRunner",
    "TrtRunner",
    "build_engine",
    "capabilities",
    "check_mode",
    "make_calibrator",
    "make_spec",
    "require_pycuda",
    "require_tensorrt",
    "runner_for",
]
