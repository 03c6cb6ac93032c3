"""The socket factory's security: CURVE allow-lists per bound socket, the sender's role on every
frame, and ZMQ_MAXMSGSIZE on receiving sockets; the pool of PUSH sockets (real sockets on
loopback)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from common.security import (
    Curve,
    KeyError_,
    generate,
    identity,
    load_curve,
    release,
    secret_file,
    sender_role,
)
from common.sockets import PushPool, arrivals, open_socket, secure_client


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("keys"), levels=2)


def curve(keys, role: str) -> Curve:
    return load_curve(role, keys / "public", secret_file(keys, role))


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    release(context)
    context.destroy(linger=0)


def pull(ctx, server: Curve | None, allow: set[str], **kw) -> tuple[zmq.Socket, str]:
    sock = open_socket(
        ctx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0, curve=server, allow=allow, **kw
    )
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def received(sock: zmq.Socket, timeout_ms: int = 1500) -> zmq.Frame | None:
    return sock.recv(copy=False) if sock.poll(timeout_ms) else None


def test_an_allowed_key_gets_through_and_its_role_is_on_the_frame(keys, ctx):
    inbox, endpoint = pull(ctx, curve(keys, "level1"), {"gateway", "level0"})
    push = open_socket(
        ctx, zmq.PUSH, endpoint, linger_ms=0, curve=curve(keys, "level0"), server="level1"
    )
    push.send(b"span")
    frame = received(inbox)
    assert frame is not None and frame.bytes == b"span"
    assert sender_role(frame) == "level0"


@pytest.mark.parametrize("who", ["plain", "unknown key", "key not on the list"])
def test_other_peers_never_complete_the_handshake(keys, ctx, who):
    inbox, endpoint = pull(ctx, curve(keys, "level1"), {"gateway"})
    if who == "plain":
        client = None
    elif who == "unknown key":
        public, secret = zmq.curve_keypair()
        client = Curve("stranger", public, secret, curve(keys, "gateway").peers)
    else:
        client = curve(keys, "level0")  # a real key, but level 1's inbox takes only the gateway
    push = open_socket(
        ctx, zmq.PUSH, endpoint, linger_ms=0, curve=client, server="level1" if client else None
    )
    for _ in range(3):
        try:
            push.send(b"start", zmq.NOBLOCK)
        except zmq.Again:
            pass
    assert received(inbox, 1000) is None


def test_a_frame_over_max_msg_bytes_is_never_delivered(ctx):
    inbox, endpoint = pull(ctx, None, set(), max_msg_bytes=1024)
    push = open_socket(ctx, zmq.PUSH, endpoint, linger_ms=0)
    push.send(b"x" * 2048)
    assert received(inbox, 500) is None  # the connection was dropped instead
    push2 = open_socket(ctx, zmq.PUSH, endpoint, linger_ms=0)
    push2.send(b"y" * 1000)
    frame = received(inbox)
    assert frame is not None and frame.bytes == b"y" * 1000


def test_one_sub_connects_to_servers_of_different_roles(keys, ctx):
    publishers = {}
    for role in ("level1", "level0"):
        sock = open_socket(
            ctx,
            zmq.PUB,
            "tcp://127.0.0.1:0",
            linger_ms=0,
            curve=curve(keys, role),
            allow={"gateway"},
        )
        publishers[role] = sock
    sub = open_socket(ctx, zmq.SUB, None, linger_ms=0, curve=curve(keys, "gateway"))
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for role, sock in publishers.items():
        secure_client(sub, curve(keys, "gateway"), role)
        sub.connect(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    got = set()
    for _ in range(40):
        for role, sock in publishers.items():
            sock.send(role.encode())
        while sub.poll(50):
            got.add(sub.recv())
        if len(got) == 2:
            break
    assert got == {b"level0", b"level1"}


def test_a_service_without_keys_refuses_to_start_unless_insecure(keys):
    with pytest.raises(KeyError_, match="insecure = true"):
        identity("level0", insecure=False, public_keys=None, secret_key=None)
    with pytest.raises(KeyError_, match="not the key of role"):
        identity("level0", False, str(keys / "public"), str(secret_file(keys, "level1")))
    assert identity("level0", insecure=True, public_keys=None, secret_key=None) is None


@pytest.mark.parametrize("multipart", [False, True])
def test_arrivals_yields_every_message_of_a_burst_queued_before_it_started(multipart):
    """The shape that stalled the gateway's registry loop: a burst already queued when the
    loop first waits, then a late straggler. Every message must come out, in order."""

    async def scenario() -> list[bytes]:
        actx = zmq.asyncio.Context()
        sink = open_socket(actx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0)
        source = open_socket(actx, zmq.PUSH, sink.getsockopt_string(zmq.LAST_ENDPOINT))
        for i in range(200):
            await source.send(b"%d" % i)
        await asyncio.sleep(0.3)  # the burst sits in the queue before anyone reads
        got: list[bytes] = []

        async def straggler() -> None:
            await asyncio.sleep(0.5)
            await source.send(b"200")

        late = asyncio.create_task(straggler())
        async for message in arrivals(sink, multipart=multipart, poll_ms=50):
            got.append(message[0] if multipart else message.bytes)
            if len(got) == 201:
                break
        await late
        source.close(linger=0)
        sink.close(linger=0)
        actx.term()
        return got

    got = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    assert got == [b"%d" % i for i in range(201)]


def unused_endpoint(ctx) -> str:
    sock = open_socket(ctx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    return endpoint


def test_the_push_pool_opens_one_secure_socket_per_endpoint(keys, ctx):
    inboxes = [pull(ctx, curve(keys, "level1"), {"gateway"}) for _ in range(2)]
    pool = PushPool(ctx, linger_ms=0, curve=curve(keys, "gateway"))
    for i in range(3):
        for n, (_, endpoint) in enumerate(inboxes):
            assert pool.send(endpoint, b"%d-%d" % (n, i), server="level1")
    assert len(pool) == 2 and sorted(pool.endpoints()) == sorted(e for _, e in inboxes)
    endpoint = inboxes[0][1]
    assert pool.socket(endpoint) is pool.socket(endpoint, "level1")
    for n, (inbox, _) in enumerate(inboxes):
        frames = [received(inbox) for _ in range(3)]
        assert [f.bytes for f in frames] == [b"%d-%d" % (n, i) for i in range(3)]
        assert {sender_role(f) for f in frames} == {"gateway"}
    pool.close()


def test_the_push_pool_uses_its_options(ctx):
    pool = PushPool(ctx, linger_ms=7, hwm=3)
    sock = pool.socket(unused_endpoint(ctx))
    assert sock.socket_type == zmq.PUSH
    assert (sock.getsockopt(zmq.LINGER), sock.getsockopt(zmq.SNDHWM)) == (7, 3)
    pool.close(linger_ms=0)


def test_a_push_pool_send_to_a_full_peer_is_a_drop_not_a_block(ctx):
    pool = PushPool(ctx, linger_ms=0, hwm=2)
    endpoint = unused_endpoint(ctx)  # nobody reads: the queue fills at the high-water mark
    sent = [pool.send(endpoint, b"x") for _ in range(20)]
    assert sent[0] and not sent[-1]
    pool.close()


def test_a_push_pool_keeps_no_socket_it_could_not_open(keys, ctx):
    pool = PushPool(ctx, linger_ms=0, curve=curve(keys, "gateway"))
    with pytest.raises(zmq.ZMQError):
        pool.send("not an endpoint", b"x", server="level0")
    with pytest.raises(KeyError_):
        pool.send(unused_endpoint(ctx), b"x", server="level9")  # no key for that role
    assert len(pool) == 0


def test_the_push_pool_closes_what_it_is_told_to(ctx):
    pool = PushPool(ctx, linger_ms=0)
    a, b, c = (unused_endpoint(ctx) for _ in range(3))
    socks = {ep: pool.socket(ep) for ep in (a, b, c)}
    pool.retain({a, b})
    assert sorted(pool.endpoints()) == sorted([a, b]) and socks[c].closed
    pool.discard(a)
    pool.discard("tcp://127.0.0.1:1")  # not in the pool: nothing to do
    assert pool.endpoints() == [b] and a not in pool and b in pool and socks[a].closed
    pool.close()
    assert len(pool) == 0 and socks[b].closed
    assert pool.send(a, b"x")  # still usable: opens a fresh socket
    assert pool.socket(a) is not socks[a]
    pool.close()
