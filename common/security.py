"""Who may talk to whom on ZeroMQ: CURVE keypairs per role and pyzmq's ZAP authenticator.

Roles: ``gateway``, ``level0`` … ``levelN`` (every replica of a level shares its level's key) and
``client`` (ZMQ client-API users). Every bound socket is a CURVE server that accepts only the
roles listed for it (``common.sockets.open_socket(..., allow=...)``); every connecting socket is
a CURVE client that proves its role's key and checks the server's. After the handshake each frame
carries its sender's role as the ZAP User-Id (``sender_role``), which the registry uses to accept a
heartbeat for level L only from level L's key.

Key layout, made by ``python -m common.security generate DIR --levels K`` (``DIR`` must not hold
keys yet; rotate by generating a new set and rolling every process)::

    DIR/public/<role>.key              every role's public key (not secret; mounted everywhere)
    DIR/<role>/<role>.key_secret       that role's secret key (mount only into that role)

For Kubernetes, ``python -m common.security k8s --levels K [--from DIR] | kubectl apply -f -``
prints the ConfigMap ``pipespec-public-keys`` and one Secret per role, ``pipespec-keys-gateway``
and ``pipespec-keys-level-<N>`` (file ``key_secret``), which k8s/ mounts (a new set each run
unless ``--from`` names one; keep the ``client`` key printed on stderr for ZMQ-API clients).
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = structlog.get_logger("security")

GATEWAY = "gateway"
CLIENT = "client"
KEYGEN_COMMAND = "python -m common.security generate DIR --levels K"


def level_role(level: int) -> str:
    """The role of every replica of ``level``.

    >>> level_role(2)
    'level2'
    """
    return f"level{level}"


def roles_for(levels: int) -> list[str]:
    """Every role of a hierarchy of ``levels`` levels.

    >>> roles_for(2)
    ['gateway', 'client', 'level0', 'level1']
    """
    return [GATEWAY, CLIENT, *(level_role(i) for i in range(levels))]


class KeyError_(ValueError):
    """Keys are missing or do not match; the message says what to do."""


@dataclass(frozen=True)
class Curve:
    """One process's CURVE identity: its role, its keypair and every role's public key."""

    role: str
    public: bytes  # z85
    secret: bytes  # z85
    peers: dict[str, bytes]  # role -> z85 public key

    def key_of(self, role: str) -> bytes:
        try:
            return self.peers[role]
        except KeyError:
            raise KeyError_(f"no public key for role {role!r} among {sorted(self.peers)}") from None

    def role_of(self, public_key: str | bytes) -> str | None:
        key = public_key.encode() if isinstance(public_key, str) else public_key
        return next((role for role, k in self.peers.items() if k == key), None)


def load_curve(role: str, public_dir: str | Path, secret_file: str | Path) -> Curve:
    """The identity of ``role`` from the key layout above; KeyError_ naming what is wrong."""
    public_dir, secret_file = Path(public_dir), Path(secret_file)
    if not public_dir.is_dir():
        raise KeyError_(f"public key directory {public_dir} does not exist ({KEYGEN_COMMAND})")
    peers = {p.stem: zmq.auth.load_certificate(p)[0] for p in sorted(public_dir.glob("*.key"))}
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read secret key {secret_file}: {exc} ({KEYGEN_COMMAND})") from None
    if secret is None:
        raise KeyError_(f"{secret_file} holds no secret key")
    if peers.get(role) != public:
        raise KeyError_(
            f"{secret_file} is not the key of role {role!r} listed in {public_dir}/{role}.key"
        )
    return Curve(role, public, secret, peers)


def identity(
    role: str, insecure: bool, public_keys: str | None, secret_key: str | None
) -> Curve | None:
    """A service's identity from its settings: None (plain TCP) only when ``insecure``."""
    if insecure:
        log.warning(
            "insecure_transport",
            role=role,
            detail="plain TCP: any peer that reaches these ports can register, read prompts "
            "and inject messages",
        )
        return None
    if not public_keys or not secret_key:
        raise KeyError_(
            f"{role}: CURVE keys are required: set public_keys and secret_key (make them with "
            f"`{KEYGEN_COMMAND}`), or insecure = true for plain TCP"
        )
    return load_curve(role, public_keys, secret_key)


def generate(directory: str | Path, levels: int) -> Path:
    """Write a fresh key set for a hierarchy of ``levels`` levels; returns ``directory``."""
    directory = Path(directory)
    public = directory / "public"
    if public.exists() and any(public.iterdir()):
        raise KeyError_(f"{public} already holds keys: generate into a new directory")
    public.mkdir(parents=True, exist_ok=True)
    for role in roles_for(levels):
        own = directory / role
        own.mkdir(mode=0o700, exist_ok=True)
        pub_file, secret_file = zmq.auth.create_certificates(own, role)
        Path(pub_file).rename(public / f"{role}.key")
        Path(secret_file).chmod(0o600)
    return directory


