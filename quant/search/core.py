"""The search: measured sensitivity per unit, measured speed per unit, then greedy by benefit / cost to the fastest
configuration whose task-metric change stays within the budget on the validation split.

Works on a `Problem`, a handful of callables, so any model (a reference model today, a spec later) plugs in:
- build(rules file, out dir) -> INT8 artifact folder (model.onnx inside);
- validate / proxy / held_out(artifact folder) -> per-utterance columns (quant.eval.stats.from_columns layout;
  proxy returns `snr_db` of the output against FP32's on a few utterances);
- latency(artifact folders) -> Latency each, measured interleaved; node_times(artifact folder) -> ms per ORT node;
  both None for a backend whose speed this machine cannot measure (TensorRT simulated on the CPU): then every
  structural block INT8 in the backend's plan counts as one unit of benefit (a unit of `alike` blocks counts each)
  and the fastest build is the one with most INT8 blocks.

Steps (every build counted as one evaluation):
0. resolution: FP32, the default rules and all-INT8 on the validation split; when even the quieter of the two
   INT8 builds' paired changes has a 95 % interval wider than the budget at this split size, no candidate could be
   proven within budget, and the search stops with the size that would tell (quant.search.budget);
1. speed: profile the FP32 build and the all-units-INT8 build in turn, a few rounds, attribute kernel time (with
   its Q/DQ) to units, the minimum over rounds;
2. proxy sensitivity: per unit, add-one-in (only it INT8) and leave-one-out (all others INT8) output SNR;
3. task sensitivity: the `top` units with the lowest add-one-in SNR get both measured on the validation metric;
4. greedy: from the faster of two starts, revert the unit with the worst cost per ms saved until the budget holds
   (proven within on validation, not just an estimate inside), building and measuring each step; then add back the
   reverted units that leave it holding. A step that lands on a build step 3 measured (a leave-one-out build, ranked
   by that same measurement) holds only with its interval widened over the builds it was ranked with
   (Ledger.candidate): the best of several noisy measurements is lucky by selection;
5. verify: time the candidates (the default rules, the starts and the greedy's path; sensitivity builds are
   measurements, not candidates), FP32 and the default-rules build interleaved; pick the fastest holding one and
   judge it on held-out data; a chosen build measured slower than the default-rules one is said so, with the
   defaults' validation verdict.

The greedy's start (choose_start). The profile's start (every unit whose INT8 kernel saves time) adds up per-unit
savings, but a whole build is not the sum of its units: Q/DQ between units, lost fusions and layout reorders cost time
no unit's profile shows (the WeNet encoder's 38-unit profile start ran 9.6-10.0 ms, its 13-unit default rules 9.3-9.4
ms; before a fused float conv's kernel was attributed to its unit, quant.search.speed, the start kept that conv float
and ran 12.5 ms). So on a timed backend the profile's start is built and timed interleaved with the default-rules build
from step 0 (no extra build: the default's evaluation is reused), and the greedy starts from the faster one. The
default start reaches configurations the profile's cannot: a unit the base rules make partly INT8 (`mixed`: e.g. an
FFN's Linears dynamic INT8, its residual Add float) stays as the base rules place it (Point.base) until the greedy
reverts it, which makes it wholly float; a unit the defaults make INT8 is kept INT8 even where its profile says it
saves nothing, until its cost per ms saved (a saving <= 0 counts as the worst) reverts it first; a partly-INT8 unit is
ranked by its whole-unit measurements, the only ones there are. Both starts stay candidates in step 5. Untimed, only
the profile's start (the unit-count proxy) exists.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from quant.errors import QuantError
from quant.precision import Rule
from quant.search.budget import MIN_UTTERANCES, Resolution, TaskBudget
from quant.search.speed import Latency, unit_times_ms
from quant.search.units import Config, Unit, all_config, config_rules, default_config, int8_blocks, write_rules

log = logging.getLogger(__name__)

Columns = Mapping[str, Sequence[Any]]
Builder = Callable[[Path, Path], Path]
Evaluator = Callable[[Path], Columns]
Timer = Callable[[Sequence[Path]], Sequence[Latency]]
Profiler = Callable[[Path], Mapping[str, float]]
Key = tuple[Config, Config]  # a candidate build: (units INT8, units as the base rules place them)
MODEL_FILE = "model.onnx"
MIN_SAVED_SHARE = 0.002
PROFILE_ROUNDS = 3  # FP32 and all-INT8 profiled in turn; per unit the minimum (measure_speed)
DEFAULT_LABEL = "default-rules"
GREEDY_ROOM = 10  # greedy steps a search's evaluation budget should leave after the sensitivity passes


class SearchError(QuantError):
    """The search cannot run as asked (no units, evaluation budget too small, ...)."""


class SplitTooSmall(SearchError):
    """The validation split cannot resolve the budget (check_resolution); `needed`: the size that would tell
    (None: none would, a zero budget)."""

    def __init__(self, message: str, n: int, needed: int | None) -> None:
        super().__init__(message)
        self.n = n
        self.needed = needed


@dataclass(frozen=True)
class Problem:
    model: onnx.ModelProto  # the FP32 graph the units name
    units: tuple[Unit, ...]
    base_rules: tuple[Rule, ...]
    fp32: Path  # FP32 artifact folder
    build: Builder
    validate: Evaluator
    proxy: Evaluator
    held_out: Evaluator
    latency: Timer | None = None  # None: speed not measurable here (see the module docstring)
    node_times: Profiler | None = None
    backend: str = "ort"  # the backend whose INT8 plan the units and the written rules follow (ort | trt)

    @property
    def timed(self) -> bool:
        return self.latency is not None and self.node_times is not None

    def build_config(self, config: Config, folder: Path, base: Config = frozenset()) -> Path:
        """The INT8 build of `config` (the units in `base` as the base rules place them) into `folder`, its rules
        file beside it (`folder`.toml)."""
        rules = config_rules(self.units, config, backend=self.backend, base=base)
        return self.build_rules([*rules, *self.base_rules], folder)

    def build_rules(self, rules: Sequence[Rule], folder: Path) -> Path:
        return self.build(write_rules(folder.with_suffix(".toml"), rules), folder)

    def speed_basis(self) -> str:
        """What the search ranks speed by, for the outputs."""
        if self.timed:
            # timing never leaves this process: a shared worker's latency says nothing about this machine's
            return ("ONNX Runtime CPU: kernel time per unit (profiler) and candidate builds timed interleaved, in "
                    "the search's own process (accuracy may run on Ray; timing never does)")
        return (f"no latency measured ({self.backend} is not timed on this machine): speed proxy = number of "
                f"structural blocks INT8 in the {self.backend} Q/DQ plan (a unit of alike blocks counts each)")


@dataclass(frozen=True)
class SearchOptions:
    budget: TaskBudget
    max_evals: int = 60  # builds measured, all steps together
    top: int = 6  # units whose sensitivity is measured on the task metric


@dataclass(frozen=True)
class Point:
    """One measured candidate build."""

    label: str
    config: Config
    artifact: Path
    columns: Columns
    verdict: dict[str, Any]
    holds: bool
    latency: Latency | None = None
    base: Config = frozenset()  # units left as the base rules place them (partly INT8: `mixed`), not in `config`

    @property
    def key(self) -> Key:
        return self.config, self.base

    def to_dict(self, units: Sequence[Unit]) -> dict[str, Any]:
        return {"label": self.label, "int8_units": [u.name for u in units if u.name in self.config],
                "base_rules_units": [u.name for u in units if u.name in self.base],
                "artifact": str(self.artifact), "holds": self.holds, **self.verdict,
                "latency": self.latency.to_dict() if self.latency else None}


@dataclass(frozen=True)
class Sensitivity:
    unit: str
    fp32_ms: float
    int8_ms: float
    add_one_in_snr_db: float | None = None
    leave_one_out_snr_db: float | None = None
    add_one_in: dict[str, Any] | None = None  # task-metric verdict dict (delta, CI, ...)
    leave_one_out: dict[str, Any] | None = None

    @property
    def saved_ms(self) -> float:
        return self.fp32_ms - self.int8_ms


@dataclass
class Ledger:
    """Builds and evaluations spent, and the measured points by configuration."""

    out_dir: Path
    problem: Problem
    options: SearchOptions
    reference: Columns
    evals: int = 0
    points: dict[Key, Point] = field(default_factory=dict)
    artifacts: dict[Key, Path] = field(default_factory=dict)
    ranked: set[Key] = field(default_factory=set)  # the builds whose task measurements ranked the units
    started: float = field(default_factory=time.monotonic)

    @property
    def left(self) -> int:
        return self.options.max_evals - self.evals

    def build(self, config: Config, label: str, base: Config = frozenset()) -> Path:
        """The INT8 build of `config`, the units in `base` as the base rules place them (once per configuration);
        counts one evaluation."""
        key = (config, base)
        if key not in self.artifacts:
            self.evals += 1
            self.artifacts[key] = self.problem.build_config(config, self._folder(label), base)
        return self.artifacts[key]

    def _folder(self, label: str) -> Path:
        return self.out_dir / "builds" / label

    def measure_default(self) -> Point:
        """The build of the base rules alone, evaluated on the validation split. Not a configuration: a group the
        base rules make partly INT8 (`mixed`) has no INT8/float decision that reproduces it."""
        units = self.problem.units
        self.evals += 1
        artifact = self.problem.build_rules(self.problem.base_rules, self._folder(DEFAULT_LABEL))
        return self._evaluate(default_config(units), DEFAULT_LABEL, artifact,
                              frozenset(u.name for u in units if u.default == "mixed"))

    def measure(self, config: Config, label: str, base: Config = frozenset()) -> Point:
        """Build and evaluate on the validation split (once per configuration)."""
        key = (config, base)
        if key not in self.points:
            self.points[key] = self._evaluate(config, label, self.build(config, label, base), base)
        return self.points[key]

    def candidate(self, config: Config, label: str, base: Config = frozenset()) -> Point:
        """`measure`, judged as a candidate: a configuration whose task measurement ranked the units (measure_task)
        was picked by that very measurement, as the best of the ranked builds, so it holds only with its interval
        Bonferroni-widened over them (TaskBudget.holds: `looks`). Without this the trt-sim WeNet search stopped at
        the leave-one-out build that had measured best of the six, -0.01 [-0.29, +0.27] CER points on validation,
        and the held-out half measured it at +0.30 [+0.03, +0.57]."""
        point = self.measure(config, label, base)
        if point.key not in self.ranked or point.verdict.get("looks"):
            return point
        looks = len(self.ranked)
        budget = self.options.budget
        verdict = budget.judge(self.reference, point.columns)
        judged = replace(point, holds=budget.holds(verdict, looks), verdict={**point.verdict, "looks": looks})
        log.info("%s again as a candidate, picked by its own measurement: -> %s", point.label,
                 budget.hold_text(verdict, looks))
        self.points[point.key] = judged
        return judged

    def _evaluate(self, config: Config, label: str, artifact: Path, base: Config = frozenset()) -> Point:
        columns = self.problem.validate(artifact)
        verdict = self.options.budget.judge(self.reference, columns)
        point = Point(label, config, artifact, columns, _verdict_dict(verdict, self.options.budget),
                      self.options.budget.holds(verdict), base=base)
        log.info("%s: %s, %s %+.4f [%+.4f, %+.4f] -> %s", label, units_text(point), self.options.budget.metric,
                 point.verdict["delta"], point.verdict["ci_low"], point.verdict["ci_high"],
                 self.options.budget.hold_text(verdict))
        return point

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60.0


def units_text(point: Point) -> str:
    """'13 INT8 units' (+ ', 40 partly INT8 as the base rules place them')."""
    partly = f", {len(point.base)} partly INT8 as the base rules place them" if point.base else ""
    return f"{len(point.config)} INT8 units{partly}"


def _verdict_dict(verdict: Any, budget: TaskBudget) -> dict[str, Any]:
    values = verdict.to_dict()
    for key in ("delta", "ci_low", "ci_high", "budget"):
        values[key] = float(values[key]) * budget.scale
    return values


def _mean_snr(columns: Columns) -> float:
    values = np.minimum(np.asarray(columns["snr_db"], dtype=np.float64), 120.0)
    return float(values.mean())


def loss(verdict: Mapping[str, Any], budget: TaskBudget) -> float:
    """How much worse than the reference (display units, positive = worse) a point's change is."""
    delta = float(verdict["delta"])
    return -delta if budget.stats_budget().higher_is_better else delta


