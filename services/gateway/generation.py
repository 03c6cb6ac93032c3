"""One request in flight at the gateway: its entry in the request table (``Flight``) and the
consumer's view of it (``Generation``).

A ``Flight`` is the tracker's ``TrackedRequest`` plus what only the gateway needs (the queue its
``Generation`` reads, token timings), so ``Gateway.tracker.requests`` is the gateway's one table
of requests in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.request_tracker import TrackedRequest
from services.gateway.events import (
    FinishEvent,
    GenerationError,
    GenerationTimeout,
    RequestStats,
    TokensEvent,
    request_stats,
)

Event = TokensEvent | FinishEvent


@dataclass
class Flight(TrackedRequest):
    # Event | GenerationError, consumed by the request's Generation
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_at: float | None = None
    last_token_at: float | None = None
    target_lost_at: float | None = None  # since when its target hop has no live replica

    def summary(self, completion_tokens: int | None = None) -> RequestStats:
        """The request's statistics; ``completion_tokens`` defaults to the tokens received."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.created
        return request_stats(
            self.request_id,
            len(self.prompt),
            len(self.tokens) if completion_tokens is None else completion_tokens,
            self.stats,
            self.resyncs,
            ttft,
            time.monotonic() - self.created,
            self.sampling,
        )


class Generation:
    """One request in flight: an async iterator of ``TokensEvent`` then one ``FinishEvent``;
    raises ``GenerationError`` if the request fails (``RequestCancelled`` if it was cancelled
    while the iterator waited). Leaving it early (``break`` inside ``async with``, ``aclose()``,
    ``cancel()``, ``stop()``, or task cancellation while waiting) sends ``Cancel`` to every stage
    of the route; cancelling is synchronous and idempotent.

    ``cancel(request_id, reason, outcome)`` is the gateway's ``Gateway.cancel``."""

    def __init__(self, flight: Flight, deadline: float, cancel: Callable[[str, str, str], None]):
        self.request_id = flight.request_id
        self._flight, self._queue, self._deadline, self._cancel = (
            flight,
            flight.queue,
            deadline,
            cancel,
        )
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        timeout = max(self._deadline - time.monotonic(), 0.01)
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.CancelledError:
            self.cancel("consumer cancelled")
            raise
        except TimeoutError:
            self.cancel("timeout")
            raise GenerationTimeout(f"request {self.request_id} timed out") from None
        if isinstance(event, GenerationError):
            self._closed = True
            raise event
        if isinstance(event, FinishEvent):
            self._closed = True
        return event

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._closed:
            self._closed = True
            self._cancel(self.request_id, reason, "cancelled")

    def stop(self, completion_tokens: int) -> RequestStats:
        """End the request because its output is complete (a stop string matched): cancels it at
        every stage and returns its statistics counting ``completion_tokens`` (stages report
        their own counters only at a natural end, so ``acceptance`` is then empty)."""
        self._closed = True
        self._cancel(self.request_id, "stop string", "stop")
        return self._flight.summary(completion_tokens)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.cancel()
