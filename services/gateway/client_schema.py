"""The ZMQ client API's schema (gateway ROUTER <-> client DEALER): plain msgpack maps without
``v``/``t``. Client-facing, so not part of the stage protocol (``common.protocol``) and never
seen by ``common.codec``; ``services.gateway.client_api`` serves it, ``zmq_client`` speaks it,
and docs/client.md describes it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.protocol import MAX_TOP_K


class ClientRequest(BaseModel):
    """A completion request from a ZMQ client (client-facing schema, not a stage message).

    Wire form: ``{"prompt": str, "max_tokens": int, "request_id": str}`` plus optional sampling
    fields (as the HTTP API's: ``temperature`` 0 or absent is greedy; ``seed`` drawn when absent
    and reported in the ``done`` event's stats); ``max_tokens`` defaults to the gateway's
    ``default_max_tokens``; ``request_id`` is the client's own label, echoed in every event.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    prompt: str
    max_tokens: int | None = None
    request_id: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)


class ClientEvent(BaseModel):
    """One reply message to a ZMQ client (client-facing schema, not a stage message).

    ``{"type": "token", "text", "token_ids"}`` for each piece of output, then either
    ``{"type": "done", "finish_reason", "stats"}`` or ``{"type": "error", "message"}``.
    Sent with ``model_dump(exclude_none=True)``; ``request_id`` echoes the request's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["token", "done", "error"]
    request_id: str | None = None
    text: str | None = None  # token: the text these tokens complete (may be "")
    token_ids: list[int] | None = None  # token: the new committed token ids
    finish_reason: Literal["stop", "length", "cancelled"] | None = None  # done
    stats: dict | None = None  # done: per-request statistics (gateway's RequestStats)
    message: str | None = None  # error