# ------------------------------------------------------------------------------------------------ measurements


def measure_speed(ledger: Ledger) -> dict[str, Sensitivity]:
    """Kernel time of each unit in the FP32 build and in the all-units-INT8 build: both profiled in turn for
    PROFILE_ROUNDS rounds, each unit's minimum over the rounds (one profile of each, minutes apart on a shared
    machine, let a burst of load decide which units save time); without a profiler (TensorRT simulated) each unit
    saves one unit of the proxy per structural block in it (fp32 blocks, int8 0)."""
    problem = ledger.problem
    everything = ledger.build(all_config(problem.units), "all-int8")
    if problem.node_times is None:
        return {u.name: Sensitivity(u.name, float(u.blocks), 0.0) for u in problem.units}
    rounds: dict[Path, list[dict[str, float]]] = {problem.fp32: [], everything: []}
    for _ in range(PROFILE_ROUNDS):
        for folder, times in rounds.items():
            times.append(unit_times_ms(problem.node_times(folder), problem.units, problem.model))
    fp32, int8 = ({u.name: min(t[u.name] for t in rounds[folder]) for u in problem.units}
                  for folder in (problem.fp32, everything))
    return {u.name: Sensitivity(u.name, fp32[u.name], int8[u.name]) for u in problem.units}


