"""Per-request backends behind the batched interface: a pass is a loop over their sessions.

For backends whose passes cost nothing worth batching (n-gram) and for the simulator, which adds
a cost for the whole pass (:mod:`common.backends.batched_sim`). The "pool" only counts
reservations, so admission behaves as with a real KV pool.

>>> from common.backends.ngram import NgramBackend
>>> from common.backends.batched import Run
>>> b = LoopedBatched(NgramBackend(2, 1), kv_pool_tokens=32)
>>> b.open("a", 16); b.open("b", 16)
>>> out = b.step([Run("a", [5, 6, 7, 5, 6]), Run("b", [1, 2], rows=1)])
>>> out["a"].greedy, out["a"].positions, out["b"].greedy
([None, None, None, 6, 7], [0, 1, 2, 3, 4], [None])
>>> b.usage().perc
1.0
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from common.backends.base import Backend, Session
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


class LoopedBatched(BatchedBackend):
    """``backend``'s sessions, one per open request; ``kv_pool_tokens`` bounds the reservations
    (``None``: unbounded)."""

    def __init__(self, backend: Backend, kv_pool_tokens: int | None = None):
        self.backend = backend
        self.name, self.kind = backend.name, backend.kind
        self.can_verify, self.max_context = backend.can_verify, backend.max_context
        self.has_logits, self.vocab_size = backend.has_logits, backend.vocab_size
        self.eos_token_ids = backend.eos_token_ids
        self.capacity = kv_pool_tokens
        self._sessions: dict[Hashable, tuple[Session, int]] = {}

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.backend.tokenizer_fingerprint

    def _reserved(self) -> int:
        return sum(capacity for _, capacity in self._sessions.values())

    def can_open(self, capacity: int) -> bool:
        return self.capacity is None or self._reserved() + capacity <= self.capacity

    def open(self, request: Hashable, capacity: int) -> None:
        if request in self._sessions:
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
        self._sessions[request] = (self.backend.new_session([]), capacity)

    def length(self, request: Hashable) -> int:
        return self._sessions[request][0].length

    def session(self, request: Hashable) -> Session:
        """The per-request session behind ``request`` (what a test inspects)."""
        return self._sessions[request][0]

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        check_runs(runs, self._sessions)
        for run in runs:
            session, capacity = self._sessions[run.request]
            if session.length + len(run.tokens) > capacity:
                raise ValueError(
                    f"request {run.request!r}: {session.length} + {len(run.tokens)} positions "
                    f"exceed its capacity of {capacity}"
                )
        results = {}
        for run in runs:
            session = self._sessions[run.request][0]
            start = session.length
            kept = []  # the pass's logits, where the backend has them (its chooser hook)
            preds = session.forward(list(run.tokens), _keep_logits(kept)) if run.tokens else []
            keep = run.n_rows()
            first = len(preds) - keep
            results[run.request] = RunResult(
                run.row_positions(start),
                preds[first:] if keep else [],
                kept[0][first:] if kept else None,
            )
        return results

    def crop(self, request: Hashable, length: int) -> None:
        session = self._sessions[request][0]
        if not 0 <= length <= session.length:
            raise ValueError(f"crop({length}) on request {request!r} of length {session.length}")
        session.crop(length)

    def close(self, request: Hashable) -> None:
        entry = self._sessions.pop(request, None)
        if entry is not None:
            entry[0].close()

    def usage(self) -> PoolUsage:
        held = sum(s.length for s, _ in self._sessions.values())
        return PoolUsage(
            self._reserved(), self.capacity or 0, held_tokens=held, requests=len(self._sessions)
        )
