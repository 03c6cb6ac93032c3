"""The simulated backend behind the batched interface, with a batch term in its cost model.

Predictions are :class:`~common.backends.simulated.SimulatedBackend`'s (a function of each
request's history); a pass costs ``cost_ms * relative_cost(tokens in the whole batch)``, spent once
per pass, where ``relative_cost`` (``common.draft_policy``) interpolates a measured curve of pass
cost against batch tokens, relative to a one-token pass. The default curve is the batched runner's
on SmolLM2-135M, fp32, one thread (``python -m benchmarks.batched_costs curve``;
docs/batched-runner.md). The draft-length policy weighs drafts with the same curve.

>>> from common.backends.batched import Run
>>> slept = []
>>> b = SimulatedBatched(agreement=1.0, seed=7, vocab=50, cost_ms=10.0, sleep=slept.append)
>>> b.open("a", 8); b.open("b", 8)
>>> out = b.step([Run("a", [1, 2, 3]), Run("b", [4])])    # 4 tokens in the batch
>>> [round(s, 4) for s in slept]
[0.01]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

from common.backends.batched import Run, RunResult
from common.backends.batched_loop import LoopedBatched
from common.backends.simulated import SimulatedBackend
from common.draft_policy import DEFAULT_CURVE, relative_cost


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
        self.cost_curve = self.curve
        self.name = f"simulated-batched(agreement={agreement}, seed={seed}, {cost_ms}ms/pass)"

    def pass_seconds(self, batch_tokens: int) -> float:
        return self.cost_ms * relative_cost(batch_tokens, self.curve) / 1000.0

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        results = super().step(runs)
        cost = self.pass_seconds(sum(len(r.tokens) for r in runs))
        if cost:
            self.sleep(cost)
        return results