def measure_proxy(ledger: Ledger, sens: dict[str, Sensitivity], reserve: int, loo_reserve: int
                  ) -> dict[str, Sensitivity]:
    """Output SNR against FP32 with only the unit INT8 (add-one-in, every unit, biggest time saving first, while
    more than `reserve` evaluations are left) and with only the unit float (leave-one-out, the units add-one-in
    found worst first, while more than `loo_reserve` are left: the task metric comes before it)."""
    units = sorted(ledger.problem.units, key=lambda u: -sens[u.name].saved_ms)
    everything = all_config(ledger.problem.units)
    result = dict(sens)
    for unit in units:
        if ledger.left <= reserve:
            break
        columns = ledger.problem.proxy(ledger.build(frozenset({unit.name}), f"add-{_safe(unit.name)}"))
        result[unit.name] = _replace(result[unit.name], add_one_in_snr_db=_mean_snr(columns))
        log.info("only %s INT8: output SNR %.1f dB (%d evaluations left)", unit.name, _mean_snr(columns), ledger.left)
    measured = [u for u in units if result[u.name].add_one_in_snr_db is not None]
    for unit in sorted(measured, key=lambda u: result[u.name].add_one_in_snr_db or 0.0):
        if ledger.left <= loo_reserve:
            break
        columns = ledger.problem.proxy(ledger.build(everything - {unit.name}, f"loo-{_safe(unit.name)}"))
        result[unit.name] = _replace(result[unit.name], leave_one_out_snr_db=_mean_snr(columns))
        log.info("only %s float: output SNR %.1f dB", unit.name, _mean_snr(columns))
    return result


