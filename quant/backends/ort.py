"""ONNX Runtime: the one place sessions are made, a runner that binds tensors by name, and the conversion helpers
the build uses (static Q/DQ quantization from our ranges, dynamic LSTM quantization, FP16 conversion, a look at the
optimized graph to see which ops really became integer kernels)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from quant.errors import BackendUnavailable, BuildError, ModelError
from quant.onnxgraph.graph import load_model
from quant.onnxgraph.shapes import infer_shapes

log = logging.getLogger(__name__)

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# Kernels of ORT's optimized graph that compute in integers (what a quantized op should turn into on CPU).
INTEGER_KERNELS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
    "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QLinearConvTranspose",
    "QAttention", "QLinearWhere",
})
OPT_LEVELS = ("disable", "basic", "extended", "all")
# `trt-sim`: TensorRT's explicit-mode numerics on the CPU. At "basic" ORT folds constants (a weight's Q becomes an
# int8 initializer) but fuses no DequantizeLinear -> op -> QuantizeLinear into its integer kernels (QLinearConv & co.
# start at "extended"), so every Q/DQ pair stays fake quantization: values on the int8 grid, float arithmetic, which
# equals int8 x int8 -> int32 accumulation rescaled by s_x * s_w up to float rounding (tests/test_trt_sim.py).
TRT_SIM_OPTIMIZATION = "basic"
# ONNX Runtime 1.31 CPU segfaults while optimizing a float16 Transpose -> MatMul (MatmulTransposeFusion together
# with the NCHWc layout pass); measured on a 2-node graph. Float16 models are loaded with that fusion off.
FP16_DISABLED_OPTIMIZERS = ("MatmulTransposeFusion",)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - onnxruntime is a hard dependency
        raise BackendUnavailable(f"onnxruntime is not importable: {error}") from None
    return onnxruntime


def make_session(
    path: str | os.PathLike[str],
    threads: int = 1,
    providers: Sequence[str] | None = None,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike[str] | None = None,
    profile_prefix: str | os.PathLike[str] | None = None,
    spinning: bool = True,
) -> Any:
    """An InferenceSession with `threads` intra-op threads, sequential execution and the given graph optimization
    level. `optimized_model_path` asks ORT to write the graph it will actually run; `profile_prefix` turns on ORT's
    profiler (per-node kernel times; `session.end_profiling()` writes `<prefix>_<date>.json` and returns its path).
    `spinning=False`: idle intra-op threads sleep instead of spin-waiting for the next kernel, leaving the CPU to other
    threads of this process (the calibration's statistics updates)."""
    ort = _ort()
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"{file}: no such ONNX model; export or build it first")
    if optimization not in OPT_LEVELS:
        raise ModelError(f"optimization level {optimization!r} is not one of {OPT_LEVELS}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    disabled = list(FP16_DISABLED_OPTIMIZERS) if optimization != "disable" and has_float16_weights(file) else []
    try:
        return ort.InferenceSession(str(file), options, providers=list(providers or ["CPUExecutionProvider"]),
                                    disabled_optimizers=disabled or None)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelError(f"{file}: ONNX Runtime cannot load it as an ONNX model: {error}") from None


def has_float16_weights(path: Path) -> bool:
    model = load_model(path, external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type
    shape: tuple[int | str | None, ...]


class OrtRunner:
    """run(feeds) -> {output name: array}; inputs are bound by name and checked before ORT sees them."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, providers: Sequence[str] | None = None,
                 optimization: str = "all") -> None:
        self.path = Path(path)
        self.session = make_session(path, threads, providers, optimization)
        self.input_specs = tuple(
            TensorSpec(i.name, ORT_DTYPES.get(i.type, np.float32), tuple(i.shape)) for i in self.session.get_inputs()
        )
        self.input_names = tuple(s.name for s in self.input_specs)
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self._check(feeds)
        names = list(outputs) if outputs is not None else list(self.output_names)
        values = self.session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, values))

    def bind(self, feeds: Mapping[str, np.ndarray], carry: Mapping[str, str] | None = None) -> OrtBoundRun:
        """The graph bound once to copies of `feeds` (checked here, not per run) for repeated runs: see
        OrtBoundRun. `carry`: state input -> the output that feeds it on the next run."""
        self._check(feeds)
        return OrtBoundRun(self, feeds, carry or {})

    def _check(self, feeds: Mapping[str, np.ndarray]) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ModelError(f"{self.path.name}: inputs missing {missing}, unexpected {extra}; "
                             f"the model takes {list(self.input_names)}")
        for spec in self.input_specs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray) or value.dtype != spec.dtype:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise ModelError(f"{self.path.name}: input {spec.name!r} must be {np.dtype(spec.dtype).name}, got {got}")
            if value.ndim != len(spec.shape):
                raise ModelError(f"{self.path.name}: input {spec.name!r} must have rank {len(spec.shape)} "
                                 f"(shape {list(spec.shape)}), got shape {list(value.shape)}")
            for axis, (want, got_dim) in enumerate(zip(spec.shape, value.shape)):
                if isinstance(want, int) and want > 0 and want != got_dim:
                    raise ModelError(f"{self.path.name}: input {spec.name!r} axis {axis} must be {want}, "
                                     f"got shape {list(value.shape)}")


class OrtBoundRun:
    """An OrtRunner's graph bound once over numpy buffers that ONNX Runtime reads and writes in place (IOBinding on
    OrtValues sharing their memory), as a deployed streaming loop runs it: `run()` is session.run_with_iobinding and
    nothing else (no input check, no feed dict, no state copied in or out). Carried states ping-pong between two
    bindings: each reads the state buffers the other wrote, so a state stays where ORT wrote it. Output shapes come
    from one unbound run of the bound feeds, made here; inputs keep their shapes (set_input copies into them)."""

    def __init__(self, runner: OrtRunner, feeds: Mapping[str, np.ndarray], carry: Mapping[str, str]) -> None:
        self.name = runner.path.name
        self._session = runner.session
        ort = _ort()
        first = runner.run(feeds)  # the output shapes the buffers take, from the inputs bound below
        untensored = [name for name, value in first.items() if not isinstance(value, np.ndarray)]
        if untensored:
            raise ModelError(f"{self.name}: outputs {untensored} are not tensors; only tensor outputs can be bound")
        _check_carry(self.name, carry, feeds, first)
        self._carry = dict(carry)
        self._inputs = {name: np.array(feeds[name], order="C") for name in runner.input_names}  # our own copies
        plain_outputs = [name for name in runner.output_names if name not in self._carry.values()]
        self._outputs = {name: np.empty_like(first[name], order="C") for name in plain_outputs}
        # state buffers, per state input: [0] read by binding 0 and written by binding 1, [1] the other way round
        self._states = {state: (self._inputs[state], np.empty_like(self._inputs[state])) for state in self._carry}
        self._bindings = []
        for turn in (0, 1):
            binding = self._session.io_binding()
            for name, value in self._inputs.items():
                buffer = self._states[name][turn] if name in self._states else value
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
            for name, value in self._outputs.items():
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(value))
            for state, output in self._carry.items():
                binding.bind_ortvalue_output(output, ort.OrtValue.ortvalue_from_numpy(self._states[state][1 - turn]))
            self._bindings.append(binding)
        self._turn = 0

    def set_input(self, name: str, value: np.ndarray) -> None:
        """Copy `value` into the bound input `name` (a frame): same shape and dtype as the feed it was bound to."""
        if name in self._carry:
            raise ModelError(f"{self.name}: input {name!r} is a carried state; it is fed by its output, not set")
        buffer = self._inputs.get(name)
        if buffer is None:
            raise ModelError(f"{self.name}: no input {name!r}; the model takes {sorted(self._inputs)}")
        if not isinstance(value, np.ndarray) or value.shape != buffer.shape or value.dtype != buffer.dtype:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ModelError(f"{self.name}: input {name!r} is bound as {buffer.dtype} {list(buffer.shape)}, got {got}")
        np.copyto(buffer, value)

    def run(self) -> None:
        self._session.run_with_iobinding(self._bindings[self._turn])
        self._turn = 1 - self._turn

    def outputs(self) -> dict[str, np.ndarray]:
        """Copies of the last run's outputs (state outputs included), by name."""
        written = self._turn  # the state buffers the last run wrote are the ones the next run reads
        states = {output: self._states[state][written] for state, output in self._carry.items()}
        return {name: value.copy() for name, value in {**self._outputs, **states}.items()}


def _check_carry(model: str, carry: Mapping[str, str], feeds: Mapping[str, np.ndarray],
                 outputs: Mapping[str, np.ndarray]) -> None:
    """Each carried state's output exists, feeds no other state, and has its input's shape and dtype."""
    taken: dict[str, str] = {}
    for state, output in carry.items():
        if state not in feeds or output not in outputs:
            raise ModelError(f"{model}: carried state {state!r} -> {output!r}: the model has inputs "
                             f"{sorted(feeds)} and outputs {sorted(outputs)}")
        if output in taken:
            raise ModelError(f"{model}: output {output!r} feeds both {taken[output]!r} and {state!r}; carry one "
                             "state per output")
        taken[output] = state
        want, got = feeds[state], outputs[output]
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ModelError(f"{model}: state output {output!r} is {got.dtype} {list(got.shape)}, but feeds input "
                             f"{state!r} of {want.dtype} {list(want.shape)}")


def trt_sim_runner(path: str | os.PathLike[str], threads: int = 1) -> OrtRunner:
    """A runner that predicts TensorRT's numerics for an ONNX model TensorRT's explicit mode builds from (the
    symmetric int8 Q/DQ model_trt_qdq.onnx, an FP16 or an FP32 model): ORT with Q/DQ kept as fake quantization."""
    check_trt_qdq(Path(path))
    return OrtRunner(path, threads, optimization=TRT_SIM_OPTIMIZATION)


def check_trt_qdq(path: Path) -> None:
    """Refuse what TensorRT would not build the same way: asymmetric or uint8 Q/DQ (ONNX Runtime's INT8 model) and
    ONNX Runtime's own integer ops (dynamic LSTM, QLinear*), which would make trt-sim measure ORT, not TensorRT."""
    model = load_model(path, external_data=False)
    problem = _trt_qdq_problem(model)
    if problem:
        raise ModelError(f"{path}: {problem}; trt-sim simulates TensorRT, whose explicit INT8 takes symmetric int8 "
                         f"Q/DQ only: give the model_trt_qdq.onnx beside it (written by every int8 build)")


def _trt_qdq_problem(model: onnx.ModelProto) -> str | None:
    ort_ops = sorted({n.op_type for n in model.graph.node if n.op_type in INTEGER_KERNELS
                      or n.op_type == "DynamicQuantizeLinear" or n.domain not in ("", "ai.onnx")})
    if ort_ops:
        return f"it holds ONNX Runtime integer ops {ort_ops}"
    zero_points = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = zero_points.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or zero.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero).any():
            return f"{node.op_type} {node.name or node.output[0]!r} is not symmetric int8 (zero point 0 of type int8)"
    return None


