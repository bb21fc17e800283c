"""A strict fake of the TensorRT Python API subset quant uses, built per version (8.6 / 10.x / 11.x).

It enforces the contract rather than merely accepting calls:
- the ONNX parser needs an explicit-batch network before 10, reports unsupported nodes with node index/name/op;
- IInt8EntropyCalibrator2 subclasses must call the base __init__ (checked at construction, as pybind11 does);
- a build drives the calibrator like TensorRT: read_calibration_cache first; when it gives nothing usable,
  get_batch(names) until None/[], checking exactly len(names) int device pointers to allocations large enough for
  the calibration shape; then write_calibration_cache(bytes). A cache whose header names another TensorRT version
  or algorithm is ignored (TensorRT does that silently);
- precision flags and layer precision are refused on strongly typed networks and absent on 11;
- dynamic inputs need a profile per dynamic input and, for calibration, a calibration profile;
- engines are version-locked; an execution context checks shapes against the profile, binds tensors by name and
  execute_async_v3 runs the real ONNX with onnxruntime on the fake device buffers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .fake_pycuda import DeviceState

log = logging.getLogger("trt_double")

ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"
TIMING_MAGIC = b"FAKE-TRT-TIMING\n"
UNSUPPORTED_OPS = frozenset({"NotATensorRTOp"})


@dataclass
class TrtState:
    """What the fake saw, for tests to assert on."""

    version: str
    errors: list[str] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    calibration_names: list[list[str]] = field(default_factory=list)
    calibration_batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    cache_reads: int = 0
    cache_written: bytes | None = None
    calibrator_calls: list[str] = field(default_factory=list)
    executions: int = 0
    reverse_calibration_names: bool = False

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def digits(self) -> str:
        major, minor, patch = (int(part) for part in (self.version.split(".") + ["0", "0"])[:3])
        return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)

    def fail(self, message: str) -> None:
        log.error("fake TensorRT: %s", message)
        self.errors.append(message)


class _Enum:
    def __init__(self, kind: str, name: str, value: int) -> None:
        self.kind, self.name, self.value = kind, name, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.kind}.{self.name}: {self.value}>"


def _enum(kind: str, names: list[str]) -> type:
    return type(kind, (), {name: _Enum(kind, name, value) for value, name in enumerate(names)})


class Dims:
    def __init__(self, shape: Any = ()) -> None:
        self._dims = [int(dim) for dim in shape]

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index: int) -> int:
        return self._dims[index]

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (Dims, tuple, list)) else NotImplemented

    def __repr__(self) -> str:
        return f"Dims({self._dims})"


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (Dims, tuple, list)):
        raise TypeError(f"expected Dims, tuple or list, got {type(value).__name__}")
    return tuple(int(value[i]) for i in range(len(value)))


class FakeHostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


def make_tensorrt(version: str, device: DeviceState) -> tuple[types.ModuleType, TrtState]:
    """A fresh `tensorrt` module of `version` and the state it records into."""
    state = TrtState(version)
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    _add_types(module, state)
    _add_network(module, state)
    _add_builder(module, state, device)
    _add_runtime(module, state, device)
    return module, state


# ---------------------------------------------------------------------------------------------------------------


def _add_types(module: types.ModuleType, state: TrtState) -> None:
    data_type = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64"])
    module.DataType = data_type
    aliases = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "bool": "BOOL",
               "uint8": "UINT8", "int64": "INT64"}
    for alias, name in aliases.items():
        setattr(module, alias, getattr(data_type, name))
    module.Dims = Dims
    module.TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    module.MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE"])
    creation = ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if state.major < 11 else ["_REMOVED", "STRONGLY_TYPED"]
    if state.major < 10:
        creation = ["EXPLICIT_BATCH"]
    module.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation)
    flags = ["FP16", "INT8", "DEBUG", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    module.BuilderFlag = _enum("BuilderFlag", flags if state.major < 11 else ["_GONE1", "_GONE2", "DEBUG"])

    class Logger:
        Severity = _enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
        WARNING = Severity.WARNING  # type: ignore[attr-defined]

        def __init__(self, min_severity: Any = None) -> None:
            self.min_severity = min_severity

    module.ILogger = Logger
    module.Logger = Logger

    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
                   "UINT8": np.uint8, "INT64": np.int64}
    module.nptype = lambda dtype: numpy_types[dtype.name]
    if state.major < 11:
        _add_calibrator_bases(module, state)


class _PybindInitCheck(type):
    """pybind11 refuses an instance whose overridden __init__ did not call the bound base __init__."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = cls.__new__(cls)
        instance.__init__(*args, **kwargs)
        if not instance.__dict__.get("_trt_base_initialized"):
            raise TypeError(f"tensorrt.tensorrt.{cls.__mro__[-3].__name__}.__init__() must be called when overriding "
                            "__init__")
        return instance


