"""The quantized runner's operations: the C++ kernels where they build, else the torch reference.

``PIPESPEC_KERNELS=reference`` forces the torch reference; ``PIPESPEC_KERNELS=generic`` (or
``avx2``, ``avx512-vnni``) one code path of the C++ kernels, where this CPU has it; unset, they
take the best path of the CPU. The variable is read at every call. Weights go through
:func:`prepare_weight` once: the native kernels read a :class:`TiledWeight`, the reference a
:class:`RowWeight`, and :func:`qmatmul` runs whichever the weight is.
"""

from __future__ import annotations

import os

import torch

from common.kernels import reference
from common.kernels.packing import BlockScales, RowWeight, TiledWeight, tile, untile

__all__ = ["attention", "implementation", "prepare_weight", "qmatmul", "rmsnorm", "silu_mul"]


def _native():
    """The loaded extension, or None where it is not built or the reference is forced."""
    if os.environ.get("PIPESPEC_KERNELS") == "reference":
        return None
    from common.kernels import native

    return native.load()


PATHS = ("generic", "avx2", "avx512-vnni")


def _path() -> str:
    """The native code path asked for: ``""`` (the CPU's best) or one of :data:`PATHS`."""
    path = os.environ.get("PIPESPEC_KERNELS", "")
    return path if path in PATHS else ""


def implementation() -> str:
    """``"native-avx512-vnni"``, ``"native-avx2"``, ``"native-generic"`` or ``"reference"``."""
    ext = _native()
    if ext is None:
        return "reference"
    return f"native-{_path() or ext.cpu_path()}"


def prepare_weight(row: RowWeight) -> RowWeight | TiledWeight:
    """The layout the active implementation reads."""
    return row if _native() is None else tile(row)


def qmatmul(x: torch.Tensor, w: RowWeight | TiledWeight) -> torch.Tensor:
    """``x [M, K] @ w.T`` quantized (``reference.qmatmul``): ``[M, N]`` float32."""
    if isinstance(w, RowWeight):
        return reference.qmatmul(x, w)
    ext = _native()
    if ext is None:
        return reference.qmatmul(x, untile(w))
    x = x.float().contiguous()
    f = w.factors
    if f is None:
        return ext.qmatmul(x, w.codes, w.s, w.z, w.n, w.k, w.group, w.bits, _path())
    if isinstance(f, BlockScales):
        return ext.qmatmul_block(x, w.codes, f.d, f.offset, w.n, w.k, w.group, w.bits, _path())
    args = (w.n, w.k, w.group, f.superblock, w.bits, _path())
    return ext.qmatmul_factored(x, w.codes, f.d, f.dm, f.sc, f.mi, *args)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference.rmsnorm``, bit for bit."""
    ext = _native()
    if ext is None:
        return reference.rmsnorm(x, weight, eps)
    return ext.rmsnorm(x.float().contiguous(), weight.float().contiguous(), eps, _path())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[gate | up]`` (close to ``reference.silu_mul``)."""
    ext = _native()
    if ext is None:
        return reference.silu_mul(gate_up)
    return ext.silu_mul(gate_up.float().contiguous(), _path())


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_rows: torch.Tensor,
    row_start: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per-row causal attention over pooled keys (``reference.attention``): ``[N, H, D]``."""
    ext = _native()
    if ext is None:
        return reference.attention(q, k_cache, v_cache, key_rows, row_start, counts, scale)
    ints = [t.to(torch.int64).contiguous() for t in (key_rows, row_start, counts)]
    return ext.attention(
        q.float().contiguous(),
        k_cache.float().contiguous(),
        v_cache.float().contiguous(),
        *ints,
        float(scale),
        _path(),
    )