# ------------------------------------------------------------------------------------------------ conversions


def optimized_graph(path: str | os.PathLike[str], work_dir: str | os.PathLike[str]) -> onnx.ModelProto:
    """The graph ORT runs on this machine's CPU after all optimizations (fusions into integer kernels included)."""
    target = Path(work_dir) / (Path(path).stem + ".ort_optimized.onnx")
    make_session(path, threads=1, optimization="all", optimized_model_path=target)
    try:
        return onnx.load(str(target))
    finally:
        target.unlink(missing_ok=True)
        Path(str(target) + ".data").unlink(missing_ok=True)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def integer_kernel_counts(optimized: onnx.ModelProto) -> dict[str, int]:
    return {op: n for op, n in op_counts(optimized).items() if op in INTEGER_KERNELS}


def quantize_qdq(
    model: onnx.ModelProto,
    tensors_range: Mapping[str, tuple[float, float]],
    nodes_to_quantize: Sequence[str],
    op_types: Sequence[str],
    activation_uint8: bool,
    per_channel: bool = True,
    extra_options: Mapping[str, Any] | None = None,
    reduce_range: bool = False,
) -> onnx.ModelProto:
    """Static Q/DQ quantization with ranges we computed (no ORT calibration run). `tensors_range` maps a tensor
    to (rmin, rmax); int8 activations are made symmetric (zero point 0)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer, update_opset_version

    activation_type = QuantType.QUInt8 if activation_uint8 else QuantType.QInt8
    typed = save_and_reload_model_with_shape_infer(model)
    if _untyped_inputs(typed, nodes_to_quantize):
        typed = _symbolic_types(typed)
    model = update_opset_version(typed, QuantType.QInt8, activation_type)
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in tensors_range.items()
    })
    options = {"ActivationSymmetric": not activation_uint8, "WeightSymmetric": True, **(extra_options or {})}
    quantizer = QDQQuantizer(model, per_channel, reduce_range, QuantType.QInt8, activation_type, ranges,
                             list(nodes_to_quantize), [], list(op_types), options)
    try:
        with _quiet_ort_advice():
            quantizer.quantize_model()
    except Exception as error:
        raise BuildError(f"ONNX Runtime Q/DQ quantization failed: {error}") from error
    result: onnx.ModelProto = quantizer.model.model
    return result


def _untyped_inputs(model: onnx.ModelProto, nodes: Sequence[str]) -> list[str]:
    """Inputs of `nodes` whose element type shape inference left unknown (ORT's quantizer skips those)."""
    typed = {v.name for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
             if v.type.tensor_type.elem_type}
    typed |= {i.name for i in model.graph.initializer}
    wanted = set(nodes)
    return [t for n in model.graph.node if n.name in wanted for t in n.input if t and t not in typed]


def _symbolic_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference with auto_merge, in memory (no temp files), as quant_pre_process
    does for transformer graphs whose dynamic shapes plain ONNX inference cannot follow."""
    inferred = infer_shapes(model, symbolic=True, consequence="tensors without a type stay unquantized")
    return model if inferred is None else inferred


def cpu_has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI) accumulates u8 x s8 products without the int16 saturation of AVX2's
    vpmaddubsw; without it ONNX Runtime recommends 7-bit weights (reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class _QuietOrtAdvice(logging.Filter):
    """ORT's quantizer logs advice on the root logger that does not apply here: we run shape inference ourselves,
    and the dynamic pass runs on a model that already holds our static Q/DQ on purpose."""

    ADVICE = ("Please consider to run pre-processing", "Please consider pre-processing",
              "Please check if the model is already quantized")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.ADVICE)


@contextmanager
def _quiet_ort_advice() -> Iterator[None]:
    quiet = _QuietOrtAdvice()
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.addFilter(quiet)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        for handler in handlers:
            handler.removeFilter(quiet)


def quantize_dynamic_nodes(
    model_path: Path, output_path: Path, nodes: Sequence[str], op_types: Sequence[str]
) -> None:
    """Dynamic quantization (int8 weights, activations quantized at run time) of exactly `nodes`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_ort_advice():
            quantize_dynamic(model_path, output_path, op_types_to_quantize=list(op_types),
                             nodes_to_quantize=list(nodes), weight_type=QuantType.QInt8, per_channel=False)
    except Exception as error:
        raise BuildError(f"{model_path}: dynamic quantization of {list(nodes)} failed: {error}") from error


def convert_fp16(
    model: onnx.ModelProto, op_block_list: Sequence[str], node_block_list: Sequence[str]
) -> onnx.ModelProto:
    """FP16 weights and activations, the blocked ops kept in float32, and every graph input/output in its original
    type (keep_io_types, plus a fix for the converter casting a blocked node's graph output to float16: a
    streaming model's state output must keep the dtype of its input to be fed back)."""
    from onnxconverter_common import float16

    try:
        converted: onnx.ModelProto = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(op_block_list), node_block_list=list(node_block_list),
            disable_shape_infer=False,
        )
    except Exception as error:
        raise BuildError(f"FP16 conversion failed: {error}") from error
    align_cast_targets(converted)
    restore_output_types(converted, model)
    return converted