def _add_calibrator_bases(module: types.ModuleType, state: TrtState) -> None:
    class IInt8Calibrator(metaclass=_PybindInitCheck):
        def __init__(self) -> None:
            self._trt_base_initialized = True

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        pass

    IInt8Calibrator.__name__ = "IInt8Calibrator"
    module.IInt8Calibrator = IInt8Calibrator
    module.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2


# ---------------------------------------------------------------------------------------------------------------
# Network + ONNX parser.

_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8", 7: "INT64"}


class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.name, self.shape, self.dtype = name, Dims(shape), dtype

    def is_shape_tensor(self) -> bool:
        return False


def _add_network(module: types.ModuleType, state: TrtState) -> None:
    class ILayer:
        def __init__(self, name: str, op_type: str, outputs: list[ITensor], metadata: str) -> None:
            self.name, self.type, self._outputs, self.metadata = name, op_type, outputs, metadata
            self._precision: Any = None
            self.output_types: dict[int, Any] = {}

        @property
        def precision(self) -> Any:
            self._require_precision_api()
            return self._precision or module.float32

        @precision.setter
        def precision(self, dtype: Any) -> None:
            self._require_precision_api()
            if not isinstance(dtype, _Enum) or dtype.kind != "DataType":
                raise TypeError(f"layer precision must be a DataType, got {dtype!r}")
            self._precision = dtype

        @property
        def precision_is_set(self) -> bool:
            return self._precision is not None

        def set_output_type(self, index: int, dtype: Any) -> None:
            self._require_precision_api()
            if not 0 <= index < len(self._outputs):
                raise IndexError(f"layer {self.name} has {len(self._outputs)} outputs, not index {index}")
            if self._outputs[index].dtype.name not in ("FLOAT", "HALF"):
                raise ValueError(f"set_output_type on non-float output {self._outputs[index].name}")
            self.output_types[index] = dtype

        def _require_precision_api(self) -> None:
            if state.major >= 11:
                raise AttributeError("'tensorrt.ILayer' object has no attribute 'precision' (removed in 11.0)")

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            names = module.NetworkDefinitionCreationFlag
            self.explicit_batch = state.major >= 10 or bool(flags & (1 << int(names.EXPLICIT_BATCH)))
            strong = getattr(names, "STRONGLY_TYPED", None)
            self.strongly_typed = state.major >= 11 or (strong is not None and bool(flags & (1 << int(strong))))
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.layers: list[ILayer] = []
            self.onnx_path: str | None = None
            self.has_qdq = False

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, index: int) -> ILayer:
            return self.layers[index]

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_output(self, index: int) -> ITensor:
            return self.outputs[index]

    class ParserError:
        def __init__(self, node: int, node_name: str, operator: str, desc: str) -> None:
            self._node, self._name, self._operator, self._desc = node, node_name, operator, desc
            if state.major >= 10:
                self.node_name = lambda: self._name
                self.node_operator = lambda: self._operator

        def node(self) -> int:
            return self._node

        def desc(self) -> str:
            return self._desc

        def code(self) -> str:
            return "UNSUPPORTED_NODE"

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            if not isinstance(network, INetworkDefinition):
                raise TypeError("OnnxParser needs an INetworkDefinition")
            self.network = network
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse_from_file(self, path: str) -> bool:
            if not isinstance(path, str):
                raise TypeError("parse_from_file takes a str path")
            if not self.network.explicit_batch:
                self.errors.append(ParserError(-1, "", "", "the ONNX parser requires an EXPLICIT_BATCH network"))
                return False
            return _parse_into(self, Path(path))

    def _parse_into(parser: OnnxParser, path: Path) -> bool:
        import onnx

        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        graph, network = model.graph, parser.network
        types_by_name = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        for index, node in enumerate(graph.node):
            if node.op_type in UNSUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                parser.errors.append(ParserError(index, node.name, node.op_type, f"No importer for op {node.op_type}"))
        if parser.errors:
            return False
        weights = {init.name for init in graph.initializer}
        network.inputs = [_tensor(v, module) for v in graph.input if v.name not in weights]
        network.outputs = [_tensor(v, module) for v in graph.output]
        for index, node in enumerate(graph.node):
            name = node.name or f"(Unnamed Layer* {index}) [{node.op_type}]"
            outputs = [ITensor(o, (), getattr(module.DataType, _ONNX_TYPES.get(types_by_name.get(o, 1), "FLOAT")))
                       for o in node.output]
            metadata = f"[ONNX Layer: {node.name}]" if state.major >= 10 and node.name else ""
            network.layers.append(ILayer(name, node.op_type, outputs, metadata))
        network.onnx_path = str(path)
        network.has_qdq = any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)
        return True

    module.INetworkDefinition = INetworkDefinition
    module.OnnxParser = OnnxParser
    module.ParserError = ParserError
    module.ILayer = ILayer


