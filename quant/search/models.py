"""The search's callables for one graph of any model spec (shipped or the user's): INT8 builds through
quant.artifacts.build_artifact with the spec's calibration cache (quant.tasks.calibration.calibrate_spec), evaluation
through the spec's Task (quant.tasks: task_for(spec).evaluate, one utterance at a time so every column is paired per
utterance; the spec's other graphs stay FP32), and timing on the Task's speed workload. The test set is split in
halves: the first validates the search, the second gives the held-out numbers.

Targets: `ort` measures ONNX Runtime's INT8 model (model.onnx) and its CPU latency; `trt-sim` measures the TensorRT
Q/DQ model (model_trt_qdq.onnx) run by quant.backends.ort.trt_sim_runner, and claims no latency (TensorRT is not
timed on a CPU; see quant.search.core)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from quant.backends import Runner, open_runner
from quant.errors import ModelError
from quant.executor import Executor
from quant.search.budget import MIN_UTTERANCES, SNR_CAP_DB
from quant.search.core import MODEL_FILE, Columns, Problem, SearchOptions, SearchResult, SplitTooSmall, run_search
from quant.search.speed import interleaved_latency, node_times_ms
from quant.search.units import find_units

log = logging.getLogger(__name__)

PROXY_UTTERANCES = 2
DEFAULT_SHARDS = 8  # evaluation shards per candidate with an executor (fewer when fewer utterances)
TARGETS = {"ort": "ort", "trt-sim": "trt"}  # search target -> the backend whose INT8 plan the rules set
TRT_QDQ_FILE = "model_trt_qdq.onnx"


@dataclass(frozen=True)
class ArtifactBuilder:
    """rules file, out dir -> INT8 artifact folder (build_artifact of `source` with the given calibration cache)."""

    source: Path
    cache: Path | None = None
    name: str | None = None

    def __call__(self, rules: Path, out_dir: Path) -> Path:
        from quant.artifacts.artifact import build_artifact

        return build_artifact(self.source, "int8", name=self.name or self.source.stem, rules=rules, out_dir=out_dir,
                              cache=self.cache)


def output_snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    power = float((reference.astype(np.float64) ** 2).sum())
    if noise == 0.0:
        return SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10 * np.log10(max(power, 1e-30) / noise)))


class Recorder:
    """A runner that keeps the outputs it returns, state outputs left out (the searched graph's output SNR against
    FP32's: a state's error shows in the outputs of the frames after it), and integer outputs left out too: indices
    and lengths (the WeNet encoder's top-k `beam_log_probs_idx`) are not a signal with a noise power; a near tie
    that swaps two indices counted as an error of their difference and made the SNR rank the index flips (18 dB for
    a unit whose float outputs were 40-51 dB)."""

    def __init__(self, runner: Runner, states: frozenset[str] = frozenset()) -> None:
        self.runner = runner
        self.states = states
        self.outputs: list[np.ndarray] = []

    @property
    def input_names(self) -> Sequence[str]:
        return self.runner.input_names

    @property
    def output_names(self) -> Sequence[str]:
        return self.runner.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.runner.run(feeds)
        self.outputs.extend(np.asarray(outputs[name], dtype=np.float64).ravel() for name in sorted(outputs)
                            if name not in self.states and np.issubdtype(np.asarray(outputs[name]).dtype, np.floating))
        return outputs

    def take(self) -> np.ndarray:
        flat = np.concatenate(self.outputs) if self.outputs else np.zeros(0)
        self.outputs = []
        return flat


@dataclass
class SpecEvaluator:
    """artifact folder -> per-utterance task columns (task_for(spec).evaluate on one utterance at a time, the
    spec's other graphs FP32) and `snr_db`: the searched graph's outputs (states left out) against the FP32
    build's, per utterance. Streaming graphs run as the Task runs them, with their own states fed back.

    With an `executor` (quant search --executor ray) the utterances run in shards on it: the same evaluation per
    utterance on the worker (graphs shipped as bytes, quant.tasks.sharded), the outputs compared here, so the
    columns, and the configuration the search picks from them, equal the in-process ones."""

    task: Any  # quant.tasks.Task
    role: str
    graphs: Mapping[str, Path]  # FP32 ONNX file per role
    items: Sequence[Any]  # loaded utterances (SE pairs / ASR samples), each evaluated alone
    memo_key: str  # where Task.evaluate's memo holds the loaded utterances ("pairs" | "samples")
    fp32: Path  # the FP32 artifact folder
    target: str = "ort"
    executor: Executor | None = None
    _memos: list[dict[str, Any]] = field(default_factory=list)
    _reference: list[np.ndarray] = field(default_factory=list)
    _others: dict[str, Runner] = field(default_factory=dict)

    def searched_file(self, folder: Path) -> tuple[Path, str]:
        """The searched graph's file in an artifact folder and the backend that runs it."""
        if self.target == "trt-sim":
            # FP32 runs as TensorRT's FP32 build would (ORT basic optimization), the candidates as their Q/DQ model
            return folder / (MODEL_FILE if folder == self.fp32 else TRT_QDQ_FILE), "trt-sim"
        return folder / MODEL_FILE, "ort"

    def __call__(self, folder: Path) -> Columns:
        if not self._memos:  # the memo keeps each utterance's input scores (noisy PESQ ...) across builds
            self._memos.extend({self.memo_key: [item]} for item in self.items)
        if not self._reference and folder != self.fp32:
            self(self.fp32)
        results = self._sharded(folder) if self.executor is not None else self._here(folder)
        columns: dict[str, list[Any]] = {}
        for part, _ in results:
            for key, values in part.items():
                columns.setdefault(key, []).extend(values)
        outputs = [output for _, output in results]
        if not self._reference:
            self._reference.extend(outputs)
        columns["snr_db"] = [output_snr_db(ref, out) if ref.shape == out.shape else float("nan")
                             for ref, out in zip(self._reference, outputs)]
        return columns

    def _here(self, folder: Path) -> list[tuple[Columns, np.ndarray]]:
        if not self._others:
            self._others.update({role: open_runner(path, "ort", threads=1) for role, path in self.graphs.items()
                                 if role != self.role})
        path, backend = self.searched_file(folder)
        return evaluate_items(self.task, {**self._others, self.role: open_runner(path, backend, threads=1)},
                              self.role, self._memos)

    def _sharded(self, folder: Path) -> list[tuple[Columns, np.ndarray]]:
        from quant.executor import Shard, split
        from quant.tasks.sharded import ArtifactFile, Artifacts, gather

        assert self.executor is not None
        path, backend = self.searched_file(folder)
        others = Artifacts.read({role: p for role, p in self.graphs.items() if role != self.role}).files
        searched = ArtifactFile(self.role, path.name, path.read_bytes(), backend)
        context = ItemsContext(self.task.spec, self.role, self.memo_key, Artifacts((*others, searched)))
        shards = [Shard(index, [self._memos[i] for i in part], tuple(f"utterance {i + 1}" for i in part))
                  for index, part in enumerate(split(self._memos, DEFAULT_SHARDS))]
        results = gather(self.executor.map(evaluate_items_shard, shards, context), shards)
        for memo, (_, _, learned) in zip(self._memos, results):
            memo.update(learned)  # what the workers computed once per utterance (noisy scores) travels next time
        return [(columns, outputs) for columns, outputs, _ in results]


def evaluate_items(task: Any, runners: Mapping[str, Runner], role: str,
                   memos: Sequence[dict[str, Any]]) -> list[tuple[Columns, np.ndarray]]:
    """Per utterance (one memo each): the task's per-utterance columns and the searched graph's flat outputs."""
    runner = runners[role]
    recorder = Recorder(runner, state_outputs(task.spec, runner))
    with_recorder: dict[str, Any] = {**runners, role: recorder}
    return [(task.evaluate(with_recorder, memo=memo).per_utterance_columns(), recorder.take()) for memo in memos]


@dataclass(frozen=True)
class ItemsContext:
    """What every evaluation shard of one candidate needs (shipped once): the spec, the searched role, the memo key
    of the loaded utterances, and the graphs (the candidate and the other roles' FP32 files)."""

    spec: Any
    role: str
    memo_key: str
    artifacts: Any  # quant.tasks.sharded.Artifacts


def evaluate_items_shard(shard: Any, context: ItemsContext) -> list[tuple[Columns, np.ndarray, dict[str, Any]]]:
    """Worker side: evaluate_items on the shard's utterances; returns what each memo learned besides its audio."""
    from quant.tasks import task_for
    from quant.tasks.sharded import runners

    memos = [dict(memo) for memo in shard.payload]
    results = evaluate_items(task_for(context.spec), runners(context.artifacts), context.role, memos)
    return [(columns, outputs, {k: v for k, v in memo.items() if k != context.memo_key})
            for (columns, outputs), memo in zip(results, memos)]


@dataclass(frozen=True)
class Split:
    validation: int | None = None  # the first utterances, used by the search (None: the first half)
    held_out: int | None = None  # utterances after the second half's start, or after the validation split when that
    # is longer than half, for the final numbers (None: all of them)
    grown: bool = False  # `validation` is search_widening's, grown from the default: it may grow again


def halves(items: Sequence[Any], split: Split) -> tuple[list[Any], list[Any]]:
    """Validation: the first `split.validation` utterances (default half); held-out: from the second half's start
    (or after a validation split longer than half), never overlapping."""
    if len(items) < 2:
        raise ModelError(f"the test set has {len(items)} utterance(s); the search needs at least 2 (validation and "
                         "held-out halves)")
    half = len(items) // 2
    validation = half if split.validation is None else split.validation
    if validation >= len(items):
        raise ModelError(f"--validation {validation}: the test set has {len(items)} utterances; leave some for the "
                         "held-out numbers")
    return list(items[:validation]), list(items[max(half, validation):][: split.held_out])


def search_widening(make_problem: Callable[[Split], Problem], split: Split, options: SearchOptions, out_dir: Path,
                    size: int) -> tuple[Problem, SearchResult]:
    """run_search on `make_problem(split)`; when the split is the default (no --validation) and too small to resolve
    the budget (SplitTooSmall), again with the validation split grown to the size that would tell, while the test
    set of `size` utterances leaves at least MIN_UTTERANCES held out (fewer could not judge the chosen build: the
    dpcrn-stream search once grew to 31 of 40 and its 9 held-out utterances could not tell). A --validation the user
    gave is never changed."""
    while True:
        problem = make_problem(split)
        try:
            return problem, run_search(problem, options, out_dir)
        except SplitTooSmall as error:
            chosen_by_user = split.validation is not None and not split.grown
            if chosen_by_user or error.needed is None or not error.n < error.needed <= size - MIN_UTTERANCES:
                raise
            log.warning("%s; searching again with the first %d of %d utterances as the validation split",
                        error, error.needed, size)
            split = Split(error.needed, split.held_out, grown=True)


def test_set_size(spec: Any) -> int:
    """Utterances in the spec's test set (what --validation and --held-out split)."""
    return len(_test_items(spec)[1])


def base_rules_of(spec: Any, role: str, rules: Path | None = None) -> tuple[Any, ...]:
    """The plan a search of graph `role` starts from, as its builds make it: the shipped rules less the graph's
    `rules_off`, or a given rules file whole."""
    from quant.precision import load_rules, without_rules

    if rules is not None:
        return load_rules(rules)
    return without_rules(load_rules(), spec.graph(role).rules_off, f"{spec.name} graph {role!r}: rules_off")


def spec_problem(spec: Any, role: str, graphs: Mapping[str, Path], out_dir: Path, split: Split,
                 cache: Path | None = None, rules: Path | None = None, target: str = "ort",
                 rounds: int = 15, grouping: str = "group", executor: Executor | None = None) -> Problem:
    """The search problem of graph `role` of a model spec whose FP32 ONNX files by role are `graphs` (every graph of
    the spec: the others run FP32 in the evaluation). `cache`: the calibration cache (default: calibrate_spec, from
    the store on a key hit); `grouping`: units per structural block (group) or per node (quant.search.units);
    `executor`: where the candidates' evaluations run in shards (None: here); builds and timing always run here, never
    on a shared worker."""
    from quant.artifacts.artifact import build_artifact
    from quant.tasks import FeedOptions, task_for

    if target not in TARGETS:
        raise ModelError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    graph = spec.graph(role)
    source = Path(graphs[role])
    base_rules = base_rules_of(spec, role, rules)
    feed_options = FeedOptions(graphs=dict(graphs))
    if cache is None:
        from quant.tasks.calibration import calibrate_spec

        cache = Path(calibrate_spec(spec, role, source, feed_options=feed_options).path)
    fp32 = build_artifact(source, "fp32", name=graph.name, out_dir=out_dir / "builds" / "fp32")
    task = task_for(spec)
    memo_key, items = _test_items(spec)
    validation, held = halves(items, split)

    def evaluator(chosen: Sequence[Any]) -> SpecEvaluator:
        return SpecEvaluator(task, role, graphs, chosen, memo_key, fp32, target, executor)

    model = onnx.load(str(source))
    units = find_units(model, base_rules, TARGETS[target], grouping)
    problem = Problem(model=model, units=units, base_rules=base_rules,
                      fp32=fp32, build=ArtifactBuilder(source, cache, graph.name), validate=evaluator(validation),
                      proxy=evaluator(validation[:PROXY_UTTERANCES]), held_out=evaluator(held),
                      backend=TARGETS[target])
    if target != "ort":
        return problem
    feeds = task.speed_workload(role, options=feed_options).first_run()
    return replace(problem, latency=lambda folders: interleaved_latency([f / MODEL_FILE for f in folders], feeds,
                                                                         rounds),
                   node_times=lambda folder: node_times_ms(folder / MODEL_FILE, feeds))


def state_outputs(spec: Any, runner: Runner) -> frozenset[str]:
    """The outputs of a streaming graph that feed its next step's states (the spec's pairs or the `_out`
    convention); none for a graph without [streaming]."""
    if spec.streaming is None:
        return frozenset()
    from quant.spec import STATE_SUFFIX

    pairs = spec.streaming.state_pairs()
    if pairs:
        return frozenset(pairs.values())
    inputs = set(runner.input_names)
    return frozenset(o for o in runner.output_names if o.endswith(STATE_SUFFIX) and o[: -len(STATE_SUFFIX)] in inputs)


def _test_items(spec: Any) -> tuple[str, list[Any]]:
    """The spec's test utterances loaded as its Task's evaluate keeps them in its memo (SE: "pairs", ASR:
    "samples"), in manifest order, so the halves are the manifest's."""
    from quant.spec import resolve_manifest

    manifest = str(resolve_manifest(spec.defaults.test_manifest, "test manifest"))
    if spec.model.task == "asr":
        from quant.eval.asr import load_samples

        return "samples", load_samples(manifest)
    from quant.eval.se import load_pairs

    return "pairs", load_pairs(manifest)
