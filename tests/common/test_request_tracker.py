"""Table-driven tests of the gateway's request bookkeeping (``common/request_tracker.py``):
sequences of Output pieces as the network may deliver them (in order, duplicated, reordered,
with gaps, after the end) and what the tracker makes of them; re-sends on a virtual clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.protocol import LevelStats, Output, RequestError, RouteHop
from common.request_tracker import RequestTracker, TrackedRequest

RESEND_S = 1.0
ROUTE = [
    RouteHop(
        level=level, replica=f"r{level}", inbox=f"tcp://h:{level}", notices=f"tcp://h:{9 - level}"
    )
    for level in range(2)
]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tracked(rid: str = "a", max_tokens: int = 8) -> TrackedRequest:
    return TrackedRequest(
        request_id=rid,
        prompt=[1, 2],
        max_tokens=max_tokens,
        eos_ids=[0],
        route=list(ROUTE),
        reply_to="tcp://gw:1",
        created=0.0,
    )


def piece(start, tokens, done=False, reason=None, stats=(), rid="a") -> Output:
    return Output(
        request_id=rid,
        replica="r1",
        start=start,
        tokens=tokens,
        done=done,
        finish_reason=reason,
        stats=list(stats),
    )


STATS = [LevelStats(level=0), LevelStats(level=1, forward_passes=3)]

# (pieces in arrival order, new tokens returned for each, final tokens, done, reason, gap)
CASES = {
    "in order": (
        [piece(0, [5, 6]), piece(2, [7], True, "length")],
        [[5, 6], [7]],
        [5, 6, 7],
        True,
        "length",
        False,
    ),
    "duplicate": (
        [piece(0, [5, 6]), piece(0, [5, 6]), piece(2, [7])],
        [[5, 6], [], [7]],
        [5, 6, 7],
        False,
        None,
        False,
    ),
    "overlapping re-send": (
        [piece(0, [5]), piece(0, [5, 6, 7])],
        [[5], [6, 7]],
        [5, 6, 7],
        False,
        None,
        False,
    ),
    "gap, then the missing piece": (
        [piece(2, [7]), piece(0, [5, 6])],
        [[], [5, 6]],
        [5, 6],
        False,
        None,
        True,  # the early piece is dropped and asks for a re-send
    ),
    "done on a piece that does not reach the end is ignored": (
        [piece(0, [5, 6, 7]), piece(0, [5], True, "stop")],
        [[5, 6, 7], []],
        [5, 6, 7],
        False,
        None,
        False,
    ),
    "nothing after done": (
        [piece(0, [5], True, "stop"), piece(1, [6])],
        [[5], []],
        [5],
        True,
        "stop",
        False,
    ),
    "empty final piece": (
        [piece(0, [5, 6]), piece(2, [], True, "cancelled")],
        [[5, 6], []],
        [5, 6],
        True,
        "cancelled",
        False,
    ),
    "another request's piece": (
        [piece(0, [5], rid="b")],
        [[]],
        [],
        False,
        None,
        False,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_on_output(name):
    pieces, new, tokens, done, reason, gap = CASES[name]
    tracker = RequestTracker(RESEND_S, clock=Clock())
    tracker.add(tracked())
    assert [tracker.on_output(p) for p in pieces] == new
    req = tracker.requests["a"]
    assert (req.tokens, req.done, req.finish_reason, req.gap) == (tokens, done, reason, gap)


def test_stats_come_from_the_latest_complete_piece():
    tracker = RequestTracker(RESEND_S, clock=Clock())
    tracker.add(tracked())
    tracker.on_output(piece(0, [5, 6], stats=STATS))
    tracker.on_output(piece(0, [5], stats=[LevelStats(level=0)]))  # stale: not at the end
    assert tracker.requests["a"].stats == STATS


def test_add_sends_start_to_every_hop():
    tracker = RequestTracker(RESEND_S, clock=Clock())
    sends = tracker.add(tracked())
    assert [hop for hop, _ in sends] == ROUTE
    start = sends[0][1]
    assert (start.prompt, start.committed, start.have, start.max_tokens) == ([1, 2], [], 0, 8)


# (seconds to wait, pieces arriving then, re-sends expected: the `have` of each re-sent Start)
RESEND_CASES = {
    "quiet until the timeout": ([(0.5, []), (0.6, [])], [[], [0, 0]]),
    "progress postpones the re-send": (
        [(0.9, [piece(0, [5])]), (0.9, []), (0.2, [])],
        [[], [], [1, 1]],
    ),
    "a gap asks at once": ([(0.1, [piece(3, [8])])], [[0, 0]]),
    "re-sends repeat while silent": ([(1.0, []), (0.5, []), (0.5, [])], [[0, 0], [], [0, 0]]),
    "nothing once done": ([(0.1, [piece(0, [5], True, "stop")]), (5.0, [])], [[], []]),
}


@pytest.mark.parametrize("name", RESEND_CASES)
def test_due(name):
    steps, expected = RESEND_CASES[name]
    clock = Clock()
    tracker = RequestTracker(RESEND_S, clock=clock)
    tracker.add(tracked())
    got = []
    for wait, pieces in steps:
        clock.now += wait
        for p in pieces:
            tracker.on_output(p)
        got.append([start.have for _, start in tracker.due()])
    assert got == expected
    assert tracker.requests["a"].resyncs == sum(1 for sends in expected if sends)


def test_resend_carries_what_the_gateway_has():
    clock = Clock()
    tracker = RequestTracker(RESEND_S, clock=clock)
    tracker.add(tracked())
    tracker.on_output(piece(0, [5, 6]))
    clock.now += RESEND_S
    (_, start), _ = tracker.due()
    assert (start.committed, start.have, start.prompt) == ([5, 6], 2, [1, 2])


def test_reroute_moves_the_request_and_resends():
    tracker = RequestTracker(RESEND_S, clock=Clock())
    tracker.add(tracked())
    other = [ROUTE[0], ROUTE[1].model_copy(update={"replica": "r1b"})]
    sends = tracker.reroute("a", other)
    assert [hop.replica for hop, _ in sends] == ["r0", "r1b"]
    assert sends[0][1].route == other and tracker.requests["a"].resyncs == 1
    assert tracker.reroute("missing", other) == []


def test_error_finishes_the_request_once():
    tracker = RequestTracker(RESEND_S, clock=Clock())
    tracker.add(tracked())
    error = RequestError(request_id="a", replica="r1", level=1, message="boom")
    req = tracker.on_error(error)
    assert req.done and req.error == "level 1 (r1): boom"
    tracker.on_error(error.model_copy(update={"message": "again"}))
    assert req.error == "level 1 (r1): boom"
    assert tracker.on_output(piece(0, [5])) == [] and tracker.due() == []
    assert tracker.remove("a") is req and tracker.remove("a") is None


def test_a_subclass_entry_is_the_one_table_row_from_add_to_remove():
    """What the gateway does: its ``Flight`` subclasses ``TrackedRequest`` with its own state,
    and the tracker's table is the only one (the entry it hands back is the one added)."""

    @dataclass
    class Flight(TrackedRequest):
        seen: list[list[int]] = field(default_factory=list)

    tracker: RequestTracker[Flight] = RequestTracker(RESEND_S, clock=Clock())
    flight = Flight(**vars(tracked()))
    sends = tracker.add(flight)
    assert tracker.requests == {"a": flight} and {hop for hop, _ in sends} == set(ROUTE)
    flight.seen.append(tracker.on_output(piece(0, [5, 6])))
    assert tracker.requests["a"].seen == [[5, 6]] and flight.tokens == [5, 6]
    assert (
        tracker.on_error(RequestError(request_id="a", replica="r1", level=1, message="x")) is flight
    )
    assert tracker.remove("a") is flight and tracker.requests == {}
