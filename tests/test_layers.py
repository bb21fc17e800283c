"""Imports point down only: every quant module's imports (top level, inside functions, importlib.import_module with a
literal name) checked against the layer list of docs/architecture.md ("Layers")."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quant"

# Bottom up; a module may import its own floor and the floors below it. The root package `quant` (version and the
# documented `quant.load_spec`) is on no floor: Python runs it before any submodule anyway.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("quant.errors", "quant.fileio", "quant.paths", "quant.tomlschema", "quant.executor"),
    ("quant.onnxgraph",),
    ("quant.spec",),
    ("quant.data", "quant.features", "quant.decoding", "quant.frontends"),
    ("quant.models",),
    ("quant.backends",),
    ("quant.calib",),
    ("quant.precision",),
    ("quant.artifacts", "quant.rewrite"),
    ("quant.eval",),
    ("quant.tasks", "quant.search", "quant.timing"),
    ("quant.report", "quant.pipeline"),
    ("quant.cli", "quant.__main__"),
)


@dataclass(frozen=True)
class Edge:
    source: Path
    line: int
    importer: str
    imported: str


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | None:
    """Index into LAYERS of the longest prefix naming `module` (None: on no floor)."""
    best: tuple[int, int] | None = None
    for index, floor in enumerate(LAYERS):
        for prefix in floor:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative).is_dir()


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")[: len(importer.split(".")) - (node.level - (1 if is_package else 0))]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, importer: str | None = None) -> list[Edge]:
    """Every quant module `path` (module `importer`, default its own name) imports, wherever in the file;
    `from quant.x import y` names quant.x.y when y is a module (importing a submodule does not make its package's
    __init__ the dependency)."""
    importer = importer or module_name(path)
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(importer, path.name == "__init__.py", node)
            subs = [f"{target}.{alias.name}" for alias in node.names]
            modules = [sub for sub in subs if _is_module(sub)]
            names = modules if len(modules) == len(subs) else [target, *modules]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        edges += [Edge(path, node.lineno, importer, name) for name in names  # type: ignore[attr-defined]
                  if name.startswith("quant.")]
    return edges


def all_edges() -> list[Edge]:
    return [edge for path in sorted(PACKAGE.rglob("*.py")) for edge in imports_of(path)]


def test_every_module_is_on_a_floor() -> None:
    lost = sorted({module_name(path) for path in PACKAGE.rglob("*.py")} - {"quant"})
    lost = [module for module in lost if floor_of(module) is None]
    assert not lost, f"modules on no floor (add them to LAYERS here and in docs/architecture.md): {lost}"


def test_imports_point_down_only() -> None:
    upward = []
    for edge in all_edges():
        low, high = floor_of(edge.importer), floor_of(edge.imported)
        if low is not None and high is not None and high > low:
            upward.append(f"{edge.source.relative_to(PACKAGE.parent)}:{edge.line} {edge.importer} imports "
                          f"{edge.imported} (floor {high + 1} > {low + 1})")
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_a_lazy_upward_import_is_caught(tmp_path: Path) -> None:
    """The checker sees imports inside functions and importlib calls, not only the top of the file."""
    source = tmp_path / "probe.py"
    source.write_text("import numpy\n\n\ndef f():\n    from quant.cli import main\n    import importlib\n"
                      "    return importlib.import_module('quant.pipeline')\n")
    edges = imports_of(source, importer="quant.errors")
    assert [(edge.line, edge.imported) for edge in edges] == [(5, "quant.cli"), (7, "quant.pipeline")]
    assert all(floor_of(edge.imported) > floor_of(edge.importer) for edge in edges)  # type: ignore[operator]


@pytest.mark.parametrize("module, floor", [("quant.onnxgraph.graph", 1), ("quant.artifacts.trt_build", 8),
                                           ("quant.backends.trt_inputs", 5), ("quant.calib.opset", 6)])
def test_floor_of_takes_the_package(module: str, floor: int) -> None:
    assert floor_of(module) == floor
