"""The small interface every model backend implements.

A backend holds one loaded model; a :class:`Session` is one request's incremental state in it
(for transformers, a KV cache). Stages only ever do three things with a session:

    s = backend.new_session(context)   # prefill: context = prompt + tokens[:-1]
    preds = s.forward([t0, t1, ...])   # feed tokens after the cache; preds[i] = greedy next token
                                       #   after t_i (None: this backend has no prediction there)
    s.crop(n)                          # keep the first n positions, drop the rest

Sampled requests pass a chooser: ``s.forward(tokens, chooser)`` with a
:class:`common.sampling.Chooser`, which turns the pass's logits ``[n, V]`` into the tokens (the
Gumbel-max coupled sample at each row's position) and may record log-probabilities. Backends
without logits (n-gram, simulated) ignore it: their predictions are deterministic drafts.

Worked example (greedy verify of drafts d1 d2 after last token x; see common.decoding):
    s.length == 10; preds = s.forward([x, d1, d2])  -> e.g. [d1, y, z]; s.length == 13
    d1 accepted, d2 rejected (y != d2): keep x, d1 and y -> s.crop(11) (y itself not yet fed)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.sampling import Chooser


class Session(ABC):
    @property
    @abstractmethod
    def length(self) -> int:
        """Positions held in the cache (prompt included)."""

    @abstractmethod
    def forward(self, tokens: list[int], chooser: Chooser | None = None) -> list[int | None]:
        """Feed ``tokens`` after the cache in one pass; the prediction after each one: greedy,
        or what ``chooser`` picks from the logits."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Keep only the first ``length`` positions (``length <= self.length``)."""

    def close(self) -> None:  # noqa: B027 - optional hook; most sessions free nothing
        """Free the request's memory (KV cache)."""


class Backend(ABC):
    name: str = ""  # what is loaded, for logs and /health
    kind: str = ""  # "hf", "early-exit", "ngram", "simulated"
    can_verify: bool = True  # False: may only draft (level 0)
    has_logits: bool = True  # False: predictions without logits (no sampling, no logprobs)
    max_context: int = 0  # positions; 0 = unbounded
    vocab_size: int = 0  # token ids it accepts are 0 .. vocab_size - 1; 0 = any
    eos_token_ids: tuple[int, ...] = ()

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """Stable hash of the vocabulary this backend's ids mean; None if it works on raw ids."""
        return None

    @abstractmethod
    def new_session(self, context: list[int]) -> Session:
        """A new request: prefill ``context`` (may be empty)."""