def measure_task(ledger: Ledger, sens: dict[str, Sensitivity], reserve: int) -> dict[str, Sensitivity]:
    """The validation task metric, add-one-in and leave-one-out, of the `top` units the proxy ranks worst."""
    everything = all_config(ledger.problem.units)
    ranked = sorted(sens.values(), key=lambda s: proxy_cost(s), reverse=True)[: ledger.options.top]
    result = dict(sens)
    for item in ranked:
        if ledger.left <= reserve:
            break
        add = ledger.measure(frozenset({item.unit}), f"add-{_safe(item.unit)}")
        leave = ledger.measure(everything - {item.unit}, f"loo-{_safe(item.unit)}")
        ledger.ranked.update({add.key, leave.key})
        result[item.unit] = _replace(result[item.unit], add_one_in=add.verdict, leave_one_out=leave.verdict)
    return result


def proxy_cost(item: Sensitivity) -> float:
    """Relative output noise power the unit's INT8 adds alone (add-one-in). A unit the evaluation budget left
    unmeasured counts as the worst (0 dB): reverting an unknown before a unit measured harmless is the safe order."""
    snr = item.add_one_in_snr_db
    return 10 ** (-snr / 10) if snr is not None else 1.0


def task_cost(item: Sensitivity, everything: Point | None, budget: TaskBudget) -> float | None:
    """Metric lost by the unit's INT8: alone, or recovered by reverting it from all-INT8; None when not measured."""
    costs = []
    if item.add_one_in is not None:
        costs.append(loss(item.add_one_in, budget))
    if item.leave_one_out is not None and everything is not None:
        costs.append(loss(everything.verdict, budget) - loss(item.leave_one_out, budget))
    return max(costs) if costs else None


