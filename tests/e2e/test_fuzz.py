"""Fuzzing every ZeroMQ socket of a running system (launcher, CURVE keys) with hypothesis while
good requests run: random bytes, valid msgpack that is not a protocol message, and well-formed
messages with nonsense in them (foreign request ids, wrong levels, out-of-vocabulary tokens, a
route naming the real replica).

* From a peer without an allowed key (plain TCP, and CURVE with an unknown key): the handshake
  stops everything; nothing reaches a codec, and the denied-handshake counters rise.
* From a peer holding an allowed key (the gateway's for stage inboxes, a level's for the registry
  and for the PUB socket above it, the client's for the client API): the codec and the engine
  are reached and their reject counters on /metrics rise.

No process dies, and every good completion stays the target's greedy output.

Not fuzzed: a stage's SUB socket (it connects only to the notice channels of its route's upper
levels, which a peer reaches only by being on the route: the gateway's key).
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codec import encode
from common.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Cancel,
    Heartbeat,
    Notice,
    RouteHop,
    Span,
    Start,
)
from common.security import Curve, load_curve, release, secret_file
from common.sockets import open_socket
from deploy.harness import complete
from deploy.launch import free_port
from tests.harness import GreedyOracle, launched
from tests.harness import config as e2e_config
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow
EXAMPLES = 100  # per socket and peer
MAX_TOKENS = 12
GOOD_PROMPTS = ["w5 w6 w7 w5 w6", "w30 w31 w32", "w9 w9 w9 w10"]
FIELDS = sorted({name for cls in MESSAGE_TYPES.values() for name in cls.model_fields})

# -- strategies ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# valid msgpack, wrong message: right or wrong version and tag, real field names, any values
wrong_maps = st.builds(
    lambda v, t, fields: msgpack.packb({"v": v, "t": t, **fields}, use_bin_type=True),
    # the current version mostly (so the message checks are reached), and wrong ones
    st.sampled_from([PROTOCOL_VERSION] * 3 + [0, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION)]),
    st.sampled_from([*MESSAGE_TYPES, "bogus", ""]),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
)
any_msgpack = values.map(lambda v: msgpack.packb(v, use_bin_type=True))
random_bytes = st.binary(max_size=3000)
small = st.integers(0, 40)
token = st.integers(0, 2**31 - 1)  # far beyond the tiny vocabulary, too
rid = st.text("abcdef0123456789", min_size=1, max_size=8).map(lambda s: f"fuzz-{s}")
SINKS = ["tcp://127.0.0.1:9", "tcp://127.0.0.1:11"]
# level 0, sent with level 1's key: the registry must refuse it
WRONG_LEVEL_HEARTBEAT = Heartbeat(
    replica="fuzz-L0", incarnation="fuzz", level=0, inbox=SINKS[0], notices=SINKS[1], ready=True
)


def hops(real: dict[int, str], sink: str) -> st.SearchStrategy[list[RouteHop]]:
    """Routes of 0-3 hops; sometimes naming a stage's real replica so the engine takes it."""

    def hop(level: int) -> st.SearchStrategy[RouteHop]:
        return st.builds(
            RouteHop,
            level=st.just(level),
            replica=st.sampled_from([real.get(level, "nobody"), "nobody"]),
            inbox=st.sampled_from(SINKS),
            notices=st.sampled_from(SINKS),
        )

    return st.integers(0, 3).flatmap(lambda n: st.tuples(*(hop(i) for i in range(n))).map(list))


def messages(real: dict[int, str], sink: str) -> st.SearchStrategy[bytes]:
    """Well-formed protocol messages with nonsense in them."""
    start = st.builds(
        Start,
        request_id=rid,
        prompt=st.lists(token, max_size=6),
        committed=st.lists(token, max_size=3),
        have=small,
        max_tokens=st.integers(1, 6),
        eos_ids=st.lists(token, max_size=2),
        route=hops(real, sink),
        reply_to=st.just(sink),
    )
    span = st.builds(
        Span,
        request_id=rid,
        level=small,
        replica=st.text(max_size=8),
        start=small,
        tokens=st.lists(token, max_size=8),
        base_epoch=small,
        epoch=small,
    )
    notice = st.builds(
        Notice,
        request_id=rid,
        level=small,
        replica=st.text(max_size=8),
        start=small,
        tokens=st.lists(token, max_size=8),
        epoch=small,
        rollback=st.booleans(),
        final=st.booleans(),
    )
    cancel = st.builds(Cancel, request_id=rid, reason=st.text(max_size=10))
    heartbeat = st.builds(  # level 0 from any other key: the registry must refuse it
        Heartbeat,
        replica=st.text(max_size=8),
        incarnation=st.text(max_size=8),
        level=st.just(0),
        inbox=st.sampled_from(SINKS),
        notices=st.sampled_from(SINKS),
        ready=st.booleans(),
    )
    return st.one_of(start, span, notice, cancel, heartbeat).map(encode)


def frames(real: dict[int, str], sink: str, authenticated: bool) -> st.SearchStrategy[bytes]:
    kinds = [random_bytes, any_msgpack, wrong_maps]
    return st.one_of(*kinds, messages(real, sink)) if authenticated else st.one_of(*kinds)


# -- the system ------------------------------------------------------------------------------


def scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def stranger(peers: dict[str, bytes]) -> Curve:
    public, secret = zmq.curve_keypair()
    return Curve("stranger", public, secret, peers)


