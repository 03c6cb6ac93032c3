"""A small synchronous client for the gateway's ZeroMQ API (see ``services.gateway.client_api``;
docs/client.md describes both client APIs and the wire format).

>>> from services.gateway.zmq_client import PipeSpecClient
>>> with PipeSpecClient("tcp://127.0.0.1:5551") as client:    # doctest: +SKIP
...     for text in client.stream("def fibonacci(n):", max_tokens=32):
...         print(text, end="", flush=True)
...     text, stats = client.complete("The capital of France is", max_tokens=8)
...     print(text, stats["tokens_per_target_pass"])
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import zmq

from common.security import CLIENT, GATEWAY, load_curve, secret_file
from common.sockets import open_socket
from services.gateway.client_schema import ClientEvent, ClientRequest


class PipeSpecError(RuntimeError):
    """The gateway answered a request with an error."""


class PipeSpecClient:
    """One DEALER connected to the gateway's ROUTER. Not thread-safe: one client per thread.

    Every receive waits at most ``timeout_s`` for the next message (``TimeoutError`` otherwise),
    so a silent gateway never hangs the caller. ``keys_dir``: a key set made by
    ``python -m common.security generate`` (its ``public/`` and ``client/``); without one the
    connection is plain TCP, which only a gateway with ``insecure = true`` accepts.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 60.0,
        linger_ms: int = 500,
        keys_dir: str | Path | None = None,
    ):
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context()
        curve = None
        if keys_dir is not None:
            curve = load_curve(CLIENT, Path(keys_dir) / "public", secret_file(keys_dir, CLIENT))
        self._sock = open_socket(
            self._ctx, zmq.DEALER, endpoint, linger_ms=linger_ms, curve=curve, server=GATEWAY
        )

    def stream(self, prompt: str, max_tokens: int | None = None, **sampling) -> Iterator[str]:
        """Text as the gateway commits it. ``sampling``: ``temperature``, ``top_p``, ``top_k``,
        ``min_p``, ``seed`` (greedy without a temperature)."""
        for event in self.events(prompt, max_tokens, **sampling):
            if event.type == "token" and event.text:
                yield event.text

    def complete(self, prompt: str, max_tokens: int | None = None, **sampling) -> tuple[str, dict]:
        """The whole completion and its statistics (``done`` event's ``stats``; the seed used
        is ``stats["sampling"]["seed"]``)."""
        parts = []
        for event in self.events(prompt, max_tokens, **sampling):
            if event.type == "token":
                parts.append(event.text or "")
            else:
                return "".join(parts), event.stats or {}
        raise PipeSpecError("the reply ended without a done event")

    def events(
        self, prompt: str, max_tokens: int | None = None, **sampling
    ) -> Iterator[ClientEvent]:
        """Events of one request as they arrive: ``token`` events (``text``, ``token_ids``),
        ending with ``done`` (``finish_reason``, ``stats``); raises PipeSpecError on ``error``.
        ``sampling``: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``."""
        request_id = uuid.uuid4().hex
        request = ClientRequest(
            prompt=prompt, max_tokens=max_tokens, request_id=request_id, **(sampling or {})
        )
        self._sock.send(msgpack.packb(request.model_dump(exclude_none=True), use_bin_type=True))
        while True:
            if not self._sock.poll(self.timeout_ms, zmq.POLLIN):
                raise TimeoutError(f"no reply from the gateway within {self.timeout_ms / 1000:g} s")
            event = ClientEvent.model_validate(msgpack.unpackb(self._sock.recv(), raw=False))
            if event.request_id not in (request_id, None):
                continue  # left over from an earlier request that was abandoned
            if event.type == "error":
                raise PipeSpecError(event.message)
            yield event
            if event.type == "done":
                return

    def close(self) -> None:
        self._sock.close()  # LINGER was set when it was opened
        self._ctx.term()

    def __enter__(self) -> PipeSpecClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
