"""Exact graph rewrites that let more of a model run in integer kernels, and the check each must pass before use.

- `convtranspose_to_conv`: ConvTranspose -> Conv. ONNX Runtime's CPU has no integer ConvTranspose (it runs float
  after DequantizeLinear), but QLinearConv is fast. Along an axis of stride 1 a transposed convolution is a
  convolution with the kernel flipped, in/out channels swapped and the input padded by dilation x (kernel - 1).
  Along an axis of stride s > 1 it is s convolutions, one per output phase r (output index s*m + r), each using the
  taps j with dilation*j = r (mod s): one Conv with s x the output channels whose phases are interleaved back
  along the axis (sub-pixel rearrangement: Reshape -> Transpose -> Reshape), then cropped by the original pads.
- `split_concat_conv`: Conv(Concat([a, b, ...], channels)) -> Conv(a, W_a) + Conv(b, W_b) + ..., the weight split
  along its input channels. Each part then gets its own INT8 scale, so a U-Net skip joined to the decoder path no
  longer forces two distributions under one scale (the reason quant's skip-concat rule keeps such convs float).
- `prelu_to_leakyrelu`: a PRelu with one slope value is a LeakyRelu (fused into FP32 convs; QLinearLeakyRelu).
- `gru_step_to_matmul`: a GRU of sequence length 1 (a streaming graph's per-frame GRU) -> its two products as
  MatMuls by constant weights plus the gate arithmetic. ONNX Runtime has no integer GRU; weight MatMuls it has.

All only re-associate float sums; `check_rewrite` runs original and rewritten graph in ONNX Runtime on the given
(real) inputs and refuses a rewrite whose outputs differ by more than float tolerance. They are plain ONNX, so the
TensorRT Q/DQ model built from the rewritten graph gets the same integer convolutions.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quant.errors import BuildError
from quant.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from quant.onnxgraph.graph import default_opset, load_model
from quant.onnxgraph.shapes import infer_shapes

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
# max |rewritten - original| / max |original| per output: float32 re-association error, far below INT8's step
DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class RewriteResult:
    model: onnx.ModelProto
    rewritten: tuple[str, ...]  # names of the original nodes replaced


# ------------------------------------------------------------------------------------- ConvTranspose -> Conv


@dataclass(frozen=True)
class _Axis:
    stride: int
    dilation: int
    kernel: int
    pad_begin: int
    pad_end: int
    output_padding: int

    @property
    def span(self) -> int:  # dilation * (kernel - 1): how far a tap reaches
        return self.dilation * (self.kernel - 1)

    @property
    def reach(self) -> int:
        """Q: the largest input offset a phase reads (stride 1: the dilated span, else floor(span / stride))."""
        return self.span if self.stride == 1 else self.span // self.stride

    def taps(self) -> list[tuple[int, int, int]]:
        """(original tap j, phase r, position p in the phase kernel)."""
        if self.stride == 1:  # one phase; the Conv keeps the dilation, so positions are tap indices, flipped
            return [(j, 0, self.kernel - 1 - j) for j in range(self.kernel)]
        out = []
        for j in range(self.kernel):
            r = (self.dilation * j) % self.stride
            out.append((j, r, self.reach - (self.dilation * j - r) // self.stride))
        return out

    def conv_kernel(self) -> int:
        return self.kernel if self.stride == 1 else self.reach + 1


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def convtranspose_to_conv(model: onnx.ModelProto) -> RewriteResult:
    """Every ConvTranspose with a constant weight, group 1, explicit pads (no auto_pad/output_shape) -> Conv
    (+ phase interleave where a stride > 1, + Slice where pads crop). The Conv keeps the ConvTranspose's name."""
    model = _copy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    done = []
    declared = {v.name for v in list(graph.value_info) + list(graph.output)}
    for node in graph.node:
        replaced = _deconv_nodes(node, inits) if node.op_type == "ConvTranspose" else None
        if replaced is None:
            new_nodes.append(node)
            continue
        nodes, tensors = replaced
        new_nodes.extend(nodes)
        new_inits.extend(tensors)
        done.append(node.name)
        weight = inits[node.input[1]]
        if node.output[0] not in declared:
            # the interleave's Reshape takes a computed shape, which ONNX shape inference cannot follow: declare the
            # known rank and channel count so later passes (split_concat_conv, the quantizer) still see them
            out = node.output[0]
            dims: list[int | str] = [f"{out}_n", int(weight.dims[1])]
            dims += [f"{out}_{i}" for i in range(len(weight.dims) - 2)]
            graph.value_info.append(helper.make_tensor_value_info(out, weight.data_type, dims))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return RewriteResult(model, tuple(done))


