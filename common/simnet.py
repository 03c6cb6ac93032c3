"""A discrete-event network with a virtual clock, for running real StageEngines and a
RequestTracker together, deterministically for a seed.

Two uses: the tests' fake transport, which delays, reorders, duplicates and drops messages; and
the *ideal schedule* of the benchmarks: the same algorithm with zero communication and scheduling
overhead, where a pass takes exactly what the simulated backend says it costs.

Each stage is a node that, like the real service, drains the messages that arrived while it was
busy, then runs one forward pass; the pass lasts the virtual time the backend spent in ``sleep``
(simulated backends made with the network's ``spend``) plus ``cost()``; what a pass sends leaves
when the pass ends. Every message goes through the real codec (encode, then decode).

:func:`build` is the one place that wires such a system (tests and benchmarks alike).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from common.backends.batched import BatchedBackend, Run
from common.codec import decode, encode
from common.decoding import apply_stop
from common.engine_config import EngineConfig
from common.protocol import Message, Notice, Output, RequestError, RouteHop, Span
from common.request_tracker import RequestTracker, TrackedRequest
from common.sampling import GREEDY, Chooser, SamplingParams
from common.stage_engine import PassObserver, StageEngine

GATEWAY = "gateway"

Sleep = Callable[[float], None]  # a simulated backend's sleep: seconds -> None


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
        self.spent = 0.0  # virtual seconds the current pass spent in backends' sleep

    def spend(self, seconds: float) -> None:
        """A simulated backend's ``sleep``: advances the running pass, not the wall clock."""
        self.spent += seconds

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, fn))

    def send(self, dest: str, msg: Message, depart: float | None = None) -> None:
        self.sent += 1
        if self.rng.random() < self.faults.drop:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        frame = encode(msg)
        for _ in range(copies):
            when = (self.now if depart is None else depart) + self.rng.uniform(
                0, self.faults.max_delay
            )
            self.at(when, lambda f=frame: self._deliver(dest, decode(f)))

    def _deliver(self, dest: str, msg: Message) -> None:
        self.inboxes.setdefault(dest, []).append(msg)
        wake = self.on_arrival.get(dest)
        if wake:
            wake()

    def run_until(
        self, done: Callable[[], bool], max_time: float, max_events: int = 2_000_000
    ) -> bool:
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
        self._held: list[tuple[str, Message]] | None = None  # sends of the running pass

    def hold(self) -> None:
        """Keep what the pass sends until it ends (its duration is known only then)."""
        self._held = []

    def release(self, depart: float) -> None:
        held, self._held = self._held or [], None
        for dest, msg in held:
            self.net.send(dest, msg, depart)

    def _send(self, dest: str, msg: Message) -> None:
        if self._held is not None:
            self._held.append((dest, msg))
        else:
            self.net.send(dest, msg)

    def send_span(self, hop: RouteHop, span: Span) -> None:
        self._send(hop.replica, span)

    def publish(self, notice: Notice) -> None:
        for sub in sorted(self.net.subscribers.get((self.node, notice.request_id), ())):
            self._send(sub, notice)

    def send_reply(self, endpoint: str, msg: Output | RequestError) -> None:
        self._send(endpoint, msg)

    def subscribe(self, request_id: str, hops: list[RouteHop]) -> None:
        self.unsubscribe(request_id)
        for hop in hops:
            self.net.subscribers.setdefault((hop.replica, request_id), set()).add(self.node)

    def unsubscribe(self, request_id: str) -> None:
        for (_pub, rid), subs in self.net.subscribers.items():
            if rid == request_id:
                subs.discard(self.node)


class PassLog(PassObserver):
    """What a node's batched passes carried: passes, requests summed over them, the largest."""

    def __init__(self):
        self.passes = self.requests = self.most_requests = 0

    def on_batch(self, requests: int, tokens: int) -> None:
        self.passes += 1
        self.requests += requests
        self.most_requests = max(self.most_requests, requests)


