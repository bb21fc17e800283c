"""Model specs: everything quant needs to know about one model, in one small TOML file (docs/specs.md).

`load_spec("dpcrn")` loads a shipped spec (quant/assets/specs/<name>.toml); `load_spec("path/to/model.toml")` a
user's. The loader is strict: an unknown key, a wrong type or a value out of range is a SpecError naming the file,
the key path (`frontend.window`) and what is allowed. Paths in a spec are relative to the spec file; they are
resolved at load time but checked for existence only when used (`GraphSpec.onnx_path`, `resolve_manifest`), so a
spec can be loaded, inspected and validated before its ONNX files exist.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from quant.errors import ModelError
from quant.paths import ASSETS_DIR
from quant.tomlschema import SchemaError, from_table, to_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport (pip install tomli)
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

SPECS_DIR = ASSETS_DIR / "specs"
CALIB_DATA_PREFIX = "calib_data:"  # `calib_data:se_calib` = the committed set's manifest (quant.paths.calib_data_dir)

Task = Literal["se", "asr"]
Transform = Literal["stft", "magnitude", "power", "log10_power", "fbank", "waveform_frames", "waveform"]
Window = Literal["none", "hann", "sqrt_hann", "sine"]
OutputKind = Literal["spectrum", "mask_magnitude", "mask_complex", "time_frames", "waveform"]
Inverse = Literal["istft", "overlap_add", "none"]
Method = Literal["entropy", "minmax", "percentile"]
SeMetric = Literal["pesq_wb", "pesq_nb", "stoi", "si_sdr"]
AsrMetric = Literal["cer", "wer"]
TextNormalization = Literal["english", "none"]
StateDtype = Literal["float32", "float16"]
# exact graph rewrites applied before every build (quant.rewrite.REWRITES implements each; tests pin the two lists)
Rewrite = Literal["deconv-to-conv", "split-concat-conv", "prelu-to-leakyrelu", "gru-step-to-matmul"]

# the axes each transform produces (layout letters): B batch, F bins, T frames, C channel (re/im for stft, else a
# singleton the layout may add), S samples (of a frame, or of the whole waveform)
AXES: Mapping[str, str] = {"stft": "BFTC", "magnitude": "BFT", "power": "BFT", "log10_power": "BFT",
                           "fbank": "BTF", "waveform_frames": "BTS", "waveform": "BS"}
DEFAULT_LAYOUTS: Mapping[str, str] = {"stft": "B F T C", "magnitude": "B F T", "power": "B F T",
                                      "log10_power": "B F T", "fbank": "B T F", "waveform_frames": "B T S",
                                      "waveform": "B S"}
SPECTRAL = ("stft", "magnitude", "power", "log10_power")
# the output kinds' inverse transforms (time-domain waveform from the model output)
INVERSES: Mapping[str, str] = {"spectrum": "istft", "mask_magnitude": "istft", "mask_complex": "istft",
                               "time_frames": "overlap_add", "waveform": "none"}
# graphs quant exports itself (`export = NAME`): quant.artifacts.export.export_model name, file it writes
EXPORTS: Mapping[str, tuple[str, str]] = {
    "dpcrn": ("dpcrn", "dpcrn.onnx"), "dpcrn-stream": ("dpcrn-stream", "dpcrn_stream.onnx"),
    "wenet-encoder": ("wenet", "encoder.onnx"), "wenet-decoder": ("wenet", "decoder.onnx"),
}
# feed sources a graph input can name besides `<role>:<output>` of an earlier graph
FRONTEND_SOURCES = ("frontend", "frontend:lengths", "waveform", "waveform:lengths")
NBEST_FIELDS = ("hyps_pad_sos_eos", "r_hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score")


class SpecError(ModelError):
    """A model spec file is missing, not TOML, or has a key, type or value quant does not accept."""


def _positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise SchemaError(key, f"must be positive, got {value}")


# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: Task
    description: str = ""


@dataclass(frozen=True)
class FeedSpec:
    """`input` of this graph is fed from `from`: frontend | frontend:lengths | waveform | waveform:lengths |
    <role>:<output> of an earlier graph | nbest:<field> (ASR rescoring inputs built from the CTC n-best)."""

    input: str
    source: str = field(metadata={"key": "from"})

    def __post_init__(self) -> None:
        if self.source in FRONTEND_SOURCES:
            return
        role, _, tensor = self.source.partition(":")
        if not role or not tensor:
            raise SchemaError("from", f"{self.source!r} is not one of {', '.join(FRONTEND_SOURCES)}, "
                              "'<role>:<output>' or 'nbest:<field>'")
        if role == "nbest" and tensor not in NBEST_FIELDS:
            raise SchemaError("from", f"{self.source!r}: n-best fields are {', '.join(NBEST_FIELDS)}")

    @property
    def graph(self) -> str | None:
        """The role of the graph whose output feeds this input (None for front-end and n-best sources)."""
        role, _, _ = self.source.partition(":")
        return None if self.source in FRONTEND_SOURCES or role == "nbest" else role

    @property
    def tensor(self) -> str:
        return self.source.partition(":")[2]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: a file (`path`, relative to the spec) or a reference model quant exports (`export`)."""

    role: str
    path: Path | None = None
    export: Literal["dpcrn", "dpcrn-stream", "wenet-encoder", "wenet-decoder"] | None = None
    name: str | None = None  # artifact/cache name (engines/<name>/); default: the model name, or <model>-<role>
    inputs: tuple[str, ...] = ()  # expected input names, checked against the ONNX file when it is opened
    outputs: tuple[str, ...] = ()
    feeds: tuple[FeedSpec, ...] = ()
    calibration_method: Method | None = None  # default: [defaults] calibration_method
    # exact rewrites (in order) of the graph that every build starts from, FP32 included; `--rewrites` overrides
    rewrites: tuple[Rewrite, ...] = ()
    # shipped precision rules (quant/precision_default.toml, by name) this graph's builds leave out, where measurements
    # on this model overrule them; a `--rules FILE` or a searched rules file is a whole plan and ignores it
    rules_off: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.rewrites)) != len(self.rewrites):
            raise SchemaError("rewrites", f"graph {self.role!r} names a rewrite twice: {list(self.rewrites)}")
        if len(set(self.rules_off)) != len(self.rules_off):
            raise SchemaError("rules_off", f"graph {self.role!r} names a rule twice: {list(self.rules_off)}")
        if (self.path is None) == (self.export is None):
            raise SchemaError("", f"graph {self.role!r} needs exactly one of 'path' (an ONNX file) or 'export' "
                              f"({', '.join(EXPORTS)})")
        inputs = [feed.input for feed in self.feeds]
        if len(set(inputs)) != len(inputs):
            raise SchemaError("feeds", f"graph {self.role!r} feeds an input twice: {inputs}")

    @property
    def export_file(self) -> str | None:
        """The file name quant's exporter writes for this graph (None for user graphs)."""
        return EXPORTS[self.export][1] if self.export else None

    @property
    def exporter(self) -> str | None:
        """The quant.artifacts.export.export_model name that writes this graph (None for user graphs)."""
        return EXPORTS[self.export][0] if self.export else None

    @property
    def stem(self) -> str:
        """The graph's key in results (artifacts, speed, error_vs_fp32) and in PyTorch eager's module table: the
        stem of its ONNX file (dpcrn, dpcrn_stream, encoder, decoder for the reference exports)."""
        return Path(self.export_file or str(self.path)).stem

    def onnx_path(self, export_dir: Path | None = None) -> Path:
        """The ONNX file of this graph; it must exist now. Exported graphs live in `export_dir`."""
        if self.path is not None:
            path = self.path
        elif export_dir is None:
            raise SpecError(f"graph {self.role!r} is exported by quant ({self.export}); pass the export folder")
        else:
            path = export_dir / str(self.export_file)
        if not path.is_file():
            raise ModelError(f"{path}: ONNX file of graph {self.role!r} not found; fix 'path' in the spec "
                             "(relative to the spec file) or export the model first")
        return path


