"""One level of the PipeSpec hierarchy, for many requests, with no I/O of its own.

The stage service feeds it decoded messages (:meth:`StageEngine.handle`) and calls
:meth:`StageEngine.step` to run one batched forward pass; everything it sends goes through an
:class:`Outbox`. The same engine runs over real ZeroMQ sockets (``services.stage``) and over the
in-process fake transport of the tests.

A step is plan -> one backend call -> commit (like vLLM's ``EngineCore.step``): ``_plan`` picks
every request that wants a pass (within ``max_batch_tokens``), opens its KV reservation if the
pool has room (else it waits), and decides what it feeds: the tokens its KV cache lacks plus the
drafts from below that the draft-length policy keeps (``common.draft_policy``). One
``BatchedBackend.step`` runs them all; ``_commit`` then does, per request, what a level always
does: accept the longest matching prefix of the drafts and append one correction/bonus token.
Level 0 has no drafts, so its step is a plain greedy step; a verifier with no drafts makes its own
greedy step instead of idling (the paper's rho model).

Lossless by construction: a level appends only its own predictions (accepted drafts equal
them), so the target's sequence is its own output whatever the drafts, their timing or their
loss. Drafts, epochs and notices only decide how *fast* that happens. A prediction is greedy, or,
for a sampled request, the Gumbel-max coupled sample at its position (``common.sampling``): a
pure function of the level's logits and (seed, position), so the same machinery applies.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from common.backends.base import Backend
from common.backends.batched import BatchedBackend, PoolUsage, Run, RunResult
from common.backends.batched_loop import LoopedBatched
from common.decoding import accept_greedy, anchor_drafts, apply_stop, reconcile
from common.draft_policy import (
    acceptance_estimate,
    draft_lengths,
    drafter_lead,
    on_time_estimate,
    pass_threads,
)
from common.engine_config import EngineConfig
from common.protocol import (
    Cancel,
    LevelStats,
    Message,
    Notice,
    Output,
    RequestError,
    RouteHop,
    Span,
    Start,
    TokenLogprob,
)
from common.sampling import Chooser, SamplingParams

log = structlog.get_logger("stage")


class Outbox(Protocol):
    """Where the engine's messages go (ZeroMQ sockets, or the tests' fake transport)."""

    def send_span(self, hop: RouteHop, span: Span) -> None: ...
    def publish(self, notice: Notice) -> None: ...
    def send_reply(self, endpoint: str, msg: Output | RequestError) -> None: ...
    def subscribe(self, request_id: str, hops: list[RouteHop]) -> None: ...
    def unsubscribe(self, request_id: str) -> None: ...


class PassObserver:
    """Hooks for metrics; the default does nothing."""

    def on_pass(
        self, drafts: int, accepted: int, emitted: int, rejected: bool, seconds: float
    ) -> None: ...
    def on_batch(self, requests: int, tokens: int) -> None: ...
    def on_rollback_applied(self) -> None: ...
    def on_stale_span(self) -> None: ...


@dataclass
class SeenNotice:
    replica: str
    epoch: int
    end: int  # issuer's sequence length


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
    opened: bool = False  # holds a KV reservation: a prefix of prompt + tokens[:-1] (_sync_cache)
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
    wanted_drafts: int | None = None  # verifier: drafts its policy would check now (tokens)
    advised_passes: int = 0  # verifier: passes planned after advising the level below a lead
    supplied_passes: int = 0  # ... of those but the first (no time), ones that found drafts
    lead_hint: int | None = None  # drafter: the lead the level above advises (drafter_lead)


@dataclass
class FinishedRequest:
    tokens: list[int]
    finish_reason: str
    stats: list[LevelStats]
    expires: float
    logprobs: list[TokenLogprob | None] = field(default_factory=list)


def _is_target(level: int, r: LevelRequest) -> bool:
    return level == len(r.route) - 1


def _ended(r: LevelRequest) -> bool:
    return len(r.tokens) >= r.max_tokens or bool(r.tokens and r.tokens[-1] in r.eos_ids)


class Schedule:
    """When a request wants a forward pass at this level, and which drafts that pass checks.

    :meth:`wants_pass` only reads, so metrics may ask it; :meth:`update` is the one place a
    schedule changes a request's state, and the engine calls it only from ``step``.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self.level = config.level

    def drafts(self, r: LevelRequest) -> list[int]:
        """The drafts the next pass checks: the span from below that extends our sequence, at
        most ``config.draft_cap`` of them and no more than the room left; none below
        ``config.min_drafts``."""
        if r.span is None or self.level == 0:
            return []
        drafts = anchor_drafts(r.tokens, r.span.start, r.span.tokens)
        if drafts is None:
            return []
        room = r.max_tokens - len(r.tokens) - 1  # positions left after the correction/bonus
        drafts = drafts[: max(0, min(self.config.draft_cap, room))]
        return drafts if len(drafts) >= self.config.min_drafts else []

    def update(self, r: LevelRequest, now: float) -> None:
        """Record what the decision at ``now`` (seconds on the engine's clock) depends on."""

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        """Whether ``r`` wants a pass at ``now``; no side effects."""
        raise NotImplementedError