class StageNode:
    """Runs one engine on the network: drain, one pass, repeat. ``passes``: what they carried."""

    def __init__(
        self,
        net: FakeNetwork,
        engine: StageEngine,
        outbox: FakeOutbox,
        cost: Callable[[], float],
        tick_every: float,
        passes: PassLog,
    ):
        self.net, self.engine, self.outbox, self.cost = net, engine, outbox, cost
        self.passes = passes
        self.busy = False
        self.busy_s = 0.0  # virtual seconds spent in passes
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
        self.net.spent = 0.0
        self.outbox.hold()
        if not self.engine.step():  # no request wants a pass (step sent nothing)
            self.outbox.release(depart=self.net.now)
            self.busy = False
            return
        cost = self.cost()
        end = self.net.now + self.net.spent + cost
        self.busy_s += self.net.spent + cost
        self.outbox.release(depart=end)
        self.net.at(end, self._run)

    def _tick(self) -> None:
        self.engine.tick()
        self._wake_if_idle()  # time-based conditions (sync waits) need a look now and then
        self.net.at(self.net.now + self.tick_every, self._tick)


class GatewayNode:
    """The RequestTracker on the fake network, re-syncing every ``tick_every``."""

    def __init__(self, net: FakeNetwork, tracker: RequestTracker, tick_every: float):
        self.net, self.tracker, self.tick_every = net, tracker, tick_every
        self.errors: list[RequestError] = []
        self.first_output_at: dict[str, float] = {}  # request id -> virtual time of 1st token
        net.on_arrival[GATEWAY] = self._drain
        net.at(tick_every, self._tick)

    def submit(self, req: TrackedRequest) -> None:
        for hop, start in self.tracker.add(req):
            self.net.send(hop.replica, start)

    def _drain(self) -> None:
        for msg in self.net.inboxes.pop(GATEWAY, []):
            if isinstance(msg, Output):
                if self.tracker.on_output(msg):
                    self.first_output_at.setdefault(msg.request_id, self.net.now)
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
        return [
            RouteHop(
                level=i, replica=n.engine.replica, inbox=n.engine.replica, notices=n.engine.replica
            )
            for i, n in enumerate(self.nodes)
        ]


def reference_decode(
    backend: BatchedBackend,
    prompt: list[int],
    max_tokens: int,
    eos: Sequence[int],
    sampling: SamplingParams = GREEDY,
) -> list[int]:
    """The reference decoder: the target alone, one token per pass, with the same processors and
    noise as every level (``common.sampling``). What every run must reproduce exactly. A batched
    backend decodes the request alone in its own pool (padded as in every pass): the oracle of
    batched serving."""
    b = backend
    rid = ("reference", id(prompt))
    b.open(rid, len(prompt) + max_tokens)
    try:
        if len(prompt) > 1:
            b.step([Run(rid, prompt[:-1], rows=0)])
        tokens: list[int] = []
        last = prompt[-1]
        while True:
            got = b.step([Run(rid, [last])])[rid]
            if sampling.greedy or got.logits is None:
                last = got.greedy[0]
            else:
                last = Chooser(sampling, first_position=len(tokens))(got.logits)[0]
            tokens.append(last)
            tokens, finish = apply_stop(tokens, eos, max_tokens)
            if finish:
                return tokens
    finally:
        b.close(rid)


def greedy_reference(
    backend: BatchedBackend, prompt: list[int], max_tokens: int, eos: Sequence[int]
) -> list[int]:
    """The target's greedy output, one token per step."""
    return reference_decode(backend, prompt, max_tokens, eos)


def default_engine(resend_after: float = 40.0) -> EngineConfig:
    """What :func:`build`'s engines get unless told otherwise: a short lead (8 tokens), windows of
    at most 16 drafts, and timers far beyond a run (50 and 100 times ``resend_after``)."""
    return EngineConfig(
        level=0,
        max_lead=8,
        max_verify_tokens=16,
        request_ttl_s=50 * resend_after,
        done_retention_s=100 * resend_after,
    )


