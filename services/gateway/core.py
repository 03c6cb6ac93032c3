"""The gateway's engine: routes requests over the stages and streams the target's output back.

    gateway = Gateway(settings, fingerprint(tokenizer), eos_ids=[tokenizer.eos_token_id])
    await gateway.start()
    async with await gateway.generate(prompt_ids, max_tokens=32) as generation:
        async for event in generation:      # TokensEvent ..., then one FinishEvent
            ...
    await gateway.stop()

``generate`` is ``check`` then ``submit``. ``check`` holds the request to the limits (the pure
``limits.check_prompt``, once per request); ``submit`` takes a slot from the admission control
(``admission.Admission``): it may queue for one, and raises ``Overloaded`` when the gateway is
full. A front end that runs one request as several generations (n choices) checks once and
submits the same ``Prompt`` n times.

The request table is ``tracker.requests``: one ``Flight`` (``generation``) per request in flight,
added by ``_launch`` and removed by ``_end``.

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
from collections.abc import Sequence

import structlog
import zmq
import zmq.asyncio

from common.codec import DecodeError, decode, encode
from common.protocol import Cancel, Heartbeat, Message, Output, RequestError, RouteHop
from common.request_tracker import RequestTracker, Send
from common.sampling import GREEDY, SamplingParams
from common.security import GATEWAY, denied_total, identity, level_role, release, sender_role
from common.settings import GatewaySettings
from common.sockets import WILDCARD_HOSTS, PushPool, arrivals, bound_endpoint, open_socket
from services.gateway.admission import Admission
from services.gateway.events import (
    FinishEvent,
    GenerationError,
    GenerationTimeout,
    InvalidRequest,
    RequestCancelled,
    TokensEvent,
)
from services.gateway.generation import Flight, Generation
from services.gateway.limits import Limits, Prompt, check_prompt
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import NoRoute, Replica, ReplicaRegistry

__all__ = ["Gateway", "Generation", "Prompt", "advertised_host"]

log = structlog.get_logger("gateway")

TICK_S = 0.05
ROUTE_POLL_S = 0.05  # a request waiting for a route re-checks the registry this often
DEADLINE_GRACE_S = 1.0  # a consumer waits this long past the ticker's timeout before giving up


def advertised_host(settings: GatewaySettings) -> str:
    """The host stages use to reach this gateway."""
    host = settings.advertise_host or settings.bind_host
    return socket.gethostname() if host in WILDCARD_HOSTS else host


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        tokenizer_fingerprint: str | None,
        eos_ids: Sequence[int],
        metrics: GatewayMetrics | None = None,
    ):
        self.settings = settings
        self.eos_ids = list(eos_ids)
        self.metrics = metrics or GatewayMetrics()
        self.admission = Admission(
            settings.max_requests_in_flight, settings.max_queued_requests, settings.queue_timeout_s
        )
        self.metrics.requests_waiting.set_function(lambda: self.admission.waiting)
        self.registry = ReplicaRegistry(
            settings.num_levels,
            tokenizer_fingerprint,
            settings.heartbeat_timeout_s,
            min_heartbeat_interval_s=settings.min_heartbeat_interval_s,
        )
        # CURVE identity (None only with insecure = true); KeyError_ if keys are missing
        self.curve = identity(GATEWAY, settings.insecure, settings.public_keys, settings.secret_key)
        self.metrics.watch_rejects(
            lambda: self.registry.rejected,
            lambda: denied_total(self._ctx) if self._ctx is not None else 0,
        )
        self.tracker: RequestTracker[Flight] = RequestTracker(settings.resend_after_s)
        self.reply_to = ""  # the registry endpoint as stages reach it; set by start()
        self._ctx: zmq.asyncio.Context | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._pushes: PushPool | None = None  # inbox endpoint -> PUSH; set by start()
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._ctx = zmq.asyncio.Context()
        # on a sync shadow of the context: sends are plain NOBLOCK calls
        self._pushes = PushPool(
            zmq.Context.shadow(self._ctx.underlying),
            linger_ms=s.linger_ms,
            hwm=s.hwm,
            curve=self.curve,
        )
        self._pull = open_socket(
            self._ctx,
            zmq.PULL,
            f"tcp://{s.bind_host}:{s.registry_port}",
            linger_ms=s.linger_ms,
            hwm=s.hwm,
            curve=self.curve,
            allow={level_role(level) for level in range(s.num_levels)},
            max_msg_bytes=s.max_message_bytes,
        )
        self.reply_to = bound_endpoint(self._pull, advertised_host(s))
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="gateway-receive"),
            asyncio.create_task(self._tick_loop(), name="gateway-tick"),
        ]
        log.info(
            "gateway_started",
            registry=self.reply_to,
            num_levels=s.num_levels,
            secure=self.curve is not None,
            restarts=s.restarts,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for request_id in list(self.tracker.requests):
            self._fail(
                request_id, GenerationError("the gateway is shutting down"), outcome="aborted"
            )
        linger = self.settings.linger_ms
        if self._pushes is not None:
            self._pushes.close()
        if self._pull is not None:
            self._pull.close(linger=linger)
        if self._ctx is not None:
            release(self._ctx)
            self._ctx.destroy(linger=linger)
        self._ctx = self._pushes = self._pull = None
        log.info("gateway_stopped")

    def alive(self) -> bool:
        """The background tasks run (for /health/live): a crashed loop means restart me."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def context(self) -> zmq.asyncio.Context:
        """The process's ZMQ context, for other front ends (the client API); set by start()."""
        if self._ctx is None:
            raise RuntimeError("Gateway.start() has not been awaited")
        return self._ctx

    # -- state, for the probes and /v1/models -------------------------------------------------

    @property
    def secure(self) -> bool:
        """CURVE between the services (False only with ``insecure = true``)."""
        return self.curve is not None

    def unavailable_reason(self) -> str | None:
        """None when every level has a live ready replica; else why not (for /health)."""
        return self.registry.unavailable_reason()

    def max_context(self) -> int | None:
        """The target's context in tokens (prompt and output), None while no target is known."""
        return self.registry.target_max_context() or None

    def live_replicas(self) -> list[list[dict]]:
        """Per level, level 0 first: each live replica's description (``Replica.describe``)."""
        return [
            [r.describe() for r in self.registry.live(level)]
            for level in range(self.settings.num_levels)
        ]

    def refused_replicas(self) -> dict[str, str]:
        """Replica id -> why its heartbeats are refused."""
        return {replica: refusal.reason for replica, refusal in self.registry.refusals.items()}

    @property
    def requests_running(self) -> int:
        """Requests holding an admission slot."""
        return self.admission.running

    @property
    def requests_waiting(self) -> int:
        """Requests queued for an admission slot."""
        return self.admission.waiting

    # -- requests ------------------------------------------------------------------------------

    def limits(self) -> Limits:
        """The limits a new request is held to: the settings' and the target's context."""
        s = self.settings
        return Limits(s.default_max_tokens, s.max_tokens_limit, self.registry.target_max_context())

    def check(
        self, prompt_ids: Sequence[int], max_tokens: int | None = None, param: str = "max_tokens"
    ) -> Prompt:
        """The prompt held to the limits (``limits.check_prompt``), with its output length:
        ``max_tokens``, or the default when None. Raises InvalidRequest naming what is wrong
        (``param``: the field's name as the client spelled it)."""
        return check_prompt(prompt_ids, max_tokens, self.limits(), param)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int | None = None,
        request_id: str | None = None,
        sampling: SamplingParams = GREEDY,
        top_logprobs: int = -1,
    ) -> Generation:
        """``check`` then ``submit``: start a request once admitted; iterate the result for its
        events. Raises InvalidRequest (bad input) at once; then as ``submit``."""
        return await self.submit(
            self.check(prompt_ids, max_tokens), request_id, sampling, top_logprobs
        )

    async def submit(
        self,
        prompt: Prompt,
        request_id: str | None = None,
        sampling: SamplingParams = GREEDY,
        top_logprobs: int = -1,
    ) -> Generation:
        """Start a checked request once admitted; iterate the result for its events.

        Raises InvalidRequest (a request_id already in flight) at once, Overloaded when no slot
        is free or frees in time, NoRoute (some level has had no replica for ``route_wait_s``);
        nothing is sent to a stage before that. ``sampling``: greedy by default;
        ``top_logprobs`` >= 0 asks the target for the raw log-probability of each token and of
        that many alternatives.
        """
        if self._ctx is None:
            raise RuntimeError("Gateway.start() has not been awaited")
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self.tracker.requests:
            raise InvalidRequest(f"request_id {request_id!r} is already in flight", "request_id")
        queued_at = time.monotonic()
        await self.admission.acquire()
        try:
            route = await self._route(len(prompt.ids) + prompt.max_tokens)
            self.metrics.queue_time.observe(time.monotonic() - queued_at)
            return self._launch(prompt, request_id, sampling, top_logprobs, route)
        except BaseException:
            self.admission.release()
            raise

    async def _route(self, need: int) -> list[RouteHop]:
        """A replica per level for a request needing ``need`` KV positions (prompt +
        max_tokens). When some level has none (or none whose KV pool could ever hold it), wait up
        to ``route_wait_s`` for one (a heartbeat late under load, a replica restarting) before
        NoRoute: a blip of the registry must not fail a request that a moment later could run."""
        deadline = time.monotonic() + self.settings.route_wait_s
        while True:
            try:
                return self.registry.pick_route(need)
            except NoRoute:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(ROUTE_POLL_S)

    def _launch(
        self,
        prompt: Prompt,
        request_id: str,
        sampling: SamplingParams,
        top_logprobs: int,
        route: list[RouteHop],
    ) -> Generation:
        flight = Flight(
            request_id=request_id,
            prompt=list(prompt.ids),
            max_tokens=prompt.max_tokens,
            eos_ids=self.eos_ids,
            route=route,
            reply_to=self.reply_to,
            created=time.monotonic(),
            sampling=sampling,
            top_logprobs=top_logprobs,
        )
        self.metrics.requests_running.inc()
        self._send_all(self.tracker.add(flight))
        log.info(
            "request_started",
            request_id=request_id,
            prompt_tokens=len(prompt.ids),
            max_tokens=prompt.max_tokens,
            route=[hop.replica for hop in route],
            temperature=sampling.temperature,
            seed=sampling.seed,
        )
        deadline = flight.created + self.settings.request_timeout_s + DEADLINE_GRACE_S
        return Generation(flight, deadline, self.cancel)

    def cancel(
        self, request_id: str, reason: str = "cancelled", outcome: str = "cancelled"
    ) -> None:
        """Stop a request at every stage of its route; a consumer waiting on it gets
        RequestCancelled. Idempotent; never blocks."""
        flight = self.tracker.requests.get(request_id)
        if flight is None:
            return
        self._send_cancel(flight, reason)
        flight.queue.put_nowait(RequestCancelled(f"request {request_id} was cancelled: {reason}"))
        log.info(
            "request_cancelled", request_id=request_id, reason=reason, tokens=len(flight.tokens)
        )
        self._end(request_id, outcome=outcome)

    # -- incoming messages ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Drain the registry socket until stop() cancels this task."""
        async for frame in arrivals(self._pull):
            try:
                self._receive(frame)
            except Exception:  # one bad frame must never end the loop (and the registry)
                log.exception("receive_failed", bytes=len(frame.bytes))

    def _receive(self, frame: zmq.Frame) -> None:
        try:
            msg = decode(frame.bytes)
        except DecodeError as exc:
            self.metrics.decode_rejects.labels("registry").inc()
            log.warning("frame_rejected", reason=str(exc), bytes=len(frame.bytes))
            return
        try:
            self._dispatch(msg, sender_role(frame) if self.curve is not None else None)
        except Exception:
            log.exception("dispatch_failed", type=msg.TYPE)

    def _dispatch(self, msg: Message, sender: str | None = None) -> None:
        """``sender``: the role whose key sent ``msg`` (None on plain TCP). Outputs and errors
        count only from the target level's key; heartbeats only from their own level's."""
        if isinstance(msg, Heartbeat):
            refused_before = self.registry.refused_total
            self.registry.apply(msg, sender)
            self.metrics.replicas_refused.inc(self.registry.refused_total - refused_before)
        elif sender is not None and sender != level_role(self.registry.target_level):
            self.metrics.decode_rejects.labels("registry_sender").inc()
            log.warning("message_from_wrong_role", type=msg.TYPE, sender=sender)
        elif isinstance(msg, Output):
            self._on_output(msg)
        elif isinstance(msg, RequestError):
            self._on_error(msg)
        else:
            self.metrics.decode_rejects.labels("registry").inc()
            log.warning("unexpected_message", type=msg.TYPE)

    def _on_output(self, msg: Output) -> None:
        flight = self.tracker.requests.get(msg.request_id)
        if flight is None:
            return  # finished or cancelled already: a late duplicate
        new = self.tracker.on_output(msg)
        if new:
            self._observe_tokens(flight, len(new))
            logprobs = flight.logprobs[-len(new) :] if flight.top_logprobs >= 0 else []
            flight.queue.put_nowait(TokensEvent(new, logprobs))
        if flight.done:
            reason = flight.finish_reason or "stop"
            flight.queue.put_nowait(FinishEvent(reason, flight.summary()))
            # The target's final notice reaches drafters over PUB/SUB, which loses messages to a
            # subscriber still connecting (a very short request); release them reliably too.
            self._send_cancel(flight, "finished")
            self._end(msg.request_id, outcome=reason)

    def _observe_tokens(self, flight: Flight, count: int) -> None:
        """Time to first token; inter-token latency per token (a piece of several tokens, e.g.
        accepted drafts, spreads the gap since the previous piece over its tokens)."""
        now = time.monotonic()
        if flight.last_token_at is None:
            flight.first_token_at = now
            self.metrics.time_to_first_token.observe(now - flight.created)
        else:
            gap = (now - flight.last_token_at) / count
            for _ in range(count):
                self.metrics.inter_token_latency.observe(gap)
        flight.last_token_at = now

    def _on_error(self, msg: RequestError) -> None:
        flight = self.tracker.on_error(msg)
        if flight is not None:
            log.warning(
                "request_error",
                request_id=msg.request_id,
                stage_level=msg.level,
                replica=msg.replica,
                message=msg.message,
            )
            self._fail(msg.request_id, GenerationError(flight.error), outcome="error")

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
        self._fail_targetless()
        for level in range(self.settings.num_levels):
            live = self.registry.live(level)
            self.metrics.live_replicas.labels(str(level)).set(len(live))
            self.metrics.kv_cache_usage.labels(str(level)).set(
                max((r.heartbeat.kv_cache_usage_perc for r in live), default=0.0)
            )

    def _repair_routes(self, lost_ids: set[str]) -> None:
        """Move requests off lost replicas: to another replica of the same level where one is
        routable; otherwise the hop stays (a lost drafter: the levels above decode without its
        drafts; a lost target: the request waits for one, or times out)."""
        for req in list(self.tracker.requests.values()):
            broken = [
                hop
                for hop in req.route
                if hop.replica in lost_ids or not self.registry.is_live(hop.replica)
            ]
            if not broken:
                continue
            need = len(req.prompt) + req.max_tokens
            route = [self._replacement(hop, need) if hop in broken else hop for hop in req.route]
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

    def _replacement(self, hop: RouteHop, need: int) -> RouteHop:
        return self.registry.pick(hop.level, need) or hop

    def _fail_targetless(self) -> None:
        """Fail requests whose target has had no live replica for ``target_lost_timeout_s``
        (every target replica died): a clear error instead of waiting for the request timeout.
        A lost drafter never fails a request: the levels above decode without it."""
        now, limit = time.monotonic(), self.settings.target_lost_timeout_s
        for request_id, flight in list(self.tracker.requests.items()):
            if self.registry.is_live(flight.route[-1].replica):
                flight.target_lost_at = None
                continue
            if flight.target_lost_at is None:
                flight.target_lost_at = now
            elif now - flight.target_lost_at >= limit:
                log.warning("request_target_lost", request_id=request_id, limit_s=limit)
                self._fail(
                    request_id,
                    GenerationError(
                        f"the target level has had no live replica for {limit:g} s; "
                        f"{len(flight.tokens)} tokens were produced before it was lost"
                    ),
                    "error",
                )

    def _expire_requests(self) -> None:
        now, limit = time.monotonic(), self.settings.request_timeout_s
        for req in list(self.tracker.requests.values()):
            if now - req.created >= limit:
                log.warning(
                    "request_timed_out",
                    request_id=req.request_id,
                    tokens=len(req.tokens),
                    limit_s=limit,
                )
                self._fail(
                    req.request_id,
                    GenerationTimeout(f"request timed out after {limit:g} s"),
                    "timeout",
                )

    # -- ending requests -----------------------------------------------------------------------

    def _fail(self, request_id: str, error: GenerationError, outcome: str) -> None:
        flight = self.tracker.requests.get(request_id)
        if flight is None:
            return
        self._send_cancel(flight, outcome)
        flight.queue.put_nowait(error)
        self._end(request_id, outcome)

    def _end(self, request_id: str, outcome: str) -> None:
        req = self.tracker.remove(request_id)
        self.admission.release()
        m = self.metrics
        m.requests.labels(outcome).inc()
        m.requests_running.dec()
        m.prompt_tokens.inc(len(req.prompt))
        m.generation_tokens.inc(len(req.tokens))
        m.record_levels(req.stats, sampled=not req.sampling.greedy)
        m.e2e_latency.observe(time.monotonic() - req.created)
        log.info(
            "request_ended",
            request_id=request_id,
            outcome=outcome,
            tokens=len(req.tokens),
            resyncs=req.resyncs,
            wall_s=round(time.monotonic() - req.created, 3),
        )

    # -- sending -------------------------------------------------------------------------------

    def _send_cancel(self, flight: Flight, reason: str) -> None:
        msg = Cancel(request_id=flight.request_id, reason=reason)
        for hop in flight.route:
            self._send(hop, msg)

    def _send_all(self, sends: list[Send]) -> None:
        for hop, msg in sends:
            self._send(hop, msg)

    def _send(self, hop: RouteHop, msg: Message) -> None:
        if not self.registry.is_live(hop.replica):
            return  # lost: its replacement (if any) gets the request through _repair_routes
        if not self._pushes.send(hop.inbox, encode(msg), level_role(hop.level)):
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
            if inbox not in in_use:
                self._pushes.discard(inbox, linger_ms=0)  # nothing queued for a lost peer is useful
