"""An in-process network with a virtual clock that delays, reorders, duplicates and drops
messages, for running real StageEngines and a RequestTracker together deterministically.

Each stage is a node that, like the real service, drains the messages that arrived while it was
busy, then runs one forward pass that takes ``cost`` virtual seconds; what a pass sends leaves
when the pass ends. Every message goes through the real codec (encode, then decode).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from common.codec import decode, encode
from common.protocol import Message, Notice, Output, RequestError, RouteHop, Span
from common.request_tracker import RequestTracker, TrackedRequest
from common.stage_engine import StageEngine

GATEWAY = "gateway"


@dataclass
class Faults:
    drop: float = 0.0  # probability a message is lost
    duplicate: float = 0.0  # probability it is delivered twice
    max_delay: float = 0.0  # uniform extra delay in virtual seconds (reorders messages)


class FakeNetwork:
    def __init__(self, rng: random.Random, faults: Faults):
        self.rng, self.faults = rng, faults
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.inboxes: dict[str, list[Message]] = {}
        self.on_arrival: dict[str, Callable[[], None]] = {}
        self.subscribers: dict[tuple[str, str], set[str]] = {}  # (publisher, request) -> nodes
        self.sent = self.dropped = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, fn))

    def send(self, dest: str, msg: Message, depart: Optional[float] = None) -> None:
        self.sent += 1
        if self.rng.random() < self.faults.drop:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        frame = encode(msg)
        for _ in range(copies):
            when = (self.now if depart is None else depart) + self.rng.uniform(0, self.faults.max_delay)
            self.at(when, lambda f=frame: self._deliver(dest, decode(f)))

    def _deliver(self, dest: str, msg: Message) -> None:
        self.inboxes.setdefault(dest, []).append(msg)
        wake = self.on_arrival.get(dest)
        if wake:
            wake()

    def run_until(self, done: Callable[[], bool], max_time: float, max_events: int = 2_000_000) -> bool:
        n = 0
        while self._events and not done():
            when, _, fn = heapq.heappop(self._events)
            if when > max_time or n >= max_events:
                return False
            self.now = max(self.now, when)
            fn()
            n += 1
        return done()


class FakeOutbox:
    """The Outbox of one stage node."""

    def __init__(self, net: FakeNetwork, node: str):
        self.net, self.node = net, node
        self.depart: Optional[float] = None  # set while a pass runs: its end time

    def send_span(self, hop: RouteHop, span: Span) -> None:
        self.net.send(hop.replica, span, self.depart)

    def publish(self, notice: Notice) -> None:
        for sub in sorted(self.net.subscribers.get((self.node, notice.request_id), ())):
            self.net.send(sub, notice, self.depart)

    def send_reply(self, endpoint: str, msg: Output | RequestError) -> None:
        self.net.send(endpoint, msg, self.depart)

    def subscribe(self, request_id: str, hops: list[RouteHop]) -> None:
        self.unsubscribe(request_id)
        for hop in hops:
            self.net.subscribers.setdefault((hop.replica, request_id), set()).add(self.node)

    def unsubscribe(self, request_id: str) -> None:
        for (pub, rid), subs in self.net.subscribers.items():
            if rid == request_id:
                subs.discard(self.node)


class StageNode:
    """Runs one engine on the fake network: drain, one pass of ``cost()`` seconds, repeat."""

    def __init__(self, net: FakeNetwork, engine: StageEngine, outbox: FakeOutbox,
                 cost: Callable[[], float], tick_every: float):  # fmt: skip
        self.net, self.engine, self.outbox, self.cost = net, engine, outbox, cost
        self.busy = False
        self.tick_every = tick_every
        net.on_arrival[engine.replica] = self._wake_if_idle
        net.at(tick_every, self._tick)

    def _wake_if_idle(self) -> None:
        if not self.busy:
            self.busy = True
            self.net.at(self.net.now, self._run)

    def _run(self) -> None:
        for msg in self.net.inboxes.pop(self.engine.replica, []):
            self.engine.handle(msg)
        if not self.engine.has_work():
            self.busy = False
            return
        end = self.net.now + self.cost()
        self.outbox.depart = end
        self.engine.step()
        self.outbox.depart = None
        self.net.at(end, self._run)

    def _tick(self) -> None:
        self.engine.tick()
        self.net.at(self.net.now + self.tick_every, self._tick)


class GatewayNode:
    """The RequestTracker on the fake network, re-syncing every ``tick_every``."""

    def __init__(self, net: FakeNetwork, tracker: RequestTracker, tick_every: float):
        self.net, self.tracker, self.tick_every = net, tracker, tick_every
        self.errors: list[RequestError] = []
        net.on_arrival[GATEWAY] = self._drain
        net.at(tick_every, self._tick)

    def submit(self, req: TrackedRequest) -> None:
        for hop, start in self.tracker.add(req):
            self.net.send(hop.replica, start)

    def _drain(self) -> None:
        for msg in self.net.inboxes.pop(GATEWAY, []):
            if isinstance(msg, Output):
                self.tracker.on_output(msg)
            elif isinstance(msg, RequestError):
                self.errors.append(msg)
                self.tracker.on_error(msg)

    def _tick(self) -> None:
        for hop, start in self.tracker.due():
            self.net.send(hop.replica, start)
        self.net.at(self.net.now + self.tick_every, self._tick)


@dataclass
class Hierarchy:
    """A whole system on one fake network: one engine per level plus the gateway's tracker."""

    net: FakeNetwork
    gateway: GatewayNode
    nodes: list[StageNode] = field(default_factory=list)

    @property
    def route(self) -> list[RouteHop]:
        return [RouteHop(level=i, replica=n.engine.replica, inbox=n.engine.replica,
                         notices=n.engine.replica) for i, n in enumerate(self.nodes)]  # fmt: skip
