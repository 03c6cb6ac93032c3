"""The one codec: protocol messages <-> single-frame msgpack bytes.

Wire form: a msgpack map ``{"v": PROTOCOL_VERSION, "t": <type tag>, **fields}``.
Anything that is not exactly that raises :class:`DecodeError`, which callers log, count and drop.
"""

from __future__ import annotations

import msgpack
from pydantic import ValidationError

from common.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, Message

MAX_MESSAGE_BYTES = 16 << 20


class DecodeError(ValueError):
    """A frame that is not a valid protocol message."""


def encode(msg: Message) -> bytes:
    body = msg.model_dump(mode="python")
    body["v"] = PROTOCOL_VERSION
    body["t"] = msg.TYPE
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> Message:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise DecodeError(f"expected a map, got {type(body).__name__}")
    version, tag = body.pop("v", None), body.pop("t", None)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {tag!r}")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise DecodeError(f"invalid {tag}: {exc.errors(include_url=False)[:3]}") from None
