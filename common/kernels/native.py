"""Build and load the C++ kernels (``csrc/quant_ops.cpp``) with torch's JIT extension machinery.

The build goes to a directory keyed by a hash of the source, the compiler flags, the torch
version and the Python ABI (``$PIPESPEC_KERNEL_DIR/<hash>``, default
``~/.cache/pipespec/kernels/<hash>``), so a second load imports the finished library directly.
Where the build cannot happen (no compiler, no ninja, another CPU architecture), :func:`load`
logs a warning and returns None: the runner falls back to the torch reference.

``python -m common.kernels.native build`` builds it (``make install`` runs this) and prints what it
built and which code path this CPU gets.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import structlog
import torch

log = structlog.get_logger()

NAME = "pipespec_quant_ops"
SOURCE = Path(__file__).parent / "csrc" / "quant_ops.cpp"
# -ffp-contract=off: no product may be fused into an add (the reference rounds each operation).
# No -march: the AVX-512 code is chosen at run time, so one build serves every x86-64 CPU.
# -fopenmp: at::parallel_for is an inline OpenMP loop; it links libgomp.so.1, the runtime torch
# has loaded already, so torch.set_num_threads governs it.
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def build_dir() -> Path:
    """Where this source, these flags and this torch build their library."""
    key = hashlib.sha256()
    flags = " ".join((os.environ.get("CXX", "c++"), *CFLAGS, *LDFLAGS)).encode()
    for part in (SOURCE.read_bytes(), flags, torch.__version__.encode()):
        key.update(part)
    key.update((sysconfig.get_config_var("EXT_SUFFIX") or sys.version).encode())
    root = os.environ.get("PIPESPEC_KERNEL_DIR") or Path.home() / ".cache" / "pipespec" / "kernels"
    return Path(root) / key.hexdigest()[:16]


def _import_built(directory: Path) -> ModuleType | None:
    """The library already built in ``directory``, or None."""
    path = directory / f"{NAME}.so"
    if not path.exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _compile(directory: Path, verbose: bool) -> ModuleType:
    """Build with ninja (torch takes a file lock, so concurrent builders wait for one another)."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        verbose=verbose,
    )


@functools.cache
def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernels (built on first use), or None with a logged warning."""
    try:
        directory = build_dir()
        return _import_built(directory) or _compile(directory, verbose)
    except Exception as exc:  # any failure to build or load means: use the reference
        log.warning("native kernels unavailable, using the torch reference", reason=str(exc))
        return None


def main(argv: list[str]) -> int:
    """``build``: build (or find) the library and say which code path this CPU gets."""
    if argv[:1] != ["build"]:
        print("usage: python -m common.kernels.native build", file=sys.stderr)
        return 2
    module = load(verbose="-v" in argv)
    if module is None:
        print("native kernels: build failed; the runner will use the torch reference")
        return 0  # never fail an install: the reference covers it
    print(f"native kernels: {module.__file__}")
    print(f"code path on this CPU: {module.cpu_path()} (of {', '.join(module.cpu_paths())})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
