"""The SPEC argument the commands share: a shipped model name (dpcrn, dpcrn-stream, wenet), a model spec file, or,
for the commands that act on one graph, a shipped graph's artifact name (wenet-encoder = spec wenet, --graph encoder).
Argument parsing and lookup only: the work is quant.spec's and quant.pipeline's."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant.errors import QuantError

SPEC_HELP = ("a shipped model (dpcrn, dpcrn-stream, wenet) or a model spec file (.toml; see docs/specs.md)")


def add_spec(parser: argparse.ArgumentParser, graphs: bool = True, onnx: bool = False) -> None:
    """The positional SPEC and, for commands acting on one graph at a time, --graph ROLE."""
    parser.add_argument("spec", metavar="SPEC", help=SPEC_HELP + (", or an .onnx file" if onnx else ""))
    if graphs:
        parser.add_argument("--graph", metavar="ROLE", help="the spec's graph to act on, by role (default: every "
                            "graph, in order)")


@dataclass(frozen=True)
class Selection:
    """The spec a command acts on and the roles of the graphs it acts on (in the spec's order)."""

    spec: Any  # quant.spec.ModelSpec
    roles: tuple[str, ...]

    @property
    def graphs(self) -> list[Any]:
        return [self.spec.graph(role) for role in self.roles]

    def single_role(self, ask: str = "give --graph ROLE") -> str:
        """The one role selected, for a command that acts on one graph; `ask`: what the error asks for when the
        spec has several graphs and no --graph chose one."""
        if len(self.roles) > 1:
            raise QuantError(f"{self.spec.name} has graphs {list(self.roles)}; {ask}")
        return self.roles[0]


def is_onnx(text: str) -> bool:
    return Path(text).suffix == ".onnx"


def select(text: str, role: str | None = None) -> Selection:
    """The spec named by `text` (with `role`: only that graph). A shipped graph's artifact name (wenet-encoder,
    wenet-decoder) selects its spec and role, as `quant build wenet-encoder` did before specs."""
    from quant.spec import SpecError, load_spec, shipped_specs

    try:
        spec = load_spec(text)
    except SpecError:
        for name in shipped_specs():
            shipped = load_spec(name)
            graph = next((g for g in shipped.graphs if g.name == text), None)
            if graph is not None and role in (None, graph.role):
                return Selection(shipped, (graph.role,))
        raise
    roles = tuple(g.role for g in spec.graphs)
    if role is not None:
        spec.graph(role)  # a SpecError naming the roles there are
        roles = (role,)
    return Selection(spec, roles)


def add_rewrites(parser: argparse.ArgumentParser) -> None:
    """--rewrites A,B / --no-rewrites: the graph rewrites of every graph instead of each graph's spec `rewrites`."""
    from quant.cli.options import rewrite_list

    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rewrites", type=rewrite_list, metavar="A,B",
                       help="exact graph rewrites applied (and checked on real inputs) before every build, instead of "
                       "the spec's: deconv-to-conv, split-concat-conv, prelu-to-leakyrelu, gru-step-to-matmul")
    group.add_argument("--no-rewrites", dest="rewrites", action="store_const", const=(),
                       help="build from the graph as exported, whatever the spec's rewrites")


def fp32_graphs(spec: Any, rewrites: tuple[str, ...] | None = None) -> dict[str, Path]:
    """The FP32 ONNX file of each graph by role that builds start from: quant's reference graphs exported on demand
    under engines/, with the spec's graph rewrites applied (`rewrites` instead, when given; () for none)."""
    from quant.paths import DEFAULT_OUT_ROOT
    from quant.pipeline import RunOptions, Steps

    return Steps(DEFAULT_OUT_ROOT, RunOptions(rewrites=rewrites)).graphs(spec)


def single_output(selection: Selection, output: Path | None, option: str) -> None:
    """An explicit output path names one file or folder: refuse it when the command acts on several graphs."""
    if output is not None and len(selection.roles) > 1:
        raise QuantError(f"{option} {output}: {selection.spec.name} has graphs {list(selection.roles)}; give --graph "
                         f"ROLE with {option}")
