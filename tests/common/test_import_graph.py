"""No import circle in the project (``common``, ``services``, ``deploy``, ``benchmarks``): the
modules are read with ``ast`` (nothing is imported), every import between them becomes an edge
(those inside functions too: a lazy import still ties two modules together; edges across
packages too), and the graph must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "services", "deploy", "benchmarks")


def module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its __init__)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, wherever the import is."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            # ``from a import b`` imports the module a.b when there is one, else names of a
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that returns to its start (the first in name order), or
    None: a depth-first search that stops at a module already on its path."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project's modules it imports, over every module of ``packages``."""
    files = {name: path for package in packages for name, path in module_files(package).items()}
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": set()}, None),
        ({"a": {"a"}}, ["a", "a"]),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, None),  # a diamond is fine
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_edges_are_found_in_every_import_form(tmp_path):
    modules = {"common", "common.a", "common.b", "common.pkg", "common.pkg.c", "common.pkg.d"}
    source = (
        "import common.a\n"
        "from common import b\n"
        "def lazy():\n    from common.pkg.c import thing\n"
        "from . import d\n"
        "import os\n"
    )
    (tmp_path / "__init__.py").write_text(source)
    assert imports_of("common.pkg", tmp_path / "__init__.py", modules) == {
        "common.a",
        "common.b",
        "common.pkg.c",
        "common.pkg.d",
    }


def test_graph_sees_the_known_edges():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert "common.model_catalog" in graph["common.backends.hf"]
    assert "common.decoding" in graph["common.stage_engine"]
    assert "services.gateway.core" in graph["services.gateway.app"]
    assert "common.settings" in graph["services.gateway.core"]  # across packages
    assert "deploy.demo" in graph["deploy.launch"]  # --demo's lazy import
    assert any(graph[name] for name in graph if name.startswith("benchmarks."))


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
