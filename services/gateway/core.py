"""The gateway's engine: routes requests over the stages and streams the target's output back.

    gateway = Gateway(settings, fingerprint(tokenizer), eos_ids=[tokenizer.eos_token_id])
    await gateway.start()
    async with gateway.generate(prompt_ids, max_tokens=32) as generation:
        async for event in generation:      # TokensEvent ..., then one FinishEvent
            ...
    await gateway.stop()

Two tasks run beside the requests: one drains the registry PULL socket (Heartbeat -> registry,
Output/RequestError -> tracker and the request's queue); a ticker re-sends Start where output is
lost or late, moves requests off lost replicas and fails requests older than ``request_timeout_s``.
Sends are non-blocking: a full peer costs a counted drop, which the tracker's re-sync repairs.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

import structlog
import zmq
import zmq.asyncio

from common.codec import DecodeError, decode, encode
from common.protocol import Cancel, Heartbeat, Message, Output, RequestError, RouteHop
from common.request_tracker import RequestTracker, Send, TrackedRequest
from common.settings import GatewaySettings
from common.sockets import bound_endpoint, open_socket
from services.gateway.events import (
    FinishEvent,
    GenerationError,
    GenerationTimeout,
    InvalidRequest,
    RequestStats,
    TokensEvent,
    request_stats,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Replica, ReplicaRegistry

log = structlog.get_logger("gateway")

TICK_S = 0.05
MAX_TOKENS_LIMIT = 1 << 16  # sanity cap when the target reports no context length
DEADLINE_GRACE_S = 1.0  # a consumer waits this long past the ticker's timeout before giving up
WILDCARD_HOSTS = {"0.0.0.0", "*", "::", ""}

Event = TokensEvent | FinishEvent


def advertised_host(settings: GatewaySettings) -> str:
    """The host stages use to reach this gateway."""
    host = settings.advertise_host or settings.bind_host
    return socket.gethostname() if host in WILDCARD_HOSTS else host


@dataclass
class _InFlight:
    queue: asyncio.Queue  # Event | GenerationError, consumed by the request's Generation
    prompt_tokens: int
    first_token_at: Optional[float] = None


class Generation:
    """One request in flight: an async iterator of ``TokensEvent`` then one ``FinishEvent``;
    raises ``GenerationError`` if the request fails. Leaving it early (``break`` inside
    ``async with``, ``aclose()``, ``cancel()``, or task cancellation while waiting) sends
    ``Cancel`` to every stage of the route; cancelling is synchronous and idempotent."""

    def __init__(self, gateway: Gateway, request_id: str, queue: asyncio.Queue, deadline: float):
        self.request_id = request_id
        self._gateway, self._queue, self._deadline = gateway, queue, deadline
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        timeout = max(self._deadline - time.monotonic(), 0.01)
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.CancelledError:
            self.cancel("consumer cancelled")
            raise
        except TimeoutError:
            self.cancel("timeout")
            raise GenerationTimeout(f"request {self.request_id} timed out") from None
        if isinstance(event, GenerationError):
            self._closed = True
            raise event
        if isinstance(event, FinishEvent):
            self._closed = True
        return event

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._closed:
            self._closed = True
            self._gateway.cancel(self.request_id, reason)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.cancel()


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        tokenizer_fingerprint: Optional[str],
        eos_ids: Sequence[int],
        metrics: Optional[GatewayMetrics] = None,
    ):
        self.settings = settings
        self.eos_ids = list(eos_ids)
        self.metrics = metrics or GatewayMetrics()
        self.registry = ReplicaRegistry(
            settings.num_levels, tokenizer_fingerprint, settings.heartbeat_timeout_s
        )
        self.tracker = RequestTracker(settings.resend_after_s)
        self.reply_to = ""  # the registry endpoint as stages reach it; set by start()
        self._flights: dict[str, _InFlight] = {}
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._send_ctx: Optional[zmq.Context] = None  # sync shadow: sends are plain NOBLOCK calls
        self._pull: Optional[zmq.asyncio.Socket] = None
        self._pushes: dict[str, zmq.Socket] = {}  # inbox endpoint -> PUSH
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._ctx = zmq.asyncio.Context()
        self._send_ctx = zmq.Context.shadow(self._ctx.underlying)
        self._pull = open_socket(
            self._ctx, zmq.PULL, f"tcp://{s.bind_host}:{s.registry_port}", linger_ms=s.linger_ms, hwm=s.hwm
        )
        self.reply_to = bound_endpoint(self._pull, advertised_host(s))
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="gateway-receive"),
            asyncio.create_task(self._tick_loop(), name="gateway-tick"),
        ]
        log.info("gateway_started", registry=self.reply_to, num_levels=s.num_levels)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for request_id in list(self._flights):
            self._fail(request_id, GenerationError("the gateway is shutting down"), outcome="aborted")
        linger = self.settings.linger_ms
        for sock in self._pushes.values():
            sock.close(linger=linger)
        self._pushes.clear()
        if self._pull is not None:
            self._pull.close(linger=linger)
        if self._ctx is not None:
            self._ctx.destroy(linger=linger)
        self._ctx = self._send_ctx = self._pull = None
        log.info("gateway_stopped")

    @property
    def context(self) -> zmq.asyncio.Context:
        """The process's ZMQ context, for other front ends (the client API); set by start()."""
        if self._ctx is None:
            raise RuntimeError("Gateway.start() has not been awaited")
        return self._ctx

    # -- requests ------------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise InvalidRequest if the request cannot be served as asked."""
        if not prompt_ids:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > MAX_TOKENS_LIMIT:
            raise InvalidRequest(
                f"max_tokens must be at most {MAX_TOKENS_LIMIT}, got {max_tokens}", "max_tokens"
            )
        context = self.registry.target_max_context()
        total = len(prompt_ids) + max_tokens
        if context and total > context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) is {total} tokens, "
                f"more than the model's context of {context} tokens",
                "max_tokens",
            )

    def generate(
        self, prompt_ids: Sequence[int], max_tokens: int, request_id: Optional[str] = None
    ) -> Generation:
        """Start a request now; iterate the result for its events.

        Raises InvalidRequest (bad input) or NoRoute (some level has no replica) at once,
        before anything is sent.
        """
        if self._ctx is None:
            raise RuntimeError("Gateway.start() has not been awaited")
        self.check(prompt_ids, max_tokens)
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._flights:
            raise InvalidRequest(f"request_id {request_id!r} is already in flight", "request_id")
        route = self.registry.pick_route()
        req = TrackedRequest(
            request_id=request_id,
            prompt=list(prompt_ids),
            max_tokens=max_tokens,
            eos_ids=self.eos_ids,
            route=route,
            reply_to=self.reply_to,
            created=time.monotonic(),
        )
        flight = _InFlight(asyncio.Queue(), len(prompt_ids))
        self._flights[request_id] = flight
        self.metrics.requests_running.inc()
        self._send_all(self.tracker.add(req))
        log.info(
            "request_started",
            request_id=request_id,
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            route=[hop.replica for hop in route],
        )
        deadline = req.created + self.settings.request_timeout_s + DEADLINE_GRACE_S
        return Generation(self, request_id, flight.queue, deadline)

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Stop a request at every stage of its route. Idempotent; never blocks."""
        req = self.tracker.requests.get(request_id)
        if req is None or request_id not in self._flights:
            return
        self._send_cancel(req, reason)
        log.info("request_cancelled", request_id=request_id, reason=reason, tokens=len(req.tokens))
        self._end(request_id, outcome="cancelled")

    def unavailable_reason(self) -> Optional[str]:
        """None when every level has a live ready replica; else why not (for /health)."""
        return self.registry.unavailable_reason()

    # -- incoming messages ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:  # runs until stop() cancels it
            frame = await self._pull.recv()
            try:
                msg = decode(frame)
            except DecodeError as exc:
                self.metrics.decode_rejects.labels("registry").inc()
                log.warning("frame_rejected", reason=str(exc), bytes=len(frame))
                continue
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("dispatch_failed", type=msg.TYPE)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            refused_before = self.registry.refused_total
            self.registry.apply(msg)
            self.metrics.replicas_refused.inc(self.registry.refused_total - refused_before)
        elif isinstance(msg, Output):
            self._on_output(msg)
        elif isinstance(msg, RequestError):
            self._on_error(msg)
        else:
            self.metrics.decode_rejects.labels("registry").inc()
            log.warning("unexpected_message", type=msg.TYPE)

    def _on_output(self, msg: Output) -> None:
        flight = self._flights.get(msg.request_id)
        if flight is None:
            return  # finished or cancelled already: a late duplicate
        new = self.tracker.on_output(msg)
        if new:
            if flight.first_token_at is None:
                flight.first_token_at = time.monotonic()
                req = self.tracker.requests[msg.request_id]
                self.metrics.time_to_first_token.observe(flight.first_token_at - req.created)
            flight.queue.put_nowait(TokensEvent(new))
        req = self.tracker.requests[msg.request_id]
        if req.done:
            flight.queue.put_nowait(FinishEvent(req.finish_reason or "stop", self._stats(req, flight)))
            self._end(msg.request_id, outcome=req.finish_reason or "stop")

    def _on_error(self, msg: RequestError) -> None:
        req = self.tracker.on_error(msg)
        if req is not None and msg.request_id in self._flights:
            log.warning(
                "request_error",
                request_id=msg.request_id,
                stage_level=msg.level,
                replica=msg.replica,
                message=msg.message,
            )
            self._fail(msg.request_id, GenerationError(req.error), outcome="error")

    # -- ticker --------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:  # runs until stop() cancels it
            await asyncio.sleep(TICK_S)
            try:
                self._tick()
            except Exception:
                log.exception("tick_failed")

    def _tick(self) -> None:
        lost = self.registry.reap()
        self._close_sockets_of(lost)
        self._repair_routes({replica.id for replica in lost})
        resends = self.tracker.due()
        if resends:
            self.metrics.resyncs.inc(len({msg.request_id for _, msg in resends}))
            self._send_all(resends)
        self._expire_requests()
        for level in range(self.settings.num_levels):
            self.metrics.live_replicas.labels(str(level)).set(len(self.registry.live(level)))

    def _repair_routes(self, lost_ids: set[str]) -> None:
        """Move requests off lost replicas: to another replica of the same level where one is
        routable; otherwise the hop stays (a lost drafter: the levels above decode without its
        drafts; a lost target: the request waits for one, or times out)."""
        for req in list(self.tracker.requests.values()):
            broken = [
                hop for hop in req.route if hop.replica in lost_ids or not self.registry.is_live(hop.replica)
            ]
            if not broken:
                continue
            route = [self._replacement(hop) if hop in broken else hop for hop in req.route]
            if route == req.route and not any(hop.replica in lost_ids for hop in req.route):
                continue  # still nothing to move to; already handled when the replica was lost
            unreplaced = [hop.level for hop in route if not self.registry.is_live(hop.replica)]
            log.warning(
                "request_rerouted",
                request_id=req.request_id,
                lost=[hop.replica for hop in broken],
                route=[hop.replica for hop in route],
                unreplaced_levels=unreplaced,
            )
            if route != req.route:
                self.metrics.reroutes.inc()
            self._send_all(self.tracker.reroute(req.request_id, route))

    def _replacement(self, hop: RouteHop) -> RouteHop:
        return self.registry.pick(hop.level) or hop

    def _expire_requests(self) -> None:
        now, limit = time.monotonic(), self.settings.request_timeout_s
        for req in list(self.tracker.requests.values()):
            if now - req.created >= limit:
                log.warning(
                    "request_timed_out", request_id=req.request_id, tokens=len(req.tokens), limit_s=limit
                )
                self._fail(
                    req.request_id, GenerationTimeout(f"request timed out after {limit:g} s"), "timeout"
                )

    # -- ending requests -----------------------------------------------------------------------

    def _fail(self, request_id: str, error: GenerationError, outcome: str) -> None:
        flight = self._flights.get(request_id)
        req = self.tracker.requests.get(request_id)
        if flight is None or req is None:
            return
        self._send_cancel(req, outcome)
        flight.queue.put_nowait(error)
        self._end(request_id, outcome)

    def _end(self, request_id: str, outcome: str) -> None:
        req = self.tracker.remove(request_id)
        flight = self._flights.pop(request_id)
        m = self.metrics
        m.requests.labels(outcome).inc()
        m.requests_running.dec()
        m.prompt_tokens.inc(flight.prompt_tokens)
        m.generation_tokens.inc(len(req.tokens))
        m.record_levels(req.stats)
        m.e2e_latency.observe(time.monotonic() - req.created)
        log.info(
            "request_ended",
            request_id=request_id,
            outcome=outcome,
            tokens=len(req.tokens),
            resyncs=req.resyncs,
            wall_s=round(time.monotonic() - req.created, 3),
        )

    def _stats(self, req: TrackedRequest, flight: _InFlight) -> RequestStats:
        now = time.monotonic()
        ttft = None if flight.first_token_at is None else flight.first_token_at - req.created
        return request_stats(
            req.request_id,
            flight.prompt_tokens,
            len(req.tokens),
            req.stats,
            req.resyncs,
            ttft,
            now - req.created,
        )

    # -- sending -------------------------------------------------------------------------------

    def _send_cancel(self, req: TrackedRequest, reason: str) -> None:
        msg = Cancel(request_id=req.request_id, reason=reason)
        for hop in req.route:
            self._send(hop, msg)

    def _send_all(self, sends: list[Send]) -> None:
        for hop, msg in sends:
            self._send(hop, msg)

    def _send(self, hop: RouteHop, msg: Message) -> None:
        if not self.registry.is_live(hop.replica):
            return  # lost: its replacement (if any) gets the request through _repair_routes
        sock = self._pushes.get(hop.inbox)
        if sock is None:
            s = self.settings
            sock = open_socket(self._send_ctx, zmq.PUSH, hop.inbox, linger_ms=s.linger_ms, hwm=s.hwm)
            self._pushes[hop.inbox] = sock
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.metrics.send_drops.inc()
            log.warning(
                "send_dropped",
                replica=hop.replica,
                stage_level=hop.level,
                type=msg.TYPE,
                request_id=getattr(msg, "request_id", None),
            )

    def _close_sockets_of(self, lost: list[Replica]) -> None:
        in_use = {r.heartbeat.inbox for r in self.registry.replicas.values()}
        for replica in lost:
            inbox = replica.heartbeat.inbox
            if inbox not in in_use and inbox in self._pushes:
                self._pushes.pop(inbox).close(linger=0)  # nothing queued for a lost peer is useful
