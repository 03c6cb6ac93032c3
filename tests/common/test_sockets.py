"""The socket factory's security: CURVE allow-lists per bound socket, the sender's role on every
frame, and ZMQ_MAXMSGSIZE on receiving sockets (real sockets on loopback)."""

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
from common.sockets import arrivals, open_socket, secure_client


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