def _deconv_nodes(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    attrs = _attributes(node)
    if node.input[1] not in inits or len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return None
    if int(attrs.get("group", 1)) != 1 or "output_shape" in attrs or attrs.get("auto_pad", b"NOTSET") not in (
            b"NOTSET", "NOTSET"):
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])  # (C_in, C_out, k...)
    rank = weight.ndim - 2
    ones = [1] * rank
    strides = list(attrs.get("strides", ones))
    dilations = list(attrs.get("dilations", ones))
    pads = list(attrs.get("pads", [0] * 2 * rank))
    out_pad = list(attrs.get("output_padding", [0] * rank))
    axes = [_Axis(strides[a], dilations[a], weight.shape[2 + a], pads[a], pads[rank + a], out_pad[a])
            for a in range(rank)]
    c_in, c_out = weight.shape[:2]
    phases = [a.stride for a in axes]
    n_phases = int(np.prod(phases))
    kernel = np.zeros((c_out, *phases, c_in, *[a.conv_kernel() for a in axes]), weight.dtype)
    for combo in itertools.product(*[a.taps() for a in axes]):
        taps = tuple(j for j, _, _ in combo)
        phase = tuple(r for _, r, _ in combo)
        position = tuple(p for _, _, p in combo)
        # kernel[c_out, phase..., c_in, position...] = weight[c_in, c_out, taps...]
        target: tuple[Any, ...] = (slice(None), *phase, slice(None), *position)
        source: tuple[Any, ...] = (slice(None), slice(None), *taps)
        kernel[target] = weight[source].T
    kernel = kernel.reshape(c_out * n_phases, c_in, *kernel.shape[2 + rank:])
    name = node.name or node.output[0]
    prefix = f"{name}/as_conv"
    tensors = [numpy_helper.from_array(kernel, f"{prefix}/weight")]
    conv_inputs = [node.input[0], f"{prefix}/weight"]
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(inits[node.input[2]])
        tensors.append(numpy_helper.from_array(np.repeat(bias, n_phases), f"{prefix}/bias"))
        conv_inputs.append(f"{prefix}/bias")
    # pads of the Conv; what a negative pad would need (pads cropping more than the span) is a Slice after it
    begin, end, crop_begin, crop_end = [], [], [], []
    for a in axes:
        if a.stride == 1:
            left, right = a.span - a.pad_begin, a.span - a.pad_end + a.output_padding
            begin.append(max(left, 0))
            end.append(max(right, 0))
            crop_begin.append(max(-left, 0))
            crop_end.append(max(-right, 0))
        else:
            slack = a.stride * (a.reach + 1) - a.span - 1  # interleaved length - full transposed length
            extra = -(-max(0, a.output_padding - a.pad_end - slack) // a.stride)
            begin.append(a.reach)
            end.append(a.reach + extra)
            crop_begin.append(a.pad_begin)
            crop_end.append(slack + a.stride * extra + a.pad_end - a.output_padding)
    interleave = n_phases > 1
    crop = any(crop_begin) or any(crop_end)
    conv_out = f"{prefix}/phases" if interleave else (f"{prefix}/uncropped" if crop else node.output[0])
    conv_dilations = [a.dilation if a.stride == 1 else 1 for a in axes]
    nodes = [helper.make_node("Conv", conv_inputs, [conv_out], name=name, pads=begin + end, strides=ones,
                              dilations=conv_dilations, group=1)]
    current = conv_out
    if interleave:
        after = f"{prefix}/uncropped" if crop else node.output[0]
        more_nodes, more_tensors = _interleave(prefix, current, after, c_out, phases)
        nodes += more_nodes
        tensors += more_tensors
        current = after
    if crop:
        big = np.iinfo(np.int64).max
        tensors += [numpy_helper.from_array(np.array(crop_begin, np.int64), f"{prefix}/crop_starts"),
                    numpy_helper.from_array(np.array([-c if c else big for c in crop_end], np.int64),
                                            f"{prefix}/crop_ends"),
                    numpy_helper.from_array(np.arange(2, 2 + rank, dtype=np.int64), f"{prefix}/crop_axes")]
        nodes.append(helper.make_node("Slice", [current, f"{prefix}/crop_starts", f"{prefix}/crop_ends",
                                                f"{prefix}/crop_axes"], [node.output[0]], name=f"{prefix}/crop"))
    return nodes, tensors


def _interleave(prefix: str, source: str, target: str, channels: int, phases: Sequence[int]
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """(N, C*P0*P1.., L0, L1..) with channel index c*P + phase -> (N, C, L0*P0, L1*P1, ..).

    Axes of stride 1 get no phase axis in the split: with one strided axis the Transpose then moves a single axis
    (DPCRN: (N, C, 2, T, F) -> (N, C, T, F, 2)), which ONNX Runtime copies with its fast single-axis path; with the
    size-1 phase axis kept it took the generic element-wise path, 10x slower (23 vs 2 ms for (1, 64, 1, 2, 563, 65),
    float, 1 thread) and 7 % of the offline DPCRN's INT8 run."""
    rank = len(phases)
    strided = [a for a in range(rank) if phases[a] > 1]
    p = f"{prefix}/interleave"
    tensors = [numpy_helper.from_array(np.array([channels, *[phases[a] for a in strided]], np.int64),
                                       f"{p}/c_phases"),
               numpy_helper.from_array(np.array([channels], np.int64), f"{p}/c"),
               numpy_helper.from_array(np.array(phases, np.int64), f"{p}/phases")]
    first_length = 2 + len(strided)
    perm = [0, 1] + [i for a in range(rank)
                     for i in ((first_length + a, 2 + strided.index(a)) if a in strided else (first_length + a,))]
    tensors += [numpy_helper.from_array(np.array([v], np.int64), f"{p}/{label}")
                for label, v in (("zero", 0), ("one", 1), ("two", 2), ("end", np.iinfo(np.int64).max))]
    nodes = [
        helper.make_node("Shape", [source], [f"{p}/shape"], name=f"{p}/shape"),
        helper.make_node("Slice", [f"{p}/shape", f"{p}/zero", f"{p}/one"], [f"{p}/n"], name=f"{p}/n"),
        helper.make_node("Slice", [f"{p}/shape", f"{p}/two", f"{p}/end"], [f"{p}/lengths"], name=f"{p}/lengths"),
        helper.make_node("Concat", [f"{p}/n", f"{p}/c_phases", f"{p}/lengths"], [f"{p}/split_shape"],
                         name=f"{p}/split_shape", axis=0),
        helper.make_node("Reshape", [source, f"{p}/split_shape"], [f"{p}/split"], name=f"{p}/split"),
        helper.make_node("Transpose", [f"{p}/split"], [f"{p}/moved"], name=f"{p}/move", perm=perm),
        helper.make_node("Mul", [f"{p}/lengths", f"{p}/phases"], [f"{p}/long"], name=f"{p}/long"),
        helper.make_node("Concat", [f"{p}/n", f"{p}/c", f"{p}/long"], [f"{p}/merged_shape"],
                         name=f"{p}/merged_shape", axis=0),
        helper.make_node("Reshape", [f"{p}/moved", f"{p}/merged_shape"], [target], name=f"{p}/merge"),
    ]
    return nodes, tensors


# ------------------------------------------------------------------------------------ Conv(Concat) -> sum of Convs


def split_concat_conv(model: onnx.ModelProto) -> RewriteResult:
    """Every Conv (constant weight, group 1) whose input is a channel Concat -> one Conv per concatenated part,
    summed; the bias goes to the first part. The Concat goes unless another node needs it (a Shape read only at
    non-channel axes reads the first part instead). Channel counts: see _channel_counts."""
    model = _copy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constants = _constants(graph)
    shapes = _channel_counts(model)
    producers = {out: n for n in graph.node for out in n.output}
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    replacement: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    done = []
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits or int(_attributes(node).get("group", 1)) != 1:
            continue
        concat = producers.get(node.input[0])
        if concat is None or concat.op_type != "Concat":
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        found = [shapes.get(t) for t in concat.input]
        counts = [c for c in found if c is not None]
        if int(_attributes(concat)["axis"]) not in (1, 1 - weight.ndim) or len(counts) != len(found) \
                or sum(counts) != weight.shape[1]:
            continue  # not a channel concat, or channel counts unknown / not the weight's
        name = node.name or node.output[0]
        parts, offset = [], 0
        for index, (tensor, count) in enumerate(zip(concat.input, counts)):
            w_name = f"{name}/part{index}/weight"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, offset:offset + count]), w_name))
            offset += count
            inputs = [tensor, w_name] + ([node.input[2]] if index == 0 and len(node.input) > 2 and node.input[2]
                                         else [])
            part = helper.make_node("Conv", inputs, [f"{name}/part{index}"], name=f"{name}/part{index}")
            part.attribute.extend(node.attribute)
            parts.append(part)
        total = parts[0].output[0]
        sums = []
        for index, part in enumerate(parts[1:], start=1):
            out = node.output[0] if index == len(parts) - 1 else f"{name}/sum{index}"
            sums.append(helper.make_node("Add", [total, part.output[0]], [out], name=f"{name}/sum{index}"))
            total = out
        position = list(graph.node).index(node)
        replacement[position] = parts + sums
        if node.input[0] not in outputs and _reroute_shape_readers(graph, concat, node, constants):
            drop.add(list(graph.node).index(concat))  # else kept for its other readers
        done.append(name)
    nodes = []
    for position, n in enumerate(graph.node):
        if position in drop:
            continue
        nodes.extend(replacement.get(position, [n]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return RewriteResult(model, tuple(done))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by tensor name."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _reroute_shape_readers(graph: onnx.GraphProto, concat: onnx.NodeProto, conv: onnx.NodeProto,
                           constants: Mapping[str, np.ndarray]) -> bool:
    """Whether the Concat can go: every other reader is a Shape whose value is only gathered at non-channel axes
    (DPCRN's decoder reads the frame count this way), which then reads the first part instead (same dims but 1)."""
    tensor = concat.output[0]
    others = [n for n in graph.node if tensor in n.input and n is not conv]
    shapes = [n for n in others if n.op_type == "Shape" and not n.attribute]
    if len(shapes) != len(others):
        return False
    for shape in shapes:
        for reader in (n for n in graph.node if shape.output[0] in n.input):
            index = constants.get(reader.input[1]) if reader.op_type == "Gather" and len(reader.input) > 1 else None
            if index is None or any(int(i) in (1, -3) for i in np.asarray(index).ravel()):
                return False  # -3: axis 1 of a rank-4 tensor counted from the end (rank unknown here: refuse)
    for shape in shapes:
        shape.input[0] = concat.input[0]
    return True


CHANNEL_KEEPING = frozenset({"BatchNormalization", "PRelu", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Clip",
                             "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "InstanceNormalization"})


def _channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> its axis-1 size: from ONNX shape inference, else traced back through ops that keep channels
    (element-wise ops, normalizations, a Slice on other axes) to a Conv / ConvTranspose weight. Shape inference
    alone loses the channels behind a Slice with computed ends (a causal crop)."""
    inferred = infer_shapes(model) or model  # a graph inference cannot follow: only what the trace finds
    known: dict[str, int] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            known[info.name] = int(dims[1].dim_value)
    constants = _constants(model.graph)
    producers = {out: n for n in model.graph.node for out in n.output}

    def channels(tensor: str, depth: int = 0) -> int | None:
        if tensor in known or depth > 64:
            return known.get(tensor)
        node = producers.get(tensor)
        found: int | None = None
        if node is None:
            found = None
        elif node.op_type == "Conv" and node.input[1] in constants:
            found = int(constants[node.input[1]].shape[0])
        elif node.op_type == "ConvTranspose" and node.input[1] in constants:
            found = int(constants[node.input[1]].shape[1]) * int(_attributes(node).get("group", 1))
        elif node.op_type == "Slice":
            axes = constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is not None and 1 not in axes.tolist():
                found = channels(node.input[0], depth + 1)
        elif node.op_type in CHANNEL_KEEPING:
            for source in node.input[:2]:
                if source and source not in constants:
                    found = channels(source, depth + 1)
                    if found is not None:
                        break
        if found is not None:
            known[tensor] = found
        return found

    for node in model.graph.node:
        if node.op_type == "Concat":
            for tensor in node.input:
                channels(tensor)
    for init in model.graph.initializer:
        if len(init.dims) > 1:
            known.setdefault(init.name, int(init.dims[1]))
    return known


# ------------------------------------------------------------------------------------------- PRelu -> LeakyRelu


def prelu_to_leakyrelu(model: onnx.ModelProto) -> RewriteResult:
    """PRelu whose slope is one constant value (torch's nn.PReLU() default) -> LeakyRelu(alpha=slope): the same
    function, but one ORT fuses into an NCHWc Conv in FP32 and runs as QLinearLeakyRelu between Q/DQ in INT8
    (ORT has no integer PRelu)."""
    model = _copy(model)
    constants = _constants(model.graph)
    done = []
    for position, node in enumerate(model.graph.node):
        slope = constants.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) > 1 else None
        if slope is None or slope.size == 0 or not np.all(slope == slope.ravel()[0]):
            continue
        leaky = helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name,
                                 alpha=float(slope.ravel()[0]))
        model.graph.node[position].CopyFrom(leaky)
        done.append(node.name)
    _drop_unused_initializers(model.graph)
    return RewriteResult(model, tuple(done))


# ---------------------------------------------------------------------------------- GRU one step -> MatMuls


DEFAULT_GRU_ACTIVATIONS = ("Sigmoid", "Tanh")


def gru_step_to_matmul(model: onnx.ModelProto) -> RewriteResult:
    """Every GRU that runs one time step (sequence length statically 1: a streaming graph's per-frame GRU with its
    state fed back) -> MatMul(x, W^T) + MatMul(h, R^T) + biases and the gate arithmetic, writing the GRU's Y and Y_h.
    ONNX Runtime has no integer GRU kernel; the two MatMuls by constant weights are then ordinary weight MatMuls the
    precision rules quantize. A GRU this cannot express exactly is left alone and the reason logged (gru_refusal)."""
    model = _copy(model)
    graph = model.graph
    grus = [n for n in graph.node if n.op_type == "GRU"]
    if not grus:
        return RewriteResult(model, ())
    constants = _constants(graph)
    lengths = _leading_dims(model, [n.input[0] for n in grus])
    opset = default_opset(model) or 13
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    done = []
    for node in graph.node:
        reason = gru_refusal(node, constants, lengths.get(node.input[0])) if node.op_type == "GRU" else "not a GRU"
        if reason:
            if node.op_type == "GRU":
                log.info("gru-step-to-matmul leaves %s alone: %s", node.name or node.output[0], reason)
            new_nodes.append(node)
            continue
        step = _gru_step(node, constants, opset)
        new_nodes.extend(step.nodes)
        new_inits.extend(step.tensors)
        done.append(node.name or node.output[0])
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return RewriteResult(model, tuple(done))


def gru_refusal(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], sequence_length: int | None) -> str:
    """Why this GRU cannot become one unrolled step ("" when it can)."""
    attrs = _attributes(node)
    activations = tuple(_text(a) for a in attrs.get("activations", ()))
    inputs = list(node.input) + [""] * (6 - len(node.input))
    weights = [inputs[1], inputs[2]] + ([inputs[3]] if inputs[3] else [])
    checks = [
        (sequence_length != 1, f"its input {inputs[0]!r} has sequence length {sequence_length or 'unknown'}, "
                               "not a static 1 (an offline GRU over all frames)"),
        (_text(attrs.get("direction", "forward")) == "bidirectional", "direction is bidirectional"),
        (activations not in ((), DEFAULT_GRU_ACTIVATIONS),
         f"activations {list(activations)} are not the default {list(DEFAULT_GRU_ACTIVATIONS)}"),
        ("activation_alpha" in attrs or "activation_beta" in attrs, "activation_alpha/beta are set"),
        ("clip" in attrs, "clip is set"),
        (int(attrs.get("layout", 0)) != 0, "layout is 1 (batch first)"),
        (bool(inputs[4]), "sequence_lens is given"),
        (any(w not in constants for w in weights), "W, R or B is not a constant"),
    ]
    return next((reason for failed, reason in checks if failed), "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _StepNodes:
    """Nodes and constants of one unrolled cell step, named under `<cell>/step/` (the writing; _gru_step the math)."""

    def __init__(self, node: onnx.NodeProto, opset: int) -> None:
        self.prefix = f"{node.name or node.output[0]}/step"
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.tensors: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: Sequence[str], label: str, output: str | None = None, **attrs: Any) -> str:
        out = output or f"{self.prefix}/{label}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{self.prefix}/{label}", **attrs))
        return out

    def constant(self, value: np.ndarray, label: str) -> str:
        name = f"{self.prefix}/{label}"
        self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def linear(self, source: str, weight: np.ndarray, bias: np.ndarray | None, label: str) -> str:
        """MatMul by a constant weight, then its bias Add (the pair ORT's dynamic quantizer fuses)."""
        product = self.op("MatMul", [source, self.constant(weight, f"{label}_weight")], f"{label}_matmul")
        if bias is None or not bias.any():
            return product
        return self.op("Add", [product, self.constant(bias, f"{label}_bias")], f"{label}_bias_add")

    def split(self, source: str, sizes: Sequence[int], label: str) -> list[str]:
        outs = [f"{self.prefix}/{label}_{part}" for part in range(len(sizes))]
        name = f"{self.prefix}/{label}_split"
        if self.opset >= 13:
            split = self.constant(np.array(sizes, np.int64), f"{label}_sizes")
            self.nodes.append(helper.make_node("Split", [source, split], outs, name=name, axis=-1))
        else:
            self.nodes.append(helper.make_node("Split", [source], outs, name=name, axis=-1, split=list(sizes)))
        return outs

    def add(self, first: str, second: str | None, label: str) -> str:
        return self.op("Add", [first, second], label) if second is not None else first

    def sequence_output(self, state: str, output: str) -> None:
        """Y (1, 1, batch, hidden): the one step's state with the one direction axis."""
        if self.opset >= 13:
            self.op("Unsqueeze", [state, self.constant(np.array([1], np.int64), "y_axes")], "y", output=output)
        else:
            self.op("Unsqueeze", [state], "y", output=output, axes=[1])


def _gru_step(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], opset: int) -> _StepNodes:
    """One GRU step on X (1, batch, input) and h (1, batch, hidden), ONNX's equations with gates in z, r, h order:
    z = f(x Wz + h Rz + Wbz + Rbz), r likewise, n = g(x Wh + r (h Rh + Rbh) + Wbh) when linear_before_reset else
    g(x Wh + (r h) Rh + Rbh + Wbh), H = (1 - z) n + z h, written n + z (h - n). One direction: forward and reverse
    are the same single step."""
    step = _StepNodes(node, opset)
    inputs = list(node.input) + [""] * (6 - len(node.input))
    w, r = constants[inputs[1]][0], constants[inputs[2]][0]  # (3H, input), (3H, H): the one direction
    hidden = r.shape[1]
    bias = constants[inputs[3]][0] if inputs[3] else np.zeros(6 * hidden, w.dtype)
    w_bias, r_bias = bias[:3 * hidden], bias[3 * hidden:]
    zr, new = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
    before_reset = bool(_attributes(node).get("linear_before_reset", 0))
    h = inputs[5] or None
    outputs = list(node.output) + [""] * (2 - len(node.output))
    # the recurrent biases outside the reset product go with the input's
    x_bias = w_bias + np.concatenate([r_bias[zr], 0 * r_bias[new] if before_reset else r_bias[new]])
    gx_zr, gx_n = step.split(step.linear(inputs[0], w.T, x_bias, "x"), [2 * hidden, hidden], "x")
    gh_zr: str | None = None
    reset_term: str | None = None  # what r multiplies (before_reset) or r (h Rh) itself
    if before_reset:
        gh_n: str | None = None
        if h is not None:
            h_bias = np.concatenate([0 * r_bias[zr], r_bias[new]])
            gh_zr, gh_n = step.split(step.linear(h, r.T, h_bias, "h"), [2 * hidden, hidden], "h")
        elif r_bias[new].any():  # h = 0: the recurrent product is its bias
            gh_n = step.constant(r_bias[new], "h_bias")
        z, reset = step.split(step.op("Sigmoid", [step.add(gx_zr, gh_zr, "zr_in")], "zr"), [hidden] * 2, "zr")
        reset_term = step.op("Mul", [reset, gh_n], "r_h") if gh_n is not None else None
    else:
        if h is not None:
            gh_zr = step.linear(h, r[zr].T, None, "h_zr")
        z, reset = step.split(step.op("Sigmoid", [step.add(gx_zr, gh_zr, "zr_in")], "zr"), [hidden] * 2, "zr")
        if h is not None:
            reset_term = step.linear(step.op("Mul", [reset, h], "r_times_h"), r[new].T, None, "rh")
    n = step.op("Tanh", [step.add(gx_n, reset_term, "n_in")], "n")
    h_out = outputs[1] or f"{step.prefix}/h_new"
    if h is None:  # (1 - z) n
        keep = step.op("Sub", [step.constant(np.ones(1, w.dtype), "one"), z], "keep")
        step.op("Mul", [keep, n], "h_new", output=h_out)
    else:
        moved = step.op("Mul", [z, step.op("Sub", [h, n], "h_minus_n")], "z_times")
        step.op("Add", [n, moved], "h_new", output=h_out)
    if outputs[0]:
        step.sequence_output(h_out, outputs[0])
    return step


def _leading_dims(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, int | None]:
    """Axis 0 of each tensor where shape inference knows it statically: ONNX's, then ONNX Runtime's symbolic
    inference (which follows the computed Reshape shapes of a torch export, where ONNX's stops)."""
    found: dict[str, int | None] = {}
    for symbolic in (False, True):
        inferred = infer_shapes(model, symbolic=symbolic) or model
        infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        for info in infos:
            dims = info.type.tensor_type.shape.dim
            if info.name in tensors and dims and dims[0].HasField("dim_value"):
                found[info.name] = int(dims[0].dim_value)
        if all(t in found for t in tensors):
            break
    return found


# ----------------------------------------------------------------------------------------------------- checks

REWRITES: dict[str, Callable[[onnx.ModelProto], RewriteResult]] = {
    "deconv-to-conv": convtranspose_to_conv,
    "split-concat-conv": split_concat_conv,
    "prelu-to-leakyrelu": prelu_to_leakyrelu,
    "gru-step-to-matmul": gru_step_to_matmul,
}


@dataclass(frozen=True)
class RewriteCheck:
    max_abs_error: float  # over every output and feed
    output_range: float  # max |original output|
    feeds: int

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.output_range, 1e-30)

    def within(self, tolerance: float) -> bool:
        return bool(np.isfinite(self.max_abs_error)) and self.relative_error <= tolerance

    def describe(self, tolerance: float) -> str:
        return (f"max abs error {self.max_abs_error:.3g} is {self.relative_error:.3g} of the output range "
                f"(tolerance {tolerance:g}) on {self.feeds} feed(s)")


def measure_rewrite(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Sequence[Feeds]) -> RewriteCheck:
    """Run both graphs in ONNX Runtime (optimizations off: the graphs as written) on every feed; the largest output
    difference. An output the rewritten graph lacks, or of another shape, is an infinite error."""
    from quant.backends.ort import OrtRunner

    with tempfile.TemporaryDirectory() as work:
        paths = []
        for label, model in (("original", original), ("rewritten", rewritten)):
            path = Path(work) / f"{label}.onnx"
            onnx.save(model, str(path))
            paths.append(path)
        before, after = (OrtRunner(p, optimization="disable") for p in paths)
        worst, scale = 0.0, 0.0
        for feed in feeds:
            a, b = before.run(feed), after.run(feed)
            for name, value in a.items():
                other = b.get(name)
                if other is None or other.shape != value.shape:
                    worst = float("inf")
                    continue
                worst = max(worst, float(np.max(np.abs(value.astype(np.float64) - other))) if value.size else 0.0)
                scale = max(scale, float(np.max(np.abs(value))) if value.size else 0.0)
    return RewriteCheck(worst, scale, len(feeds))


def check_rewrite(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Sequence[Feeds],
                  tolerance: float = DEFAULT_TOLERANCE) -> RewriteCheck:
    """measure_rewrite, and a BuildError if an output differs by more than `tolerance` x the original output's
    range."""
    check = measure_rewrite(original, rewritten, feeds)
    if not check.within(tolerance):
        raise BuildError(f"graph rewrite changed the outputs: {check.describe(tolerance)}; not used")
    return check


def apply_rewrites(model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Feeds],
                   tolerance: float = DEFAULT_TOLERANCE) -> tuple[RewriteResult, RewriteCheck]:
    """The named rewrites in order, the result checked against `model` on `feeds` (real inputs)."""
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise BuildError(f"unknown graph rewrite(s) {unknown}; known: {sorted(REWRITES)}")
    current, done = model, []
    for name in names:
        result = REWRITES[name](current)
        current = result.model
        done += list(result.rewritten)
        log.info("%s: rewrote %d node(s)", name, len(result.rewritten))
    check = check_rewrite(model, current, feeds, tolerance)
    return RewriteResult(current, tuple(done)), check


# ------------------------------------------------------------------------------------- the graph a build uses

CHECK_FEEDS = 2  # real feeds (the task's calibration feeds) run through original and rewritten graph
_CODE_SHA256 = sha256_file(Path(__file__))  # a rewritten file is reused only while this code made it


@dataclass(frozen=True)
class RewrittenGraph:
    """The graph builds and calibration start from (`path`) and how it was made from `source`."""

    path: Path
    source: Path
    rewrites: tuple[str, ...]  # asked for, in order
    nodes: Mapping[str, int]  # nodes each rewrite replaced
    check: RewriteCheck | None  # None when no rewrite found anything (then path is source)

    @property
    def rewritten(self) -> bool:
        return self.path != self.source


def rewritten_name(source: Path, names: Sequence[str]) -> str:
    return f"{source.stem}.{'+'.join(names)}.onnx"


def rewrite_file(source: str | Path, names: Sequence[str], feeds: Callable[[], Iterable[Feeds]], out_dir: str | Path,
                 tolerance: float = DEFAULT_TOLERANCE) -> RewrittenGraph:
    """`source` with the named rewrites applied, written to out_dir/<stem>.<rewrites>.onnx with a JSON record beside
    it, after checking it against `source` in ONNX Runtime on the first CHECK_FEEDS of `feeds()` (real inputs; only
    called when a check runs). A copy whose record names this source, these rewrites and this code is reused. A
    rewrite that changes the outputs beyond `tolerance` is a BuildError naming the file and the rewrite; one that
    finds nothing to rewrite is a no-op, and when none finds anything `source` itself comes back."""
    source = Path(source)
    names = tuple(names)
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise BuildError(f"{source}: unknown graph rewrite(s) {unknown}; known: {', '.join(REWRITES)}")
    if not names:
        return RewrittenGraph(source, source, (), {}, None)
    target = Path(out_dir) / rewritten_name(source, names)
    source_sha = sha256_file(source)
    reused = _reuse_rewrite(source, source_sha, names, target, tolerance)
    if reused is not None:
        return reused
    original = load_model(source)
    steps = _apply_each(original, names)
    nodes = {name: len(result.rewritten) for name, result in zip(names, steps)}
    if not any(nodes.values()):
        log.info("%s: none of the rewrites %s applies; building from the graph as it is", source, list(names))
        return RewrittenGraph(source, source, names, nodes, None)
    taken = list(itertools.islice(iter(feeds()), CHECK_FEEDS))
    if not taken:
        raise BuildError(f"{source}: no feeds to check the rewrites {list(names)} on; check the calibration manifest")
    check = measure_rewrite(original, steps[-1].model, taken)
    if not check.within(tolerance):
        culprit = _first_failing(original, names, steps, taken, tolerance)
        raise BuildError(f"{source}: graph rewrite {culprit!r} changed the outputs ({check.describe(tolerance)}); "
                         "leave it out of the spec's rewrites (or pass --rewrites without it, or --no-rewrites)")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, steps[-1].model.SerializeToString())
    result = RewrittenGraph(target, source, names, nodes, check)
    atomic_write_json(_rewrite_record_path(target), {
        "source": str(source), "source_sha256": source_sha, "sha256": sha256_file(target), "rewrites": list(names),
        "nodes": nodes, "code_sha256": _CODE_SHA256, "onnx": onnx.__version__, "tolerance": tolerance,
        "check": _check_record(check)})
    log.info("%s: %s rewrote %s; max abs error %.3g vs the original (%.2g of the output range) on %d real feed(s)",
             target, "+".join(names), nodes, check.max_abs_error, check.relative_error, check.feeds)
    return result


def rewrite_meta(path: Path) -> dict[str, Any] | None:
    """The record of a file rewrite_file wrote (for a build's meta.json), when it describes exactly this file."""
    try:
        record = json.loads(_rewrite_record_path(path).read_text())
        if not isinstance(record, dict) or record.get("sha256") != sha256_file(path):
            return None
    except (OSError, ValueError):
        return None
    return {key: record.get(key) for key in ("rewrites", "nodes", "source", "source_sha256", "check")}


def _apply_each(model: onnx.ModelProto, names: Sequence[str]) -> list[RewriteResult]:
    """The result after each rewrite in turn (the last is the full rewrite)."""
    steps, current = [], model
    for name in names:
        result = REWRITES[name](current)
        log.info("%s: rewrote %d node(s)", name, len(result.rewritten))
        steps.append(result)
        current = result.model
    return steps


def _first_failing(original: onnx.ModelProto, names: Sequence[str], steps: Sequence[RewriteResult],
                   feeds: Sequence[Feeds], tolerance: float) -> str:
    """The first rewrite after which the outputs leave the tolerance (the last one when each prefix passes)."""
    for name, step in zip(names[:-1], steps[:-1]):
        if step.rewritten and not measure_rewrite(original, step.model, feeds).within(tolerance):
            return name
    return names[-1]


def _check_record(check: RewriteCheck) -> dict[str, float | int]:
    return {"max_abs_error": check.max_abs_error, "output_range": check.output_range,
            "relative_error": check.relative_error, "feeds": check.feeds}


def _rewrite_record_path(target: Path) -> Path:
    return target.with_suffix(".json")


def _reuse_rewrite(source: Path, source_sha: str, names: tuple[str, ...], target: Path,
                   tolerance: float) -> RewrittenGraph | None:
    try:
        record = json.loads(_rewrite_record_path(target).read_text())
        if (record.get("source_sha256") != source_sha or tuple(record.get("rewrites", ())) != names
                or record.get("code_sha256") != _CODE_SHA256 or record.get("onnx") != onnx.__version__
                or record.get("tolerance") != tolerance or record.get("sha256") != sha256_file(target)):
            return None
        checked = record["check"]
        check = RewriteCheck(float(checked["max_abs_error"]), float(checked["output_range"]), int(checked["feeds"]))
        nodes = {str(k): int(v) for k, v in record["nodes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or not quant's record
        return None
    log.debug("reusing %s: its record names source sha256 %s", target, source_sha[:12])
    return RewrittenGraph(target, source, names, nodes, check)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
