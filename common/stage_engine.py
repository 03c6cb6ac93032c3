"""One level of the PipeSpec hierarchy, for many requests, with no I/O of its own.

The stage service feeds it decoded messages (:meth:`StageEngine.handle`) and calls
:meth:`StageEngine.step` to run one batched forward pass; everything it sends goes through an
:class:`Outbox`. The same engine runs over real ZeroMQ sockets (``services.stage``) and over the
in-process fake transport of the tests.

A step is plan -> one backend call -> commit (like vLLM's ``EngineCore.step``): ``_plan`` picks
every request that wants a pass (``common.stage_schedule``) within ``max_batch_tokens``, opens its
KV reservation if the pool has room (else it waits), and decides what it feeds: the tokens its KV
cache lacks plus the drafts from below that the draft-length policy keeps (``common.stage_plan``,
``common.draft_policy``). One ``BatchedBackend.step`` runs them all; ``_commit`` then does, per
request, what a level always does (``common.stage_commit``): accept the longest matching prefix of
the drafts and append one correction/bonus token, then sends a span up, a notice down and, at the
target, output to the gateway (``common.stage_messages``). Level 0 has no drafts, so its step is a
plain greedy step; a verifier with no drafts makes its own greedy step instead of idling (the
paper's rho model). A verifier also advises the level below how far ahead to draft
(``common.lead_advice``).

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
from dataclasses import replace

import structlog

from common import lead_advice, stage_commit, stage_kv
from common.backends.batched import BatchedBackend, PoolUsage, RunResult
from common.decoding import apply_stop, reconcile
from common.draft_policy import LOAD_MEMORY, drafting_allowed, pass_threads
from common.engine_config import EngineConfig
from common.level_request import (
    FinishedRequest,
    LevelRequest,
    SeenNotice,
    check_start,
    new_request,
    overtaken,
)
from common.protocol import Cancel, Message, Notice, Span, Start
from common.stage_messages import Messages, Outbox
from common.stage_plan import PlannedRun, policy_drafts, within_room
from common.stage_schedule import SCHEDULES

log = structlog.get_logger("stage")


class PassObserver:
    """Hooks for metrics; the default does nothing."""

    def on_pass(
        self, drafts: int, accepted: int, emitted: int, rejected: bool, seconds: float
    ) -> None: ...
    def on_batch(self, requests: int, tokens: int) -> None: ...
    def on_rollback_applied(self) -> None: ...
    def on_stale_span(self) -> None: ...


class StageEngine:
    def __init__(
        self,
        config: EngineConfig,
        backend: BatchedBackend,
        outbox: Outbox,
        replica: str,
        clock: Callable[[], float] = time.monotonic,
        observer: PassObserver | None = None,
        set_threads: Callable[[int], None] | None = None,
    ):
        self.level = config.level
        self.config = config
        self.schedule = SCHEDULES[config.schedule](config)
        self.backend = backend
        self.outbox = outbox
        self.send = Messages(outbox, self.level, replica)
        self.replica = replica
        self.clock = clock
        self.observer = observer or PassObserver()
        # the cores rule (config.threads_alone): every core while the drafters below idle
        self._set_threads = set_threads
        self._record = lead_advice.DraftRecord()  # what the ended requests' drafts scored
        self._loads: deque[int] = deque(maxlen=LOAD_MEMORY)  # requests in the last passes
        self._threads: int | None = None
        self.requests: dict[str, LevelRequest] = {}
        self.finished: dict[str, FinishedRequest] = {}  # target only: for re-sends
        self._order: deque[str] = deque()  # round-robin over requests
        self.draining = False
        self.counters: dict[str, int] = {}
        # the last lead the level above advised, for any request (lead_advice.first_hint)
        self._last_advised_lead: int | None = None
        self._last_advised_at = 0.0

    def is_target(self, r: LevelRequest) -> bool:
        return self.level == r.target_level

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

    def _on_start(self, msg: Start) -> None:
        """A Start re-syncs a request we hold, repeats the end of one we finished, or starts
        a new one."""
        r = self.requests.get(msg.request_id)
        done = self.finished.get(msg.request_id)
        if r is not None:
            self._resync(r, msg)
        elif done is not None:  # lost output: repeat the end, and tell lower levels to let go
            self.send.resend_finished(msg, done)
        else:
            self._start_new(msg)

    def _resync(self, r: LevelRequest, msg: Start) -> None:
        """Update the route and reply address; the target re-sends what the gateway lacks."""
        r.last_heard = self.clock()
        if r.route != msg.route:
            r.route = list(msg.route)
            self.outbox.subscribe(r.request_id, r.route[self.level + 1 :])
        r.reply_to = msg.reply_to
        if self.is_target(r):
            r.sent = min(r.sent, msg.have)
            self.send.output(r, done=False)

    def _start_new(self, msg: Start) -> None:
        """Take a new request (or refuse it: the target tells the gateway why)."""
        problem = check_start(msg, self.level, self.replica, self.backend)
        if problem:
            self._count("rejected_start")
            log.warning("start_rejected", request_id=msg.request_id, reason=problem)
            if self.level == len(msg.route) - 1:
                self.send.error(msg.reply_to, msg.request_id, problem)
            return
        r = new_request(msg, self.level, self.replica, self.clock())
        if not self.is_target(r):  # no pass for it until the level above advises, maybe
            age = self.clock() - self._last_advised_at
            hint = lead_advice.first_hint(self._last_advised_lead, bool(self.requests), age)
            r.lead = replace(r.lead, hint=hint)
        self.requests[r.request_id] = r
        self._order.append(r.request_id)
        self.outbox.subscribe(r.request_id, r.route[self.level + 1 :])
        log.debug(
            "request_started",
            request_id=r.request_id,
            stage_level=self.level,
            prompt_tokens=len(r.prompt),
            resumed_from=len(r.tokens),
            lead_hint=r.lead.hint,
        )

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
        if not overtaken(span, r.span):
            r.span = span

    def _on_notice(self, n: Notice) -> None:
        """A level above's state: remember it, take its lead advice, then adopt its tokens."""
        r = self.requests.get(n.request_id)
        if r is None or n.level <= self.level:
            return
        end = n.start + len(n.tokens)
        seen = SeenNotice(n.replica, n.epoch, end)
        if seen.older_than(r.seen.get(n.level)):
            return
        r.seen[n.level] = seen
        r.last_heard = self.clock()
        if n.level == self.level + 1 and n.drafter_lead is not None:
            r.lead = replace(r.lead, hint=n.drafter_lead)
            self._last_advised_lead, self._last_advised_at = n.drafter_lead, self.clock()
        if n.level == r.target_level:
            r.target_len = max(r.target_len, end)
        if n.final:
            self._drop(r, reason="finished")
        else:
            self._adopt(r, n)

    def _adopt(self, r: LevelRequest, n: Notice) -> None:
        """Take the tokens of a level above where they extend or rewrite ours (a rollback)."""
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
        stage_kv.sync_cache(self.backend, r, valid=plan.keep)
        r.stalled = False
        if self.level > 0:
            self._publish(r, start=plan.keep)

    # ------------------------------------------------------------------ reads (metrics)
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

    # ------------------------------------------------------------------ the step
    def step(self) -> bool:
        """Run one batched forward pass for every request that wants one: plan, one backend
        call, commit. False if none does.

        Planning is the only place the schedule's state changes (``Schedule.update``: a sync
        verifier's wait for drafts)."""
        plan = self._plan()
        if not plan:
            return False
        runs = [p.run() for p in plan]
        self._apply_cores_rule(plan)
        t0 = time.perf_counter()
        try:
            results = self.backend.step(runs)
        except Exception as exc:  # a model error fails the requests of this pass, not the process
            self._pass_failed([p.r for p in plan], exc, requests=len(plan))
            return True
        seconds = time.perf_counter() - t0
        self.observer.on_batch(len(plan), sum(len(run.tokens) for run in runs))
        for p in plan:
            try:
                self._commit(p, results[p.r.request_id], seconds / len(plan))
            except Exception as exc:
                self._pass_failed([p.r], exc, request_id=p.r.request_id)
        return True

    def _pass_failed(self, rs: list[LevelRequest], exc: Exception, **where: object) -> None:
        """Fail the requests ``rs`` of a pass that raised ``exc`` (call it where it is caught)."""
        self._count("pass_failed")
        log.exception("pass_failed", stage_level=self.level, **where)
        for r in rs:
            self._fail(r, f"model error at level {self.level}: {exc}")

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
        # an idle poll is no pass: it must not count in the load (draft_policy.LOAD_MEMORY)
        if plan:
            self._choose_drafts(plan, room=self.config.max_batch_tokens - tokens)
        return plan

    def _open(self, r: LevelRequest) -> bool:
        """Whether ``r`` holds a KV reservation, taking one if the pool has room; if not, it
        waits (``waiting_kv``) until a request closes (``common.stage_kv``)."""
        was_waiting = r.waiting_kv
        if stage_kv.try_open(self.backend, r):
            return True
        if not was_waiting:
            self._count("kv_waits")
            log.debug("kv_wait", request_id=r.request_id, stage_level=self.level)
        return False

    def _choose_drafts(self, plan: list[PlannedRun], room: int) -> None:
        """Trim each planned request's drafts to what the policy keeps and the batch has room
        for (``room``: tokens left under ``max_batch_tokens``); weigh the lead advice first."""
        goodput = self.config.draft_policy == "goodput" and self.level > 0
        for p in plan:  # did the drafts we asked for arrive?
            p.r.lead = lead_advice.after_planned_pass(p.r.lead, found_drafts=bool(p.drafts))
        if goodput and self.schedule.advises_leads:
            self._weigh_leads(plan)
        if not any(p.drafts for p in plan):
            return
        counts = policy_drafts(plan, self.backend.cost_curve) if goodput else None
        offered = counts if counts is not None else [len(p.drafts) for p in plan]
        for p, k in zip(plan, within_room(offered, room)):
            p.drafts = p.drafts[:k]

    def _weigh_leads(self, plan: list[PlannedRun]) -> None:
        """Set ``lead.wanted`` of each planned request: the drafts the policy would check in the
        passes to come, over every running request (``lead_advice.wanted_drafts``)."""
        now = self.clock()
        running = [r for r in self.requests.values() if self.schedule.wants_pass(r, now)]
        if self.config.max_drafting_load is not None:  # the cores rule's cap on the load
            self._loads.append(len(running))
            over = not drafting_allowed(self._loads, self.config.max_drafting_load)
            for r in running:  # a request that ran above the cap ends without drafts
                r.over_drafting_load = r.over_drafting_load or over
        if all(r.over_drafting_load for r in running):
            wanted = [0] * len(running)  # nothing to weigh
        else:
            wanted = self._wanted_drafts(running)
            wanted = [0 if r.over_drafting_load else w for r, w in zip(running, wanted)]
        by_request = {r.request_id: w for r, w in zip(running, wanted)}
        for p in plan:
            p.r.lead = replace(p.r.lead, wanted=by_request.get(p.r.request_id, 0))

    def _wanted_drafts(self, running: list[LevelRequest]) -> list[int]:
        """What the draft policy would check per running request, from the finished requests'
        record (``lead_advice.evidence``) and each request's own acceptance so far."""
        prior, on_time, sharing = lead_advice.evidence(self._record, self.config.sharing_cost)
        chances = [
            lead_advice.draft_chances(
                r.stats.accepted_tokens, r.stats.draft_tokens, r.lead, prior, on_time
            )
            for r in running
        ]
        # under the cores rule a late drafter costs passes, not drafts (draft_lengths' reach)
        reach = [t for _, t in chances] if sharing > 1.0 else None
        values = [a for a, _ in chances] if reach else [a * t for a, t in chances]
        return lead_advice.wanted_drafts(
            values,
            self.config.draft_cap,
            self.backend.cost_curve,
            self.config.drafter_cost,
            sharing,
            reach,
        )

    def _apply_cores_rule(self, plan: list[PlannedRun]) -> None:
        """Threads for this pass (``draft_policy.pass_threads``), set only when they change."""
        config = self.config
        if self._set_threads is None or config.threads_alone is None:
            return
        share = config.threads or config.threads_alone
        n = pass_threads([p.r.lead.wanted for p in plan], share, config.threads_alone)
        if n != self._threads:
            self._set_threads(n)
            self._threads = n

    def _commit(self, p: PlannedRun, result: RunResult, seconds: float) -> None:
        """Accept / correct / bonus for one request of the pass, then its spans, notices and
        outputs. ``result`` has one row per draft plus one; ``seconds``: its share of the pass."""
        r = p.r
        chooser = stage_commit.chooser_for(r, self.is_target(r))
        preds = stage_commit.predictions(result, chooser)
        if preds[0] is None:  # a drafter with nothing to propose: wait for news from above
            stage_kv.sync_cache(self.backend, r)  # drop what the pass fed but the last token
            r.stalled = True
            r.stats.busy_s += seconds
            return
        v = stage_commit.accept(r, p.drafts, preds, chooser)
        # the cache drops rejected drafts and the new last token (or what a stop cut off)
        stage_kv.sync_cache(self.backend, r)
        stage_commit.record(r, self.level, v, seconds)
        self.observer.on_pass(v.drafts, v.accepted, v.emitted, v.rejected, seconds)
        if self.is_target(r):
            r.target_len = len(r.tokens)
            if v.finish is not None:
                r.finish_reason = v.finish
        self._send_commit(r, v)

    def _send_commit(self, r: LevelRequest, v: stage_commit.Verdict) -> None:
        """What a pass changed, to the levels below (a notice), and above (a span) or, at the
        target, to the gateway."""
        if self.level > 0:
            below_end = r.span.start + len(r.span.tokens) if r.span else 0
            self._publish(
                r,
                start=min(v.old_len, below_end),
                rollback=v.rejected,
                final=r.finish_reason is not None,
            )
        if not self.is_target(r):
            self.send.span(r)
            return
        self.send.output(r, done=r.finish_reason is not None)
        if r.finish_reason is not None:
            self._finish_target(r)

    # ------------------------------------------------------------------ notices out
    def _publish(
        self, r: LevelRequest, start: int, rollback: bool = False, final: bool = False
    ) -> None:
        start = max(0, min(start, len(r.tokens)))
        r.last_publish = self.clock()
        self.send.notice(r, start, rollback, final, lead=self._advised_lead(r))

    def _advised_lead(self, r: LevelRequest) -> int | None:
        """The lead the level below should keep (None: no advice, it uses its ``max_lead``)."""
        if not self.schedule.advises_leads:
            return None
        above = self.schedule.lead(r)
        return lead_advice.advice(r.lead.wanted, above, self.is_target(r), self.config.max_lead)

    def _maybe_republish(self, r: LevelRequest) -> None:
        """A drafter is behind on our rollbacks (its notice may be lost): repeat our state."""
        if self.clock() - r.last_publish >= self.config.republish_interval_s:
            self._count("republished")
            self._publish(r, start=0)

    # ------------------------------------------------------------------ endings
    def tick(self) -> None:
        """Timers: forget silent drafter requests and expired finished ones."""
        now = self.clock()
        for r in list(self.requests.values()):
            if not self.is_target(r) and now - r.last_heard > self.config.request_ttl_s:
                self._drop(r, reason="ttl")
        for rid in [k for k, f in self.finished.items() if f.expires < now]:
            del self.finished[rid]

    def _finish_target(self, r: LevelRequest) -> None:
        expires = self.clock() + self.config.done_retention_s
        self.finished[r.request_id] = FinishedRequest.of(r, self.send.all_stats(r), expires)
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
            self.send.error(r.reply_to, r.request_id, message)
            self._publish(r, start=len(r.tokens), final=True)
        self._drop(r, reason="failed")

    def _drop(self, r: LevelRequest, reason: str) -> None:
        if self.requests.pop(r.request_id, None) is not None:
            self._record = self._record.add(r.stats.accepted_tokens, r.stats.draft_tokens, r.lead)
        try:
            self._order.remove(r.request_id)
        except ValueError:
            pass
        stage_kv.close(self.backend, r)
        self.outbox.unsubscribe(r.request_id)
        log.debug("request_dropped", request_id=r.request_id, stage_level=self.level, reason=reason)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
