"""What every runner with a KV pool shares: requests open a reservation of pool rows, passes
append to it, rollbacks crop it, and a pass is checked before it touches any cache.

A subclass (the transformers runner, the quantized runner) calls :meth:`PooledRunner._new_pool`
when it allocates its pool tensors, sets ``positions`` (the longest request its rotary tables
cover) and implements :meth:`PooledRunner._pass` over the runs that feed tokens; each slot's
``rows[p]`` is the pool row of the request's position ``p``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from common.backends.batched import BatchedBackend, PoolUsage, Run, RunResult, check_runs
from common.backends.kv_pool import BlockPool


class Slot:
    """One open request: its pool rows (reservation order) and how many positions it holds."""

    __slots__ = ("rows", "length")

    def __init__(self, rows: torch.Tensor):
        self.rows, self.length = rows, 0


class PooledRunner(BatchedBackend):
    """The pool bookkeeping of a batched runner; see the module docstring."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    positions: int = 0  # the longest request the rotary tables cover (at most the pool)

    def _new_pool(self, kv_pool_tokens: int, block_size: int) -> None:
        self.pool = BlockPool(kv_pool_tokens, block_size)
        self._slots: dict[Hashable, Slot] = {}

    def open(self, request: Hashable, capacity: int) -> None:
        if self.max_context and capacity > self.max_context:
            raise ValueError(
                f"request {request!r}: capacity {capacity} exceeds the model's "
                f"{self.max_context} positions"
            )
        if capacity > self.positions:
            raise ValueError(
                f"request {request!r}: capacity {capacity} exceeds the pool's "
                f"{self.positions} positions"
            )
        self.pool.reserve(request, capacity)
        rows = torch.tensor(self.pool.rows(request), dtype=torch.long, device=self.device)
        self._slots[request] = Slot(rows)

    def can_open(self, capacity: int) -> bool:
        return capacity <= self.positions and self.pool.can_reserve(capacity)

    def length(self, request: Hashable) -> int:
        return self._slots[request].length

    def crop(self, request: Hashable, length: int) -> None:
        slot = self._slots[request]
        if not 0 <= length <= slot.length:
            raise ValueError(f"crop({length}) on request {request!r} of length {slot.length}")
        slot.length = length  # rows past it are never read, and overwritten by the next feed

    def close(self, request: Hashable) -> None:
        if self._slots.pop(request, None) is not None:
            self.pool.release(request)

    def usage(self) -> PoolUsage:
        used, capacity = self.pool.usage()
        held = sum(s.length for s in self._slots.values())
        return PoolUsage(used, capacity, held_tokens=held, requests=len(self._slots))

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        """Check every run against its reservation and the vocabulary, then one pass over the
        runs that feed tokens (runs of no tokens get empty results)."""
        check_runs(runs, self._slots)
        vocab = self.vocab_size
        for run in runs:
            slot = self._slots[run.request]
            if slot.length + len(run.tokens) > len(slot.rows):
                raise ValueError(
                    f"request {run.request!r}: {slot.length} + {len(run.tokens)} positions exceed "
                    f"its capacity of {len(slot.rows)}"
                )
            if any(not 0 <= t < vocab for t in run.tokens):
                raise ValueError(f"request {run.request!r}: token ids must be in [0, {vocab})")
        nothing = torch.zeros((0, vocab), dtype=self.dtype, device=self.device)
        empty = {r.request: RunResult([], [], nothing) for r in runs if not r.tokens}
        runs = [run for run in runs if run.tokens]
        if not runs:
            return empty
        with torch.inference_mode():
            return self._pass(runs) | empty

    def _pass(self, runs: list[Run]) -> dict[Hashable, RunResult]:
        """One forward pass over ``runs`` (each feeds at least one token, all checked)."""
        raise NotImplementedError
