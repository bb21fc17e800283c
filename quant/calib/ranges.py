"""Activation ranges of every float tensor of an ONNX model, collected with ONNX Runtime over calibration feeds.

Phases (as ONNX Runtime's calibrators: augment -> collect -> compute, but streaming):
1. augment: a copy of the model exposes every float activation (graph inputs and main-graph node outputs, never
   initializers or Constant outputs) as a graph output; types come from ONNX shape inference, then ONNX Runtime's
   symbolic shape inference when some are still unknown; tensors whose type stays unknown are skipped (listed).
   Tensors inside control-flow subgraphs (If/Loop/Scan bodies) are not exposed: TensorRT names none of them either.
   The output of an op that only rearranges its input (Reshape, Transpose, Squeeze, ...) holds exactly the input's
   values, so it shares the input's statistics and is not exposed at all (offline DPCRN: 37 % of activation values);
   a Concat of activations holds exactly its inputs' values, so its statistics are their exact merge (8.6 %), and
   a constant-zero Pad holds its input's values and zeros, so its statistics are the input's merged with the number
   of zeros it added, which the augmented graph computes as Size(output) - Size(input) (an int64 output), and the
   input of a Slice along one axis with step 1 holds the slice's values and those of the two parts left out, which
   the augmented graph cuts out as extra outputs (offline DPCRN: 5.9 % and 11.8 % of the values fetched before).
   Every derived statistic equals the fetched one exactly (integer counts, min/max), so results do not change.
2. collect: one pass over the feeds keeps running min/max per tensor (non-finite values counted and ignored) and,
   for entropy and percentile, counts |x| into a power-of-two-range histogram that grows by exact pairwise merges
   (quant.calib.histogram), so the counts do not depend on the batch order. Nothing but these statistics (and, for
   small batches such as streaming frames, up to a chunk of values per tensor waiting to be counted at once) is kept
   between batches, so memory is one batch's activations (two with `overlap`: the graph runs on the next batch
   while this one's statistics update), and the feeds (a streaming roll, say) are made once.
3. compute: amax per tensor by minmax (max |x|), percentile (of |x|) or entropy (TensorRT's KL search on 2048 bins
   over [0, amax]).

`feeds` is any iterable of feed dicts (a list, a reader, a generator) or a callable returning one.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import onnx

from quant.calib import histogram as hist
from quant.errors import CalibrationError, ModelError
from quant.fileio import private_temp_dir
from quant.onnxgraph.graph import load_model
from quant.onnxgraph.shapes import infer_shapes

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
FeedSource = Union[Callable[[], Iterable[Feed]], Iterable[Feed]]
METHODS = ("entropy", "minmax", "percentile")
HISTOGRAM_METHODS = ("entropy", "percentile")
TEMP_PREFIX = "quant-ranges-"  # work folders in the system temp dir: quant-ranges-<pid>-<random>/augmented.onnx
# ops whose first output holds exactly the values of their first input, rearranged (same multiset, same dtype)
_SAME_VALUES_OPS = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
_UNION_OPS = {"Concat"}  # ops whose output holds exactly the values of all their inputs
ZERO_COUNT_SUFFIX = "/quant_zeros_added"  # augmented output: how many zeros the op making <name> added to its input
# batches of a tensor smaller than this wait to be counted together (TensorStats): ~30 us of calls per update is the
# cost of counting about 16 Ki values
SMALL_BATCH = hist.CHUNK_ELEMENTS // 16
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class RangeOptions:
    """Settings of a range collection; change with dataclasses.replace."""

    num_bins: int = hist.NUM_BINS
    num_levels: int = hist.NUM_LEVELS
    start_bin: int = hist.START_BIN
    suppress_zero_bin: bool = True  # entropy: bin 0 counted as bin 1 (pytorch-quantization; see histogram.py)
    percentile: float = hist.DEFAULT_PERCENTILE
    threads: int = 1  # ONNX Runtime intra-op threads, and threads updating the tensors' statistics after each run
    max_batch: int | None = None  # split feeds along axis 0 into chunks of this size (all inputs must share dim 0)
    # run the graph on the next batch while the statistics of this one update (same result; holds two batches'
    # activations at once: offline DPCRN, 8 segments one at a time, peak RSS 949 MB vs 825 MB without)
    overlap: bool = True
    progress: bool = True  # a progress bar while stderr is a terminal (never into a log file or pipe); False: none

    def __post_init__(self) -> None:  # checked up front, not after a first pass over the feeds
        if not 0 < self.percentile <= 100:
            raise CalibrationError(f"RangeOptions: percentile must be in (0, 100], got {self.percentile}")
        for name in ("num_bins", "num_levels", "threads", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CalibrationError(f"RangeOptions: {name} must be at least 1, got {value}")


@dataclass(frozen=True)
class TensorRange:
    name: str
    amax: float
    minimum: float
    maximum: float
    count: int  # finite values seen
    nonfinite: int  # NaN/inf values ignored


@dataclass(frozen=True)
class RangeResult:
    method: str
    params: Mapping[str, Any]
    tensors: Mapping[str, TensorRange]
    skipped: tuple[str, ...] = ()
    batches: int = 0
    # the |x| histograms the thresholds were chosen from (entropy, percentile; none for minmax), for the report
    histograms: Mapping[str, hist.AbsHistogram] = field(default_factory=dict, compare=False, repr=False)

    @property
    def amax(self) -> dict[str, float]:
        return {name: tensor.amax for name, tensor in self.tensors.items()}


@dataclass
class TensorStats:
    """What the collector keeps per tensor between batches: running min/max and, for the histogram methods, the |x|
    histogram over a power-of-two range.

    Small batches (below SMALL_BATCH values; a streaming frame: 3000 values on average for the streaming DPCRN) wait
    in `pending` until a chunk's worth has come, then update the statistics at once: an update costs about 30 us of
    calls whatever its size. The statistics do not depend on how the values are grouped (exact merges); `flush()`
    must come before they are read (`with_derived`, `merge_stats` and the shard runner call it)."""

    minmax: hist.MinMaxAccumulator = field(default_factory=hist.MinMaxAccumulator)
    histogram: hist.Pow2Histogram | None = None
    pending: list[np.ndarray] = field(default_factory=list, repr=False)
    pending_size: int = 0

    def add(self, values: np.ndarray) -> None:
        if values.dtype.kind in "iu":  # not activations: a count of zeros an op added (see augment_model)
            self.add_zeros(int(values.sum()))
            return
        if values.size >= SMALL_BATCH:  # its own update costs little more than its values' (no copy)
            self._count(values.reshape(-1))
            return
        self.pending.append(values.reshape(-1))
        self.pending_size += values.size
        if self.pending_size >= hist.CHUNK_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        """Count the pending values."""
        if self.pending:
            flat = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
            self.pending, self.pending_size = [], 0
            self._count(flat)

    def _count(self, flat: np.ndarray) -> None:
        if self.histogram is None:
            self.minmax.add(flat)
            return
        # chunk by chunk, so the histogram's passes read what the min/max passes just brought into the cache; the
        # range grows chunk by chunk too, which the exact merges make irrelevant to the counts
        for start in range(0, flat.size, hist.CHUNK_ELEMENTS):
            chunk = flat[start : start + hist.CHUNK_ELEMENTS]
            self.minmax.add(chunk)
            self.histogram.cover(self.minmax.amax)  # first grow the range to this chunk's max |x|, then count
            self.histogram.add(chunk)

    def add_zeros(self, count: int) -> None:
        """As if `count` zeros were added."""
        self.minmax.add_zeros(count)
        if self.histogram is not None:
            self.histogram.add_zeros(count)


def new_stats(histograms: bool, options: RangeOptions) -> TensorStats:
    """Empty statistics of one tensor, with a histogram of the resolution `options.num_bins` asks for."""
    return TensorStats(histogram=hist.Pow2Histogram(hist.collect_bins(options.num_bins)) if histograms else None)


def method_params(method: str, options: RangeOptions) -> dict[str, Any]:
    """The parameters that determine a method's result (part of a cache key)."""
    if method == "minmax":
        return {}
    if method == "percentile":
        return {"num_bins": options.num_bins, "percentile": options.percentile, **collector_params(method)}
    if method == "entropy":
        return {"num_bins": options.num_bins, "num_levels": options.num_levels, "start_bin": options.start_bin,
                "suppress_zero_bin": options.suppress_zero_bin, **collector_params(method)}
    raise CalibrationError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")


