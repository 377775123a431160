"""The package layout (docs/architecture.md): every import, lazy ones included, points down the flow
cli -> certification -> report -> bounds -> model, data -> graph -> the base modules, and no module imports
itself back through others. Imports under ``if TYPE_CHECKING:`` are annotations only and are not walked."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import lipcert

PACKAGE = Path(lipcert.__file__).resolve().parent
#: the rank of each part of the package: a module may import its own part or a lower rank
RANKS = {"base": 0, "graph": 1, "model": 2, "data": 2, "bounds": 3, "report": 4, "certification": 5, "cli": 6,
         "api": 7}
#: modules directly in lipcert/ that everything may use (they import only each other)
BASE = {"errors", "atomic", "device", "limits", "version", "progress", "parse"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The lipcert modules ``name`` imports (a package's ``__init__`` counts when it is named itself)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lipcert"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lipcert":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found - {name}


def part(name: str) -> str:
    pieces = name.split(".")
    if len(pieces) == 1:
        return "api"
    if pieces[1] in RANKS:
        return pieces[1]
    assert pieces[1] in BASE or pieces[1] == "__main__", f"{name} is in no part of the layout; add it to RANKS or BASE"
    return "api" if pieces[1] == "__main__" else "base"


@cache
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_every_import_points_down_the_flow():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            here, there = part(name), part(target)
            if here != there and RANKS[there] >= RANKS[here]:
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in edges and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The walker itself: a lazy import inside a function and a relative import both count; TYPE_CHECKING does not."""
    source = ("from typing import TYPE_CHECKING\nfrom ..graph import core\nif TYPE_CHECKING:\n"
              "    from lipcert.cli import app\ndef f():\n    from lipcert.report.model import Report\n")
    fake = tmp_path / "example.py"
    fake.write_text(source)
    found = imports_of("lipcert.bounds.example", fake, {"lipcert.graph.core", "lipcert.report.model"})
    assert found == {"lipcert.graph.core", "lipcert.report.model"}
