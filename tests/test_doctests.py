"""The worked examples in the docstrings of every package (``common``, ``services``, ``deploy``,
``benchmarks``) run as tests: each module the packages hold is found with
``pkgutil.walk_packages`` (so a module added or deleted needs no change here), imported, and its
doctests executed, so an example that drifts from the code fails. This is the one place
docstring examples run; the modules' own test files do not call ``doctest`` themselves.

(pytest's ``--doctest-modules`` would only look under ``testpaths = ["tests"]``; walking the
packages here keeps the default ``pytest -q`` the one command.)"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

PACKAGES = ("common", "services", "deploy", "benchmarks")

# Modules whose examples are many: at least this many must run (a finder that misses part of a
# module, e.g. examples hidden in a class it skips, fails here). Applied when the module exists.
MIN_EXAMPLES = {
    "common.sampling": 10,
    "services.gateway.registry": 2,
    "benchmarks.acceptance_replay": 2,
}


def module_names(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Dotted names of every module of ``packages`` (each package itself included), sorted."""
    names = set(packages)
    for package in packages:
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.walk_packages(path, f"{package}.")}
    return sorted(names)


MODULES = module_names()


def test_every_package_is_walked():
    assert {
        "common.decoding",
        "common.backends",
        "common.backends.simulated",
        "common.sampling",
        "services.gateway.registry",
        "services.gateway.replies",
        "services.stage.service",
        "deploy.demo",
        "deploy.harness",
    } <= set(MODULES)
    assert any(name.startswith("benchmarks.") for name in MODULES)


@pytest.fixture
def one_thread():
    """Examples run on one torch thread whatever the machine, so they see the same conditions
    everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
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
    assert results.attempted >= MIN_EXAMPLES.get(name, 0), (name, results)
