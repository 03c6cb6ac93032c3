"""The stage service: a StageEngine behind ZeroMQ sockets, one process per model replica.

Sockets (see common.sockets for the bind/connect rule):
  inbox    PULL, bound    Start/Cancel from the gateway, Span from the level below
  notices  PUB,  bound    Notice to lower levels; topic = request id + NUL
  sub      SUB,  connects to the notices of the upper levels on each request's route
  push     PUSH, connects one per peer endpoint (common.sockets.PushPool): spans up, outputs and
           heartbeats to the gateway
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid

import structlog
import zmq

from common.backends.batched import BatchedBackend
from common.codec import DecodeError, decode, encode
from common.protocol import Heartbeat, Message, Notice, Output, RequestError, RouteHop, Span
from common.security import (
    GATEWAY,
    Curve,
    KeyError_,
    denied_total,
    identity,
    level_role,
    release,
)
from common.settings import StageSettings
from common.sockets import PushPool, bound_endpoint, open_socket, secure_client
from common.stage_engine import StageEngine
from services.stage.metrics import LoopWatch, StageMetrics, serve_http

log = structlog.get_logger("stage")
DRAIN_LIMIT = 10_000  # messages handled between two passes, at most


RESOLVE_EVERY_S = 5.0  # how often the gateway's addresses are looked up again


def gateway_endpoints(settings: StageSettings) -> list[str]:
    """Where heartbeats go: the configured gateway endpoint, or, with ``gateway_all_addresses``,
    one endpoint per address its host resolves to (every pod of a headless Service).

    >>> gateway_endpoints(StageSettings(level=0, backend="ngram", gateway="tcp://localhost:5550",
    ...                                 gateway_all_addresses=True))
    ['tcp://127.0.0.1:5550']
    """
    if not settings.gateway_all_addresses:
        return [settings.gateway]
    scheme, rest = settings.gateway.split("://", 1)
    host, port = rest.rsplit(":", 1)
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return [settings.gateway]  # not resolvable now: keep trying the name itself
    return [f"{scheme}://{ip}:{port}" for ip in sorted({info[4][0] for info in infos})]


def topic(request_id: str) -> bytes:
    return request_id.encode() + b"\0"


class ZmqOutbox:
    """The engine's Outbox over real sockets. Sends never block: a full or absent peer costs a
    counted drop, which the protocol repairs (state-based messages, re-sync)."""

    def __init__(
        self,
        ctx: zmq.Context,
        settings: StageSettings,
        notices: zmq.Socket,
        sub: zmq.Socket,
        curve: Curve | None = None,
    ):
        self.settings, self.notices, self.sub, self.curve = settings, notices, sub, curve
        self.pushes = PushPool(ctx, linger_ms=settings.linger_ms, hwm=settings.hwm, curve=curve)
        self.sub_connected: set[str] = set()
        self.subscribed: set[str] = set()
        self.dropped = 0
        self.bad_peers = 0  # endpoints it could not connect to (malformed, unknown role)

    def _push(self, endpoint: str, msg: Message, server: str) -> None:
        try:
            sent = self.pushes.send(endpoint, encode(msg), server)
        except (zmq.ZMQError, KeyError_) as exc:  # a malformed endpoint or unknown role
            self.bad_peers += 1
            log.warning("peer_refused", endpoint=endpoint, role=server, reason=str(exc))
            return
        if not sent:
            self.dropped += 1

    def send_span(self, hop: RouteHop, span: Span) -> None:
        self._push(hop.inbox, span, level_role(hop.level))

    def send_reply(self, endpoint: str, msg: Output | RequestError | Heartbeat) -> None:
        self._push(endpoint, msg, GATEWAY)

    def publish(self, notice: Notice) -> None:
        self.notices.send_multipart([topic(notice.request_id), encode(notice)])

    def subscribe(self, request_id: str, hops: list[RouteHop]) -> None:
        for hop in hops:
            if hop.notices not in self.sub_connected:
                try:
                    if self.curve is not None:
                        secure_client(self.sub, self.curve, level_role(hop.level))
                    self.sub.connect(hop.notices)
                except (zmq.ZMQError, KeyError_) as exc:
                    self.bad_peers += 1
                    log.warning("peer_refused", endpoint=hop.notices, reason=str(exc))
                    continue
                self.sub_connected.add(hop.notices)
        if request_id not in self.subscribed:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic(request_id))
            self.subscribed.add(request_id)

    def unsubscribe(self, request_id: str) -> None:
        if request_id in self.subscribed:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic(request_id))
            self.subscribed.discard(request_id)

    def close(self) -> None:
        self.pushes.close()


class StageService:
    def __init__(self, settings: StageSettings, backend: BatchedBackend):
        self.settings = settings
        self.backend = backend
        # Identity: ``replica`` names the replica (stable across restarts of one pod);
        # ``incarnation`` changes on every process start. The gateway refuses a second
        # incarnation under a live replica's id until the first has expired.
        self.replica = f"{settings.replica_id}-L{settings.level}"
        self.incarnation = uuid.uuid4().hex
        self.ctx = zmq.Context()
        s = settings
        self.curve = identity(level_role(s.level), s.insecure, s.public_keys, s.secret_key)
        below = {level_role(level) for level in range(s.level)}
        common = dict(
            linger_ms=s.linger_ms, hwm=s.hwm, curve=self.curve, max_msg_bytes=s.max_message_bytes
        )
        # Start/Cancel come from the gateway, spans from the level below; notices go down.
        inbox_from = {GATEWAY} | ({level_role(s.level - 1)} if s.level else set())
        self.inbox = open_socket(
            self.ctx,
            zmq.PULL,
            f"tcp://{s.bind_host}:{s.inbox_port or '*'}",
            allow=inbox_from,
            **common,
        )
        self.notices = open_socket(
            self.ctx,
            zmq.PUB,
            f"tcp://{s.bind_host}:{s.notices_port or '*'}",
            allow=below,
            **common,
        )
        self.sub = open_socket(self.ctx, zmq.SUB, None, **common)  # connects per route
        host = s.advertise_host or s.bind_host
        self.inbox_endpoint = bound_endpoint(self.inbox, host)
        self.notices_endpoint = bound_endpoint(self.notices, host)
        self.outbox = ZmqOutbox(self.ctx, s, self.notices, self.sub, self.curve)
        self.metrics = StageMetrics(s.level)
        self.metrics.watch(
            engine_counters=lambda: self.engine.counters,
            dropped_sends=lambda: self.outbox.dropped + self.outbox.bad_peers,
            denied_handshakes=lambda: denied_total(self.ctx),
        )
        self.engine = StageEngine(
            s.engine_config(),
            backend,
            self.outbox,
            self.replica,
            observer=self.metrics,
            set_threads=_torch_threads if s.threads_alone else None,
        )
        self.kv = self._sample_kv()  # (used, capacity, waiting), refreshed by the main loop
        self.watch = LoopWatch(s.liveness_timeout_s)
        self.http = None
        if s.metrics_port is not None:
            self.http = serve_http(
                self.metrics,
                s.bind_host,
                s.metrics_port,
                live=self.watch.alive,
                ready=lambda: not self.engine.draining,
            )
        self.rejected_frames = 0
        self.running = True
        self.drain_deadline: float | None = None
        self._beating = threading.Event()

    def _heartbeat_loop(self) -> None:
        """Heartbeats from their own thread and sockets, so a long forward pass does not make the
        stage look dead; ``ready`` still turns false if the main loop stops beating. With
        ``gateway_all_addresses``, one socket per gateway replica, re-resolved every few seconds."""
        socks = PushPool(self.ctx, linger_ms=0, hwm=16, curve=self.curve)
        next_resolve = 0.0
        try:
            while self._beating.is_set():
                if time.monotonic() >= next_resolve:
                    wanted = set(gateway_endpoints(self.settings))
                    socks.retain(wanted)
                    for ep in wanted:
                        socks.socket(ep, GATEWAY)
                    next_resolve = time.monotonic() + RESOLVE_EVERY_S
                frame = encode(self.heartbeat())
                for ep in socks.endpoints():
                    socks.send(ep, frame)  # a full queue drops a heartbeat; the next one follows
                time.sleep(self.settings.heartbeat_interval_s)
        finally:
            socks.close()

    def heartbeat(self) -> Heartbeat:
        b = self.backend
        used, capacity, waiting = self.kv
        return Heartbeat(
            replica=self.replica,
            incarnation=self.incarnation,
            level=self.settings.level,
            inbox=self.inbox_endpoint,
            notices=self.notices_endpoint,
            ready=self.watch.alive(),
            draining=self.engine.draining,
            active_requests=len(self.engine.requests),
            model=b.name,
            backend=b.kind,
            can_verify=b.can_verify,
            can_target=b.can_target,
            tokenizer_fingerprint=b.tokenizer_fingerprint,
            max_context=b.max_context,
            restarts=self.settings.restarts,
            kv_used_tokens=used,
            kv_capacity_tokens=capacity,
            waiting_requests=waiting,
        )

    def _sample(self) -> None:
        """Each heartbeat interval, on the main loop: the gauges, and the KV figures that the
        heartbeat thread sends."""
        self.metrics.active_requests.set(len(self.engine.requests))
        self.metrics.queue_depth.set(self.engine.queue_depth())
        self.kv = self._sample_kv()
        self.metrics.set_kv(*self.kv)

    def _sample_kv(self) -> tuple[int, int, int]:
        """The engine's KV pool: (reserved tokens, capacity tokens (0: unbounded), requests
        waiting for room). Read on the main loop only: the heartbeat
        thread reads the copy in ``self.kv``, never the engine's pool while a pass changes it."""
        usage = self.engine.kv_usage()
        return usage.used_tokens, usage.capacity_tokens, self.engine.waiting_for_kv()

    def _drain(self, sock: zmq.Socket, multipart: bool) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frame = (
                    sock.recv_multipart(zmq.NOBLOCK)[-1] if multipart else sock.recv(zmq.NOBLOCK)
                )
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except DecodeError as exc:
                self.rejected_frames += 1
                self.metrics.rejected_frames.inc()
                log.warning(
                    "frame_rejected",
                    reason=str(exc),
                    bytes=len(frame),
                    total_rejected=self.rejected_frames,
                )
                continue
            self.engine.handle(msg)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        log.info(
            "stage_ready",
            replica=self.replica,
            level=self.settings.level,
            inbox=self.inbox_endpoint,
            notices=self.notices_endpoint,
            model=self.backend.name,
            backend=self.backend.kind,
            device=self.settings.device,
            dtype=self.settings.dtype,
            secure=self.curve is not None,
            restarts=self.settings.restarts,
        )
        interval = self.settings.heartbeat_interval_s
        next_beat = 0.0
        self._beating.set()
        beats = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beats.start()
        while self.running:
            now = time.monotonic()
            self.watch.beat()
            if now >= next_beat:
                self.engine.tick()
                self._sample()
                next_beat = now + interval
            if self.drain_deadline is not None:
                # Only requests this stage is the target of must finish: drafts are speculative,
                # and the target of a drafter's request goes on without it (or the gateway moves it).
                owned = self.engine.target_requests()
                if not owned or now >= self.drain_deadline:
                    log.info(
                        "stage_drained",
                        unfinished=owned,
                        speculative=len(self.engine.requests) - owned,
                    )
                    break
            busy = self.engine.has_work()
            timeout_ms = 0 if busy else max(1, min(50, int((next_beat - now) * 1000)))
            ready = dict(poller.poll(timeout_ms))
            if self.inbox in ready:
                self._drain(self.inbox, multipart=False)
            if self.sub in ready:
                self._drain(self.sub, multipart=True)
            self.engine.step()
        self._beating.clear()
        beats.join(timeout=2 * interval + 1)
        self.close()

    def _stop(self, signum, frame) -> None:
        """First SIGTERM: drain (take no new requests, finish in-flight ones, at most
        drain_timeout_s; the gateway moves what is left). SIGINT or a second signal: stop now."""
        if (
            signum == signal.SIGTERM
            and self.drain_deadline is None
            and self.settings.drain_timeout_s > 0
        ):
            self.engine.draining = True
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            log.info(
                "stage_draining",
                active_requests=len(self.engine.requests),
                timeout_s=self.settings.drain_timeout_s,
            )
            return
        log.info("stage_stopping", signal=signum)
        self.running = False

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
        self.outbox.close()
        for sock in (self.inbox, self.notices, self.sub):
            sock.close(linger=self.settings.linger_ms)
        release(self.ctx)
        self.ctx.term()
        log.info("stage_stopped", replica=self.replica)


def _torch_threads(n: int) -> None:
    """The cores rule's switch (only stages that run torch set ``threads_alone``)."""
    import torch

    torch.set_num_threads(n)