def _tensor(value: Any, module: types.ModuleType) -> ITensor:
    dims = value.type.tensor_type.shape.dim
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in dims)
    dtype = getattr(module.DataType, _ONNX_TYPES.get(value.type.tensor_type.elem_type, "FLOAT"))
    return ITensor(value.name, shape, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Builder, config, profiles, timing cache, calibration.


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        lowest, optimal, highest = _shape(min), _shape(opt), _shape(max)
        if not len(lowest) == len(optimal) == len(highest):
            raise ValueError(f"profile shapes of {input} differ in rank")
        if not all(0 < a <= b <= c for a, b, c in zip(lowest, optimal, highest)):
            raise ValueError(f"profile of {input} needs 0 < min <= opt <= max, got {lowest} {optimal} {highest}")
        self.shapes[input] = (lowest, optimal, highest)


class ITimingCache:
    def __init__(self, data: bytes, version: str) -> None:
        self.valid = data == b"" or data.startswith(TIMING_MAGIC)
        header = json.loads(data[len(TIMING_MAGIC):]) if self.valid and data else {"version": version, "entries": 0}
        self.version, self.entries = header["version"], header["entries"]

    def serialize(self) -> FakeHostMemory:
        return FakeHostMemory(TIMING_MAGIC + json.dumps({"version": self.version, "entries": self.entries}).encode())


def _add_builder(module: types.ModuleType, state: TrtState, device: DeviceState) -> None:
    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self._calibrator: Any = None
            self.pool_limits: dict[str, int] = {}
            self.timing_cache: ITimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            if not isinstance(flag, _Enum) or flag.kind != "BuilderFlag":
                raise TypeError(f"set_flag takes a BuilderFlag, got {flag!r}")
            self.flags.add(flag.name)

        def get_flag(self, flag: Any) -> bool:
            return flag.name in self.flags

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            self.pool_limits[pool.name] = int(pool_size)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("add_optimization_profile takes an IOptimizationProfile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
            return ITimingCache(bytes(serialized_timing_cache), state.version)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if not cache.valid or (cache.version != state.version and not ignore_mismatch):
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    if state.major < 11:

        def set_calibration_profile(self: IBuilderConfig, profile: IOptimizationProfile) -> bool:
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("set_calibration_profile takes an IOptimizationProfile")
            self.calibration_profile = profile
            return True

        def _get_calibrator(self: IBuilderConfig) -> Any:
            return self._calibrator

        def _set_calibrator(self: IBuilderConfig, calibrator: Any) -> None:
            if not isinstance(calibrator, module.IInt8Calibrator):
                raise TypeError(f"int8_calibrator must be an IInt8Calibrator, got {type(calibrator).__name__}")
            self._calibrator = calibrator

        IBuilderConfig.set_calibration_profile = set_calibration_profile  # type: ignore[attr-defined]
        IBuilderConfig.int8_calibrator = property(_get_calibrator, _set_calibrator)  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: Any) -> None:
            if not isinstance(logger, module.ILogger):
                raise TypeError("Builder needs a tensorrt.ILogger")

        def create_network(self, flags: int = 0) -> Any:
            known = sum(1 << int(value) for value in vars(module.NetworkDefinitionCreationFlag).values()
                        if isinstance(value, _Enum) and not value.name.startswith("_"))
            if not isinstance(flags, int) or flags & ~known:
                raise ValueError(f"invalid network creation flags {flags!r}")
            return module.INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: Any, config: IBuilderConfig) -> FakeHostMemory | None:
            return _build(module, state, device, network, config)

    module.IBuilderConfig = IBuilderConfig
    module.IOptimizationProfile = IOptimizationProfile
    module.ITimingCache = ITimingCache
    module.Builder = Builder