def revert_priority(item: Sensitivity, everything: Point | None, budget: TaskBudget) -> tuple[float, float]:
    """Cost per ms saved: the task metric where measured, the proxy noise power as tie-break and for the rest."""
    saved = max(item.saved_ms, 1e-6)
    task = task_cost(item, everything, budget)
    return (max(task, 0.0) / saved if task is not None else 0.0, proxy_cost(item) / saved)


# ------------------------------------------------------------------------------------------------ search


def greedy_start(sens: Mapping[str, Sensitivity]) -> Config:
    """Every unit whose INT8 kernel (with its Q/DQ) measured faster than its float one by more than
    MIN_SAVED_SHARE of all units' FP32 kernel time: a saving below profiler noise buys nothing for its error."""
    floor_ms = MIN_SAVED_SHARE * sum(item.fp32_ms for item in sens.values())
    return frozenset(name for name, item in sens.items() if item.saved_ms > floor_ms)


@dataclass(frozen=True)
class Start:
    """Where the greedy starts: the measured point, the step text, what search.json records of the choice, and the
    profile's start (a candidate whichever start is taken)."""

    point: Point
    step: str
    record: dict[str, Any]
    profile: Point


PROFILE_START = "profile"


def choose_start(ledger: Ledger, sens: Mapping[str, Sensitivity], default: Point) -> Start:
    """The profile's start (greedy_start, built and measured on validation: a candidate either way) or, where it is
    timed slower, the default-rules build: both timed interleaved with the search's own timer (module docstring)."""
    problem = ledger.problem
    profile = ledger.measure(greedy_start(sens), "start")
    profile_step = f"start: the {len(profile.config)} units whose INT8 kernels save measurable time"
    if problem.latency is None or not problem.timed:
        return Start(profile, profile_step, {"from": PROFILE_START, "latency_ms": None,
                                             "why": "no latency measured: the unit-count proxy's start"}, profile)
    began = time.monotonic()
    profile_latency, default_latency = problem.latency([profile.artifact, default.artifact])
    seconds = round(time.monotonic() - began, 1)  # no build: its cost is this timing, in the search's minutes too
    times = {PROFILE_START: profile_latency.to_dict(), DEFAULT_LABEL: default_latency.to_dict()}
    compared = (f"profile's start ({units_text(profile)}) {profile_latency.min_ms:.2f} ms, default rules "
                f"({units_text(default)}) {default_latency.min_ms:.2f} ms, min over interleaved rounds")
    if default_latency.min_ms < profile_latency.min_ms:
        why = f"the default rules measured faster: {compared}"
        chosen, step = default, f"start: the default rules ({units_text(default)}), {why}"
    else:
        why = f"the profile's start measured as fast or faster: {compared}"
        chosen, step = profile, f"{profile_step}; {why}"
    log.info("greedy start: %s", why)
    return Start(chosen, step, {"from": DEFAULT_LABEL if chosen is default else PROFILE_START,
                                "latency_ms": times, "why": why, "timing_s": seconds}, profile)


