"""Table-driven tests of the one codec (``common/codec.py``): every message type survives a
round trip unchanged; every malformed frame raises DecodeError saying what is wrong."""

from __future__ import annotations

import msgpack
import pytest

from common import protocol as wire
from common.codec import MAX_MESSAGE_BYTES, DecodeError, decode, encode
from common.protocol import MESSAGE_TYPES, PROTOCOL_VERSION

HOP = wire.RouteHop(
    level=1, replica="r1", inbox="tcp://10.0.0.5:5601", notices="tcp://10.0.0.5:5602"
)
STATS = [wire.LevelStats(level=0, forward_passes=4, accepted_per_pos=[3, 1], busy_s=0.25)]

MESSAGES = [
    wire.Start(
        request_id="a",
        prompt=[1, 2, 3],
        committed=[4],
        have=1,
        max_tokens=16,
        eos_ids=[2],
        route=[HOP],
        reply_to="tcp://gw:5550",
    ),
    wire.Start(request_id="minimal", prompt=[], max_tokens=1, route=[], reply_to=""),
    wire.Span(
        request_id="a",
        level=0,
        replica="r0",
        start=3,
        tokens=[7, 8],
        base_epoch=1,
        epoch=2,
        stats=STATS,
    ),
    wire.Notice(request_id="a", level=2, replica="r2", start=0, tokens=[9], epoch=3, rollback=True),
    wire.Notice(request_id="a", level=2, replica="r2", start=5, tokens=[], epoch=0, final=True),
    wire.Cancel(request_id="a"),
    wire.Cancel(request_id="a", reason="client went away"),
    wire.Output(request_id="a", replica="r2", start=0, tokens=[5, 6]),
    wire.Output(
        request_id="a",
        replica="r2",
        start=2,
        tokens=[],
        done=True,
        finish_reason="length",
        stats=STATS,
    ),
    wire.RequestError(request_id="a", replica="r1", level=1, message="prompt too long: é ✓"),
    wire.Heartbeat(
        replica="r1",
        incarnation="i1",
        level=1,
        inbox="tcp://h:1",
        notices="tcp://h:2",
        ready=True,
        tokenizer_fingerprint=None,
        max_context=2048,
    ),
    wire.Heartbeat(
        replica="r2",
        incarnation="i2",
        level=2,
        inbox="tcp://h:3",
        notices="tcp://h:4",
        ready=True,
        kv_used_tokens=48,
        kv_capacity_tokens=192,
        waiting_requests=3,
    ),
]


def test_every_type_is_in_the_table():
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    frame = encode(msg)
    assert isinstance(frame, bytes)
    assert decode(frame) == msg
    body = msgpack.unpackb(frame)
    assert (body["v"], body["t"]) == (PROTOCOL_VERSION, msg.TYPE)


def frame_of(**body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


GOOD = {"v": PROTOCOL_VERSION, "t": "cancel", "request_id": "a"}

# (frame, words the error must contain)
BAD_FRAMES = {
    "not msgpack": (b"\xc1", "not msgpack"),
    "truncated": (frame_of(**GOOD)[:-2], "not msgpack"),
    "not a map": (msgpack.packb([1, 2]), "expected a map, got list"),
    "no version": (frame_of(t="cancel", request_id="a"), "protocol version None"),
    "other version": (frame_of(**GOOD | {"v": PROTOCOL_VERSION + 1}), "is not"),
    "no type": (frame_of(v=PROTOCOL_VERSION, request_id="a"), "unknown message type None"),
    "unknown type": (frame_of(**GOOD | {"t": "launch"}), "unknown message type 'launch'"),
    "type not a string": (frame_of(**GOOD | {"t": 3}), "unknown message type 3"),
    "missing field": (frame_of(v=PROTOCOL_VERSION, t="cancel"), "invalid cancel"),
    "unknown field": (frame_of(**GOOD | {"extra": 1}), "invalid cancel"),
    "wrong type (strict)": (frame_of(**GOOD | {"request_id": 5}), "invalid cancel"),
    "negative position": (
        frame_of(v=PROTOCOL_VERSION, t="output", request_id="a", replica="r", start=-1, tokens=[]),
        "invalid output",
    ),
    "too big": (b"\x00" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frames(name):
    frame, words = BAD_FRAMES[name]
    with pytest.raises(DecodeError) as info:
        decode(frame)
    assert words in str(info.value)


def test_the_good_frame_of_the_bad_table_decodes():
    assert decode(frame_of(**GOOD)) == wire.Cancel(request_id="a")


HEARTBEAT = {
    "v": PROTOCOL_VERSION,
    "t": "heartbeat",
    "replica": "r",
    "incarnation": "i",
    "level": 1,
    "inbox": "tcp://h:1",
    "notices": "tcp://h:2",
    "ready": True,
}


def test_a_heartbeat_without_kv_fields_reads_as_no_bounded_pool():
    """A stage from before the KV fields stays readable: zeros, usage 0."""
    hb = decode(frame_of(**HEARTBEAT))
    assert (hb.kv_used_tokens, hb.kv_capacity_tokens, hb.waiting_requests) == (0, 0, 0)
    assert hb.kv_cache_usage_perc == 0.0


def test_heartbeat_kv_fields_round_trip_and_give_the_usage():
    hb = decode(frame_of(**HEARTBEAT, kv_used_tokens=48, kv_capacity_tokens=192))
    assert (hb.kv_used_tokens, hb.kv_capacity_tokens) == (48, 192)
    assert hb.kv_cache_usage_perc == 0.25


@pytest.mark.parametrize("field", ["kv_used_tokens", "kv_capacity_tokens", "waiting_requests"])
def test_negative_kv_fields_are_refused(field):
    with pytest.raises(DecodeError, match="invalid heartbeat"):
        decode(frame_of(**HEARTBEAT | {field: -1}))