def collector_params(method: str) -> dict[str, str]:
    """The parameter naming how a method's statistics are collected: today's collector, whatever a cache recorded, so
    ranges from an earlier collector (the two-pass one has no such entry) are a different key, never a hit."""
    return {"collector": hist.COLLECTOR} if method in HISTOGRAM_METHODS else {}


def collect_ranges(
    onnx_path: str | Path, feeds: FeedSource, method: str = "entropy", options: RangeOptions | None = None
) -> RangeResult:
    """amax (and min/max, non-finite counts) for every float activation of the model at `onnx_path`."""
    options = options or RangeOptions()
    params = method_params(method, options)
    stats, skipped, batches = collect_statistics(onnx_path, feeds, histograms=method != "minmax", options=options)
    return RangeResult(method, params, tensor_ranges(stats, method, options), tuple(skipped), batches,
                       histograms_of(stats, options))


def histograms_of(stats: Mapping[str, TensorStats], options: RangeOptions) -> dict[str, hist.AbsHistogram]:
    """The |x| histograms the thresholds were chosen from, as `options.num_bins` bins over [0, amax] (the collected
    power-of-two bins interpolated, as the entropy search sees them); none after a minmax collection."""
    return {name: hist.regrid(item.histogram, options.num_bins) for name, item in stats.items()
            if item.histogram is not None}


