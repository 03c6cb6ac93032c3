"""ReplicaRegistry: registration, refusal, liveness, least-loaded routing (fake clock, no I/O)."""

from __future__ import annotations

import pytest

from common.protocol import Heartbeat
from services.gateway.registry import NoRoute, ReplicaRegistry

FP = "gateway-vocab"
TIMEOUT = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(replica: str, level: int, **fields) -> Heartbeat:
    defaults = dict(
        incarnation=f"{replica}-1",
        inbox=f"tcp://{replica}:6000",
        notices=f"tcp://{replica}:7000",
        ready=True,
        tokenizer_fingerprint=FP,
    )
    return Heartbeat(replica=replica, level=level, **(defaults | fields))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> ReplicaRegistry:
    return ReplicaRegistry(
        num_levels=3, tokenizer_fingerprint=FP, heartbeat_timeout_s=TIMEOUT, clock=clock
    )


def register_full(registry: ReplicaRegistry) -> None:
    registry.apply(beat("ngram", 0, tokenizer_fingerprint=None, can_verify=False))
    registry.apply(beat("draft", 1))
    registry.apply(beat("target", 2, max_context=2048))


def test_route_has_one_hop_per_level_in_order(registry):
    register_full(registry)
    route = registry.pick_route()
    assert [(hop.level, hop.replica) for hop in route] == [
        (0, "ngram"),
        (1, "draft"),
        (2, "target"),
    ]
    assert registry.unavailable_reason() is None


def test_missing_level_is_named(registry):
    registry.apply(beat("ngram", 0, tokenizer_fingerprint=None))
    registry.apply(beat("target", 2))
    with pytest.raises(NoRoute, match="no live replica at level 1"):
        registry.pick_route()


@pytest.mark.parametrize(
    "hb, reason",
    [
        (
            beat("wrong-vocab", 1, tokenizer_fingerprint="other"),
            "tokenizer fingerprint other differs",
        ),
        (beat("too-high", 3), "level 3 is not below num_levels=3"),
        (beat("weak-target", 2, can_verify=False), "is the target but backend"),
    ],
)
def test_refused_replicas_are_counted_remembered_and_never_routed(registry, hb, reason):
    assert registry.apply(hb) is False
    assert registry.apply(hb) is False  # every heartbeat refused, counted once
    assert registry.refused_total == 1
    assert reason in registry.refusals[hb.replica].reason
    assert hb.replica not in registry.replicas
    assert reason in registry.unavailable_reason()  # /health says why


def test_raw_id_replica_is_compatible_with_any_vocabulary(registry):
    assert registry.apply(beat("ngram", 0, tokenizer_fingerprint=None)) is True


def test_least_loaded_counts_assignments_since_last_heartbeat(registry):
    register_full(registry)
    registry.apply(beat("draft-b", 1, active_requests=1))
    picks = [registry.pick_route()[1].replica for _ in range(3)]
    # draft (load 0) -> draft (1) vs draft-b (1): tie broken by id -> draft (2) vs draft-b (1)
    assert picks == ["draft", "draft", "draft-b"]
    registry.apply(beat("draft", 1, active_requests=0))  # a heartbeat resets its assignments
    assert registry.pick_route()[1].replica == "draft"


def test_not_ready_or_draining_replicas_are_live_but_not_routed(registry):
    register_full(registry)
    registry.apply(beat("draft", 1, draining=True))
    with pytest.raises(NoRoute, match=r"no ready replica at level 1 \(draft draining\)"):
        registry.pick_route()
    registry.apply(beat("draft", 1, ready=False))
    assert "draft not ready" in registry.unavailable_reason()
    assert registry.is_live("draft")


def test_silent_replica_dies_once_and_is_reported(registry, clock):
    register_full(registry)
    clock.now += TIMEOUT - 0.1
    registry.apply(beat("ngram", 0, tokenizer_fingerprint=None))
    registry.apply(beat("target", 2))
    assert registry.reap() == []
    clock.now += 0.2
    assert not registry.is_live("draft")  # dead as soon as the timeout passes, even before reap
    assert [r.id for r in registry.reap()] == ["draft"]
    assert registry.reap() == []
    with pytest.raises(NoRoute, match="level 1"):
        registry.pick_route()
    assert registry.pick(0).replica == "ngram"
    assert registry.pick(1) is None


def test_a_second_incarnation_cannot_take_over_a_live_replica_id(registry, clock):
    register_full(registry)
    clock.now += 1.0
    assert not registry.apply(beat("target", 2, incarnation="target-2", inbox="tcp://evil:1"))
    assert registry.rejected == {"takeover": 1}
    assert registry.replicas["target"].heartbeat.incarnation == "target-1"
    assert registry.pick(2).inbox == "tcp://target:6000"
    assert registry.reap() == []


def test_restart_under_the_same_id_registers_once_the_old_incarnation_expired(registry, clock):
    register_full(registry)
    clock.now += TIMEOUT  # the first incarnation went silent
    assert registry.apply(beat("target", 2, incarnation="target-2"))
    lost = [(r.id, r.heartbeat.incarnation) for r in registry.reap()]
    assert ("target", "target-1") in lost
    assert registry.replicas["target"].heartbeat.incarnation == "target-2"


def test_a_heartbeat_counts_only_from_its_own_levels_key(registry):
    register_full(registry)
    assert not registry.apply(beat("evil", 2), sender="level1")
    assert not registry.apply(beat("target", 2, ready=False), sender="gateway")
    assert registry.rejected == {"wrong_key": 2}
    assert "evil" not in registry.replicas and registry.replicas["target"].heartbeat.ready
    assert registry.apply(beat("target", 2), sender="level2")


def test_a_replica_heartbeating_too_fast_is_refused_and_counted(clock):
    registry = ReplicaRegistry(3, FP, TIMEOUT, clock=clock, min_heartbeat_interval_s=0.05)
    assert registry.apply(beat("draft", 1, active_requests=1))
    clock.now += 0.01
    assert not registry.apply(beat("draft", 1, active_requests=9))
    assert registry.rejected == {"too_fast": 1}
    assert registry.replicas["draft"].heartbeat.active_requests == 1
    clock.now += 0.05
    assert registry.apply(beat("draft", 1, active_requests=2))


def test_target_max_context_is_smallest_known(registry):
    register_full(registry)
    registry.apply(beat("target-b", 2, max_context=1024))
    registry.apply(beat("target-c", 2, max_context=0))  # unknown: ignored
    assert registry.target_max_context() == 1024


def test_refusals_expire_with_their_heartbeats(registry, clock):
    registry.apply(beat("wrong-vocab", 1, tokenizer_fingerprint="other"))
    clock.now += TIMEOUT
    registry.reap()
    assert registry.refusals == {}
