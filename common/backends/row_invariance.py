"""The fewest rows a matrix product needs, on this machine, for each row's result not to depend on how
many rows share the call: what the batched runner pads every product to (``min_rows``).

A BLAS library picks its kernel by the shapes, and kernels sum in different orders, so row ``i`` of
``x @ W.T`` can change in its last bits with the number of rows ``M``. Padding every product to ``R``
rows makes a request's logits independent of the batch and of the window it is fed in, if every
``M >= R`` falls in one kernel regime. Where that threshold lies is the machine's business, so the
runner asks this module at load time (``min_rows = 0``, the default) instead of assuming it. With
MKL in fp32 on one thread, one CPU gives bit-identical rows for every ``M >= 4``; another (a Xeon
with AVX-512 and AMX) has two regimes, ``M`` = 2..15 and ``M >= 16``, so 4 rows no longer suffice
and 16 do. The measurements, machine by machine, are in ``docs/batched-runner.md`` (*Row
invariance, machine by machine*).

The kernel also depends on how the weight is laid out. Stored column-major (``W.t().contiguous()
.t()``: the same ``[out, in]`` tensor, its transpose contiguous), ``x @ W.T`` is a plain NN product:

* on that Xeon it has one regime for every ``M`` from 2 up to at least 128 (to 191 for inputs of
  4864 or 8960 features, a third regime from 192 rows) and is faster from 4 rows up;
* on an AMD EPYC (AVX-512) both layouts need 4 rows, and the row-major (transformers') layout is
  faster (``python -m benchmarks.batched_costs padding --weight-layout row|column`` compares them).

So the runner probes both layouts (:func:`fewest_rows` on each, ``weight_layout = "auto"``) and
stores its weights column-major (:func:`store_column_major`) only where that needs fewer rows. It
never gives a product more than :data:`MAX_ROWS` rows (:func:`rowwise` splits a long prefill into
slices).

>>> torch.manual_seed(0) and None
>>> ops = [(torch.nn.Linear(32, 48, bias=False), 32)]
>>> with torch.inference_mode():
...     r = invariant_min_rows(ops)
>>> r in CANDIDATES
True
>>> pad_rows(torch.ones(1, 2), 3).tolist()
[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
>>> rowwise(lambda x: x * 2, torch.ones(5, 1), min_rows=2, max_rows=2).tolist()  # 2 + 2 + 1 (padded)
[[2.0], [2.0], [2.0], [2.0], [2.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
import torch

log = structlog.get_logger()

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)  # row counts tried, smallest first
MAX_ROWS = 128  # the most rows one product gets (rowwise); more are split into slices
# row counts a probe computes together: around every power of two up to MAX_ROWS (the tests go
# further, through rowwise)
PROBE_ROWS = tuple(
    sorted({m for p in range(8) for m in (2**p - 1, 2**p, 2**p + 1) if 0 < m <= MAX_ROWS})
)

Op = tuple[Callable[[torch.Tensor], torch.Tensor], int]  # (row-wise op, input width)


def pad_rows(x: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``min_rows`` rows (dim 0); ``x`` itself if it has enough."""
    if x.shape[0] >= min_rows:
        return x
    return torch.cat([x, x.new_zeros((min_rows - x.shape[0], *x.shape[1:]))])


def rowwise(
    op: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    min_rows: int,
    max_rows: int = MAX_ROWS,
) -> torch.Tensor:
    """``op(x)`` for a row-wise ``op``, with every call given ``min_rows`` to ``max_rows`` rows:
    ``x`` split into slices of ``max_rows``, the last padded to ``min_rows``; the padding's rows
    are dropped from the result."""
    if len(x) <= max_rows:
        return op(pad_rows(x, min_rows))[: len(x)]
    return torch.cat([op(pad_rows(part, min_rows))[: len(part)] for part in x.split(max_rows)])


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``) with the same shape and values, stored so its transpose is
    contiguous: ``F.linear`` with it runs an NN product.

    >>> w = column_major(torch.arange(6.0).reshape(2, 3))
    >>> w.tolist(), w.stride(), w.t().is_contiguous()
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], (1, 2), True)
    """
    return weight.detach().t().contiguous().t()


def store_column_major(linears: Sequence[torch.nn.Module]) -> None:
    """Re-store each module's ``weight`` column-major (:func:`column_major`), in place. Modules
    sharing a weight (tied embeddings and head) keep sharing it. An embedding still looks rows up
    (strided)."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in linears:
        weight = module.weight
        if id(weight) not in done:
            done[id(weight)] = torch.nn.Parameter(column_major(weight), requires_grad=False)
        module.weight = done[id(weight)]


def rows_agree(
    op: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    min_rows: int,
    probe_rows: Sequence[int] = PROBE_ROWS,
) -> bool:
    """Whether ``op`` gives rows 0, M/2 and M-1 of ``x[:M]`` exactly what it gives each of them
    alone padded to ``min_rows`` rows, for every ``M`` in ``probe_rows`` from ``min_rows`` up to
    ``len(x)``."""
    alone: dict[int, torch.Tensor] = {}
    for m in probe_rows:
        if m < min_rows or m > len(x):
            continue
        together = op(x[:m])
        for i in sorted({0, m // 2, m - 1}):
            if i not in alone:
                alone[i] = op(pad_rows(x[i : i + 1], min_rows))[0]
            if not torch.equal(together[i], alone[i]):
                return False
    return True


def fewest_rows(
    ops: Sequence[Op],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    candidates: Sequence[int] = CANDIDATES,
    probe_rows: Sequence[int] = PROBE_ROWS,
    seed: int = 0,
) -> int | None:
    """The smallest candidate row count that makes every op in ``ops`` row-invariant (for the
    ``probe_rows`` tried) on inputs of ``device`` and ``dtype``; None if none does."""
    g = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(max(probe_rows), width, generator=g).to(device, dtype) for _, width in ops
    ]
    for rows in candidates:
        if all(rows_agree(op, x, rows, probe_rows) for (op, _), x in zip(ops, inputs)):
            return rows
    return None


def warn_not_invariant() -> int:
    """Log that no padding helps here; 1 row (no padding, which would buy nothing)."""
    log.warning(
        "rows_not_invariant",
        detail="no row padding makes matrix products batch-invariant on this device: "
        "outputs equal the target's own decoding almost always, not by construction",
    )
    return 1


def invariant_min_rows(ops: Sequence[Op], *args, **kwargs) -> int:
    """:func:`fewest_rows`, or 1 (no padding) with a warning if none does: logits then depend on
    the batch."""
    rows = fewest_rows(ops, *args, **kwargs)
    return warn_not_invariant() if rows is None else rows
