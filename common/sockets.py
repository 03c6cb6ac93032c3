"""The one ZeroMQ socket factory: which side binds, LINGER and high-water marks.

Rule (zguide ch.2, "stable side binds"): sockets that receive from many dynamic peers bind
(PULL inboxes, PUB notice channels, the gateway's ROUTER); sockets that reach out connect (PUSH,
SUB, DEALER). On Kubernetes that means every replica binds its own ports and connects to peers by
the addresses they advertise.
"""

from __future__ import annotations

import zmq

BINDS = {zmq.PULL, zmq.PUB, zmq.ROUTER, zmq.XPUB}
CONNECTS = {zmq.PUSH, zmq.SUB, zmq.DEALER, zmq.XSUB, zmq.REQ}


def open_socket(
    ctx: zmq.Context,
    sock_type: int,
    endpoint: str,
    *,
    linger_ms: int = 500,
    hwm: int = 10_000,
) -> zmq.Socket:
    """Create, configure and bind-or-connect a socket.

    ``endpoint`` may use port ``*`` or ``0`` when binding; read the real one back from
    ``sock.last_endpoint``. LINGER is always set, so closing never hangs on unsent messages.
    """
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if sock_type in BINDS:
        sock.bind(endpoint.replace(":0", ":*") if endpoint.endswith(":0") else endpoint)
    elif sock_type in CONNECTS:
        # ZMTP heartbeats: notice a peer that vanished without closing (node loss) and reconnect
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        sock.connect(endpoint)
    else:
        sock.close(linger=0)
        raise ValueError(f"no bind/connect rule for socket type {sock_type}")
    return sock


def bound_endpoint(sock: zmq.Socket, advertise_host: str | None = None) -> str:
    """The endpoint peers should connect to (wildcard host replaced by ``advertise_host``)."""
    ep = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if advertise_host:
        scheme, rest = ep.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        ep = f"{scheme}://{advertise_host}:{port}"
    return ep
