"""The one ZeroMQ socket factory: which side binds, LINGER, high-water marks, the largest frame a
socket accepts, and CURVE.

Rule (zguide ch.2, "stable side binds"): sockets that receive from many dynamic peers bind
(PULL inboxes, PUB notice channels, the gateway's ROUTER); sockets that reach out connect (PUSH,
SUB, DEALER). On Kubernetes that means every replica binds its own ports and connects to peers by
the addresses they advertise.

Security (``common.security``): with a ``Curve`` identity, a bound socket is a CURVE server that
accepts only the roles in ``allow`` (checked by the context's ZAP authenticator, so a peer without
an allowed key never completes the handshake), and a connecting socket is a CURVE client of the
role ``server``. Without one (``insecure = true`` in the settings) sockets are plain TCP.
"""

from __future__ import annotations

import zmq

from common.security import Curve, guard_for

BINDS = {zmq.PULL, zmq.PUB, zmq.ROUTER, zmq.XPUB}
CONNECTS = {zmq.PUSH, zmq.SUB, zmq.DEALER, zmq.XSUB, zmq.REQ}
RECEIVES = {zmq.PULL, zmq.SUB, zmq.ROUTER, zmq.DEALER, zmq.XSUB, zmq.REQ}
DEFAULT_MAX_MSG_BYTES = 16 << 20
# bind hosts that mean "every interface": a socket bound to one is reached by another name
WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", ""})


def secure_server(sock: zmq.Socket, curve: Curve, allow: set[str]) -> None:
    """Make ``sock`` (not yet bound) a CURVE server accepting only the keys of ``allow``."""
    guard = guard_for(sock.context, curve)
    sock.setsockopt_string(zmq.ZAP_DOMAIN, guard.domain({curve.key_of(r) for r in allow}))
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, curve: Curve, server: str) -> None:
    """Make the next ``connect`` of ``sock`` a CURVE client of role ``server``. The server key
    is copied per connect, so one SUB may connect to servers of several roles."""
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_serverkey = curve.key_of(server)


def open_socket(
    ctx: zmq.Context,
    sock_type: int,
    endpoint: str | None,
    *,
    linger_ms: int = 500,
    hwm: int = 10_000,
    curve: Curve | None = None,
    allow: set[str] | None = None,
    server: str | None = None,
    max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES,
) -> zmq.Socket:
    """Create, configure and bind-or-connect a socket.

    ``endpoint`` may use port ``*`` or ``0`` when binding; read the real one back from
    ``sock.last_endpoint``; ``None`` leaves a connecting socket unconnected (a SUB that connects
    per route). LINGER is always set, so closing never hangs on unsent messages; receiving
    sockets drop the connection of a peer that sends a frame over ``max_msg_bytes``
    (ZMQ_MAXMSGSIZE) before holding it. With ``curve``, binding sockets need ``allow`` (roles)
    and connecting ones ``server`` (the role they connect to).
    """
    if sock_type not in BINDS | CONNECTS:
        raise ValueError(f"no bind/connect rule for socket type {sock_type}")
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if sock_type in RECEIVES:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    try:
        if sock_type in BINDS:
            if curve is not None:
                if allow is None:
                    raise ValueError("a CURVE server socket needs `allow`")
                secure_server(sock, curve, allow)
            sock.bind(endpoint.replace(":0", ":*") if endpoint.endswith(":0") else endpoint)
        else:
            # ZMTP heartbeats: notice a peer that vanished without closing (node loss) and reconnect
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            if curve is not None:
                if server is None and endpoint is not None:
                    raise ValueError("a CURVE client socket needs `server`")
                if server is not None:
                    secure_client(sock, curve, server)
            if endpoint is not None:
                sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


class PushPool:
    """PUSH sockets by peer endpoint, for a sender that reaches many peers: each socket is opened
    by ``open_socket`` on first use, with the pool's LINGER, high-water mark and CURVE identity,
    and ``close`` closes them all.

        pool = PushPool(ctx, linger_ms=500, hwm=10_000, curve=curve)
        if not pool.send("tcp://10.0.0.7:5601", frame, server="level1"):
            ...  # the peer's queue is full: the frame was dropped

    ``server`` is the CURVE role of the peer, used when its socket is opened. A socket that cannot
    be opened (a malformed endpoint, a role without a key) raises what ``open_socket`` raises
    (``zmq.ZMQError``, ``common.security.KeyError_``) and leaves nothing in the pool. Not
    thread-safe: one pool per thread, like the sockets themselves.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        linger_ms: int = 500,
        hwm: int = 10_000,
        curve: Curve | None = None,
    ):
        self.ctx, self.linger_ms, self.hwm, self.curve = ctx, linger_ms, hwm, curve
        self._socks: dict[str, zmq.Socket] = {}

    def socket(self, endpoint: str, server: str | None = None) -> zmq.Socket:
        """The PUSH socket connected to ``endpoint``, opened now if the pool has none."""
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = open_socket(
                self.ctx,
                zmq.PUSH,
                endpoint,
                linger_ms=self.linger_ms,
                hwm=self.hwm,
                curve=self.curve,
                server=server,
            )
            self._socks[endpoint] = sock
        return sock

    def send(self, endpoint: str, frame: bytes, server: str | None = None) -> bool:
        """Send ``frame`` to ``endpoint`` without blocking; False if it was dropped because the
        peer's queue (``hwm`` messages) is full."""
        try:
            self.socket(endpoint, server).send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def discard(self, endpoint: str, linger_ms: int | None = None) -> None:
        """Close the socket to ``endpoint``, if any (``linger_ms`` defaults to the pool's)."""
        sock = self._socks.pop(endpoint, None)
        if sock is not None:
            sock.close(linger=self.linger_ms if linger_ms is None else linger_ms)

    def retain(self, endpoints: set[str], linger_ms: int | None = None) -> None:
        """Close every socket whose endpoint is not in ``endpoints``."""
        for endpoint in set(self._socks) - set(endpoints):
            self.discard(endpoint, linger_ms)

    def endpoints(self) -> list[str]:
        return list(self._socks)

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._socks

    def __len__(self) -> int:
        return len(self._socks)

    def close(self, linger_ms: int | None = None) -> None:
        """Close every socket (``linger_ms`` defaults to the pool's); the pool stays usable."""
        for endpoint in list(self._socks):
            self.discard(endpoint, linger_ms)


def bound_endpoint(sock: zmq.Socket, advertise_host: str | None = None) -> str:
    """The endpoint peers should connect to (wildcard host replaced by ``advertise_host``)."""
    ep = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if advertise_host:
        scheme, rest = ep.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        ep = f"{scheme}://{advertise_host}:{port}"
    return ep


RECEIVE_POLL_MS = 100  # an async receive loop re-checks its socket at least this often


async def arrivals(sock: zmq.Socket, multipart: bool = False, poll_ms: int = RECEIVE_POLL_MS):
    """Every message ``sock`` (a ``zmq.asyncio`` socket) receives, for as long as the caller
    iterates: one ``zmq.Frame``, or a list of bytes frames when ``multipart``.

    It waits with a timeout and then reads without blocking until the socket is empty.
    ZeroMQ's readiness signal is edge-triggered; a single awaited ``recv()`` that misses an
    edge sleeps forever while messages pile up (seen at start-up, when stages that started
    first deliver a burst of queued heartbeats)."""
    while True:
        await sock.poll(poll_ms, zmq.POLLIN)
        while True:
            try:
                if multipart:
                    yield await sock.recv_multipart(zmq.NOBLOCK)
                else:
                    yield await sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