def _build(module: types.ModuleType, state: TrtState, device: DeviceState, network: Any, config: Any) -> Any:
    checks: list[Callable[[], str | None]] = [
        lambda: None if network.onnx_path else "the network is empty (nothing parsed)",
        lambda: _check_profiles(network, config.profiles),
        lambda: _check_strong_typing(network, config),
    ]
    for check in checks:
        problem = check()
        if problem:
            state.fail(problem)
            return None
    calibrated = None
    if "INT8" in config.flags and not network.has_qdq:
        calibrated = _calibrate(state, device, network, config)
        if calibrated is None:
            return None
    record = {**_build_record(network, config, calibrated), "version": state.version}
    state.builds.append(record)
    if config.timing_cache is not None:
        config.timing_cache.entries += 1
    return FakeHostMemory(ENGINE_MAGIC + json.dumps(record).encode())


def _check_profiles(network: Any, profiles: list[IOptimizationProfile]) -> str | None:
    dynamic = [t for t in network.inputs if any(d < 0 for d in _shape(t.shape))]
    if dynamic and not profiles:
        return f"dynamic inputs {[t.name for t in dynamic]} need an optimization profile"
    for index, profile in enumerate(profiles):
        for tensor in network.inputs:
            static = _shape(tensor.shape)
            if tensor.name not in profile.shapes:
                if any(d < 0 for d in static):
                    return f"profile {index} has no shape for dynamic input {tensor.name}"
                continue
            for bound in profile.shapes[tensor.name]:
                if len(bound) != len(static) or any(s >= 0 and s != b for s, b in zip(static, bound)):
                    return f"profile {index} shape {bound} of {tensor.name} contradicts its static shape {static}"
        unknown = set(profile.shapes) - {t.name for t in network.inputs}
        if unknown:
            return f"profile {index} names unknown inputs {sorted(unknown)}"
    return None


