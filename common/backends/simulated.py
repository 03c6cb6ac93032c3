"""A model with no weights whose timing and agreement are configured: for performance studies
of hardware we do not have (e.g. the paper's 1B/8B/70B on A100) through the real services.

The simulated *target* is a deterministic function of the context: its greedy token after a
context is a hash of (seed, position, last 4 tokens). A level with agreement ``a`` predicts the
target's token where a second hash of the context, salted with its agreement, falls below ``a``,
and a different token elsewhere. So every level is deterministic for a seed (rollbacks and
re-computation give the same answers), and level i agrees with the target on a fraction ``a_i``
of contexts. A forward pass over ``n`` tokens takes ``cost_ms + (n - 1) * cost_per_token_ms``,
spent in ``sleep`` (or reported to a virtual clock by the tests).

Its ids mean nothing, so it reports the fingerprint ``simulated-<vocab>``; given a ``tokenizer``
(``vocab`` at most that tokenizer's size) it reports that tokenizer's fingerprint instead, so a
gateway serving text with that tokenizer accepts it (load tests through the HTTP API).

>>> b = SimulatedBackend(agreement=1.0, seed=7, vocab=50)
>>> s = b.new_session([1, 2, 3]); t = s.forward([4])[0]
>>> SimulatedBackend(agreement=1.0, seed=7, vocab=50).new_session([1, 2, 3]).forward([4])[0] == t
True
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable

from common.backends.base import Backend, Session

WINDOW = 4  # context tokens the simulated target looks at


def _hash(*parts: int) -> int:
    data = struct.pack(f"<{len(parts)}q", *parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class SimulatedBackend(Backend):
    kind = "simulated"
    has_logits = False  # deterministic predictions: sampling fields do not change them

    def __init__(
        self,
        agreement: float = 1.0,
        seed: int = 0,
        vocab: int = 32_000,
        cost_ms: float = 0.0,
        cost_per_token_ms: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        tokenizer: str | None = None,
    ):
        self.agreement, self.seed, self.vocab = agreement, seed, vocab
        self.cost_ms, self.cost_per_token_ms, self.sleep = cost_ms, cost_per_token_ms, sleep
        self.name = (
            f"simulated(agreement={agreement}, seed={seed}, {cost_ms}+{cost_per_token_ms}ms/tok)"
        )
        self._salt = int(agreement * 1_000_000)
        self._fingerprint = (
            f"simulated-{vocab}" if tokenizer is None else _fingerprint_of(tokenizer, vocab)
        )

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self._fingerprint

    def pass_seconds(self, n_tokens: int) -> float:
        return (self.cost_ms + max(0, n_tokens - 1) * self.cost_per_token_ms) / 1000.0

    def predict(self, history: list[int]) -> int:
        tail = history[-WINDOW:]
        target = _hash(self.seed, len(history), *tail) % self.vocab
        if self.agreement >= 1.0:
            return target
        u = _hash(self.seed, self._salt, len(history), *tail) / 2**64
        if u < self.agreement:
            return target
        return (target + 1 + _hash(self._salt, *tail) % (self.vocab - 1)) % self.vocab

    def new_session(self, context: list[int]) -> Session:
        return SimulatedSession(self, context)


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


class SimulatedSession(Session):
    def __init__(self, backend: SimulatedBackend, context: list[int]):
        self.backend = backend
        self.history = list(context)
        if context:
            backend.sleep(backend.pass_seconds(len(context)) if backend.cost_ms else 0.0)

    @property
    def length(self) -> int:
        return len(self.history)

    def forward(self, tokens: list[int], chooser=None) -> list[int | None]:
        """``chooser`` is ignored: these predictions are deterministic drafts."""
        preds = []
        for t in tokens:
            self.history.append(t)
            preds.append(self.backend.predict(self.history))
        cost = self.backend.pass_seconds(len(tokens))
        if cost:
            self.backend.sleep(cost)
        return preds

    def crop(self, length: int) -> None:
        del self.history[length:]
