"""Backends whose predictions are a function of each request's own token history (the n-gram
drafter, the simulator, the per-request transformers reference): a pass feeds each request's
state in turn, since nothing is gained by batching them.

A subclass says how to start a request's state (:meth:`HistoryBackend.new_state`): an object
with ``length``, ``forward(tokens, chooser) -> predictions`` (one per token fed: the prediction
after it), ``crop(length)`` and ``close()``. Reservations are only counted (``kv_pool_tokens``;
``None``: unbounded), so admission behaves as with a real KV pool.

>>> from common.backends.ngram import NgramBackend
>>> b = NgramBackend(2, 1, kv_pool_tokens=32)
>>> b.open("a", 16); b.open("b", 16)
>>> out = b.step([Run("a", [5, 6, 7, 5, 6]), Run("b", [1, 2], rows=1)])
>>> out["a"].greedy, out["a"].positions, out["b"].greedy
([None, None, None, 6, 7], [0, 1, 2, 3, 4], [None])
>>> b.usage().perc
1.0
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from common.backends.batched import (
    BatchedBackend,
    PoolExhausted,
    PoolUsage,
    Run,
    RunResult,
    check_runs,
)


def _keep_logits(kept: list):
    """A chooser that records the pass's logits ``[n, V]`` and picks greedily."""

    def choose(logits):
        kept.append(logits)
        return logits.argmax(dim=-1).tolist()

    return choose


class HistoryBackend(BatchedBackend):
    """One state per open request, fed in turn; see the module docstring."""

    def __init__(self, kv_pool_tokens: int | None = None):
        self.capacity = kv_pool_tokens
        self._states: dict[Hashable, tuple[Any, int]] = {}

    def new_state(self) -> Any:
        """A new request's empty state."""
        raise NotImplementedError

    def _reserved(self) -> int:
        return sum(capacity for _, capacity in self._states.values())

    def can_open(self, capacity: int) -> bool:
        return self.capacity is None or self._reserved() + capacity <= self.capacity

    def open(self, request: Hashable, capacity: int) -> None:
        if request in self._states:
            raise ValueError(f"request {request!r} is already open")
        if self.capacity is not None and capacity > self.capacity:
            raise ValueError(
                f"request {request!r}: capacity {capacity} exceeds the pool's {self.capacity}"
            )
        if not self.can_open(capacity):
            raise PoolExhausted(
                f"pool full: {capacity} positions asked, "
                f"{self.capacity - self._reserved()} of {self.capacity} free"
            )
        self._states[request] = (self.new_state(), capacity)

    def length(self, request: Hashable) -> int:
        return self._states[request][0].length

    def state(self, request: Hashable) -> Any:
        """The per-request state behind ``request`` (what a test inspects)."""
        return self._states[request][0]

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        check_runs(runs, self._states)
        for run in runs:
            state, capacity = self._states[run.request]
            if state.length + len(run.tokens) > capacity:
                raise ValueError(
                    f"request {run.request!r}: {state.length} + {len(run.tokens)} positions "
                    f"exceed its capacity of {capacity}"
                )
        results = {}
        for run in runs:
            state = self._states[run.request][0]
            start = state.length
            kept = []  # the pass's logits, where the backend has them (its chooser hook)
            preds = state.forward(list(run.tokens), _keep_logits(kept)) if run.tokens else []
            keep = run.n_rows()
            first = len(preds) - keep
            results[run.request] = RunResult(
                run.row_positions(start),
                preds[first:] if keep else [],
                kept[0][first:] if kept else None,
            )
        return results

    def crop(self, request: Hashable, length: int) -> None:
        state = self._states[request][0]
        if not 0 <= length <= state.length:
            raise ValueError(f"crop({length}) on request {request!r} of length {state.length}")
        state.crop(length)

    def close(self, request: Hashable) -> None:
        entry = self._states.pop(request, None)
        if entry is not None:
            entry[0].close()

    def usage(self) -> PoolUsage:
        held = sum(s.length for s, _ in self._states.values())
        return PoolUsage(
            self._reserved(), self.capacity or 0, held_tokens=held, requests=len(self._states)
        )
