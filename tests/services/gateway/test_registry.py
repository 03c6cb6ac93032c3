"""ReplicaRegistry: registration, refusal, liveness, least-loaded routing (fake clock, no I/O)."""

from __future__ import annotations

import pytest

from common.protocol import Heartbeat
from services.gateway.registry import NoRoute, ReplicaRegistry, routing_key

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
        (beat("pruned-target", 2, can_target=False), "only part of the vocabulary"),
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


# -- KV memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, need, better",
    [
        ((1, 100), (1, 50), None, "a"),  # same load: more free KV
        ((0, 50), (1, 900), None, "a"),  # least loaded first, as before KV was reported
        ((0, 50), (2, 900), 64, "b"),  # room for the request now beats a lighter load
        ((1, 100), (1, 900), 64, "b"),  # both have room: same load, more free KV
        ((1, 10), (3, 20), 64, "a"),  # neither has room now: least loaded
        ((1, None), (1, 10**9), 64, "a"),  # an unbounded pool always has the most room
    ],
)
def test_routing_key_prefers_room_now_then_load_then_free_kv(a, b, need, better):
    keys = {"a": routing_key(*a, need=need), "b": routing_key(*b, need=need)}
    assert min(keys, key=keys.get) == better


def kv_beat(replica: str, used: int, capacity: int, **fields) -> Heartbeat:
    return beat(replica, 1, kv_used_tokens=used, kv_capacity_tokens=capacity, **fields)


def test_equal_load_goes_to_the_replica_with_more_free_kv(registry):
    register_full(registry)
    registry.apply(kv_beat("draft", 900, 1000))
    registry.apply(kv_beat("draft-b", 100, 1000))
    assert registry.pick_route()[1].replica == "draft-b"  # need unknown: free KV breaks the tie
    registry.apply(kv_beat("draft-b", 100, 1000, active_requests=2))
    assert registry.pick_route()[1].replica == "draft"  # less loaded, and still has room


def test_what_was_routed_since_the_heartbeat_counts_against_free_kv(registry):
    register_full(registry)
    registry.apply(kv_beat("draft", 900, 1000))  # 100 free, idle
    registry.apply(kv_beat("draft-b", 0, 1000, active_requests=5))  # 1000 free, busy
    picks = [registry.pick_route(need=80)[1].replica for _ in range(3)]
    # the first takes draft's room (100 -> 20 free); then only draft-b has room for 80 more
    assert picks == ["draft", "draft-b", "draft-b"]
    assert registry.replicas["draft"].kv_free == 20
    registry.apply(kv_beat("draft", 980, 1000))  # the stage reports it: assignments reset
    assert registry.replicas["draft"].kv_free == 20 and registry.replicas["draft"].assigned == 0


def test_a_replica_whose_pool_is_too_small_is_never_chosen(registry):
    register_full(registry)
    registry.apply(kv_beat("draft", 0, 100))  # idle but small
    registry.apply(kv_beat("draft-b", 1900, 2000, active_requests=9))  # busy and full, but big
    assert registry.pick_route(need=200)[1].replica == "draft-b"  # waits at draft-b for room
    assert registry.pick_route(need=100)[1].replica == "draft"  # fits exactly
    assert registry.pick_route()[1].replica == "draft"  # need unknown: capacity not checked


def test_no_route_when_no_pool_of_a_level_could_ever_hold_the_request(registry):
    register_full(registry)
    registry.apply(kv_beat("draft", 0, 1000))
    registry.apply(kv_beat("draft-b", 0, 1500))
    with pytest.raises(NoRoute) as info:
        registry.pick_route(need=2000)
    assert str(info.value) == (
        "no replica at level 1 can hold this request: it needs 2000 KV positions "
        "(prompt + max_tokens) and the largest KV pool there holds 1500; lower max_tokens or "
        "shorten the prompt"
    )
    assert registry.unavailable_reason() is None  # /health: the system itself is fine
    assert [r.assigned for r in registry.replicas.values()] == [0] * 4  # nothing half-assigned
    registry.apply(kv_beat("draft-c", 0, 0))  # an unbounded pool holds anything
    assert registry.pick_route(need=2000)[1].replica == "draft-c"


def test_describe_reports_kv_usage_and_waiting_requests(registry):
    registry.apply(kv_beat("draft", 48, 192, waiting_requests=2))
    registry.apply(beat("plain", 1))
    described = {d["replica"]: d for d in (r.describe() for r in registry.live(1))}
    kv_keys = ("kv_used_tokens", "kv_capacity_tokens", "kv_cache_usage_perc", "waiting_requests")
    assert [described["draft"][k] for k in kv_keys] == [48, 192, 0.25, 2]
    assert [described["plain"][k] for k in kv_keys] == [0, 0, 0.0, 0]
