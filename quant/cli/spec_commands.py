"""`quant specs list|check`: the shipped model specs, and a dry run of a spec on one utterance (quant.tasks.check)."""

from __future__ import annotations

import argparse

from quant.cli.specs import add_rewrites, add_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("specs", help="list the shipped model specs, or check a spec against its graphs "
                                   "and data on one utterance")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the shipped specs (reference models), with their files")
    listing.set_defaults(handler=run_list)

    check = actions.add_parser(
        "check", help="load SPEC, match its names against each ONNX file, run the first calibration feed through "
        "each FP32 graph and evaluate FP32 on the first test utterance",
        description="Everything a run of SPEC needs, tried once on one utterance: the spec's keys, each graph's file "
        "and the input/output names the spec gives it, the front end's features (shape, layout), streaming states "
        "and chain wiring through the FP32 graph, both manifests, and the output conversion with the task's metrics. "
        "A mistake stops with one line naming the file, key or tensor (exit 2); nothing is written but quant's own "
        "exports and rewritten graphs under engines/.")
    add_spec(check, graphs=False)
    add_rewrites(check)
    check.set_defaults(handler=run_check)


def run_list(args: argparse.Namespace) -> int:
    from quant.spec import load_spec, shipped_specs, spec_path

    for name in shipped_specs():
        spec = load_spec(name)
        print(f"{name:14s} {spec.model.task:4s} {spec_path(name)}  {spec.model.description}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from quant.cli.specs import fp32_graphs, select
    from quant.tasks.check import check_spec

    spec = select(args.spec).spec
    for line in check_spec(spec, fp32_graphs(spec, args.rewrites)).lines():
        print(line)
    return 0
