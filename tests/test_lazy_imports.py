"""Every ``from X import Y`` in the project names something that exists, including the imports
inside functions, which run only on the path that needs them (a merge once left
``benchmarks.run``'s sampled rows importing a function that had been renamed; nothing ran that
path until a benchmark did)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "services", "deploy", "benchmarks")


def project_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every absolute ``from module import name`` of the project's own
    packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and node.module
                    and node.module.split(".")[0] in PACKAGES
                ):
                    file = str(path.relative_to(ROOT))
                    found += [(file, node.module, alias.name) for alias in node.names]
    return found


IMPORTS = project_imports()


def test_the_walk_finds_imports_inside_functions():
    assert ("benchmarks/run.py", "benchmarks.systems", "run_system") in IMPORTS


@pytest.mark.parametrize("module", sorted({m for _, m, _ in IMPORTS}))
def test_every_imported_name_exists(module):
    loaded = importlib.import_module(module)
    missing = [
        (file, name)
        for file, m, name in IMPORTS
        if m == module
        and name != "*"
        and not hasattr(loaded, name)
        and importlib.util.find_spec(f"{module}.{name}") is None
    ]
    assert not missing, f"{module} has no {missing}"
