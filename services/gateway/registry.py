"""Which stage replicas exist, which are alive, and which one of each level serves a new request.

Pure bookkeeping with an injected clock (no sockets): the gateway feeds it every ``Heartbeat``
and asks it for routes. A replica is *live* while its last heartbeat is younger than
``heartbeat_timeout_s``; *routable* when it is also ready and not draining. Load is what the
replica last reported (``active_requests``) plus the requests routed to it since that heartbeat.

Who may register (with CURVE, ``sender`` is the role whose key sent the heartbeat): a heartbeat
for level L only from level L's key; a live replica's id only by the incarnation that registered
it (another one waits until the first expires); and no replica faster than one heartbeat per
``min_heartbeat_interval_s``. Those heartbeats are dropped without touching the registered
replica and counted by reason in ``rejected``.

KV memory (in token positions): a replica's *free KV* is its reported capacity minus what it
reported used, minus the need of the requests routed to it since that heartbeat; a capacity of 0
means unbounded. A request's *need* is prompt + max_tokens (what a stage reserves). Routing never
sends a request to a replica whose capacity is below its need (it could never start there), and
among the others prefers one with room now (see ``routing_key``); it never refuses for want of
free KV: a stage queues such a request until room frees.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from common.protocol import Heartbeat, RouteHop
from common.security import level_role

log = structlog.get_logger("gateway.registry")


class NoRoute(Exception):
    """Some level has no routable replica; ``str(exc)`` says which and why."""


@dataclass
class Replica:
    heartbeat: Heartbeat  # the latest one
    last_seen: float
    assigned: int = 0  # requests routed here since ``heartbeat``
    assigned_kv: int = 0  # their KV need, in positions

    @property
    def id(self) -> str:
        return self.heartbeat.replica

    @property
    def level(self) -> int:
        return self.heartbeat.level

    @property
    def load(self) -> int:
        return self.heartbeat.active_requests + self.assigned

    @property
    def routable(self) -> bool:
        return self.heartbeat.ready and not self.heartbeat.draining

    @property
    def kv_capacity(self) -> int:
        """KV positions the replica's pool holds; 0 = unbounded or not reported."""
        return self.heartbeat.kv_capacity_tokens

    @property
    def kv_free(self) -> int | None:
        """KV positions free for new requests (may be negative: over-assigned); None = unbounded."""
        hb = self.heartbeat
        if not hb.kv_capacity_tokens:
            return None
        return hb.kv_capacity_tokens - hb.kv_used_tokens - self.assigned_kv

    def fits(self, need: int | None) -> bool:
        """Whether a request needing ``need`` positions could ever run here (None: unknown)."""
        return need is None or not self.kv_capacity or need <= self.kv_capacity

    def hop(self) -> RouteHop:
        hb = self.heartbeat
        return RouteHop(level=hb.level, replica=hb.replica, inbox=hb.inbox, notices=hb.notices)

    def describe(self) -> dict:
        hb = self.heartbeat
        return {
            "replica": hb.replica,
            "level": hb.level,
            "model": hb.model,
            "backend": hb.backend,
            "ready": hb.ready,
            "draining": hb.draining,
            "load": self.load,
            "max_context": hb.max_context,
            "restarts": hb.restarts,
            "kv_used_tokens": hb.kv_used_tokens,
            "kv_capacity_tokens": hb.kv_capacity_tokens,  # 0: unbounded / not reported
            "kv_cache_usage_perc": round(hb.kv_cache_usage_perc, 4),
            "waiting_requests": hb.waiting_requests,
        }


def routing_key(load: int, kv_free: int | None, need: int | None) -> tuple:
    """Sort key of a replica for a new request, best first: one with room for the request now
    (``kv_free`` >= ``need``; None = unbounded, always room; an unknown need counts as room), then
    the least loaded, then the one with the most free KV.

    >>> candidates = {"busy": (3, 900), "full": (1, 20), "roomy": (1, 600), "free": (1, None)}
    >>> sorted(candidates, key=lambda c: routing_key(*candidates[c], need=64))
    ['free', 'roomy', 'busy', 'full']
    >>> sorted(candidates, key=lambda c: routing_key(*candidates[c], need=None))
    ['free', 'roomy', 'full', 'busy']
    """
    free = float("inf") if kv_free is None else kv_free
    room_now = need is None or free >= need
    return (not room_now, load, -free)


