"""A model with no weights whose timing and agreement are configured: for performance studies
of hardware we do not have (e.g. the paper's 1B/8B/70B on A100) through the real services.

The simulated *target* is a deterministic function of the context: its greedy token after a
context is a hash of (seed, position, last 4 tokens). A level with agreement ``a`` predicts the
target's token where a second hash of the context, salted with its agreement, falls below ``a``,
and a different token elsewhere. So every level is deterministic for a seed (rollbacks and
re-computation give the same answers), and level i agrees with the target on a fraction ``a_i``
of contexts.

A pass costs ``cost_ms`` times ``relative_cost(tokens in the whole batch)`` (``common.draft_policy``:
a measured curve of pass cost against batch tokens, relative to a one-token pass; by default the
batched runner's, which the draft-length policy weighs drafts with too), spent once per pass in
``sleep`` (or reported to a virtual clock by the tests). With ``cost_per_token_ms`` the cost is
a line instead: ``cost_ms + (n - 1) * cost_per_token_ms`` for ``n`` tokens. The draft policy
weighs passes with ``curve`` either way (``common.backends.load_backend`` hands it the line).

Its ids mean nothing, so it reports the fingerprint ``simulated-<vocab>``; given a ``tokenizer``
(``vocab`` at most that tokenizer's size) it reports that tokenizer's fingerprint instead, so a
gateway serving text with that tokenizer accepts it (load tests through the HTTP API).

>>> from common.backends.batched import Run
>>> slept = []
>>> b = SimulatedBackend(agreement=1.0, seed=7, vocab=50, cost_ms=10.0, sleep=slept.append)
>>> b.open("a", 8); b.open("b", 8)
>>> out = b.step([Run("a", [1, 2, 3]), Run("b", [4])])    # 4 tokens in the batch, one sleep
>>> [round(s, 4) for s in slept], out["a"].greedy[2] == b.predict([1, 2, 3])
([0.01], True)
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Hashable, Sequence

from common.backends.batched import Run, RunResult
from common.backends.history import HistoryBackend
from common.draft_policy import DEFAULT_CURVE, relative_cost

WINDOW = 4  # context tokens the simulated target looks at


def _hash(*parts: int) -> int:
    data = struct.pack(f"<{len(parts)}q", *parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class SimulatedBackend(HistoryBackend):
    kind = "simulated"
    has_logits = False  # deterministic predictions: sampling fields do not change them

    def __init__(
        self,
        agreement: float = 1.0,
        seed: int = 0,
        vocab: int = 32_000,
        cost_ms: float = 0.0,
        cost_per_token_ms: float = 0.0,
        curve: Sequence[tuple[int, float]] = DEFAULT_CURVE,
        sleep: Callable[[float], None] = time.sleep,
        tokenizer: str | None = None,
        kv_pool_tokens: int | None = None,
    ):
        super().__init__(kv_pool_tokens)
        self.agreement, self.seed, self.vocab = agreement, seed, vocab
        self.cost_ms, self.cost_per_token_ms, self.sleep = cost_ms, cost_per_token_ms, sleep
        self.cost_curve = tuple(curve)  # what the draft policy weighs passes with
        self.name = (
            f"simulated(agreement={agreement}, seed={seed}, {cost_ms}+{cost_per_token_ms}ms/tok)"
        )
        self._salt = int(agreement * 1_000_000)
        self._fingerprint = (
            f"simulated-{vocab}" if tokenizer is None else _fingerprint_of(tokenizer, vocab)
        )

    def pass_seconds(self, batch_tokens: int) -> float:
        """What a pass over ``batch_tokens`` tokens (all requests together) costs."""
        if self.cost_per_token_ms:
            return (self.cost_ms + max(0, batch_tokens - 1) * self.cost_per_token_ms) / 1000.0
        return self.cost_ms * relative_cost(batch_tokens, self.cost_curve) / 1000.0

    def predict(self, history: list[int]) -> int:
        tail = history[-WINDOW:]
        target = _hash(self.seed, len(history), *tail) % self.vocab
        if self.agreement >= 1.0:
            return target
        u = _hash(self.seed, self._salt, len(history), *tail) / 2**64
        if u < self.agreement:
            return target
        return (target + 1 + _hash(self._salt, *tail) % (self.vocab - 1)) % self.vocab

    def new_state(self) -> SimulatedHistory:
        return SimulatedHistory(self.predict)

    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        results = super().step(runs)
        cost = self.pass_seconds(sum(len(r.tokens) for r in runs))
        if cost:
            self.sleep(cost)
        return results


def _fingerprint_of(tokenizer: str, vocab: int) -> str:
    from common.tokenization import (
        fingerprint,
        load_tokenizer,
    )  # only simulations with text need it

    loaded = load_tokenizer(tokenizer)
    if vocab > len(loaded):
        raise ValueError(
            f"sim_vocab={vocab} is more than the {len(loaded)} tokens of tokenizer {tokenizer!r}"
        )
    return fingerprint(loaded)


class SimulatedHistory:
    """One request's tokens; the prediction after each token fed is ``predict(history)``."""

    def __init__(self, predict: Callable[[list[int]], int]):
        self.predict = predict
        self.history: list[int] = []

    @property
    def length(self) -> int:
        return len(self.history)

    def forward(self, tokens: list[int], chooser=None) -> list[int | None]:
        """``chooser`` is ignored: these predictions are deterministic drafts."""
        preds: list[int | None] = []
        for t in tokens:
            self.history.append(t)
            preds.append(self.predict(self.history))
        return preds

    def crop(self, length: int) -> None:
        del self.history[length:]

    def close(self) -> None:
        self.history.clear()
