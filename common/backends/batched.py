"""The batched backend interface: one forward pass serves every request that wants one.

A :class:`BatchedBackend` owns a bounded KV pool. A request *opens* a place in it with its worst
case reserved (``capacity`` positions: prompt + max_tokens), then every call of :meth:`step` runs
**one** forward pass in which each listed request contributes its own ragged run of tokens: what
its cache lacks plus any drafts (a prefill is just a long run). Rollback stays a per-request
:meth:`crop`. Results come back per request and per position, as logits rows (when the backend has
logits) and as greedy predictions, so a per-request token chooser (argmax, Gumbel-max sampling)
can be applied to each request's rows.

    backend.open("a", capacity=64); backend.open("b", capacity=64)
    out = backend.step([Run("a", prompt_a, rows=1), Run("b", prompt_b, rows=1)])  # two prefills
    out["a"].greedy          # [next token after prompt_a]
    out = backend.step([Run("a", [x, d1, d2]), Run("b", [y])])   # verify 2 drafts; decode 1
    out["a"].positions       # [len(prompt_a), +1, +2]: the position of each fed token
    out["a"].greedy          # [pred after x, after d1, after d2]
    backend.crop("a", n)     # drop rejected positions
    backend.close("a")       # free its blocks

Worked example of the rows a run returns (``rows``: how many of the run's *last* tokens get
predictions; ``None`` = all of them):

>>> Run("a", [7, 8, 9]).row_positions(start=10)
[10, 11, 12]
>>> Run("a", [7, 8, 9], rows=1).row_positions(start=10)
[12]
>>> Run("a", [7, 8, 9], rows=0).row_positions(start=10)
[]
>>> PoolUsage(used_tokens=48, capacity_tokens=192).perc
0.25
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from common.decoding import apply_stop
from common.draft_policy import DEFAULT_CURVE


class PoolExhausted(RuntimeError):
    """The KV pool cannot hold what was asked; the caller should queue the request, not retry."""


@dataclass(frozen=True)
class Run:
    """One request's part of a pass: ``tokens`` fed after its cache, predictions for the last
    ``rows`` of them (``None``: every one; a prefill usually wants only its last row)."""

    request: Hashable
    tokens: Sequence[int]
    rows: int | None = None

    def n_rows(self) -> int:
        n = len(self.tokens)
        return n if self.rows is None else max(0, min(self.rows, n))

    def row_positions(self, start: int) -> list[int]:
        """Positions of the rows returned, for a request whose cache held ``start`` positions."""
        end = start + len(self.tokens)
        return list(range(end - self.n_rows(), end))


@dataclass
class RunResult:
    """What one request got from a pass.

    ``positions[i]`` is the position of the fed token whose next-token prediction is row ``i``;
    ``greedy[i]`` the argmax of ``logits[i]`` (``None`` where the backend has no prediction);
    ``logits`` is a ``[len(positions), vocab]`` tensor, or ``None`` for backends without logits.
    """

    positions: list[int]
    greedy: list[int | None]
    logits: Any = None


@dataclass(frozen=True)
class PoolUsage:
    """KV pool occupancy in tokens; ``perc`` is vLLM's ``kv_cache_usage_perc`` (0..1)."""

    used_tokens: int  # reserved by open requests (whole blocks)
    capacity_tokens: int
    held_tokens: int = 0  # positions actually written (<= used_tokens)
    requests: int = 0

    @property
    def perc(self) -> float:
        return self.used_tokens / self.capacity_tokens if self.capacity_tokens else 0.0


