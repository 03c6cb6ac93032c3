"""Build a whole PipeSpec system on the fake network, and the reference it must reproduce."""

from __future__ import annotations

import random
from typing import Optional, Sequence

from common.backends.base import Backend
from common.decoding import apply_stop
from common.request_tracker import RequestTracker, TrackedRequest
from common.settings import StageSettings
from common.stage_engine import StageEngine
from tests.fakes.network import GATEWAY, Faults, FakeNetwork, FakeOutbox, GatewayNode, Hierarchy, StageNode


def greedy_reference(backend: Backend, prompt: list[int], max_tokens: int, eos: Sequence[int]) -> list[int]:
    """The target alone, one token per step: what every run must reproduce exactly."""
    session = backend.new_session(prompt[:-1])
    tokens: list[int] = []
    last = prompt[-1]
    while True:
        last = session.forward([last])[0]
        tokens.append(last)
        tokens, finish = apply_stop(tokens, eos, max_tokens)
        if finish:
            return tokens


def build(
    backends: Sequence[Backend],
    costs: Sequence[float],
    seed: int,
    faults: Faults = Faults(),
    jitter: float = 0.5,
    max_lead: int = 8,
    max_verify_tokens: int = 16,
    resend_after: float = 40.0,
) -> Hierarchy:
    """One engine per backend (level = index); pass costs vary by +-``jitter`` at random."""
    rng = random.Random(seed)
    net = FakeNetwork(rng, faults)
    tracker = RequestTracker(resend_after_s=resend_after, clock=lambda: net.now)
    h = Hierarchy(net=net, gateway=GatewayNode(net, tracker, tick_every=resend_after / 4))
    for level, (backend, cost) in enumerate(zip(backends, costs)):
        settings = StageSettings(level=level, backend="simulated", max_lead=max_lead,
                                 max_verify_tokens=max_verify_tokens, request_ttl_s=50 * resend_after,
                                 done_retention_s=100 * resend_after)  # fmt: skip
        replica = f"L{level}"
        outbox = FakeOutbox(net, replica)
        engine = StageEngine(settings, backend, outbox, replica, clock=lambda: net.now,
                             republish_interval_s=cost)  # fmt: skip
        c = cost
        h.nodes.append(StageNode(net, engine, outbox,
                                 cost=lambda c=c: c * (1 + rng.uniform(-jitter, jitter)),
                                 tick_every=resend_after))  # fmt: skip
    return h


def run_request(
    h: Hierarchy, prompt: list[int], max_tokens: int, eos: Sequence[int] = (),
    request_id: str = "r0", max_time: float = 1e6,
) -> Optional[TrackedRequest]:  # fmt: skip
    """Submit one request and run the network until it is done; None if it hangs."""
    req = TrackedRequest(request_id=request_id, prompt=list(prompt), max_tokens=max_tokens,
                         eos_ids=list(eos), route=h.route, reply_to=GATEWAY, created=h.net.now)  # fmt: skip
    h.gateway.submit(req)
    ok = h.net.run_until(lambda: req.done, max_time=max_time)
    return req if ok else None
