"""The worked examples in the docstrings of ``common/`` run as tests: every module under
``common/`` is imported and its doctests executed, so an example that drifts from the code fails.

(pytest's ``--doctest-modules`` would only look under ``testpaths = ["tests"]``; walking the
package here keeps the default ``pytest -q`` the one command.)"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "common"


def module_names(package: Path) -> list[str]:
    """Dotted names of every module in ``package``, sorted."""
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
    )


MODULES = module_names(PACKAGE)


def test_every_module_is_found():
    assert {"common.decoding", "common.backends.simulated", "common.backends"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}"
    source = Path(module.__file__).read_text()
    # a module that shows examples must have them found and run (not hidden from the finder)
    assert (results.attempted > 0) == (">>>" in source), (name, results)