@dataclass(frozen=True)
class FbankSpec:
    """Kaldi fbank (kaldi-native-fbank); the waveform is multiplied by `scale` first (WeNet: int16 range)."""

    bins: int = 80
    frame_ms: float = 25.0
    shift_ms: float = 10.0
    dither: float = 0.0
    scale: float = 32768.0
    snip_edges: bool = True

    def __post_init__(self) -> None:
        _positive(bins=self.bins)
        if self.frame_ms <= 0 or self.shift_ms <= 0 or self.shift_ms > self.frame_ms:
            raise SchemaError("shift_ms", f"need 0 < shift_ms <= frame_ms, got {self.shift_ms} / {self.frame_ms}")


@dataclass(frozen=True)
class FrontendSpec:
    """Waveform -> model input features. frame/hop/n_fft in samples; layout: axis letters in the model's order."""

    transform: Transform
    sample_rate: int = 16000
    frame: int = 512
    hop: int = 256
    n_fft: int | None = None  # default: frame
    window: Window = "hann"
    center: bool = True  # pad n_fft // 2 on both sides (torch.stft center=True)
    pad_mode: Literal["constant", "reflect"] = "constant"
    layout: str | None = None  # default: DEFAULT_LAYOUTS[transform]
    bins: int | None = None  # spectral transforms: checked against n_fft // 2 + 1
    log_floor: float = 1e-12  # log10_power: log10(power + log_floor)
    fixed_frames: int | None = None  # a model input with a fixed T (offline fixed-length models)
    segment_samples: int | None = None  # long audio is cut into segments of this many samples (tail zero-padded)
    # the fewest frames the first graph turns into any output (WeNet's Conv2dSubsampling4: 7); shorter utterances
    # are skipped by calibration with a warning, and a set of only such utterances is refused
    min_frames: int = 1
    fbank: FbankSpec = field(default_factory=FbankSpec)

    def __post_init__(self) -> None:
        _positive(sample_rate=self.sample_rate, frame=self.frame, hop=self.hop, n_fft=self.n_fft,
                  fixed_frames=self.fixed_frames, segment_samples=self.segment_samples, min_frames=self.min_frames)
        if self.fft_size < self.frame:
            raise SchemaError("n_fft", f"must be at least frame ({self.frame}), got {self.fft_size}")
        self._check_layout()
        if self.bins is not None and self.transform in SPECTRAL and self.bins != self.freq_bins:
            raise SchemaError("bins", f"{self.bins} bins, but n_fft {self.fft_size} gives n_fft // 2 + 1 = "
                              f"{self.freq_bins}; set n_fft = {2 * (self.bins - 1)} or drop 'bins'")
        if self.fixed_frames and self.segment_samples and self.frames(self.segment_samples) != self.fixed_frames:
            raise SchemaError("fixed_frames", f"{self.fixed_frames}, but a segment of {self.segment_samples} "
                              f"samples gives {self.frames(self.segment_samples)} frames")

    def _check_layout(self) -> None:
        letters = self.axes
        needed = AXES[self.transform]
        extra = set(letters) - set(needed) - ({"C"} if self.transform != "waveform" else set())
        if sorted(set(letters)) != sorted(letters) or set(needed) - set(letters) or extra:
            raise SchemaError("layout", f"{self.layout!r} for {self.transform}: needs the axes "
                              f"{' '.join(needed)} once each" + (", optionally C (size 1)" if "C" not in needed
                                                                  and self.transform != "waveform" else ""))

    @property
    def axes(self) -> str:
        """Layout as a string of axis letters, e.g. 'BFTC'."""
        return "".join((self.layout or DEFAULT_LAYOUTS[self.transform]).split())

    @property
    def fft_size(self) -> int:
        return self.n_fft if self.n_fft is not None else self.frame

    @property
    def freq_bins(self) -> int:
        """Bins of the model input's F axis (mel bins for fbank)."""
        return self.fbank.bins if self.transform == "fbank" else self.fft_size // 2 + 1

    def frames(self, samples: int) -> int:
        """Frames the transform makes of `samples` samples."""
        if self.transform == "waveform":
            return samples
        if self.transform == "fbank":
            length = round(self.sample_rate * self.fbank.frame_ms / 1000)
            shift = round(self.sample_rate * self.fbank.shift_ms / 1000)
            return 0 if samples < length else 1 + (samples - length) // shift
        if self.center:
            return 1 + samples // self.hop
        return 0 if samples < self.fft_size else 1 + (samples - self.fft_size) // self.hop


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state: fed as `input`, its next value comes back as `output` (default `<input>_out`)."""

    input: str
    output: str | None = None
    shape: tuple[int, ...] = ()  # () = the ONNX input's shape, which must then be fixed
    init: float = 0.0  # every element's value at the start of an utterance
    dtype: StateDtype = "float32"

    def __post_init__(self) -> None:
        if any(d <= 0 for d in self.shape):
            raise SchemaError("shape", f"state {self.input!r}: dimensions must be positive, got {list(self.shape)}")

    @property
    def output_name(self) -> str:
        return self.output or f"{self.input}{STATE_SUFFIX}"


STATE_SUFFIX = "_out"


@dataclass(frozen=True)
class StreamingSpec:
    """A frame-by-frame model: one frame input plus recurrent states (listed, or paired by the `_out` convention)."""

    frame_input: str
    states: tuple[StateSpec, ...] = ()  # empty: every other input `x` pairs with the output `x_out`
    frames_per_step: int = 1
    reset_per_utterance: bool = True

    def __post_init__(self) -> None:
        _positive(frames_per_step=self.frames_per_step)
        names = [s.input for s in self.states]
        if len(set(names)) != len(names) or self.frame_input in names:
            raise SchemaError("states", f"state inputs must be distinct and differ from frame_input; got {names}")

    def state_pairs(self) -> dict[str, str] | None:
        """input -> output names as quant.onnxgraph.graph.state_pairs takes them (None: the `_out` convention)."""
        return {s.input: s.output_name for s in self.states} or None


@dataclass(frozen=True)
class OutputSpec:
    """What the model returns and how it becomes a waveform (SE)."""

    name: str  # output tensor
    kind: OutputKind
    graph: str | None = None  # role of the graph returning it (default: the last graph)
    inverse: Inverse | None = None  # default: INVERSES[kind]
    layout: str | None = None  # default: the front end's layout (masks: without C unless mask_complex)

    def __post_init__(self) -> None:
        if self.inverse is not None and self.inverse != INVERSES[self.kind]:
            raise SchemaError("inverse", f"{self.inverse!r} does not invert a {self.kind!r} output; "
                              f"use {INVERSES[self.kind]!r} or leave it out")


@dataclass(frozen=True)
class SeTaskSpec:
    metrics: tuple[SeMetric, ...] = ("pesq_wb", "pesq_nb", "stoi", "si_sdr")


@dataclass(frozen=True)
class AsrTaskSpec:
    """CTC prefix beam search + attention rescoring, in WeNet's conventions."""

    units: Path  # WeNet units.txt (`<unit> <id>` lines, ids 0..N-1)
    metrics: tuple[AsrMetric, ...] = ("cer", "wer")
    blank: int = 0
    sos: int | None = None  # default: the last unit id (WeNet's `<sos/eos>`)
    eos: int | None = None
    ctc_weight: float = 0.3
    reverse_weight: float = 0.0  # U2++ bidirectional decoders: weight of the right-to-left scores
    beam: int = 10
    text_normalization: TextNormalization = "none"  # "english": quant.models.tokenizer.normalize_text on both sides

    def __post_init__(self) -> None:
        _positive(beam=self.beam)
        if not 0.0 <= self.reverse_weight <= 1.0:
            raise SchemaError("reverse_weight", f"must be in [0, 1], got {self.reverse_weight}")
        if any(i is not None and i < 0 for i in (self.blank, self.sos, self.eos)):
            raise SchemaError("blank", "unit ids must be >= 0")

    def token_ids(self, vocab_size: int) -> tuple[int, int, int]:
        """(blank, sos, eos) for a units file of `vocab_size` units (sos/eos default: the last id)."""
        ids = (self.blank, self.sos if self.sos is not None else vocab_size - 1,
               self.eos if self.eos is not None else vocab_size - 1)
        if max(ids) >= vocab_size:
            raise SpecError(f"{self.units}: {vocab_size} units, but task ids (blank, sos, eos) = {ids}; "
                            "fix [task] blank/sos/eos or the units file")
        return ids