def build(
    backends: Sequence[BatchedBackend | Callable[[Sleep], BatchedBackend]],
    costs: Sequence[float] | None = None,
    seed: int = 0,
    faults: Faults = Faults(),
    jitter: float = 0.5,
    resend_after: float = 40.0,
    config: EngineConfig | Sequence[EngineConfig] | None = None,
    tick_every: float | None = None,
) -> Hierarchy:
    """One engine per backend (level = index) on one network.

    ``backends``: a backend, or a function that makes one given the network's virtual ``sleep`` (a simulated backend made
    so spends virtual time, and its passes last that long).
    ``costs``: virtual seconds per pass for each level, varied by +-``jitter`` at random, on top
    of what the backend sleeps; each engine's republish interval is then its level's pass.
    Without ``costs``, a pass lasts only what its backend sleeps: the ideal schedule.
    ``config``: the engines' config, one for every level or one per level; each gets ``level`` =
    its index (default :func:`default_engine`). ``resend_after``: virtual seconds before the
    gateway re-sends to a silent request (it checks every quarter of that). ``tick_every``:
    virtual seconds between a node's timer ticks (drafter TTLs, sync waits); default
    ``resend_after``. What a run measured is on the result: ``h.net.now`` (virtual seconds),
    each node's ``busy_s``, the gateway's ``first_output_at``.
    """
    rng = random.Random(seed)
    net = FakeNetwork(rng, faults)
    tracker = RequestTracker(resend_after_s=resend_after, clock=lambda: net.now)
    h = Hierarchy(net=net, gateway=GatewayNode(net, tracker, tick_every=resend_after / 4))
    if config is None:
        config = default_engine(resend_after)
    configs = [config] * len(backends) if isinstance(config, EngineConfig) else list(config)
    if len(configs) != len(backends):
        raise ValueError(f"{len(configs)} engine configs for {len(backends)} levels")
    tick = resend_after if tick_every is None else tick_every
    for level, (made, level_config) in enumerate(zip(backends, configs)):
        backend = made if isinstance(made, BatchedBackend) else made(net.spend)
        level_config = replace(level_config, level=level)
        if costs is None:
            cost: Callable[[], float] = lambda: 0.0  # noqa: E731
        else:
            c = costs[level]
            cost = lambda c=c: c * (1 + rng.uniform(-jitter, jitter))  # noqa: E731
            level_config = replace(level_config, republish_interval_s=c)
        replica = f"L{level}"
        outbox = FakeOutbox(net, replica)
        passes = PassLog()
        engine = StageEngine(
            level_config, backend, outbox, replica, clock=lambda: net.now, observer=passes
        )
        h.nodes.append(StageNode(net, engine, outbox, cost=cost, tick_every=tick, passes=passes))
    return h


def run_request(
    h: Hierarchy,
    prompt: list[int],
    max_tokens: int,
    eos: Sequence[int] = (),
    request_id: str = "r0",
    max_time: float = 1e6,
    sampling: SamplingParams = GREEDY,
) -> TrackedRequest | None:
    """Submit one request and run the network until it is done; None if it hangs."""
    done = run_requests(
        h, [RequestSpec(prompt, max_tokens, eos, sampling)], max_time, ids=[request_id]
    )
    return done[0]


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    eos: Sequence[int] = ()
    sampling: SamplingParams = GREEDY


def run_requests(
    h: Hierarchy,
    specs: Sequence[RequestSpec],
    max_time: float = 1e6,
    ids: Sequence[str] | None = None,
) -> list[TrackedRequest | None]:
    """Submit every request at once (ids ``r0``, ``r1``, ... unless given) and run the network
    until all are done; a request that did not finish by ``max_time`` comes back as None."""
    reqs = [
        TrackedRequest(
            request_id=ids[i] if ids else f"r{i}",
            prompt=list(spec.prompt),
            max_tokens=spec.max_tokens,
            eos_ids=list(spec.eos),
            route=h.route,
            reply_to=GATEWAY,
            created=h.net.now,
            sampling=spec.sampling,
        )
        for i, spec in enumerate(specs)
    ]
    for req in reqs:
        h.gateway.submit(req)
    h.net.run_until(lambda: all(req.done for req in reqs), max_time=max_time)
    return [req if req.done else None for req in reqs]