class BatchedBackend(ABC):
    """A model serving many requests per forward pass from a KV pool it owns."""

    name: str = ""
    kind: str = ""
    can_verify: bool = True  # False: may only draft (level 0)
    can_target: bool = True  # False: its logits are not the model's (a drafter's pruned head)
    has_logits: bool = True  # False: greedy predictions only (no sampling, no logprobs)
    max_context: int = 0  # positions per request; 0 = unbounded
    vocab_size: int = 0  # token ids it accepts are 0 .. vocab_size - 1; 0 = any
    eos_token_ids: tuple[int, ...] = ()
    # (tokens in a pass, its cost / a one-token pass's): what the draft-length policy weighs
    cost_curve: tuple[tuple[int, float], ...] = DEFAULT_CURVE
    tokenizer_source: str | None = None  # the tokenizer its ids mean; None: raw ids
    _fingerprint: str | None = None

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """Stable hash of the vocabulary its ids mean (``tokenizer_source`` is loaded on first
        use, then remembered); None for a backend that works on raw ids."""
        if self._fingerprint is None and self.tokenizer_source is not None:
            from common.tokenization import fingerprint, load_tokenizer

            self._fingerprint = fingerprint(load_tokenizer(self.tokenizer_source))
        return self._fingerprint

    @abstractmethod
    def open(self, request: Hashable, capacity: int) -> None:
        """Reserve room for ``capacity`` positions.

        :class:`PoolExhausted` if the pool is short now (queue the request and retry when another
        closes); ``ValueError`` if it could never fit (more than the pool or the model holds)."""

    def can_open(self, capacity: int) -> bool:
        """Whether :meth:`open` with this capacity would succeed now."""
        return True

    @abstractmethod
    def length(self, request: Hashable) -> int:
        """Positions held in the request's cache."""

    @abstractmethod
    def step(self, runs: Sequence[Run]) -> dict[Hashable, RunResult]:
        """One forward pass over every run; each request at most once per call."""

    @abstractmethod
    def crop(self, request: Hashable, length: int) -> None:
        """Keep only the first ``length`` positions of the request's cache."""

    @abstractmethod
    def close(self, request: Hashable) -> None:
        """Free the request's reservation (unknown requests are ignored)."""

    def usage(self) -> PoolUsage:
        return PoolUsage(used_tokens=0, capacity_tokens=0)


def check_runs(runs: Sequence[Run], known) -> None:
    """Reject a pass the backend cannot run, before touching any cache.

    >>> check_runs([Run("a", [1]), Run("a", [2])], known={"a"})
    Traceback (most recent call last):
    ...
    ValueError: request 'a' appears twice in one pass
    >>> check_runs([Run("b", [1])], known={"a"})
    Traceback (most recent call last):
    ...
    KeyError: "request 'b' is not open"
    """
    seen = set()
    for run in runs:
        if run.request in seen:
            raise ValueError(f"request {run.request!r} appears twice in one pass")
        seen.add(run.request)
        if run.request not in known:
            raise KeyError(f"request {run.request!r} is not open")
        if run.rows is not None and run.rows < 0:
            raise ValueError(f"request {run.request!r}: rows={run.rows} is negative")


def one_at_a_time(backend: BatchedBackend, tokens: Sequence[int], request="oracle") -> list:
    """The oracle: each token of ``tokens`` fed alone in its own pass (a fresh request reserving
    exactly ``len(tokens)``); the list of per-pass results' first rows (logits, else greedy)."""
    backend.open(request, len(tokens))
    try:
        rows = []
        for t in tokens:
            got = backend.step([Run(request, [t])])[request]
            rows.append(got.greedy[0] if got.logits is None else got.logits[0])
        return rows
    finally:
        backend.close(request)


def greedy_decode(
    backend: BatchedBackend, prompts: Sequence[Sequence[int]], n: int, eos: Sequence[int] = ()
) -> list[list[int]]:
    """Greedy decoding of every prompt together: one pass prefills all, then one pass per token
    decodes one token for each request not yet ended (``n`` tokens each, or fewer for a request
    that produced one of ``eos``: it ends with it). On a backend whose logits do not depend on
    the batch (the transformers runner, rows padded to 4) each result equals that prompt's
    decoding alone."""
    names = [("greedy", i) for i in range(len(prompts))]
    for name, prompt in zip(names, prompts):
        backend.open(name, len(prompt) + n)
    try:
        out = backend.step([Run(name, p, rows=1) for name, p in zip(names, prompts)])
        tokens: dict = {name: [] for name in names}
        live = list(names)
        while live:
            ended = set()
            for name in live:
                tokens[name], finish = apply_stop(tokens[name] + out[name].greedy[:1], eos, n)
                if finish:
                    ended.add(name)
            live = [name for name in live if name not in ended]
            if live:
                out = backend.step([Run(name, tokens[name][-1:]) for name in live])
        return [tokens[name] for name in names]
    finally:
        for name in names:
            backend.close(name)