class AsyncSchedule(Schedule):
    """PipeSpec: the target always runs; a drafter runs while it is less than its lead past the
    target's committed length: ``max_lead``, or less when the level above advises less (its
    draft-length policy checks fewer drafts under load: ``common.draft_policy.drafter_lead``)."""

    def lead(self, r: LevelRequest) -> int:
        """Tokens past the target's committed length this level drafts at most (0: target)."""
        if _is_target(self.level, r):
            return 0
        if r.lead_hint is None:
            return self.config.max_lead
        return min(self.config.max_lead, r.lead_hint)

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        if _is_target(self.level, r):
            return r.finish_reason is None
        if r.stalled or _ended(r):
            return False
        return len(r.tokens) < r.target_len + self.lead(r)


class SyncSchedule(Schedule):
    """Lockstep speculative decoding (the paper's "Speculative" baseline): a drafter runs at
    most ``lookahead`` tokens past the level above, and a verifier waits until it has
    ``lookahead`` drafts (or the drafter has ended, or ``sync_wait_s`` has passed)."""

    def _eligible(self, r: LevelRequest) -> bool:
        """Whether the level may run ``r`` at all (before the wait for drafts)."""
        target = _is_target(self.level, r)
        if r.finish_reason is not None or (not target and (r.stalled or _ended(r))):
            return False
        if not target:
            above = r.seen.get(self.level + 1)
            if len(r.tokens) >= (above.end if above else 0) + self.config.lookahead:
                return False
        return True

    def _window_full(self, r: LevelRequest) -> bool:
        """A full window of drafts is here, or as many as the drafter will ever send."""
        span = r.span
        room = r.max_tokens - len(r.tokens) - 1
        drafter_done = (
            span is not None
            and bool(span.tokens)
            and (span.tokens[-1] in r.eos_ids or span.start + len(span.tokens) >= r.max_tokens)
        )
        return len(self.drafts(r)) >= min(self.config.lookahead, room) or drafter_done

    def update(self, r: LevelRequest, now: float) -> None:
        """Start a verifier's wait for drafts (``r.waiting_since``) when it first finds its
        window short, and end it when the window is full."""
        if self.level == 0 or not self._eligible(r):
            return
        if self._window_full(r):
            r.waiting_since = None
        elif r.waiting_since is None:
            r.waiting_since = now

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        if not self._eligible(r):
            return False
        if self.level == 0 or self._window_full(r):
            return True
        return r.waiting_since is not None and now - r.waiting_since >= self.config.sync_wait_s


SCHEDULES: dict[str, type[Schedule]] = {"async": AsyncSchedule, "sync": SyncSchedule}


@dataclass
class PlannedRun:
    """One request's part of the next pass: what its KV cache lacks, then the drafts it checks."""

    r: LevelRequest
    pending: list[int]
    drafts: list[int]


