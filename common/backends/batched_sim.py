"""The simulated backend behind the batched interface, with a batch term in its cost model.

Predictions are :class:`~common.backends.simulated.SimulatedBackend`'s (a function of each
request's history); a pass costs ``cost_ms * relative_cost(tokens in the whole batch)``, spent once
per pass, where ``relative_cost`` interpolates a measured curve of pass cost against batch tokens,
relative to a one-token pass. The default curve is the batched runner's on SmolLM2-135M, fp32, one
thread (``python -m benchmarks.batched_costs curve``; docs/batched-runner.md).

>>> relative_cost(1), relative_cost(4), relative_cost(6), relative_cost(48)
(1.0, 1.0, 1.05, 2.65)
>>> relative_cost(100, curve=((1, 1.0), (10, 2.0)))   # past the end: the last slope, extended
12.0
>>> from common.backends.batched import Run
>>> slept = []
>>> b = SimulatedBatched(agreement=1.0, seed=7, vocab=50, cost_ms=10.0, sleep=slept.append)
>>> b.open("a", 8); b.open("b", 8)
>>> out = b.step([Run("a", [1, 2, 3]), Run("b", [4])])    # 4 tokens in the batch
>>> [round(s, 4) for s in slept]
[0.01]
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Hashable, Sequence

from common.backends.batched import Run, RunResult
from common.backends.batched_loop import LoopedBatched
from common.backends.simulated import SimulatedBackend

# (tokens in the batch, pass cost / one-token pass cost); see the module docstring
# (two runs under heavy load, min of 7 each, averaged: docs/batched-runner.md; 1-4 rows are padded)
DEFAULT_CURVE: tuple[tuple[int, float], ...] = (
    (1, 1.0),
    (4, 1.0),
    (8, 1.1),
    (16, 1.5),
    (32, 1.8),
    (64, 3.5),
)


def relative_cost(tokens: int, curve: Sequence[tuple[int, float]] = DEFAULT_CURVE) -> float:
    """Piecewise-linear interpolation of ``curve`` at ``tokens`` (0 tokens cost nothing)."""
    if tokens <= 0:
        return 0.0
    xs = [x for x, _ in curve]
    i = bisect.bisect_left(xs, tokens)
    if i < len(xs) and xs[i] == tokens:
        return curve[i][1]
    if i == 0:
        return curve[0][1]
    lo, hi = (i - 1, i) if i < len(xs) else (len(xs) - 2, len(xs) - 1)
    (x0, y0), (x1, y1) = curve[lo], curve[hi]
    return round(y0 + (tokens - x0) * (y1 - y0) / (x1 - x0), 9)


class SimulatedBatched(LoopedBatched):
    """Simulated predictions; one sleep per pass of ``cost_ms * relative_cost(batch tokens)``."""

    def __init__(
        self,
        agreement: float = 1.0,
        seed: int = 0,
        vocab: int = 32_000,
        cost_ms: float = 0.0,
        curve: Sequence[tuple[int, float]] = DEFAULT_CURVE,
        sleep: Callable[[float], None] = time.sleep,
        tokenizer: str | None = None,
        kv_pool_tokens: int | None = None,
    ):
        inner = SimulatedBackend(agreement=agreement, seed=seed, vocab=vocab, tokenizer=tokenizer)
        super().__init__(inner, kv_pool_tokens)
        self.cost_ms, self.curve, self.sleep = cost_ms, tuple(curve), sleep
        self.name = f"simulated-batched(agreement={agreement}, seed={seed}, {cost_ms}ms/pass)"

    def pass_seconds(self, batch_tokens: int) -> float:
        return self.cost_ms * relative_cost(batch_tokens, self.curve) / 1000.0

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        results = super().step(runs)
        cost = self.pass_seconds(sum(len(r.tokens) for r in runs))
        if cost:
            self.sleep(cost)
        return results