def greedy(ledger: Ledger, sens: Mapping[str, Sensitivity], start: Start) -> tuple[list[str], list[Key]]:
    """From the start, revert the unit (INT8 or partly INT8 as the base rules place it) with the worst cost per ms
    saved until the budget holds; then try adding back the reverted units, cheapest first, each as the start had it,
    keeping each that leaves the budget holding. Returns the steps taken ("revert X: holds", "add X: kept", ...)
    and the configurations visited, the start's included."""
    budget = ledger.options.budget
    everything = ledger.points.get((all_config(ledger.problem.units), frozenset()))
    point = start.point
    steps = [start.step]
    visited = [point.key]
    reverted: list[str] = []
    while not point.holds and (point.config or point.base) and ledger.left > 0:
        worst = max(sorted(point.config | point.base), key=lambda n: revert_priority(sens[n], everything, budget))
        reverted.append(worst)
        point = ledger.candidate(point.config - {worst}, f"step{len(steps)}-revert-{_safe(worst)}",
                                 point.base - {worst})
        visited.append(point.key)
        steps.append(f"revert {worst}: {'holds' if point.holds else 'not proven within budget'}{_picked(point)}")
    if not point.holds:
        return steps, visited
    for name in sorted(reverted[:-1], key=lambda n: revert_priority(sens[n], everything, budget)):
        if ledger.left <= 0:
            break
        back = frozenset({name})
        config, base = (point.config, point.base | back) if name in start.point.base else (point.config | back,
                                                                                            point.base)
        trial = ledger.candidate(config, f"step{len(steps)}-add-{_safe(name)}", base)
        visited.append(trial.key)
        steps.append(f"add {name}: {'kept' if trial.holds else 'not proven within budget'}{_picked(trial)}")
        if trial.holds:
            point = trial
    return steps, visited


@dataclass(frozen=True)
class SearchResult:
    budget: TaskBudget
    units: tuple[Unit, ...]
    sensitivities: dict[str, Sensitivity]
    frontier: tuple[Point, ...]  # every measured candidate build, in measurement order
    steps: tuple[str, ...]  # the greedy search's decisions, in order
    default: Point
    chosen: Point | None  # the fastest measured build that holds the budget; None: none does
    fp32_latency: Latency | None  # None: not timed (Problem.latency None)
    held_out: dict[str, Any]
    evals: int
    minutes: float
    speed_basis: str  # what "fastest" was judged by (Problem.speed_basis)
    backend: str = "ort"
    resolution: dict[str, Any] | None = None  # the validation split's resolution (check_resolution); None: a floor
    start: dict[str, Any] | None = None  # the greedy's start (choose_start's record); None: no greedy ran
    note: str | None = None  # the chosen build measured slower than the default rules (slower_than_default), and/or
    # --max-evals too small for the units (evaluations_short)


