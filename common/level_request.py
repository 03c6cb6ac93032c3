"""What a stage engine keeps per request (:class:`LevelRequest`), and how a ``Start`` becomes one:
:func:`check_start` (why a stage refuses it) and :func:`new_request`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.lead_advice import LeadState
from common.protocol import LevelStats, RouteHop, Span, Start, TokenLogprob
from common.sampling import SamplingParams

if TYPE_CHECKING:
    from common.backends.batched import BatchedBackend


@dataclass
class SeenNotice:
    """The state of a level above, as its latest notice told it."""

    replica: str
    epoch: int
    end: int  # issuer's sequence length

    def older_than(self, prev: SeenNotice | None) -> bool:
        """Whether this state is older than ``prev`` from the same replica: an earlier epoch,
        or a shorter sequence in the same one (a notice overtaken on the way).

        >>> SeenNotice("a", 1, 5).older_than(SeenNotice("a", 1, 6))
        True
        >>> SeenNotice("a", 2, 0).older_than(SeenNotice("a", 1, 6))   # a later epoch
        False
        >>> SeenNotice("b", 0, 0).older_than(SeenNotice("a", 1, 6))   # another replica
        False
        """
        return (
            prev is not None
            and prev.replica == self.replica
            and (self.epoch, self.end) < (prev.epoch, prev.end)
        )


@dataclass
class LevelRequest:
    """One request's state at this level."""

    request_id: str
    prompt: list[int]
    tokens: list[int]  # this level's own sequence of generated tokens
    max_tokens: int
    eos_ids: frozenset[int]
    route: list[RouteHop]
    reply_to: str
    last_heard: float
    stats: LevelStats
    opened: bool = False  # holds a KV reservation: a prefix of prompt + tokens[:-1] (stage_kv)
    waiting_kv: bool = False  # wants a pass but the KV pool has no room for it yet
    epoch: int = 0  # bumped when drafts sent to this level become invalid
    span: Span | None = None  # best drafts received from the level below
    seen: dict[int, SeenNotice] = field(default_factory=dict)  # latest notice per upper level
    target_len: int = 0  # the target's committed length, as last heard
    sent: int = 0  # target only: tokens already sent to the gateway
    stalled: bool = False  # drafter had no prediction; wait for new information
    waiting_since: float | None = None  # sync schedule: since when the verifier waits for drafts
    finish_reason: str | None = None  # target only, once finished
    last_publish: float = 0.0
    sampling: SamplingParams = SamplingParams()
    top_logprobs: int = -1  # target only: -1 no logprobs, else alternatives per token
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # target: per token
    lead: LeadState = LeadState()  # the lead advice, given (verifier) or heard (drafter)
    over_drafting_load: bool = False  # ran in a pass above max_drafting_load: never drafts

    @property
    def target_level(self) -> int:
        """The level that commits this request's output: the last of its route."""
        return len(self.route) - 1

    @property
    def ended(self) -> bool:
        """Whether this level's sequence is complete: max_tokens long, or ends in an EOS."""
        return len(self.tokens) >= self.max_tokens or bool(
            self.tokens and self.tokens[-1] in self.eos_ids
        )


@dataclass
class FinishedRequest:
    """What the target keeps of a finished request, to repeat its end if the output was lost."""

    tokens: list[int]
    finish_reason: str
    stats: list[LevelStats]
    expires: float
    logprobs: list[TokenLogprob | None] = field(default_factory=list)

    @classmethod
    def of(cls, r: LevelRequest, stats: list[LevelStats], expires: float) -> FinishedRequest:
        return cls(
            tokens=list(r.tokens),
            finish_reason=r.finish_reason or "stop",
            stats=stats,
            expires=expires,
            logprobs=list(r.logprobs) if r.top_logprobs >= 0 else [],
        )


def overtaken(span: Span, old: Span | None) -> bool:
    """Whether ``span`` is older than ``old``, the best span from below so far, from the same
    replica: an earlier epoch, or fewer drafts in the same one."""
    return (
        old is not None
        and old.replica == span.replica
        and (span.epoch, span.start + len(span.tokens)) < (old.epoch, old.start + len(old.tokens))
    )


def sampling_of(msg: Start) -> SamplingParams:
    """A Start's sampling fields; raises ValueError when they are out of range."""
    return SamplingParams(
        temperature=msg.temperature,
        seed=msg.seed,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
    )


def new_request(msg: Start, level: int, replica: str, now: float) -> LevelRequest:
    """A request's state at ``level`` as ``msg`` starts it (``check_start`` found no problem):
    resumed from ``msg.committed``, of which the gateway has ``msg.have``."""
    return LevelRequest(
        request_id=msg.request_id,
        prompt=list(msg.prompt),
        tokens=list(msg.committed),
        max_tokens=msg.max_tokens,
        eos_ids=frozenset(msg.eos_ids),
        route=list(msg.route),
        reply_to=msg.reply_to,
        last_heard=now,
        stats=LevelStats(level=level, replica=replica),
        sampling=sampling_of(msg),
        top_logprobs=msg.logprobs,
        logprobs=[None] * len(msg.committed),
        sent=msg.have,
        target_len=len(msg.committed),
    )


def check_start(msg: Start, level: int, replica: str, backend: BatchedBackend) -> str | None:
    """Why the stage at ``level`` (``replica``, serving ``backend``) refuses ``msg``; None if
    it takes it."""
    if any(hop.level != i for i, hop in enumerate(msg.route)):
        return "route hops must be levels 0, 1, 2, ... in order"
    if level >= len(msg.route) or msg.route[level].replica != replica:
        return f"route does not name this replica ({replica}) for level {level}"
    if not msg.prompt:
        return "empty prompt"
    vocab = backend.vocab_size
    if vocab:  # 0: the backend takes any id (n-gram, simulated)
        bad = next((t for t in [*msg.prompt, *msg.committed] if not 0 <= t < vocab), None)
        if bad is not None:
            return f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})"
    target = level == len(msg.route) - 1
    if target and not backend.can_verify:
        return f"backend {backend.kind!r} cannot be the target"
    if target and not backend.can_target:
        return (
            "this stage scores only part of the vocabulary (draft_vocab): it cannot be the target"
        )
    return _check_sizes(msg, backend) or _check_options(msg, target, backend)


def _check_sizes(msg: Start, backend: BatchedBackend) -> str | None:
    """The request's worst case (prompt + max_tokens) against the model's context and the pool."""
    need = f"prompt ({len(msg.prompt)} tokens) + max_tokens ({msg.max_tokens}) exceeds"
    limit = backend.max_context
    if limit and len(msg.prompt) + msg.max_tokens > limit:
        return f"{need} the model context of {limit} tokens"
    pool = backend.usage().capacity_tokens
    if pool and len(msg.prompt) + msg.max_tokens > pool:
        return f"{need} this stage's KV pool of {pool} tokens"
    if len(msg.committed) > msg.max_tokens:
        return "committed output longer than max_tokens"
    return None


def _check_options(msg: Start, target: bool, backend: BatchedBackend) -> str | None:
    """Logprobs (only from a target with logits) and the sampling fields."""
    if msg.logprobs >= 0 and target and not backend.has_logits:
        return f"backend {backend.kind!r} has no logits: it cannot return logprobs"
    try:
        sampling_of(msg)
    except ValueError as exc:
        return str(exc)
    return None