# whether a larger value of a task metric is better (how a budget's allowed loss points)
HIGHER_IS_BETTER: Mapping[str, bool] = {"pesq_wb": True, "pesq_nb": True, "stoi": True, "si_sdr": True,
                                        "cer": False, "wer": False}


@dataclass(frozen=True)
class MetricBudget:
    """How much one precision may lose against FP32 on one task metric, in the units results.json stores (PESQ
    points, STOI, dB, CER/WER as fractions: 0.003 = 0.3 CER points). Give exactly one metric: the report judges it
    on the paired 95 % interval of the change."""

    pesq_wb: float | None = None
    pesq_nb: float | None = None
    stoi: float | None = None
    si_sdr: float | None = None
    cer: float | None = None
    wer: float | None = None

    def __post_init__(self) -> None:
        given = {name: value for name, value in self._values().items() if value is not None}
        if len(given) != 1:
            raise SchemaError("", f"name exactly one metric and how much it may lose, e.g. {{ pesq_wb = 0.05 }}; "
                              f"got {sorted(given) or 'none'}")
        if any(value < 0 for value in given.values()):
            raise SchemaError("", f"the allowed loss is a size (>= 0), got {given}")

    def _values(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def metric(self) -> str:
        return next(name for name, value in self._values().items() if value is not None)

    @property
    def limit(self) -> float:
        value = getattr(self, self.metric)
        assert value is not None
        return float(value)

    def to_row(self) -> dict[str, Any]:
        """The budget as a results.json row carries it (the report reads it from there)."""
        return {"metric": self.metric, "limit": self.limit, "higher_is_better": HIGHER_IS_BETTER[self.metric]}


@dataclass(frozen=True)
class BudgetsSpec:
    """Accuracy budgets per precision (none: that precision is reported but not judged)."""

    int8: MetricBudget | None = None
    fp16: MetricBudget | None = None

    def get(self, precision: str) -> MetricBudget | None:
        return {"int8": self.int8, "fp16": self.fp16}.get(precision)


@dataclass(frozen=True)
class DefaultsSpec:
    """Per-model defaults of the commands (each command's option overrides them)."""

    calibration_manifest: str | None = None  # a path (relative to the spec) or calib_data:<set>
    test_manifest: str | None = None
    calibration_method: Method = "percentile"
    batch_size: int = 4  # calibration batch (utterances or segments per feed)
    frame_stride: int = 4  # streaming calibration keeps every k-th frame (the roll runs every frame)
    budgets: BudgetsSpec = BudgetsSpec()

    def __post_init__(self) -> None:
        _positive(batch_size=self.batch_size, frame_stride=self.frame_stride)


@dataclass(frozen=True)
class FeedsSpec:
    """Escape hatch for inputs no front end makes: feeds from an .npz or from a Python function."""

    npz: Path | None = None  # arrays named by input (`<role>/<input>` with several graphs), axis 0 = one feed each
    function: str | None = None  # "module:function"; called as function(spec, graph, audio) -> iterable of feeds

    def __post_init__(self) -> None:
        if (self.npz is None) == (self.function is None):
            raise SchemaError("", "give exactly one of 'npz' or 'function'")
        module, _, name = (self.function or "m:f").partition(":")
        if not module or not name:
            raise SchemaError("function", f"expected 'module:function', got {self.function!r}")

    def load_function(self) -> Callable[..., Any]:
        """The user's feed function, imported now (a failure names the spec key and the import error)."""
        module_name, _, name = str(self.function).partition(":")
        try:
            function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise SpecError(f"feeds.function {self.function!r} cannot be imported: {error}") from None
        if not callable(function):
            raise SpecError(f"feeds.function {self.function!r} is not callable")
        return function  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class ModelSpec:
    model: ModelInfo
    graphs: tuple[GraphSpec, ...]
    task: SeTaskSpec | AsrTaskSpec
    frontend: FrontendSpec | None = None
    streaming: StreamingSpec | None = None
    output: OutputSpec | None = None
    defaults: DefaultsSpec = field(default_factory=DefaultsSpec)
    feeds: FeedsSpec | None = None
    source: Path | None = field(default=None, metadata={"internal": True}, compare=False)

    def __post_init__(self) -> None:
        if not self.graphs:
            raise SchemaError("graphs", "a spec needs at least one [[graphs]] table")
        roles = [g.role for g in self.graphs]
        if len(set(roles)) != len(roles):
            raise SchemaError("graphs", f"roles must be distinct, got {roles}")
        self._check_feeds(roles)
        self._check_names()
        if self.frontend is None and self.feeds is None:
            raise SchemaError("frontend", "a spec needs a [frontend] table (or a [feeds] escape hatch)")
        self._check_task(roles)
        self._check_budgets()
        if self.output is not None and self.output.graph is not None and self.output.graph not in roles:
            raise SchemaError("output.graph", f"{self.output.graph!r} is not a graph role ({', '.join(roles)})")

    def _check_feeds(self, roles: list[str]) -> None:
        for index, graph in enumerate(self.graphs):
            for feed in graph.feeds:
                if feed.graph is not None and feed.graph not in roles[:index]:
                    raise SchemaError(f"graphs[{index + 1}].feeds", f"{feed.source!r}: {feed.graph!r} is not an "
                                      f"earlier graph's role (earlier: {roles[:index] or 'none'})")
                if feed.source.startswith("nbest:") and self.model.task != "asr":
                    raise SchemaError(f"graphs[{index + 1}].feeds", "n-best feeds exist only for task 'asr'")

    def _check_budgets(self) -> None:
        for precision in ("int8", "fp16"):
            budget = self.defaults.budgets.get(precision)
            if budget is not None and budget.metric not in self.task.metrics:
                raise SchemaError(f"defaults.budgets.{precision}", f"{budget.metric!r} is not a metric of this "
                                  f"task ([task] metrics: {', '.join(self.task.metrics)})")

    def _check_names(self) -> None:
        """Names the spec uses must be among a graph's declared inputs/outputs (when it declares them)."""
        declared = {g.role: g for g in self.graphs}
        for index, graph in enumerate(self.graphs, start=1):
            for feed in graph.feeds:
                _declared(graph.inputs, feed.input, f"graphs[{index}].feeds", "inputs")
                if feed.graph is not None:
                    _declared(declared[feed.graph].outputs, feed.tensor, f"graphs[{index}].feeds", "outputs")
        if self.output is not None:
            _declared(self.output_graph().outputs, self.output.name, "output.name", "outputs")
        streaming = self.streaming
        if streaming is not None:
            graph = next((g for g in self.graphs if streaming.frame_input in g.inputs), self.graphs[0])
            _declared(graph.inputs, streaming.frame_input, "streaming.frame_input", "inputs")
            for state in streaming.states:
                _declared(graph.inputs, state.input, "streaming.states", "inputs")
                _declared(graph.outputs, state.output_name, "streaming.states", "outputs")

    def _check_task(self, roles: list[str]) -> None:
        expected = AsrTaskSpec if self.model.task == "asr" else SeTaskSpec
        if not isinstance(self.task, expected):
            raise SchemaError("task", f"model.task is {self.model.task!r} but [task] is {type(self.task).__name__}")
        if self.model.task == "asr" and "encoder" not in roles:
            raise SchemaError("graphs", f"an ASR spec needs a graph with role 'encoder' (roles: {roles})")
        if self.model.task == "se" and self.output is None:
            raise SchemaError("output", "an SE spec needs an [output] table (which tensor, and what kind)")

    @property
    def name(self) -> str:
        return self.model.name

    def graph(self, role: str) -> GraphSpec:
        for graph in self.graphs:
            if graph.role == role:
                return graph
        raise SpecError(f"{self.source or self.name}: no graph with role {role!r}; roles: "
                        f"{[g.role for g in self.graphs]}")

    def output_graph(self) -> GraphSpec:
        """The graph whose output the task reads (output.graph, default the last)."""
        role = self.output.graph if self.output and self.output.graph else self.graphs[-1].role
        return next((g for g in self.graphs if g.role == role), self.graphs[-1])

    def method(self, graph: GraphSpec) -> str:
        return graph.calibration_method or self.defaults.calibration_method

    def to_table(self) -> dict[str, Any]:
        """Plain values (TOML/JSON) of the whole spec; the content key for stamps and caches."""
        return to_table(self)  # type: ignore[no-any-return]


def _declared(names: tuple[str, ...], name: str, where: str, kind: str) -> None:
    if names and name not in names:
        raise SchemaError(where, f"{name!r} is not among the graph's declared {kind} ({', '.join(names)})")


# ------------------------------------------------------------------------------------------------ loading


def shipped_specs() -> tuple[str, ...]:
    """Names of the specs shipped in quant/assets/specs (the reference models)."""
    return tuple(sorted(p.stem for p in SPECS_DIR.glob("*.toml")))


def spec_path(path_or_name: str | Path) -> Path:
    """A shipped spec's file for a bare name, else the path itself (which must exist)."""
    text = str(path_or_name)
    if "/" not in text and "\\" not in text and not text.endswith(".toml"):
        shipped = SPECS_DIR / f"{text}.toml"
        if shipped.is_file():
            return shipped
        raise SpecError(f"{text!r} is neither a shipped model ({', '.join(shipped_specs())}) nor a spec file "
                        "(a path ending in .toml)")
    path = Path(path_or_name)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    return path


def load_spec(path_or_name: str | Path) -> ModelSpec:
    """The ModelSpec of a shipped model name (dpcrn, dpcrn-stream, wenet) or of a spec TOML file."""
    path = spec_path(path_or_name)
    if tomllib is None:  # pragma: no cover
        raise SpecError(f"{path}: reading specs needs Python >= 3.11 or the tomli package (pip install tomli)")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"{path}: cannot read the spec: {error}") from None
    return parse_spec(document, path)