def collect_statistics(
    onnx_path: str | Path, feeds: FeedSource, histograms: bool = True, options: RangeOptions | None = None
) -> tuple[dict[str, TensorStats], list[str], int]:
    """Min/max and, with `histograms`, |x| histograms in one pass. Returns (stats, skipped tensors, batches)."""
    options = options or RangeOptions()
    augmented = augment_model(_load(onnx_path))
    # the augmented model is only read while the session is made: its folder goes before the long pass, so a
    # run killed during it leaves nothing in the temp dir (and one killed earlier is cleaned by the next run)
    with private_temp_dir(TEMP_PREFIX) as tmp:
        session = _session(augmented.model, tmp, options.threads)
    stats = {name: new_stats(histograms, options) for name in augmented.fetched}
    batches = _run_pass(session, augmented.fetched, _open(feeds), options, "ranges",
                        lambda name, value: stats[name].add(value))
    if batches == 0:
        raise CalibrationError(f"no calibration feeds for {onnx_path}: the feed source yielded nothing")
    return with_derived(stats, augmented, histograms, options), augmented.skipped, batches


def with_derived(stats: Mapping[str, TensorStats], augmented: Augmented, histograms: bool, options: RangeOptions
                 ) -> dict[str, TensorStats]:
    """Statistics of every calibrated name: an alias shares (the same object as) its source's, a union is the exact
    merge of its parts' (a Slice's input is derived from its output, which may be derived in turn)."""
    for item in stats.values():
        item.flush()
    every = dict(stats)

    def resolve(name: str) -> TensorStats:
        if name not in every:
            if name in augmented.unions:
                every[name] = merge_stats([resolve(part) for part in augmented.unions[name]], histograms, options)
            else:
                every[name] = resolve(augmented.aliases[name])
        return every[name]

    return {name: resolve(name) for name in augmented.names}


def merge_stats(parts: Sequence[TensorStats], histograms: bool, options: RangeOptions) -> TensorStats:
    """One tensor's statistics as if one collector had seen every part's values (exact in any order)."""
    for part in parts:
        part.flush()
    merged = TensorStats(merge_minmax([part.minmax for part in parts]))
    if histograms:
        merged.histogram = hist.Pow2Histogram.merged([part.histogram for part in parts if part.histogram is not None],
                                                     hist.collect_bins(options.num_bins))
    return merged