def _check_strong_typing(network: Any, config: Any) -> str | None:
    if not network.strongly_typed:
        return None
    forbidden = config.flags & {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    if forbidden:
        return f"builder flags {sorted(forbidden)} are not allowed with a strongly typed network"
    pinned = [layer.name for layer in network.layers if layer.precision_is_set or layer.output_types]
    if pinned:
        return f"layer precision set on a strongly typed network: {pinned[:3]}"
    return None


def _layer_record(network: Any, config: Any) -> dict[str, Any]:
    constrained = config.flags & {"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    return {
        layer.name: {
            "precision": layer._precision.name if layer._precision is not None else None,
            "output_types": {str(i): dtype.name for i, dtype in layer.output_types.items()},
            "effective": bool(constrained),
        }
        for layer in network.layers
        if layer.precision_is_set or layer.output_types
    }


def _build_record(network: Any, config: Any, calibrated: dict[str, float] | None) -> dict[str, Any]:
    def io(tensor: Any) -> dict[str, Any]:
        return {"name": tensor.name, "dtype": tensor.dtype.name, "shape": list(_shape(tensor.shape))}

    return {
        "onnx_path": network.onnx_path,
        "strongly_typed": network.strongly_typed,
        "flags": sorted(config.flags),
        "inputs": [io(t) for t in network.inputs],
        "outputs": [io(t) for t in network.outputs],
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.shapes.items()} for p in config.profiles],
        "layers": _layer_record(network, config),
        "calibrated_amax": calibrated,
        "has_qdq": network.has_qdq,
    }


_CACHE_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


def _calibrate(state: TrtState, device: DeviceState, network: Any, config: Any) -> dict[str, float] | None:
    calibrator = getattr(config, "_calibrator", None)
    if calibrator is None:
        state.fail("INT8 without Q/DQ needs an int8_calibrator")
        return None
    ok, cache = _callback(state, "read_calibration_cache", calibrator.read_calibration_cache)
    if not ok:
        return None
    state.cache_reads += 1
    usable = _usable_cache(state, cache)
    if usable is not None:
        return usable
    shapes = _calibration_shapes(state, network, config)
    if shapes is None:
        return None
    return _run_calibration(state, device, network, calibrator, shapes)


def _usable_cache(state: TrtState, cache: Any) -> dict[str, float] | None:
    if cache is None:
        return None
    if not isinstance(cache, (bytes, bytearray, memoryview)):
        state.fail(f"read_calibration_cache returned {type(cache).__name__}, not a buffer")
        return None
    lines = bytes(cache).decode().splitlines()
    match = _CACHE_HEADER.match(lines[0]) if lines else None
    if match is None or match.group(1) != state.digits() or match.group(2) != "EntropyCalibration2":
        log.warning("fake TensorRT: ignoring an incompatible calibration cache (%s)", lines[:1])
        return None
    amax = {}
    for line in lines[1:]:
        name, _, value = line.rpartition(": ")
        bits = int(value, 16)
        amax[name] = float(np.frombuffer(bits.to_bytes(4, "big"), ">f4")[0]) * 127
    return amax


def _calibration_shapes(state: TrtState, network: Any, config: Any) -> dict[str, tuple[int, ...]] | None:
    shapes = {}
    for tensor in network.inputs:
        static = _shape(tensor.shape)
        if all(d >= 0 for d in static):
            shapes[tensor.name] = static
            continue
        profile = config.calibration_profile
        if profile is None or tensor.name not in profile.shapes:
            state.fail(f"dynamic input {tensor.name}: calibration needs set_calibration_profile")
            return None
        shapes[tensor.name] = profile.shapes[tensor.name][1]  # TensorRT calibrates at the OPT shape
    return shapes


