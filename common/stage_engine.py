"""One level of the PipeSpec hierarchy, for many requests, with no I/O of its own.

The stage service feeds it decoded messages (:meth:`StageEngine.handle`) and calls
:meth:`StageEngine.step` to run one forward pass for one request; everything it sends goes
through an :class:`Outbox`. The same engine runs over real ZeroMQ sockets (``services.stage``)
and over the in-process fake transport of the tests.

Every level runs the same step (``_run_pass``): feed the tokens the KV cache lacks, plus any
drafts from below, in one forward pass; accept the longest matching prefix of the drafts and
append one correction/bonus token. Level 0 has no drafts, so its step is a plain greedy step;
a verifier with no drafts makes its own greedy step instead of idling (the paper's rho model).

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

from common.backends.base import Backend, Session
from common.decoding import accept_greedy, anchor_drafts, apply_stop, reconcile
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
    session: Session | None = None  # KV cache: a prefix of prompt + tokens[:-1] (_sync_cache)
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
    """PipeSpec: the target always runs; a drafter runs while it is less than ``max_lead``
    tokens past the target's committed length."""

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        if _is_target(self.level, r):
            return r.finish_reason is None
        if r.stalled or _ended(r):
            return False
        return len(r.tokens) < r.target_len + self.config.max_lead


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


class StageEngine:
    def __init__(
        self,
        config: EngineConfig,
        backend: Backend,
        outbox: Outbox,
        replica: str,
        clock: Callable[[], float] = time.monotonic,
        observer: PassObserver | None = None,
    ):
        self.level = config.level
        self.config = config
        self.schedule = SCHEDULES[config.schedule](config)
        self.backend = backend
        self.outbox = outbox
        self.replica = replica
        self.clock = clock
        self.observer = observer or PassObserver()
        self.requests: dict[str, LevelRequest] = {}
        self.finished: dict[str, FinishedRequest] = {}  # target only: for re-sends
        self._order: deque[str] = deque()  # round-robin over requests
        self.draining = False
        self.counters: dict[str, int] = {}

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

    def step(self) -> bool:
        """Run one forward pass for the next request that wants one. False if none does.

        The requests it looks at, in round-robin order up to the one it runs, are the only place
        the schedule's state changes (``Schedule.update``: a sync verifier's wait for drafts)."""
        for _ in range(len(self._order)):
            rid = self._order[0]
            self._order.rotate(-1)
            r = self.requests.get(rid)
            if r is None:
                continue
            now = self.clock()
            self.schedule.update(r, now)
            if self.schedule.wants_pass(r, now):
                try:
                    self._run_pass(r)
                except Exception as exc:  # a model error fails this request, not the process
                    self._count("pass_failed")
                    log.exception("pass_failed", request_id=rid, stage_level=self.level)
                    self._fail(r, f"model error at level {self.level}: {exc}")
                return True
        return False

    def tick(self) -> None:
        """Timers: forget silent drafter requests and expired finished ones."""
        now = self.clock()
        for r in list(self.requests.values()):
            if not self.is_target(r) and now - r.last_heard > self.config.request_ttl_s:
                self._drop(r, reason="ttl")
        for rid in [k for k, f in self.finished.items() if f.expires < now]:
            del self.finished[rid]

    # ------------------------------------------------------------------ the pass
    def _run_pass(self, r: LevelRequest) -> None:
        t0 = time.perf_counter()
        seq = r.prompt + r.tokens
        if r.session is None:
            r.session = self.backend.new_session(seq[:-1])
        pending = seq[r.session.length :]  # tokens the cache lacks; the last one at least
        drafts = self.schedule.drafts(r)
        chooser = self._chooser(r, skip=len(pending) - 1)
        preds = r.session.forward(pending + drafts, chooser)[len(pending) - 1 :]
        if preds[0] is None:  # a drafter with nothing to propose: wait for news from above
            self._sync_cache(r)  # drop what the pass fed but the last token
            r.stalled = True
            r.stats.busy_s += time.perf_counter() - t0
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
        seconds = time.perf_counter() - t0
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
        cache: the session holds a prefix of ``prompt + tokens[:-1]``, so that the next pass
        has at least the last token to feed (and ``new_session`` prefills exactly that).

        ``valid``: how many of ``r.tokens`` the cache may still hold as they are now (after a
        rollback, the positions from the divergence on held other tokens); default all. The
        cache is only ever cut, never extended: a pass feeds what it lacks.
        """
        if r.session is None:
            return
        keep = len(r.tokens) - 1 if valid is None else min(valid, len(r.tokens) - 1)
        if len(r.prompt) + keep < r.session.length:
            r.session.crop(len(r.prompt) + keep)

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
            )
        )

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
        if r.session is not None:
            r.session.close()
            r.session = None
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