def merge_minmax(parts: Sequence[hist.MinMaxAccumulator]) -> hist.MinMaxAccumulator:
    """One accumulator as if it had seen every part's values: min, max and integer sums (order independent)."""
    merged = hist.MinMaxAccumulator()
    for part in parts:
        merged.minimum = min(merged.minimum, part.minimum)
        merged.maximum = max(merged.maximum, part.maximum)
        merged.count += part.count
        merged.nonfinite += part.nonfinite
    return merged


@dataclass(frozen=True)
class Augmented:
    """The model with its activations as outputs, and which of them ONNX Runtime returns."""

    model: onnx.ModelProto
    names: list[str]  # every float activation calibrated, in graph order
    aliases: dict[str, str]  # name -> the tensor holding the same values (see _SAME_VALUES_OPS)
    # name -> the tensors whose values it holds, all of them: a Concat's inputs (_UNION_OPS), a zero Pad's input and
    # zero count, a Slice's input: the slice and the two parts left out
    unions: dict[str, tuple[str, ...]]
    skipped: list[str]  # activations of unknown type, not calibrated
    # outputs added to the graph, parts of unions but not calibrated themselves: the zeros a Pad added (int64), the
    # parts of a Slice's input before and after the slice
    extra_outputs: tuple[str, ...] = ()

    @property
    def fetched(self) -> list[str]:
        """The outputs to run: activations whose statistics follow from no other's, then the extra outputs."""
        activations = [name for name in self.names if name not in self.aliases and name not in self.unions]
        return activations + list(self.extra_outputs)


def augment_model(model: onnx.ModelProto) -> Augmented:
    """A copy exposing every float activation as an output, except those whose statistics follow from others'."""
    augmented, names, skipped = _expose(model)
    aliases, unions = value_aliases(model, names), value_unions(model, names)
    extra: list[str] = []
    for name, source in zero_pads(model, names).items():
        unions[name] = (source, _add_zero_count(augmented.graph, name, source))
        extra.append(unions[name][1])
    for name, node in sliced_inputs(model, names, set(aliases) | set(unions)).items():
        unions[name] = (node.output[0], *_add_slice_complement(augmented.graph, node))
        extra.extend(unions[name][1:])
    originals = {output.name for output in model.graph.output}
    kept = [output for output in augmented.graph.output
            if output.name in originals or (output.name not in aliases and output.name not in unions)]
    del augmented.graph.output[:]
    augmented.graph.output.extend(kept)
    return Augmented(augmented, names, aliases, unions, skipped, tuple(extra))


