"""Gateway-side bookkeeping of requests in flight, with no I/O.

The tracker is what makes a request finish whatever the network does: output arrives as
``Output`` pieces placed by position, so duplicates and reordering are harmless; a gap, or
silence for ``resend_after_s``, makes the tracker re-send ``Start`` (with what it already has) to
every stage of the route. ``Start`` is idempotent: a stage that holds the request only re-sends
its output from ``have``; one that lost it (restart, lost message) resumes from
``prompt + committed``, which continues the same output: greedy, or a sampled request's, whose
every token is a function of (seed, position) (``common.sampling``).

``RequestTracker.requests`` is the one table of requests in flight. A user that keeps more per
request (the gateway: the consumer's queue, token timings) subclasses ``TrackedRequest`` and
tracks its subclass (``RequestTracker[Flight]``), so adding and removing a request happen in one
place: ``add`` and ``remove``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.protocol import LevelStats, Output, RequestError, RouteHop, Start, TokenLogprob
from common.sampling import GREEDY, SamplingParams


@dataclass
class TrackedRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    eos_ids: list[int]
    route: list[RouteHop]
    reply_to: str
    created: float
    tokens: list[int] = field(default_factory=list)  # committed output received, in order
    done: bool = False
    finish_reason: str | None = None
    stats: list[LevelStats] = field(default_factory=list)
    error: str | None = None
    last_progress: float = 0.0
    last_sync: float = 0.0
    resyncs: int = 0
    gap: bool = False  # a piece arrived beyond what we have: ask for a re-send now
    sampling: SamplingParams = GREEDY
    top_logprobs: int = -1  # -1: no logprobs; else alternatives per token
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token received

    def start_message(self) -> Start:
        return Start(
            request_id=self.request_id,
            prompt=self.prompt,
            committed=list(self.tokens),
            have=len(self.tokens),
            max_tokens=self.max_tokens,
            eos_ids=self.eos_ids,
            route=self.route,
            reply_to=self.reply_to,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
            min_p=self.sampling.min_p,
            seed=self.sampling.seed,
            logprobs=self.top_logprobs,
        )


Send = tuple[RouteHop, Start]
R = TypeVar("R", bound=TrackedRequest)


class RequestTracker(Generic[R]):
    def __init__(self, resend_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.resend_after_s = resend_after_s
        self.clock = clock
        self.requests: dict[str, R] = {}

    def add(self, req: R) -> list[Send]:
        """Register a request; returns the Start messages to send."""
        now = self.clock()
        req.last_progress = req.last_sync = now
        self.requests[req.request_id] = req
        msg = req.start_message()
        return [(hop, msg) for hop in req.route]

    def on_output(self, msg: Output) -> list[int]:
        """Apply an Output piece; returns the tokens that are new (to stream to the client)."""
        req = self.requests.get(msg.request_id)
        if req is None or req.done:
            return []
        have = len(req.tokens)
        end = msg.start + len(msg.tokens)
        if msg.start > have:
            req.gap = True
            return []
        new = list(msg.tokens[have - msg.start :]) if end > have else []
        if new and req.top_logprobs >= 0:
            if len(msg.logprobs) != len(msg.tokens):  # cannot happen from a healthy target
                req.gap = True  # ask again rather than commit tokens without their logprobs
                return []
            req.logprobs.extend(msg.logprobs[have - msg.start :])
        req.tokens.extend(new)
        if new:
            req.last_progress = self.clock()
        if msg.stats and end == len(req.tokens):
            req.stats = list(msg.stats)  # cumulative: the latest complete piece has the latest
        if msg.done and end == len(req.tokens):
            req.done, req.finish_reason = True, msg.finish_reason
        return new

    def on_error(self, msg: RequestError) -> R | None:
        req = self.requests.get(msg.request_id)
        if req is not None and not req.done:
            req.done, req.error = True, f"level {msg.level} ({msg.replica}): {msg.message}"
        return req

    def reroute(self, request_id: str, route: list[RouteHop]) -> list[Send]:
        """Move a request to another route (a replica died); re-sends Start to the new hops."""
        req = self.requests.get(request_id)
        if req is None or req.done:
            return []
        req.route = route
        return self._resync(req, self.clock())

    def due(self) -> list[Send]:
        """Start messages to re-send now: for requests with a gap or silent too long."""
        now = self.clock()
        out: list[Send] = []
        for req in self.requests.values():
            if req.done:
                continue
            silent = now - max(req.last_progress, req.last_sync) >= self.resend_after_s
            if req.gap or silent:
                out.extend(self._resync(req, now))
        return out

    def _resync(self, req: TrackedRequest, now: float) -> list[Send]:
        req.gap, req.last_sync = False, now
        req.resyncs += 1
        msg = req.start_message()
        return [(hop, msg) for hop in req.route]

    def remove(self, request_id: str) -> R | None:
        return self.requests.pop(request_id, None)