def parse_spec(document: Mapping[str, Any], path: Path) -> ModelSpec:
    """A ModelSpec from a parsed TOML document; relative paths are resolved against path's folder."""
    try:
        spec = _build(document)
    except SchemaError as error:
        raise SpecError(f"{path}: {error}") from None
    return _resolve(replace(spec, source=path.resolve()), path.resolve().parent)


def _build(document: Mapping[str, Any]) -> ModelSpec:
    # [task]'s keys depend on model.task, so it is converted on its own, after everything else
    rest = from_table(_Document, document, "")
    task: SeTaskSpec | AsrTaskSpec
    if rest.model.task == "asr":
        task = from_table(AsrTaskSpec, document.get("task", {}), "task")
    else:
        task = from_table(SeTaskSpec, document.get("task", {}), "task")
    return ModelSpec(model=rest.model, graphs=rest.graphs, task=task, frontend=rest.frontend,
                     streaming=rest.streaming, output=rest.output, defaults=rest.defaults, feeds=rest.feeds)


@dataclass(frozen=True)
class _Document:
    """ModelSpec's TOML keys other than [task] (converted apart, by model.task)."""

    model: ModelInfo
    graphs: tuple[GraphSpec, ...]
    frontend: FrontendSpec | None = None
    streaming: StreamingSpec | None = None
    output: OutputSpec | None = None
    defaults: DefaultsSpec = field(default_factory=DefaultsSpec)
    feeds: FeedsSpec | None = None
    task: Any = None  # checked apart by SeTaskSpec / AsrTaskSpec; here so that 'task' is an allowed key