def _run_calibration(
    state: TrtState, device: DeviceState, network: Any, calibrator: Any, shapes: dict[str, tuple[int, ...]]
) -> dict[str, float] | None:
    ok, _ = _callback(state, "get_batch_size", calibrator.get_batch_size)
    names = [tensor.name for tensor in network.inputs]
    if state.reverse_calibration_names:
        names = names[::-1]
    dtypes = {t.name: np.dtype(_numpy(t.dtype)) for t in network.inputs}
    amax: dict[str, float] = {}
    while ok:
        state.calibration_names.append(list(names))
        ok, pointers = _callback(state, "get_batch", calibrator.get_batch, list(names))
        if not ok or pointers is None or (isinstance(pointers, list) and not pointers):
            break
        batch = _read_batch(state, device, names, pointers, shapes, dtypes)
        if batch is None:
            return None
        state.calibration_batches.append(batch)
        for name, array in batch.items():
            amax[name] = max(amax.get(name, 0.0), float(np.max(np.abs(array.astype(np.float64)))))
    if not ok:
        return None
    if not state.calibration_batches:
        state.fail("calibration got no batches")
        return None
    cache = f"TRT-{state.digits()}-EntropyCalibration2\n" + "".join(
        f"{name}: {np.array(value / 127, '>f4').tobytes().hex().lstrip('0') or '0'}\n" for name, value in amax.items()
    )
    ok, _ = _callback(state, "write_calibration_cache", calibrator.write_calibration_cache, memoryview(cache.encode()))
    if ok:
        state.cache_written = cache.encode()
    return amax if ok else None


def _read_batch(state: TrtState, device: DeviceState, names: list[str], pointers: Any, shapes: dict[str, Any],
                dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray] | None:
    if not isinstance(pointers, list) or len(pointers) != len(names):
        state.fail(f"get_batch must return a list of {len(names)} device pointers, got {pointers!r}")
        return None
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in pointers):
        state.fail(f"get_batch must return ints, got {[type(p).__name__ for p in pointers]}")
        return None
    batch = {}
    for name, pointer in zip(names, pointers):
        nbytes = math.prod(shapes[name]) * dtypes[name].itemsize
        try:
            data = device.read(pointer, nbytes)
        except Exception as error:
            state.fail(f"calibration input {name}: {error}")
            return None
        batch[name] = np.frombuffer(data, dtypes[name]).reshape(shapes[name]).copy()
    return batch


def _callback(state: TrtState, name: str, function: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """TensorRT calls Python overrides from C++: an exception there is logged and fails the build."""
    state.calibrator_calls.append(name)
    try:
        return True, function(*args)
    except Exception as error:
        state.fail(f"exception in calibrator {name}: {error!r}")
        return False, None


def _numpy(dtype: Any) -> Any:
    return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
            "UINT8": np.uint8, "INT64": np.int64}[dtype.name]


# ---------------------------------------------------------------------------------------------------------------
# Runtime, engine, execution context.