class StageEngine:
    def __init__(
        self,
        config: EngineConfig,
        backend: BatchedBackend | Backend,
        outbox: Outbox,
        replica: str,
        clock: Callable[[], float] = time.monotonic,
        observer: PassObserver | None = None,
        set_threads: Callable[[int], None] | None = None,
    ):
        self.level = config.level
        self.config = config
        self.schedule = SCHEDULES[config.schedule](config)
        # a per-request backend serves a batch one request after another (no KV bound)
        self.backend = backend if isinstance(backend, BatchedBackend) else LoopedBatched(backend)
        self.outbox = outbox
        self.replica = replica
        self.clock = clock
        self.observer = observer or PassObserver()
        # the cores rule (config.threads_alone): every core while the drafters below idle
        self._set_threads = set_threads
        self._threads: int | None = None
        self.requests: dict[str, LevelRequest] = {}
        self.finished: dict[str, FinishedRequest] = {}  # target only: for re-sends
        self._order: deque[str] = deque()  # round-robin over requests
        self.draining = False
        self.counters: dict[str, int] = {}
        # the level above advises leads (its draft policy weighs load): a new request waits for
        # its advice before we spend a pass on it (a prefill, drafts the level above may never
        # check) when it finds others in flight or the last advice was to idle; one that finds
        # us idle after advice to draft starts at once (waiting would only delay its drafts by
        # the target's first pass). None: no advice yet
        self._last_advised_lead: int | None = None

    # ------------------------------------------------------------------ messages in
    def handle(self, msg: Message) -> None:
        if isinstance(msg, Span):
            self._on_span(msg)
        elif isinstance(msg, Notice):
            self._on_notice(msg)
        elif isinstance(msg, Start):
            self._on_start(msg)
        elif isinstance(msg, Cancel):
            self._on_cancel(msg)
        else:
            self._count("unexpected_message")
            log.warning("unexpected_message", type=msg.TYPE, stage_level=self.level)

    def is_target(self, r: LevelRequest) -> bool:
        return _is_target(self.level, r)

    def _on_start(self, msg: Start) -> None:
        r = self.requests.get(msg.request_id)
        if r is not None:  # re-sync: update the route, re-send what the gateway lacks
            r.last_heard = self.clock()
            if r.route != msg.route:
                r.route = list(msg.route)
                self.outbox.subscribe(r.request_id, r.route[self.level + 1 :])
            r.reply_to = msg.reply_to
            if self.is_target(r):
                r.sent = min(r.sent, msg.have)
                self._send_output(r, done=False)
            return
        done = self.finished.get(msg.request_id)
        if done is not None:  # lost output: repeat the end, and tell lower levels to let go
            self.outbox.publish(
                Notice(
                    request_id=msg.request_id,
                    level=self.level,
                    replica=self.replica,
                    start=len(done.tokens),
                    tokens=[],
                    epoch=0,
                    final=True,
                )
            )
            self.outbox.send_reply(
                msg.reply_to,
                Output(
                    request_id=msg.request_id,
                    replica=self.replica,
                    start=msg.have,
                    tokens=done.tokens[msg.have :],
                    done=True,
                    finish_reason=done.finish_reason,
                    stats=done.stats,
                    logprobs=_complete(done.logprobs[msg.have :]),
                ),
            )
            return
        problem = self._check_start(msg)
        if problem:
            self._count("rejected_start")
            log.warning("start_rejected", request_id=msg.request_id, reason=problem)
            if self.level == len(msg.route) - 1:
                self.outbox.send_reply(
                    msg.reply_to,
                    RequestError(
                        request_id=msg.request_id,
                        replica=self.replica,
                        level=self.level,
                        message=problem,
                    ),
                )
            return
        r = LevelRequest(
            request_id=msg.request_id,
            prompt=list(msg.prompt),
            tokens=list(msg.committed),
            max_tokens=msg.max_tokens,
            eos_ids=frozenset(msg.eos_ids),
            route=list(msg.route),
            reply_to=msg.reply_to,
            last_heard=self.clock(),
            stats=LevelStats(level=self.level, replica=self.replica),
            sampling=_sampling(msg),
            top_logprobs=msg.logprobs,
            logprobs=[None] * len(msg.committed),
        )
        r.sent = msg.have
        r.target_len = len(msg.committed)
        last = self._last_advised_lead
        if last is not None and (last == 0 or self.requests) and not self.is_target(r):
            r.lead_hint = 0  # no pass for it until the level above advises
        self.requests[r.request_id] = r
        self._order.append(r.request_id)
        self.outbox.subscribe(r.request_id, r.route[self.level + 1 :])
        log.debug(
            "request_started",
            request_id=r.request_id,
            stage_level=self.level,
            prompt_tokens=len(r.prompt),
            resumed_from=len(r.tokens),
        )

    def _check_start(self, msg: Start) -> str | None:
        if any(hop.level != i for i, hop in enumerate(msg.route)):
            return "route hops must be levels 0, 1, 2, ... in order"
        if self.level >= len(msg.route) or msg.route[self.level].replica != self.replica:
            return f"route does not name this replica ({self.replica}) for level {self.level}"
        if not msg.prompt:
            return "empty prompt"
        vocab = self.backend.vocab_size
        if vocab:  # 0: the backend takes any id (n-gram, simulated)
            bad = next((t for t in [*msg.prompt, *msg.committed] if not 0 <= t < vocab), None)
            if bad is not None:
                return f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})"
        if self.level == len(msg.route) - 1 and not self.backend.can_verify:
            return f"backend {self.backend.kind!r} cannot be the target"
        limit = self.backend.max_context
        if limit and len(msg.prompt) + msg.max_tokens > limit:
            return (
                f"prompt ({len(msg.prompt)} tokens) + max_tokens ({msg.max_tokens}) exceeds "
                f"the model context of {limit} tokens"
            )
        pool = self.backend.usage().capacity_tokens
        if pool and len(msg.prompt) + msg.max_tokens > pool:
            return (
                f"prompt ({len(msg.prompt)} tokens) + max_tokens ({msg.max_tokens}) exceeds "
                f"this stage's KV pool of {pool} tokens"
            )
        if len(msg.committed) > msg.max_tokens:
            return "committed output longer than max_tokens"
        if msg.logprobs >= 0 and self.level == len(msg.route) - 1 and not self.backend.has_logits:
            return f"backend {self.backend.kind!r} has no logits: it cannot return logprobs"
        try:
            _sampling(msg)
        except ValueError as exc:
            return str(exc)
        return None

    def _on_cancel(self, msg: Cancel) -> None:
        r = self.requests.get(msg.request_id)
        if r is None:
            return
        if self.is_target(r):
            self._publish(r, start=len(r.tokens), final=True)
        self._drop(r, reason=msg.reason)

    def _on_span(self, span: Span) -> None:
        r = self.requests.get(span.request_id)
        if r is None:
            self._count("span_unknown_request")
            return
        if span.level != self.level - 1:
            self._count("span_wrong_level")
            return
        if span.base_epoch < r.epoch:  # built before a rollback the sender had not yet seen
            r.stats.stale_spans += 1
            self.observer.on_stale_span()
            self._maybe_republish(r)
            return
        old = r.span
        end = span.start + len(span.tokens)
        if (
            old is not None
            and old.replica == span.replica
            and (span.epoch, end) < (old.epoch, old.start + len(old.tokens))
        ):
            return  # an older span, overtaken
        r.span = span

    def _on_notice(self, n: Notice) -> None:
        r = self.requests.get(n.request_id)
        if r is None or n.level <= self.level:
            return
        end = n.start + len(n.tokens)
        prev = r.seen.get(n.level)
        if (
            prev is not None
            and prev.replica == n.replica
            and (n.epoch, end) < (prev.epoch, prev.end)
        ):
            return  # older state of that level
        r.seen[n.level] = SeenNotice(n.replica, n.epoch, end)
        r.last_heard = self.clock()
        if n.level == self.level + 1 and n.drafter_lead is not None:
            r.lead_hint = self._last_advised_lead = n.drafter_lead
        if n.level == len(r.route) - 1:
            r.target_len = max(r.target_len, end)
        if n.final:
            self._drop(r, reason="finished")
            return
        plan = reconcile(r.tokens, n.start, n.tokens)
        if plan is None:
            return  # it lies beyond our sequence; a later notice will cover the gap
        if plan.rewrote:
            r.tokens = r.tokens[: plan.keep] + plan.adopt
            r.epoch += 1
            r.stats.rollbacks_applied += 1
            self.observer.on_rollback_applied()
        elif plan.adopt:
            r.tokens.extend(plan.adopt)
        else:
            return
        r.tokens, _ = apply_stop(r.tokens, r.eos_ids, r.max_tokens, checked=max(0, plan.keep - 1))
        self._sync_cache(r, valid=plan.keep)
        r.stalled = False
        if self.level > 0:
            self._publish(r, start=plan.keep)

    # ------------------------------------------------------------------ scheduling
    def has_work(self) -> bool:
        """Whether a request wants a pass now (no side effects)."""
        now = self.clock()
        return any(self.schedule.wants_pass(r, now) for r in self.requests.values())

    def target_requests(self) -> int:
        """Requests whose output this stage commits (it is their target)."""
        return sum(1 for r in self.requests.values() if self.is_target(r))

    def queue_depth(self) -> int:
        """Requests that want a forward pass now (no side effects: metrics read it)."""
        now = self.clock()
        return sum(1 for r in self.requests.values() if self.schedule.wants_pass(r, now))

    def kv_usage(self) -> PoolUsage:
        """The backend's KV pool: reserved and held tokens, capacity (0: unbounded)."""
        return self.backend.usage()

    def waiting_for_kv(self) -> int:
        """Requests that want a pass but wait for room in the KV pool."""
        return sum(1 for r in self.requests.values() if r.waiting_kv)

    def step(self) -> bool:
        """Run one batched forward pass for every request that wants one: plan, one backend
        call, commit. False if none does.

        Planning is the only place the schedule's state changes (``Schedule.update``: a sync
        verifier's wait for drafts)."""
        plan = self._plan()
        if not plan:
            return False
        runs = [Run(p.r.request_id, p.pending + p.drafts, rows=len(p.drafts) + 1) for p in plan]
        self._apply_cores_rule(plan)
        t0 = time.perf_counter()
        try:
            results = self.backend.step(runs)
        except Exception as exc:  # a model error fails the requests of this pass, not the process
            self._count("pass_failed")
            log.exception("pass_failed", stage_level=self.level, requests=len(plan))
            for p in plan:
                self._fail(p.r, f"model error at level {self.level}: {exc}")
            return True
        seconds = time.perf_counter() - t0
        self.observer.on_batch(len(plan), sum(len(run.tokens) for run in runs))
        for p in plan:
            try:
                self._commit(p, results[p.r.request_id], seconds / len(plan))
            except Exception as exc:
                self._count("pass_failed")
                log.exception("pass_failed", request_id=p.r.request_id, stage_level=self.level)
                self._fail(p.r, f"model error at level {self.level}: {exc}")
        return True

    def _apply_cores_rule(self, plan: list[PlannedRun]) -> None:
        """Threads for this pass (``draft_policy.pass_threads``), set only when they change."""
        config = self.config
        if self._set_threads is None or config.threads_alone is None:
            return
        share = config.threads or config.threads_alone
        n = pass_threads([p.r.wanted_drafts for p in plan], share, config.threads_alone)
        if n != self._threads:
            self._set_threads(n)
            self._threads = n

    def _plan(self) -> list[PlannedRun]:
        """Every request that wants a pass now and has (or gets) room in the KV pool, in
        round-robin order (the first one changes every pass) while the batch's tokens stay
        within ``max_batch_tokens``; each with the drafts the draft-length policy keeps."""
        now = self.clock()
        self._order.rotate(-1)
        plan: list[PlannedRun] = []
        tokens = 0
        for rid in self._order:
            r = self.requests[rid]
            self.schedule.update(r, now)
            if not self.schedule.wants_pass(r, now) or not self._open(r):
                continue
            pending = (r.prompt + r.tokens)[self.backend.length(rid) :]
            if plan and tokens + len(pending) > self.config.max_batch_tokens:
                continue
            plan.append(PlannedRun(r, pending, self.schedule.drafts(r)))
            tokens += len(pending)
        self._choose_drafts(plan, room=self.config.max_batch_tokens - tokens)
        return plan

    def _choose_drafts(self, plan: list[PlannedRun], room: int) -> None:
        """Trim each planned request's drafts to what the policy keeps and the batch has room
        for (``room``: tokens left under ``max_batch_tokens``)."""
        goodput = self.config.draft_policy == "goodput" and self.level > 0
        for p in plan:  # did the drafts we asked for arrive? (the first pass after advice: no time)
            if p.r.wanted_drafts:
                p.r.advised_passes += 1
                if p.r.advised_passes > 1:
                    p.r.supplied_passes += bool(p.drafts)
        fed = [len(p.pending) for p in plan]
        rates = [
            acceptance_estimate(p.r.stats.accepted_tokens, p.r.stats.draft_tokens) for p in plan
        ]
        curve = self.backend.cost_curve
        if goodput and isinstance(self.schedule, AsyncSchedule):
            # the drafters' lead: what the policy would check in the passes to come if every
            # request had drafts, counting what making them costs where the drafter shares our
            # compute. In those passes every running request feeds one token (its correction or
            # bonus), whatever this pass feeds: a prefill's many tokens make any draft look cheap
            # and would send the drafters to prefill for passes that then check none. A draft
            # counts by its chance of being accepted and of arriving in time (on_time_estimate).
            now = self.clock()
            running = [r for r in self.requests.values() if self.schedule.wants_pass(r, now)]
            wanted = draft_lengths(
                [1] * len(running),
                [
                    acceptance_estimate(r.stats.accepted_tokens, r.stats.draft_tokens)
                    * on_time_estimate(r.supplied_passes, max(0, r.advised_passes - 1))
                    for r in running
                ],
                [self.config.draft_cap] * len(running),
                curve,
                draft_cost=self.config.drafter_cost,
            )
            by_request = {r.request_id: w for r, w in zip(running, wanted)}
            for p in plan:
                p.r.wanted_drafts = by_request.get(p.r.request_id, 0)
        if not any(p.drafts for p in plan):
            return
        offered = [len(p.drafts) for p in plan]
        if goodput:
            offered = draft_lengths(fed, rates, offered, curve)  # made: only checking costs
        for p, k in zip(plan, offered):
            k = max(0, min(k, room))
            room -= k
            p.drafts = p.drafts[:k]

    def _open(self, r: LevelRequest) -> bool:
        """Whether ``r`` holds a KV reservation (its worst case: prompt + max_tokens), taking one
        if the pool has room; if not, it waits (``waiting_kv``) until a request closes."""
        if r.opened:
            return True
        capacity = len(r.prompt) + r.max_tokens
        if not self.backend.can_open(capacity):
            if not r.waiting_kv:
                self._count("kv_waits")
                log.debug("kv_wait", request_id=r.request_id, stage_level=self.level)
            r.waiting_kv = True
            return False
        self.backend.open(r.request_id, capacity)
        r.opened, r.waiting_kv = True, False
        return True

    def tick(self) -> None:
        """Timers: forget silent drafter requests and expired finished ones."""
        now = self.clock()
        for r in list(self.requests.values()):
            if not self.is_target(r) and now - r.last_heard > self.config.request_ttl_s:
                self._drop(r, reason="ttl")
        for rid in [k for k, f in self.finished.items() if f.expires < now]:
            del self.finished[rid]

    # ------------------------------------------------------------------ the pass
    def _commit(self, p: PlannedRun, result: RunResult, seconds: float) -> None:
        """Accept / correct / bonus for one request of the pass, then its spans, notices and
        outputs. ``result`` has one row per draft plus one; ``seconds``: its share of the pass."""
        r, drafts = p.r, p.drafts
        chooser = self._chooser(r, skip=0)
        if chooser is not None and result.logits is not None:
            preds = chooser(result.logits)
        else:
            preds = result.greedy
        if preds[0] is None:  # a drafter with nothing to propose: wait for news from above
            self._sync_cache(r)  # drop what the pass fed but the last token
            r.stalled = True
            r.stats.busy_s += seconds
            return
        m = accept_greedy(drafts, preds)
        new = drafts[:m] + [preds[m]]
        old_len = len(r.tokens)
        r.tokens, finish = apply_stop(r.tokens + new, r.eos_ids, r.max_tokens, checked=old_len)
        self._sync_cache(r)  # rejected drafts and the new last token (or a cut at a stop) go
        if chooser is not None and chooser.logprobs is not None:
            r.logprobs = (r.logprobs[:old_len] + chooser.logprobs[: m + 1])[: len(r.tokens)]
        rejected = m < len(drafts)
        st = r.stats
        st.forward_passes += 1
        st.emitted_tokens += len(r.tokens) - old_len
        if drafts:
            st.drafts += 1
            st.draft_tokens += len(drafts)
            st.accepted_tokens += m
            _count_positions(st.accepted_per_pos, m)
            log.debug(  # the trace the acceptance tests replay against the drafter offline
                "drafts_verified",
                request_id=r.request_id,
                stage_level=self.level,
                position=old_len,  # output index of the first draft
                drafts=len(drafts),
                accepted=m,
            )
        if rejected:
            r.epoch += 1
            st.rollbacks_issued += 1
        st.busy_s += seconds
        self.observer.on_pass(len(drafts), m, len(r.tokens) - old_len, rejected, seconds)
        if self.is_target(r):
            r.target_len = len(r.tokens)
            if finish is not None:
                r.finish_reason = finish
        if self.level > 0:
            below_end = r.span.start + len(r.span.tokens) if r.span else 0
            self._publish(
                r,
                start=min(old_len, below_end),
                rollback=rejected,
                final=r.finish_reason is not None,
            )
        if self.is_target(r):
            self._send_output(r, done=r.finish_reason is not None)
            if r.finish_reason is not None:
                self._finish_target(r)
        else:
            self._send_span(r)

    def _sync_cache(self, r: LevelRequest, valid: int | None = None) -> None:
        """Enforce the KV cache invariant, after anything that changes ``r.tokens`` or feeds the
        cache: the reservation holds a prefix of ``prompt + tokens[:-1]``, so that the next pass
        has at least the last token to feed.

        ``valid``: how many of ``r.tokens`` the cache may still hold as they are now (after a
        rollback, the positions from the divergence on held other tokens); default all. The
        cache is only ever cut, never extended: a pass feeds what it lacks.
        """
        if not r.opened:
            return
        keep = len(r.tokens) - 1 if valid is None else min(valid, len(r.tokens) - 1)
        if len(r.prompt) + keep < self.backend.length(r.request_id):
            self.backend.crop(r.request_id, len(r.prompt) + keep)

    def _chooser(self, r: LevelRequest, skip: int) -> Chooser | None:
        """None for a plain greedy pass; else what picks this pass's tokens (and, at the target,
        records their log-probabilities). Row ``skip`` predicts generated position
        ``len(r.tokens)``."""
        logprobs = r.top_logprobs if self.is_target(r) and r.top_logprobs >= 0 else None
        if r.sampling.greedy and logprobs is None:
            return None
        return Chooser(r.sampling, len(r.tokens), skip=skip, top_logprobs=logprobs)

    # ------------------------------------------------------------------ messages out
    def _all_stats(self, r: LevelRequest) -> list[LevelStats]:
        below = list(r.span.stats) if r.span is not None else []
        have = {s.level for s in below}
        below += [
            LevelStats(level=i, replica=r.route[i].replica)
            for i in range(self.level)
            if i not in have
        ]
        return sorted(below, key=lambda s: s.level) + [r.stats.model_copy()]

    def _send_span(self, r: LevelRequest) -> None:
        above = r.seen.get(self.level + 1)
        hop = r.route[self.level + 1]
        fresh = above is not None and above.replica == hop.replica
        start = min(above.end, len(r.tokens)) if fresh else 0
        self.outbox.send_span(
            hop,
            Span(
                request_id=r.request_id,
                level=self.level,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                base_epoch=above.epoch if fresh else 0,
                epoch=r.epoch,
                stats=self._all_stats(r),
            ),
        )

    def _publish(
        self, r: LevelRequest, start: int, rollback: bool = False, final: bool = False
    ) -> None:
        start = max(0, min(start, len(r.tokens)))
        r.last_publish = self.clock()
        self.outbox.publish(
            Notice(
                request_id=r.request_id,
                level=self.level,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                epoch=r.epoch,
                rollback=rollback,
                final=final,
                drafter_lead=self._advised_lead(r),
            )
        )

    def _advised_lead(self, r: LevelRequest) -> int | None:
        """The lead the level below should keep (None: no advice, it uses its ``max_lead``)."""
        if r.wanted_drafts is None or not isinstance(self.schedule, AsyncSchedule):
            return None
        above = self.schedule.lead(r)
        if above == 0 and not self.is_target(r):
            return 0  # the level above wants no drafts from us: we idle, and so does our drafter
        return drafter_lead(r.wanted_drafts, self.config.max_lead, above=above)

    def _maybe_republish(self, r: LevelRequest) -> None:
        """A drafter is behind on our rollbacks (its notice may be lost): repeat our state."""
        if self.clock() - r.last_publish >= self.config.republish_interval_s:
            self._count("republished")
            self._publish(r, start=0)

    def _send_output(self, r: LevelRequest, done: bool) -> None:
        start = r.sent
        self.outbox.send_reply(
            r.reply_to,
            Output(
                request_id=r.request_id,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                done=done,
                finish_reason=r.finish_reason,
                stats=self._all_stats(r),
                logprobs=_complete(r.logprobs[start:]) if r.top_logprobs >= 0 else [],
            ),
        )
        r.sent = len(r.tokens)

    # ------------------------------------------------------------------ endings
    def _finish_target(self, r: LevelRequest) -> None:
        self.finished[r.request_id] = FinishedRequest(
            tokens=list(r.tokens),
            finish_reason=r.finish_reason or "stop",
            stats=self._all_stats(r),
            expires=self.clock() + self.config.done_retention_s,
            logprobs=list(r.logprobs) if r.top_logprobs >= 0 else [],
        )
        log.info(
            "request_finished",
            request_id=r.request_id,
            stage_level=self.level,
            tokens=len(r.tokens),
            finish_reason=r.finish_reason,
            forward_passes=r.stats.forward_passes,
            accepted=r.stats.accepted_tokens,
            draft_tokens=r.stats.draft_tokens,
        )
        self._drop(r, reason="finished")

    def _fail(self, r: LevelRequest, message: str) -> None:
        if self.is_target(r):
            self.outbox.send_reply(
                r.reply_to,
                RequestError(
                    request_id=r.request_id, replica=self.replica, level=self.level, message=message
                ),
            )
            self._publish(r, start=len(r.tokens), final=True)
        self._drop(r, reason="failed")

    def _drop(self, r: LevelRequest, reason: str) -> None:
        self.requests.pop(r.request_id, None)
        try:
            self._order.remove(r.request_id)
        except ValueError:
            pass
        if r.opened:
            self.backend.close(r.request_id)
            r.opened = False
        self.outbox.unsubscribe(r.request_id)
        log.debug("request_dropped", request_id=r.request_id, stage_level=self.level, reason=reason)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


MAX_COUNTED_POSITIONS = 32


def _count_positions(per_pos: list[int], accepted: int) -> None:
    """Add one pass that accepted ``accepted`` drafts: positions 0..accepted-1 each count once."""
    n = min(accepted, MAX_COUNTED_POSITIONS)
    if len(per_pos) < n:
        per_pos.extend([0] * (n - len(per_pos)))
    for j in range(n):
        per_pos[j] += 1


def _sampling(msg: Start) -> SamplingParams:
    """A Start's sampling fields; raises ValueError when they are out of range."""
    return SamplingParams(
        temperature=msg.temperature,
        seed=msg.seed,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
    )


def _complete(logprobs: list[TokenLogprob | None]) -> list[TokenLogprob]:
    """``logprobs`` if every entry is known, else [] (a resumed target does not know those of
    the output it was handed; the gateway has them already)."""
    return [] if any(lp is None for lp in logprobs) else list(logprobs)  # type: ignore[misc]