def _resolve(spec: ModelSpec, base: Path) -> ModelSpec:
    """Relative paths of the spec (graphs, units, manifests, npz) made absolute against the spec's folder."""
    graphs = tuple(replace(g, path=_absolute(g.path, base), name=g.name or _graph_name(spec, g))
                   for g in spec.graphs)
    task = replace(spec.task, units=_absolute(spec.task.units, base)) if isinstance(spec.task, AsrTaskSpec) \
        else spec.task
    defaults = replace(spec.defaults, calibration_manifest=_manifest(spec.defaults.calibration_manifest, base),
                       test_manifest=_manifest(spec.defaults.test_manifest, base))
    feeds = replace(spec.feeds, npz=_absolute(spec.feeds.npz, base)) if spec.feeds else None
    return replace(spec, graphs=graphs, task=task, defaults=defaults, feeds=feeds)


def _graph_name(spec: ModelSpec, graph: GraphSpec) -> str:
    return spec.model.name if len(spec.graphs) == 1 else f"{spec.model.name}-{graph.role}"


def _absolute(path: Any, base: Path) -> Any:
    return None if path is None else (base / path).resolve()


def _manifest(ref: str | None, base: Path) -> str | None:
    if ref is None or ref.startswith(CALIB_DATA_PREFIX):
        return ref
    return str((base / ref).resolve())


def resolve_manifest(ref: str | None, what: str = "manifest") -> Path:
    """The manifest file a spec names (a path, or calib_data:<set>); it must exist now."""
    if ref is None:
        key = what.replace(" ", "_") if what in ("calibration manifest", "test manifest") else "calibration_manifest"
        raise SpecError(f"no {what} given and the spec names none; pass one or set [defaults] {key} in the spec (a "
                        "JSONL manifest, relative to the spec, or a committed set such as \"calib_data:se_calib\")")
    if ref.startswith(CALIB_DATA_PREFIX):
        from quant.paths import calib_data_dir

        path = calib_data_dir() / ref[len(CALIB_DATA_PREFIX):] / "manifest.jsonl"
    else:
        path = Path(ref)
    if not path.is_file():
        raise SpecError(f"{path}: {what} not found ({ref})")
    return path