def align_cast_targets(model: onnx.ModelProto) -> list[str]:
    """Make each Cast between float types cast to the type the converted graph declares for its output, in place.

    The converter retypes the value_info of an exported Cast(to=float) feeding float16 nodes (e.g. WeNet's padding
    mask) but leaves its `to` attribute, which ONNX Runtime rejects."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    fixed = []
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in declared:
            continue
        for attribute in node.attribute:
            wanted = declared[node.output[0]]
            if attribute.name == "to" and attribute.i in floats and wanted in floats and attribute.i != wanted:
                attribute.i = wanted
                fixed.append(node.name)
    return fixed


def restore_output_types(converted: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    """Give every graph output its original element type again, in place; returns the outputs fixed.

    A Cast producing the output gets its `to` changed (no float16 round trip); otherwise a Cast is appended."""
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producers = {out: node for node in converted.graph.node for out in node.output}
    fixed = []
    for output in converted.graph.output:
        elem = wanted.get(output.name)
        if elem is None or output.type.tensor_type.elem_type == elem:
            continue
        producer = producers.get(output.name)
        if producer is not None and producer.op_type == "Cast":
            for attribute in producer.attribute:
                if attribute.name == "to":
                    attribute.i = elem
        else:
            _append_cast(converted.graph, output.name, elem)
        output.type.tensor_type.elem_type = elem
        fixed.append(output.name)
    return fixed


def _append_cast(graph: onnx.GraphProto, name: str, elem_type: int) -> None:
    inner = f"{name}_before_cast"
    for node in graph.node:
        node.output[:] = [inner if t == name else t for t in node.output]
        node.input[:] = [inner if t == name else t for t in node.input]
    graph.node.append(onnx.helper.make_node("Cast", [inner], [name], name=f"{name}_cast_back", to=elem_type))