def test_fuzz_every_socket_while_good_requests_run(tmp_path):
    target = str(tiny_llama(tmp_path / "target"))
    drafter = str(tiny_llama(tmp_path / "drafter", seed=5))
    ports = {0: free_port(), 1: free_port()}
    stages = [
        {"level": 0, "backend": "hf", "model": drafter, "metrics_port": ports[0]},
        {"level": 1, "backend": "hf", "model": target, "metrics_port": ports[1]},
    ]
    oracle = GreedyOracle(target)
    want = {p: oracle.text(oracle.ids(p, MAX_TOKENS)) for p in GOOD_PROMPTS}
    good: list[bool] = []
    stop = threading.Event()

    def good_client() -> None:
        n = 0
        while not stop.is_set():
            prompt = GOOD_PROMPTS[n % len(GOOD_PROMPTS)]
            n += 1
            text = complete(plan, prompt, MAX_TOKENS, timeout_s=120)["choices"][0]["text"]
            good.append(text == want[prompt])

    with launched(e2e_config(target, stages), tmp_path / "logs") as system:
        plan = system.plan
        keys = plan.keys_dir
        health = httpx.get(f"{plan.http_url}/health", timeout=5).json()
        real = {lv: health["levels"][lv][0]["replica"] for lv in (0, 1)}
        inbox = {lv: _endpoint(system, lv, "inbox") for lv in (0, 1)}
        notices = {lv: _endpoint(system, lv, "notices") for lv in (0, 1)}
        registry = f"tcp://127.0.0.1:{plan.gateway.registry_port}"

        def curve(role: str) -> Curve:
            return load_curve(role, keys / "public", secret_file(keys, role))

        gateway_key = curve("gateway")
        # socket under test: (name, endpoint, type we send with, server role, allowed key)
        targets = [
            ("registry", registry, zmq.PUSH, "gateway", curve("level1")),
            ("client-api", plan.client_endpoint, zmq.DEALER, "gateway", curve("client")),
            ("inbox-L0", inbox[0], zmq.PUSH, "level0", gateway_key),
            ("inbox-L1", inbox[1], zmq.PUSH, "level1", gateway_key),
            ("notices-L1", notices[1], zmq.XSUB, "level1", curve("level0")),
        ]
        ctx = zmq.Context()
        sink = open_socket(
            ctx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0, curve=gateway_key, allow={"level1"}
        )
        sink_ep = sink.getsockopt_string(zmq.LAST_ENDPOINT)
        before = counters(plan, ports)
        clients = [threading.Thread(target=good_client) for _ in range(2)]
        for t in clients:
            t.start()
        try:
            for authenticated in (False, True):
                for name, endpoint, kind, server, key in targets:
                    peers = [key] if authenticated else [None, stranger(key.peers)]
                    for peer in peers:
                        sock = open_socket(
                            ctx, kind, endpoint, linger_ms=0, hwm=100_000, curve=peer,
                            server=server if peer else None,
                        )  # fmt: skip
                        fuzz(sock, frames(real, sink_ep, authenticated))
                        if authenticated and name == "registry":
                            # whether the fuzz drew a heartbeat is chance: send one for sure
                            sock.send(encode(WRONG_LEVEL_HEARTBEAT))
                        time.sleep(0.3)
                        sock.close(linger=0)
                if not authenticated:
                    time.sleep(1.0)
                    mid = counters(plan, ports)
            time.sleep(2.0)
            after = counters(plan, ports)
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=150)
            sink.close(linger=0)
            release(ctx)
            ctx.destroy(linger=0)
        alive = [c.spec.name for c in system.children if c.process.poll() is None]
    print(f"\nfuzz: counters before {before}\n  after unauthenticated {mid}\n  after all {after}")
    print(f"  good requests: {len(good)}, exact {sum(good)}")
    assert alive == [c.spec.name for c in system.children], "a process died"
    # unauthenticated: the handshake stopped everything; no codec saw a frame
    assert mid["denied"] > before["denied"], (before, mid)
    assert mid["decoded_rejects"] == before["decoded_rejects"], (before, mid)
    # authenticated: codecs and engines were reached, and counted what they refused
    assert after["decoded_rejects"] > mid["decoded_rejects"] + EXAMPLES, (mid, after)
    assert after["rejected_starts"] > mid["rejected_starts"] == before["rejected_starts"], (
        before,
        mid,
        after,
    )
    assert after["heartbeats_rejected"] > mid["heartbeats_rejected"], (mid, after)
    assert good and all(good), f"{good.count(False)} of {len(good)} good requests were wrong"


def fuzz(sock: zmq.Socket, strategy: st.SearchStrategy[bytes]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def send(frame: bytes) -> None:
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # no handshake (the point, for a stranger) or a full queue

    send()


def counters(plan, ports: dict[int, int]) -> dict[str, float]:
    gateway = plan.http_url

    def gw(name: str) -> float:
        text = httpx.get(f"{gateway}/metrics", timeout=5).text
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found)

    return {
        "denied": gw("pipespec:denied_handshakes_total")
        + sum(scrape(p, "pipespec:stage_denied_handshakes_total") for p in ports.values()),
        "decoded_rejects": gw("pipespec:decode_rejects_total")
        + gw("pipespec:rejected_requests_total")
        + sum(scrape(p, "pipespec:stage_rejected_frames_total") for p in ports.values()),
        # Starts the engine refused (foreign routes, bad hops): only the fuzzer sends those
        "rejected_starts": sum(
            scrape(p, f'pipespec:stage_engine_events_total{{level="{lv}",reason="rejected_start"}}')
            for lv, p in ports.items()
        ),
        "heartbeats_rejected": gw("pipespec:heartbeats_rejected_total"),
    }


def _endpoint(system, level: int, which: str) -> str:
    """A stage's bound endpoint from its log line ``stage_ready ... inbox=... notices=...``."""
    child = next(c for c in system.children if c.spec.role == f"level{level}")
    match = re.search(rf"stage_ready .*{which}=(\S+)", child.log_path.read_text())
    assert match, child.tail()
    return match.group(1)
