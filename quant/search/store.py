"""Where `quant search` keeps its outputs under an output root, and the small search `quant run --search` runs for
a graph that has none: what the pipeline's `int8-searched` row builds from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from quant.search.budget import TaskBudget
from quant.search.core import SearchError

log = logging.getLogger(__name__)

SEARCH_DIR = "search"
RUN_SEARCH_EVALS = 20  # builds of the small search `quant run --search` runs per graph (quick: 6)


def search_dir(out_root: Path, graph_name: str, target: str = "ort") -> Path:
    """engines/search/<graph>[-<target>]: the folder `quant search` writes rules.toml, search.json, frontier.png to."""
    return Path(out_root) / SEARCH_DIR / search_folder(graph_name, target)


def search_folder(graph_name: str, target: str = "ort") -> str:
    """The search folder's name under the search root: <graph> for ONNX Runtime, <graph>-<target> for another."""
    return graph_name if target == "ort" else f"{graph_name}-{target}"


def searched_rules(out_root: Path, spec: Any, target: str = "ort") -> dict[str, Path]:
    """Graph name -> the rules.toml a `quant search` of that graph for `target` (ort | trt-sim) left under
    `out_root`."""
    from quant.search.output import RULES_FILE

    found = {str(g.name): search_dir(out_root, str(g.name), target) / RULES_FILE for g in spec.graphs}
    return {name: path for name, path in found.items() if path.is_file()}


def spec_budget(spec: Any) -> TaskBudget:
    """The spec's INT8 budget ([defaults.budgets] int8 = { metric = allowed loss }) as a search budget."""
    budget = spec.defaults.budgets.get("int8")
    if budget is None:
        raise SearchError(f"{spec.name}: the spec sets no INT8 budget to search to: add one to it ([defaults.budgets] "
                          "int8 = { pesq_wb = 0.05 }) or give `quant search SPEC --budget METRIC=VALUE`")
    row = budget.to_row()
    scaled = TaskBudget(row["metric"], 0.0).scale * row["limit"]
    return TaskBudget(row["metric"], -scaled if row["higher_is_better"] else scaled)


def run_small_search(spec: Any, role: str, graphs: Mapping[str, Path], out_root: Path, cache: Path,
                     utterances: int | None, max_evals: int) -> Path | None:
    """A search of graph `role` within the spec's INT8 budget on `utterances` test utterances per half (None: the
    whole halves), `max_evals` builds; returns the rules.toml it wrote (search_dir), or None for a graph with
    nothing to search (no quantizable unit: it keeps the shipped rules)."""
    from quant.search.core import SearchError, SearchOptions, SplitTooSmall, run_search
    from quant.search.models import Split, spec_problem
    from quant.search.output import write_outputs

    graph = spec.graph(role)
    out_dir = search_dir(out_root, str(graph.name))
    budget = spec_budget(spec)
    log.info("%s: searching INT8 precision within %s (%d builds)", graph.name, budget.describe(), max_evals)
    problem = spec_problem(spec, role, graphs, out_dir, Split(utterances, utterances), cache)
    if not problem.units:
        log.info("%s: no quantizable unit; the shipped rules stay", graph.name)
        return None
    try:
        result = run_search(problem, SearchOptions(budget, max_evals=max_evals), out_dir)
    except SplitTooSmall as error:
        # say it in quant run's terms: its own split comes from --se-utterances / --asr-utterances
        flag = "--asr-utterances" if spec.model.task == "asr" else "--se-utterances"
        would = f"about {error.needed} per half would tell" if error.needed is not None else "no size would tell"
        raise SearchError(f"quant run --search: graph {graph.name}: the run's {error.n} test utterances per half "
                          f"cannot resolve {budget.describe()} ({would}); give a larger {flag} (or none), or run "
                          f"`quant search {spec.name} --graph {role}` first, which grows its split") from None
    command = f"quant run --search (spec {spec.name}, graph {role}, {budget.describe()})"
    return write_outputs(result, problem.base_rules, out_dir, command)["rules"]
