"""Which kinds of repeated block cost the task metric, on the whole test set: for each `alike` unit of a graph
(quant.search.units.alike_units: all attention blocks of a stack as one, all its FFNs, ...), the INT8 build with only
that kind INT8 and the one with every kind but it INT8, each judged against FP32 on the validation half, the held-out
half and all utterances (paired bootstrap, 95 %), plus all-INT8.

    python scripts/probe_alike.py wenet --graph encoder --target trt-sim --budget cer=+0.3

A diagnostic, not a search: it spends 2 builds per kind plus one, and it looks at the held-out half that `quant
search` keeps for its final numbers, so never feed what it shows back into a search you then report. It is how the
WeNet encoder's TensorRT INT8 loss was found to add up over the stack (FFNs alone +0.00, attention alone +0.01, both
with the rest +0.35 CER points on 450 utterances) rather than sit in one block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.cli.specs import fp32_graphs, select  # noqa: E402
from quant.errors import QuantError  # noqa: E402
from quant.search.budget import TaskBudget, parse_budget  # noqa: E402
from quant.search.core import Problem  # noqa: E402
from quant.search.models import Split, spec_problem  # noqa: E402
from quant.search.store import spec_budget  # noqa: E402
from quant.search.units import Config, all_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a shipped model (dpcrn, dpcrn-stream, wenet) or a model spec file")
    parser.add_argument("--graph", help="the spec's graph (role) to probe")
    parser.add_argument("--target", choices=("ort", "trt-sim"), default="ort")
    parser.add_argument("--budget", help="METRIC=VALUE as quant search takes it (default: the spec's INT8 budget)")
    parser.add_argument("-o", "--output", type=Path, default=Path("engines/probe_alike"), help="build folder")
    args = parser.parse_args(argv)
    try:
        return probe(args)
    except QuantError as error:
        print(f"probe_alike: error: {error}", file=sys.stderr)
        return 2


def probe(args: argparse.Namespace) -> int:
    selection = select(args.spec, args.graph)
    role = selection.single_role()
    budget = parse_budget(args.budget) if args.budget else spec_budget(selection.spec)
    out = args.output / f"{selection.spec.graph(role).name}-{args.target}"
    problem = spec_problem(selection.spec, role, fp32_graphs(selection.spec), out, Split(), target=args.target,
                           grouping="alike")
    everything = all_config(problem.units)
    configs: dict[str, Config] = {"all INT8": everything}
    for unit in problem.units:
        configs[f"only {unit.name}"] = frozenset({unit.name})
        configs[f"all but {unit.name}"] = everything - {unit.name}
    references = (problem.validate(problem.fp32), problem.held_out(problem.fp32))
    print(f"{len(problem.units)} alike units, budget {budget.describe()}; change vs FP32 "
          f"(validation | held-out | all), 95 % intervals")
    for index, (label, config) in enumerate(configs.items()):
        artifact = problem.build_config(config, out / "builds" / f"config{index}")
        print(f"{label}: {judged(problem, budget, references, artifact)}", flush=True)
    return 0


def judged(problem: Problem, budget: TaskBudget, references: Sequence[Mapping[str, Sequence[Any]]],
           artifact: Path) -> str:
    columns = (problem.validate(artifact), problem.held_out(artifact))
    parts = [*zip(references, columns), (joined(references), joined(columns))]
    return " | ".join(interval(budget, reference, candidate) for reference, candidate in parts)


def joined(halves: Sequence[Mapping[str, Sequence[Any]]]) -> dict[str, list[Any]]:
    return {key: [value for half in halves for value in half[key]] for key in halves[0]}


def interval(budget: TaskBudget, reference: Mapping[str, Sequence[Any]],
             candidate: Mapping[str, Sequence[Any]]) -> str:
    values = budget.judge(reference, candidate).change.to_dict()
    delta, low, high = (values[key] * budget.scale for key in ("delta", "ci_low", "ci_high"))
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}] n={values['n']}"


if __name__ == "__main__":
    sys.exit(main())