def run_search(problem: Problem, options: SearchOptions, out_dir: Path) -> SearchResult:
    if not problem.units:
        raise SearchError("the model has no quantizable unit under these rules (no Conv/MatMul/Gemm/Add/Mul that the "
                          "INT8 plan quantizes or keeps float by a rule); nothing to search")
    if options.max_evals < 3:
        raise SearchError(f"--max-evals {options.max_evals}: the search needs at least 3 builds (all-INT8, the "
                          "default rules, one candidate)")
    short = evaluations_short(len(problem.units), options)
    if short:
        log.warning("%s", short)
    reference = problem.validate(problem.fp32)
    ledger = Ledger(out_dir, problem, options, reference)
    default = ledger.measure_default()
    resolution = check_resolution(options.budget, [default, ledger.measure(all_config(problem.units), "all-int8")])
    sens = measure_speed(ledger)
    reserve = min(len(problem.units) + 1, max(2, options.max_evals // 3))
    sens = measure_proxy(ledger, sens, reserve, reserve + 2 * options.top)
    sens = measure_task(ledger, sens, reserve)
    start = choose_start(ledger, sens, default) if ledger.left > 0 else None
    steps, visited = greedy(ledger, sens, start) if start else (["no evaluations left for the greedy"], [])
    # timed: the default rules, all-INT8 and the greedy path from either start (sensitivity builds with one unit
    # changed are not candidates, and timing each would cost more than the search); the start's own timing only
    # chose it: every candidate is timed again here, in the same rounds
    starts = [start.profile.key] if start else []
    path = [key for key in dict.fromkeys([(all_config(problem.units), frozenset()), *starts, *visited])
            if key in ledger.points]
    timed = dict(ledger.points)
    fp32_latency: Latency | None = None
    if problem.latency is not None:
        latencies = problem.latency([problem.fp32, default.artifact, *(ledger.points[k].artifact for k in path)])
        fp32_latency = latencies[0]
        default = replace(default, latency=latencies[1])
        timed.update({k: replace(ledger.points[k], latency=lat) for k, lat in zip(path, latencies[2:])})
    points = [default, *timed.values()]
    chosen = fastest_holding([default, *(timed[k] for k in path)], problem.timed, options.budget, problem.units)
    slower = slower_than_default(default, chosen, options.budget)
    if slower:
        log.warning("%s", slower)
    if short:  # said with the result only where the evaluation budget did leave something out
        alone = sum(item.add_one_in_snr_db is not None for item in sens.values())
        on_task = sum(item.add_one_in is not None for item in sens.values())
        cut = alone < len(sens) or on_task < min(options.top, len(sens)) or ledger.left <= 0
        short = (f"{short} (this search measured {alone} of {len(sens)} units alone, {on_task} on the task metric"
                 f"{', and used every build' if ledger.left <= 0 else ''})") if cut else None
    note = "; ".join(text for text in (slower, short) if text) or None
    held_out = judge_held_out(problem, options.budget, default, chosen)
    return SearchResult(options.budget, problem.units, sens, tuple(points), tuple(steps), default, chosen,
                        fp32_latency, held_out, ledger.evals, ledger.minutes(), problem.speed_basis(), problem.backend,
                        resolution, start.record if start else None, note)


def evaluations_short(units: int, options: SearchOptions) -> str | None:
    """A line saying --max-evals cannot measure every unit once (add-one-in), the `top` on the task metric and
    leave room for the greedy, and what would; None when it can. A 64-unit trt-sim WeNet search with 40 spent them
    all on add-one-in builds and never reached the task metric."""
    room = min(GREEDY_ROOM, units)
    needed = 2 + units + 2 * min(options.top, units) + room
    if options.max_evals >= needed:
        return None
    return (f"--max-evals {options.max_evals} is short for {units} units: the default and all-INT8 builds, each unit "
            f"once, the {options.top} worst on the task metric and a greedy of {room} steps take about {needed}; give "
            f"--max-evals {needed}{' or --units alike (repeated blocks as one unit)' if units > 20 else ''}")


def check_resolution(budget: TaskBudget, probes: Sequence[Point]) -> dict[str, Any] | None:
    """Whether the validation split can resolve the budget, from the paired changes of the default-rules and
    all-INT8 builds: a candidate is at best as quiet as the quieter of them, so when even its 95 % interval at this
    split size is wider than the budget, no candidate can be proven within it and every verdict the greedy steered
    by would be noise. Raises SearchError naming the split size and the size that would tell."""
    quietest = min(probes, key=lambda p: float(p.verdict["spread"]))
    n = int(quietest.verdict["n"])
    found = budget.resolution(float(quietest.verdict["spread"]), n)
    if found is None:
        return None
    summary = _resolution_dict(found, quietest.label)
    log.info("validation split: %d utterances, 95 %% half-width %.4f (%s) against the budget %.4f", n,
             summary["half_width"], quietest.label, summary["limit"])
    if not found.resolves:
        would = (f"about {found.needed} utterances would tell: give --validation {found.needed} on a test set with "
                 "more utterances left for the held-out numbers" if found.needed is not None
                 else "no split size can tell a zero budget")
        why = (f"the 95 % interval of the {quietest.label} build's change is +-{summary['half_width']:.4f} wide, "
               f"not narrower than the budget's {summary['limit']:.4f}" if math.isfinite(found.half_width) else
               f"fewer than {MIN_UTTERANCES} utterances may all miss what the test set does")
        raise SplitTooSmall(f"the validation split of {n} utterances cannot resolve the budget "
                            f"({budget.describe()}): {why}; {would}", n, found.needed)
    return summary


def _resolution_dict(found: Resolution, probe: str) -> dict[str, Any]:
    return {"n": found.n, "half_width": found.half_width * found.scale, "limit": found.limit * found.scale,
            "needed": found.needed, "probe": probe, "resolves": found.resolves}


def fastest_holding(points: Sequence[Point], timed: bool, budget: TaskBudget, units: Sequence[Unit]) -> Point | None:
    """The timed build with the lowest latency (the minimum over interleaved rounds: on a shared machine it moves
    least with other load; the median is reported too) among those holding the budget; untimed, the build with the
    most INT8 structural blocks of `units` (the smaller metric loss breaks ties)."""
    holding = [p for p in points if p.holds and (p.latency is not None or not timed)]
    if not holding:
        return None
    if timed:
        return min(holding, key=lambda p: p.latency.min_ms if p.latency else 0.0)
    return max(holding, key=lambda p: (int8_blocks(units, p.config), -loss(p.verdict, budget)))


def slower_than_default(default: Point, chosen: Point | None, budget: TaskBudget) -> str | None:
    """A line saying the chosen build was timed slower than the default-rules build (it can only be chosen so when
    the defaults were not proven within on validation), so that nobody reads a slower build as a win; None else."""
    if chosen is None or chosen.label == DEFAULT_LABEL or chosen.latency is None or default.latency is None:
        return None
    if chosen.latency.min_ms <= default.latency.min_ms:
        return None
    verdict = default.verdict
    return (f"searched build slower than the default rules: {chosen.latency.min_ms:.2f} vs "
            f"{default.latency.min_ms:.2f} ms (min over interleaved rounds); chosen only because the default rules "
            f"were not proven within on validation ({budget.metric} change {verdict['delta']:+.4f} "
            f"[{verdict['ci_low']:+.4f}, {verdict['ci_high']:+.4f}], {verdict['verdict']})")


def judge_held_out(problem: Problem, budget: TaskBudget, default: Point, chosen: Point | None) -> dict[str, Any]:
    """FP32, the default rules and the chosen build on the held-out split, never seen by the search."""
    reference = problem.held_out(problem.fp32)
    rows: dict[str, Any] = {"fp32": _summary(reference, budget)}
    for label, point in (("default-rules", default), ("searched", chosen)):
        if point is None:
            continue
        columns = problem.held_out(point.artifact)
        verdict = budget.judge(reference, columns)
        rows[label] = {**_summary(columns, budget), **_verdict_dict(verdict, budget), "holds": budget.holds(verdict),
                       "verdict_text": budget.verdict_text(verdict)}
    return rows


def _summary(columns: Columns, budget: TaskBudget) -> dict[str, Any]:
    values = budget.per_utterance(columns, "held-out")
    return {"n": len(values.ids), budget.metric: values.value * budget.scale}


def _picked(point: Point) -> str:
    looks = point.verdict.get("looks")
    return f" (a sensitivity build: judged as the best of the {looks} it was ranked with)" if looks else ""


def _replace(item: Sensitivity, **changes: Any) -> Sensitivity:
    return replace(item, **changes)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