@dataclass
class Refusal:
    reason: str
    last_seen: float


class ReplicaRegistry:
    def __init__(
        self,
        num_levels: int,
        tokenizer_fingerprint: str | None,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        min_heartbeat_interval_s: float = 0.0,
    ):
        self.num_levels = num_levels
        self.target_level = num_levels - 1
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.min_heartbeat_interval_s = min_heartbeat_interval_s
        self.clock = clock
        self.rejected: dict[str, int] = {}  # heartbeats dropped unheard, by reason
        self._logged: set[tuple[str, str]] = set()
        self.replicas: dict[str, Replica] = {}
        self.refusals: dict[str, Refusal] = {}  # replica id -> why its heartbeats are refused
        self.refused_total = 0  # distinct refusals (one per replica and reason)
        self._died: list[Replica] = []  # reported by the next ``reap``

    # -- heartbeats ----------------------------------------------------------------------------

    def apply(self, hb: Heartbeat, sender: str | None = None) -> bool:
        """Register or refresh a replica. False if it is refused (see ``refusal_reason``) or
        rejected (see ``rejection``). ``sender``: the role of the key that sent it (None: plain
        TCP, nothing to check)."""
        now = self.clock()
        rejection = self.rejection(hb, sender, now)
        if rejection is not None:
            self._reject(hb, sender, rejection)
            return False
        reason = self.refusal_reason(hb)
        if reason is not None:
            self._refuse(hb, reason, now)
            return False
        self.refusals.pop(hb.replica, None)
        known = self.replicas.get(hb.replica)
        if known is not None and (known.heartbeat.incarnation, known.level) != (
            hb.incarnation,
            hb.level,
        ):
            self._forget(known, why="restarted")  # its requests must be re-sent to the new one
            known = None
        if known is None:
            self.replicas[hb.replica] = Replica(hb, now)
            log.info(
                "replica_registered",
                replica=hb.replica,
                stage_level=hb.level,
                model=hb.model,
                backend=hb.backend,
                inbox=hb.inbox,
                ready=hb.ready,
            )
        else:
            known.heartbeat, known.last_seen, known.assigned, known.assigned_kv = hb, now, 0, 0
        return True

    def rejection(self, hb: Heartbeat, sender: str | None, now: float) -> str | None:
        """Why ``hb`` must be dropped without a word to the registered replica, or None.

        >>> r = ReplicaRegistry(2, None, 3.0, clock=lambda: 10.0)
        >>> hb = Heartbeat(replica="a", incarnation="1", level=1, inbox="", notices="", ready=True)
        >>> r.rejection(hb, "level0", 10.0)
        'wrong_key'
        >>> r.replicas["a"] = Replica(hb, last_seen=10.0)
        >>> r.rejection(hb.model_copy(update={"incarnation": "2"}), "level1", 11.0)
        'takeover'
        >>> r.rejection(hb.model_copy(update={"incarnation": "2"}), "level1", 13.0)  # expired
        """
        if sender is not None and sender != level_role(hb.level):
            return "wrong_key"
        known = self.replicas.get(hb.replica)
        if known is None or now - known.last_seen >= self.heartbeat_timeout_s:
            return None
        if (known.heartbeat.incarnation, known.level) != (hb.incarnation, hb.level):
            return "takeover"
        if now - known.last_seen < self.min_heartbeat_interval_s:
            return "too_fast"
        return None

    def _reject(self, hb: Heartbeat, sender: str | None, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        if (hb.replica, why) not in self._logged:  # once per replica and reason: no log flood
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged.add((hb.replica, why))
            log.warning(
                "heartbeat_rejected",
                replica=hb.replica,
                incarnation=hb.incarnation,
                stage_level=hb.level,
                sender=sender,
                why=why,
            )

    def refusal_reason(self, hb: Heartbeat) -> str | None:
        if hb.level >= self.num_levels:
            return f"level {hb.level} is not below num_levels={self.num_levels}"
        if hb.level == self.target_level and not hb.can_verify:
            return f"level {hb.level} is the target but backend {hb.backend!r} cannot verify"
        if hb.level == self.target_level and not hb.can_target:
            return f"level {hb.level} is the target but scores only part of the vocabulary"
        fp = hb.tokenizer_fingerprint
        if (
            fp is not None
            and self.tokenizer_fingerprint is not None
            and fp != self.tokenizer_fingerprint
        ):
            return f"tokenizer fingerprint {fp} differs from the gateway's {self.tokenizer_fingerprint}"
        return None

    def _refuse(self, hb: Heartbeat, reason: str, now: float) -> None:
        known = self.replicas.get(hb.replica)
        if known is not None:
            self._forget(known, why="refused")
        previous = self.refusals.get(hb.replica)
        self.refusals[hb.replica] = Refusal(reason, now)
        if previous is None or previous.reason != reason:
            self.refused_total += 1
            log.warning(
                "replica_refused",
                replica=hb.replica,
                stage_level=hb.level,
                model=hb.model,
                reason=reason,
            )

    def _forget(self, replica: Replica, why: str) -> None:
        del self.replicas[replica.id]
        self._died.append(replica)
        log.warning(
            "replica_lost",
            replica=replica.id,
            stage_level=replica.level,
            why=why,
            silent_s=round(self.clock() - replica.last_seen, 3),
        )

    def reap(self) -> list[Replica]:
        """Forget replicas silent for ``heartbeat_timeout_s``; returns every replica lost since
        the last call (timed out, restarted under the same id, or refused)."""
        now = self.clock()
        for replica in list(self.replicas.values()):
            if now - replica.last_seen >= self.heartbeat_timeout_s:
                self._forget(replica, why="heartbeat timeout")
        for rid, refusal in list(self.refusals.items()):
            if now - refusal.last_seen >= self.heartbeat_timeout_s:
                del self.refusals[rid]
        died, self._died = self._died, []
        return died

    # -- routing -------------------------------------------------------------------------------

    def is_live(self, replica_id: str) -> bool:
        replica = self.replicas.get(replica_id)
        return replica is not None and self.clock() - replica.last_seen < self.heartbeat_timeout_s

    def live(self, level: int) -> list[Replica]:
        return [r for r in self.replicas.values() if r.level == level and self.is_live(r.id)]

    def pick(self, level: int, need: int | None = None) -> RouteHop | None:
        """The best routable replica of ``level`` for a request needing ``need`` KV positions
        (``routing_key``; only replicas whose capacity could hold it), counted as assigned; or
        None."""
        candidates = [r for r in self.live(level) if r.routable and r.fits(need)]
        if not candidates:
            return None
        best = min(candidates, key=lambda r: (routing_key(r.load, r.kv_free, need), r.id))
        best.assigned += 1
        best.assigned_kv += need or 0
        return best.hop()

    def pick_route(self, need: int | None = None) -> list[RouteHop]:
        """One replica per level (``pick``) for a request needing ``need`` KV positions (None:
        unknown). Raises NoRoute naming the level that has no replica, or none big enough."""
        reason = self.unavailable_reason(need)
        if reason is not None:
            raise NoRoute(reason)
        return [self.pick(level, need) for level in range(self.num_levels)]

    def unavailable_reason(self, need: int | None = None) -> str | None:
        """None when every level has a live, ready, non-draining replica (whose KV capacity could
        hold ``need`` positions, when given); else why not."""
        for level in range(self.num_levels):
            live = self.live(level)
            routable = [r for r in live if r.routable]
            if routable and any(r.fits(need) for r in routable):
                continue
            if routable:
                largest = max(r.kv_capacity for r in routable)
                return (
                    f"no replica at level {level} can hold this request: it needs {need} KV "
                    f"positions (prompt + max_tokens) and the largest KV pool there holds "
                    f"{largest}; lower max_tokens or shorten the prompt"
                )
            if live:
                states = ", ".join(
                    f"{r.id} {'draining' if r.heartbeat.draining else 'not ready'}" for r in live
                )
                return f"no ready replica at level {level} ({states})"
            refused = [f"{rid}: {ref.reason}" for rid, ref in self.refusals.items()]
            suffix = f"; refused replicas: {'; '.join(refused)}" if refused else ""
            return f"no live replica at level {level}{suffix}"
        return None

    def target_max_context(self) -> int:
        """Smallest context (positions) among live targets that report one; 0 if unknown."""
        contexts = [
            r.heartbeat.max_context for r in self.live(self.target_level) if r.heartbeat.max_context
        ]
        return min(contexts, default=0)