def value_aliases(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """name -> the first tensor of its chain of rearranging ops (both calibrated), whose statistics it shares."""
    calibrated = set(names)
    aliases: dict[str, str] = {}
    for node in model.graph.node:  # ONNX keeps nodes in topological order: a chain's head is resolved first
        if (node.op_type in _SAME_VALUES_OPS and node.input and node.input[0] in calibrated
                and node.output[0] in calibrated):
            aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
    return aliases


def value_unions(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[str, ...]]:
    """name -> the inputs of the Concat that made it, when every one of them is calibrated."""
    calibrated = set(names)
    return {node.output[0]: tuple(node.input) for node in model.graph.node
            if node.op_type in _UNION_OPS and node.output[0] in calibrated and node.input
            and all(name in calibrated for name in node.input)}


def zero_pads(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """name -> the input of the Pad that made it, for Pads that only add zeros to a calibrated activation (mode
    constant, value 0, pads that are constants >= 0: a negative pad crops), whose output holds exactly the input's
    values plus zeros. Pads computed from constants (as torch's export writes them) are folded here."""
    calibrated = set(names)
    pads = {}
    for node in model.graph.node:
        if node.op_type != "Pad" or node.input[0] not in calibrated or node.output[0] not in calibrated:
            continue
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        if attributes.get("mode", b"constant") != b"constant":
            continue
        if len(node.input) > 1:  # opset >= 11: pads and the value are inputs (the value defaults to 0)
            widths = constant_value(model, node.input[1])
            value = constant_value(model, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        else:
            widths, value = np.array(attributes.get("pads", [])), np.array(attributes.get("value", 0.0))
        if widths is not None and value is not None and np.all(widths >= 0) and value.size == 1 and value.item() == 0:
            pads[node.output[0]] = node.input[0]
    return pads


def sliced_inputs(model: onnx.ModelProto, names: list[str], derived: set[str]) -> dict[str, onnx.NodeProto]:
    """name -> a Slice of it along one axis with step 1 (both calibrated, the input not derived otherwise): its
    values are exactly those of the slice and of the parts before and after it (`_add_slice_complement`)."""
    calibrated = set(names)
    slices: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        source = node.input[0] if node.input else ""
        if (node.op_type != "Slice" or len(node.input) < 4 or source not in calibrated or source in derived
                or source in slices or node.output[0] not in calibrated or node.output[0] in derived):
            continue
        axes = constant_value(model, node.input[3]) if node.input[3] else None
        steps = constant_value(model, node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
        if axes is not None and axes.size == 1 and steps is not None and np.all(steps == 1):
            slices[source] = node
    return slices


def _add_slice_complement(graph: onnx.GraphProto, node: onnx.NodeProto) -> tuple[str, str]:
    """Add the parts of a one-axis, step-1 Slice's input before and after the slice to `graph` as outputs; returns
    their names. The slice starts at s = clamp(start (+ dim if < 0), 0, dim), as ONNX defines it, and is as long as
    its output is along the axis, so the parts are input[:s] and input[s + len:], also for an empty slice."""
    source, sliced, starts, axes = node.input[0], node.output[0], node.input[1], node.input[3]
    prefix = sliced + "/quant_"
    constants = {"zero": [0], "last": [np.iinfo(np.int64).max]}
    graph.node.extend([onnx.helper.make_node("Constant", [], [prefix + key], value=onnx.numpy_helper.from_array(
        np.array(value, np.int64))) for key, value in constants.items()])
    make = onnx.helper.make_node
    int64 = onnx.TensorProto.INT64
    graph.node.extend([
        make("Cast", [axes], [prefix + "axes"], to=int64),
        make("Cast", [starts], [prefix + "start"], to=int64),
        make("Shape", [source], [prefix + "shape"]),
        make("Gather", [prefix + "shape", prefix + "axes"], [prefix + "dim"]),
        make("Less", [prefix + "start", prefix + "zero"], [prefix + "negative"]),
        make("Add", [prefix + "start", prefix + "dim"], [prefix + "wrapped"]),
        make("Where", [prefix + "negative", prefix + "wrapped", prefix + "start"], [prefix + "unclamped"]),
        make("Max", [prefix + "unclamped", prefix + "zero"], [prefix + "positive"]),
        make("Min", [prefix + "positive", prefix + "dim"], [prefix + "begin"]),
        make("Shape", [sliced], [prefix + "sliced_shape"]),
        make("Gather", [prefix + "sliced_shape", prefix + "axes"], [prefix + "length"]),
        make("Add", [prefix + "begin", prefix + "length"], [prefix + "end"]),
        make("Slice", [source, prefix + "zero", prefix + "begin", prefix + "axes"], [prefix + "before"]),
        make("Slice", [source, prefix + "end", prefix + "last", prefix + "axes"], [prefix + "after"]),
    ])
    parts = (prefix + "before", prefix + "after")
    elem_type = next(output.type.tensor_type.elem_type for output in graph.output if output.name == source)
    graph.output.extend(onnx.helper.make_tensor_value_info(part, elem_type, None) for part in parts)
    return parts


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor `name` when it follows from initializers and Constant nodes alone, else None."""
    makers = {output: node for node in model.graph.node for output in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    needed: list[onnx.NodeProto] = []
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor in initializers or not tensor:
            continue
        seen.add(tensor)
        if tensor not in makers:  # a graph input: not a constant
            return None
        needed.append(makers[tensor])
        pending.extend(makers[tensor].input)
    order = {id(node): index for index, node in enumerate(model.graph.node)}
    nodes = sorted({id(node): node for node in needed}.values(), key=lambda node: order[id(node)])
    used = {tensor for node in nodes for tensor in node.input} | {name}
    graph = onnx.helper.make_graph(nodes, "constant", [], [onnx.helper.make_tensor_value_info(name, 0, None)],
                                   [initializers[tensor] for tensor in used if tensor in initializers])
    try:
        from onnx.reference import ReferenceEvaluator

        subgraph = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        outputs: Any = ReferenceEvaluator(subgraph).run([name], {})
        return np.asarray(outputs[0])
    except Exception as error:  # noqa: BLE001 - an op the reference cannot run: treated as not constant
        log.debug("could not fold %s: %s", name, error)
        return None


def _add_zero_count(graph: onnx.GraphProto, name: str, source: str) -> str:
    """Add Size(name) - Size(source) to `graph` as an int64 output; returns its name."""
    count = name + ZERO_COUNT_SUFFIX
    graph.node.extend([onnx.helper.make_node("Size", [name], [count + "/out"]),
                       onnx.helper.make_node("Size", [source], [count + "/in"]),
                       onnx.helper.make_node("Sub", [count + "/out", count + "/in"], [count])])
    graph.output.append(onnx.helper.make_tensor_value_info(count, onnx.TensorProto.INT64, []))
    return count


def _expose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy with every float activation as an output. Returns (model, their names, skipped names)."""
    inferred = _infer_types(model)
    types = _value_types(inferred)
    candidates = _activation_names(model)
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {output.name for output in augmented.graph.output}
    names: list[str] = []
    skipped: list[str] = []
    for name in candidates:
        elem_type = types.get(name)
        if elem_type is None:
            skipped.append(name)
            continue
        if elem_type not in _FLOAT_TYPES:
            continue
        names.append(name)
        if name not in existing:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    if skipped:
        log.warning("%d tensors have no inferable type and are not calibrated: %s", len(skipped),
                    ", ".join(skipped[:10]))
    return augmented, names, skipped


def _activation_names(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in initializers]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(output for output in node.output if output and output not in initializers)
    return list(dict.fromkeys(names))


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` typed by ONNX's shape inference, or by the symbolic one where ONNX's leaves an activation untyped."""
    inferred = infer_shapes(model) or model
    if set(_activation_names(model)) <= set(_value_types(inferred)):
        return inferred
    return infer_shapes(model, symbolic=True, guess_output_rank=True) or inferred


def _load(onnx_path: str | Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} not found: export it first (quant export) or pass an existing .onnx")
    return load_model(path)


def _session(model: onnx.ModelProto, tmp: Path, threads: int) -> Any:
    path = tmp / "augmented.onnx"
    large = model.ByteSize() > 1_900_000_000
    onnx.save(model, str(path), save_as_external_data=large, location="augmented.data" if large else None)
    try:
        from quant.backends.ort import make_session
    except ImportError:
        return _fallback_session(path, threads)
    # ORT's idle threads would spin-wait through every gap between kernels on the CPUs the statistics updates need:
    # without spinning, offline DPCRN percentile (8 segments, 2 threads, interleaved x4, load 6) took 6.1 s of CPU
    # instead of 7.1 s, and as much less wall time
    return make_session(path, threads=threads, spinning=False)


def _fallback_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # activations of one batch are freed, not kept in an arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as in _session
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _open(feeds: FeedSource) -> Iterable[Feed]:
    return feeds() if callable(feeds) else feeds


def _run_pass(
    session: Any, names: list[str], feeds: Iterable[Feed], options: RangeOptions, label: str,
    update: Callable[[str, np.ndarray], None],
) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    input_names = [item.name for item in session.get_inputs()]
    batches = 0
    # each tensor's statistics get one update per batch, batches in order (a batch's updates all finish before the
    # next batch's start), so neither the threads nor the overlap ever change a result; numpy's min/max and the
    # compiled count (quant.calib.counting) release the GIL, and so does ONNX Runtime in run(), so with `overlap` the
    # graph runs on batch k+1 (and the feed source makes it) while the pool updates batch k's statistics
    with ThreadPoolExecutor(options.threads) as pool:
        updating: list[Future[None]] = []
        try:
            # disable=None: tqdm draws only on a terminal, so a redirected stderr gets no bar text
            bar = tqdm(feeds, desc=label, unit="batch", disable=None if options.progress else True, leave=False)
            for feed in bar:
                for part in split_feed(feed, options.max_batch):
                    missing = [name for name in input_names if name not in part]
                    if missing:
                        raise CalibrationError(f"calibration feed lacks model input(s) {missing}; it has "
                                               f"{sorted(part)}")
                    outputs = _run(session, names, {name: part[name] for name in input_names})
                    _finish(updating)
                    updating = [pool.submit(_update_each, update, [(names[index], outputs[index]) for index in group])
                                for group in balanced_groups([output.size for output in outputs], options.threads)]
                    del outputs  # the pool's work items hold the arrays until each update is done
                    if not options.overlap:
                        _finish(updating)
                    batches += 1
            _finish(updating)
        finally:
            for future in updating:  # after an error: updates not yet started never start
                future.cancel()
    return batches


def balanced_groups(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices of `sizes` in at most `count` groups of about equal total size (largest first, each to the group with
    the least so far): one work item per thread and batch, where one per tensor cost ~10 us of pool overhead each
    (95 tensors a frame for the streaming DPCRN)."""
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(sizes)), key=lambda index: -sizes[index]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += sizes[index]
    return [group for group in groups if group]


def _update_each(update: Callable[[str, np.ndarray], None], items: list[tuple[str, np.ndarray]]) -> None:
    for name, values in items:
        update(name, values)


def _finish(updating: list[Future[None]]) -> None:
    """Wait for a batch's updates; the first update's error is raised here."""
    for future in updating:
        future.result()
    updating.clear()


def _run(session: Any, names: list[str], feed: Feed) -> list[np.ndarray]:
    try:
        return list(session.run(names, feed))
    except Exception as error:  # noqa: BLE001 - ORT raises its own types (InvalidArgument, Fail, ...)
        expected = {item.name: item.shape for item in session.get_inputs()}
        got = {name: tuple(value.shape) for name, value in feed.items()}
        raise CalibrationError(f"ONNX Runtime rejected a calibration feed: inputs {got}, model expects {expected}: "
                               f"{str(error).splitlines()[0]}") from None


def split_feed(feed: Feed, max_batch: int | None) -> Iterator[Feed]:
    """`feed` in batches of at most `max_batch` items along axis 0 (None: as it is)."""
    if max_batch is None:
        yield feed
        return
    sizes = {int(value.shape[0]) if value.ndim else -1 for value in feed.values()}
    if len(sizes) != 1 or -1 in sizes:
        shapes = {name: value.shape for name, value in feed.items()}
        raise CalibrationError(f"max_batch needs every input to share its first dimension, got shapes {shapes}")
    size = sizes.pop()
    for start in range(0, size, max_batch):
        yield {name: value[start : start + max_batch] for name, value in feed.items()}


def tensor_ranges(stats: Mapping[str, TensorStats], method: str, options: RangeOptions) -> dict[str, TensorRange]:
    """The range of every tensor; aliases (names sharing one statistics object) share one threshold search."""
    searched: dict[int, TensorRange] = {}
    ranges = {}
    for name, item in stats.items():
        if id(item) not in searched:
            searched[id(item)] = _tensor_range(name, item, method, options)
        ranges[name] = replace(searched[id(item)], name=name)
    return ranges


def _tensor_range(name: str, stats: TensorStats, method: str, options: RangeOptions) -> TensorRange:
    minmax = stats.minmax
    if method == "minmax" or stats.histogram is None:
        amax = minmax.amax
    elif method == "percentile":
        amax = hist.percentile_amax(stats.histogram, options.percentile)
    else:
        amax = hist.entropy_amax(hist.regrid(stats.histogram, options.num_bins), options.num_levels,
                                 options.start_bin, options.suppress_zero_bin)
    if minmax.nonfinite:
        log.info("tensor %s: ignored %d non-finite values", name, minmax.nonfinite)
    minimum = minmax.minimum if minmax.count else 0.0
    maximum = minmax.maximum if minmax.count else 0.0
    return TensorRange(name, float(amax), float(minimum), float(maximum), minmax.count, minmax.nonfinite)