def _add_runtime(module: types.ModuleType, state: TrtState, device: DeviceState) -> None:
    class ICudaEngine:
        def __init__(self, record: dict[str, Any]) -> None:
            self.record = record
            self.io = [(t, "INPUT") for t in record["inputs"]] + [(t, "OUTPUT") for t in record["outputs"]]
            self.by_name = {t["name"]: (t, mode) for t, mode in self.io}
            self._session: Any = None

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index: int) -> str:
            return str(self.io[index][0]["name"])

        def get_tensor_mode(self, name: str) -> Any:
            return getattr(module.TensorIOMode, self.by_name[name][1])

        def get_tensor_dtype(self, name: str) -> Any:
            return getattr(module.DataType, self.by_name[name][0]["dtype"])

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.by_name[name][0]["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
            tensor, mode = self.by_name[name]
            profiles = self.record["profiles"]
            if mode != "INPUT" or not 0 <= profile_index < len(profiles):
                raise ValueError(f"no profile {profile_index} shapes for {name!r}")
            if name not in profiles[profile_index]:
                return [Dims(tensor["shape"])] * 3
            return [Dims(shape) for shape in profiles[profile_index][name]]

        def create_execution_context(self) -> Any:
            return IExecutionContext(self)

        def session(self) -> Any:
            if self._session is None:
                import onnxruntime

                self._session = onnxruntime.InferenceSession(self.record["onnx_path"], providers=["CPUExecutionProvider"])
            return self._session

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            tensor, mode = self.engine.by_name.get(name, (None, None))
            if tensor is None or mode != "INPUT":
                state.fail(f"set_input_shape: {name!r} is not an input")
                return False
            wanted = _shape(shape)
            static = tuple(tensor["shape"])
            if len(wanted) != len(static) or any(s >= 0 and s != w for s, w in zip(static, wanted)):
                state.fail(f"set_input_shape {name}: {wanted} does not fit {static}")
                return False
            profile = self.engine.record["profiles"][0] if self.engine.record["profiles"] else {}
            if name in profile:
                lowest, _, highest = profile[name]
                if not all(lo <= w <= hi for lo, w, hi in zip(lowest, wanted, highest)):
                    state.fail(f"set_input_shape {name}: {wanted} outside the profile {lowest}..{highest}")
                    return False
            self.shapes[name] = wanted
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self.engine.by_name:
                state.fail(f"set_tensor_address: unknown tensor {name!r}")
                return False
            if not isinstance(memory, int):
                raise TypeError("set_tensor_address takes an int pointer")
            self.addresses[name] = memory
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            tensor, mode = self.engine.by_name[name]
            if mode == "INPUT":
                return Dims(self.shapes.get(name, tuple(tensor["shape"])))
            if not self._all_shapes_set():
                return Dims(tensor["shape"])
            return Dims(self._output_shapes()[name])

        def _all_shapes_set(self) -> bool:
            return all(t["name"] in self.shapes or min(t["shape"], default=0) >= 0 for t in self.engine.record["inputs"])

        def _input_shape(self, tensor: dict[str, Any]) -> tuple[int, ...]:
            return self.shapes.get(tensor["name"], tuple(tensor["shape"]))

        def _output_shapes(self) -> dict[str, tuple[int, ...]]:
            feeds = {t["name"]: np.zeros(self._input_shape(t), _numpy(getattr(module.DataType, t["dtype"])))
                     for t in self.engine.record["inputs"]}
            names = [t["name"] for t in self.engine.record["outputs"]]
            return {name: value.shape for name, value in zip(names, self.engine.session().run(names, feeds))}

        def execute_async_v3(self, stream_handle: int) -> bool:
            if stream_handle not in device.streams:
                state.fail(f"execute_async_v3: {stream_handle!r} is not a CUDA stream handle")
                return False
            unbound = [name for name in self.engine.by_name if name not in self.addresses]
            if unbound or not self._all_shapes_set():
                state.fail(f"execute_async_v3: unbound tensors {unbound} or unset input shapes")
                return False
            feeds = {}
            for tensor in self.engine.record["inputs"]:
                dtype = np.dtype(_numpy(getattr(module.DataType, tensor["dtype"])))
                shape = self._input_shape(tensor)
                data = device.read(self.addresses[tensor["name"]], math.prod(shape) * dtype.itemsize)
                feeds[tensor["name"]] = np.frombuffer(data, dtype).reshape(shape)
            names = [t["name"] for t in self.engine.record["outputs"]]
            for name, value in zip(names, self.engine.session().run(names, feeds)):
                device.write(self.addresses[name], np.ascontiguousarray(value).tobytes())
            state.executions += 1
            return True

    class Runtime:
        def __init__(self, logger: Any) -> None:
            if not isinstance(logger, module.ILogger):
                raise TypeError("Runtime needs a tensorrt.ILogger")

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            if not data.startswith(ENGINE_MAGIC):
                state.fail("deserialize_cuda_engine: not an engine")
                return None
            record = json.loads(data[len(ENGINE_MAGIC):])
            if record.get("version", state.version) != state.version:
                state.fail("the engine plan file is not compatible with this version of TensorRT")
                return None
            return ICudaEngine(record)

    module.Runtime = Runtime
    module.ICudaEngine = ICudaEngine
    module.IExecutionContext = IExecutionContext