def secret_file(directory: str | Path, role: str) -> Path:
    return Path(directory) / role / f"{role}.key_secret"


# -- the authenticator -------------------------------------------------------------------------


class _AllowList:
    """ZAP callback: which public keys a ZAP domain (one per server socket) accepts."""

    def __init__(self) -> None:
        self.domains: dict[str, set[bytes]] = {}
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.domains.get(domain, ())
        if not ok:
            self.denied += 1
            log.warning("curve_peer_denied", domain=domain, total_denied=self.denied)
        return ok


class _RoleAuthenticator(ThreadAuthenticator):
    """pyzmq's thread authenticator whose ZAP User-Id is the peer's role, not its raw key."""

    def __init__(self, ctx: zmq.Context, curve: Curve):
        super().__init__(zmq.Context.shadow(ctx.underlying))
        self.curve = curve

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.curve.role_of(z85.encode(client_public_key)) or "unknown"


class Guard:
    """One authenticator per ZMQ context; each server socket gets its own ZAP domain."""

    def __init__(self, ctx: zmq.Context, curve: Curve):
        self.allow = _AllowList()
        self.auth = _RoleAuthenticator(ctx, curve)
        self.auth.start()
        self._lock = threading.Lock()
        self._next = 0

    def domain(self, keys: set[bytes]) -> str:
        with self._lock:
            self._next += 1
            name = f"pipespec-{self._next}"
            self.allow.domains[name] = set(keys)
        self.auth.configure_curve_callback(name, credentials_provider=self.allow)
        return name

    def stop(self) -> None:
        self.auth.stop()


_guards: dict[int, Guard] = {}
_guards_lock = threading.Lock()


def guard_for(ctx: zmq.Context, curve: Curve) -> Guard:
    with _guards_lock:
        guard = _guards.get(ctx.underlying)
        if guard is None:
            guard = _guards[ctx.underlying] = Guard(ctx, curve)
        return guard


def denied_total(ctx: zmq.Context) -> int:
    """Handshakes refused so far on this context's server sockets."""
    guard = _guards.get(ctx.underlying)
    return guard.allow.denied if guard is not None else 0


def release(ctx: zmq.Context) -> None:
    """Stop the context's authenticator (before ``ctx.term()``, which would wait for it)."""
    with _guards_lock:
        guard = _guards.pop(ctx.underlying, None)
    if guard is not None:
        guard.stop()


def sender_role(frame: zmq.Frame) -> str | None:
    """The role whose key sent ``frame`` (ZAP User-Id), or None on a plain (insecure) socket."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


K8S_NAMESPACE = "pipespec"


def k8s_secret_name(role: str) -> str:
    """The Kubernetes Secret holding ``role``'s keypair.

    >>> k8s_secret_name("level1"), k8s_secret_name("gateway")
    ('pipespec-keys-level-1', 'pipespec-keys-gateway')
    """
    return (
        f"pipespec-keys-level-{role[len('level') :]}"
        if role.startswith("level")
        else (f"pipespec-keys-{role}")
    )


def k8s_manifests(directory: str | Path, levels: int, namespace: str = K8S_NAMESPACE) -> list:
    """The ConfigMap of public keys and one Secret per mounted role, as dicts."""
    directory = Path(directory)
    meta = {"namespace": namespace, "labels": {"app.kubernetes.io/part-of": "pipespec"}}
    public = {p.name: p.read_text() for p in sorted((directory / "public").glob("*.key"))}
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "pipespec-public-keys", **meta},
            "data": public,
        }
    ]
    for role in roles_for(levels):
        if role == CLIENT:
            continue  # not mounted: handed to trusted ZMQ-API clients
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": k8s_secret_name(role), **meta},
                "type": "Opaque",
                "stringData": {"key_secret": secret_file(directory, role).read_text()},
            }
        )
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.security",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a fresh key set")
    gen.add_argument("directory", type=Path)
    gen.add_argument("--levels", type=int, required=True, help="levels in the hierarchy (k)")
    k8s = sub.add_parser("k8s", help="print the key Secrets and ConfigMap for k8s/")
    k8s.add_argument("--levels", type=int, required=True, help="levels in the hierarchy (k)")
    k8s.add_argument("--from", dest="source", type=Path, help="an existing key set")
    k8s.add_argument("--namespace", default=K8S_NAMESPACE)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            generate(args.directory, args.levels)
            print(f"keys for {', '.join(roles_for(args.levels))} in {args.directory}")
            return 0
        import json
        import tempfile

        source = args.source or generate(tempfile.mkdtemp(prefix="pipespec-keys-"), args.levels)
        for doc in k8s_manifests(source, args.levels, args.namespace):
            print("---")
            print(json.dumps(doc, indent=1))
        print(
            f"client keys (for ZMQ-API clients): {source}/public, {source}/client", file=sys.stderr
        )
    except KeyError_ as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
