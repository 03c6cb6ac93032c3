"""Admission control: at most ``max_running`` requests in flight, at most ``max_waiting`` more
queued for a slot (first come, first served), each for at most ``wait_timeout_s``. Anything
beyond that is refused with ``Overloaded`` (HTTP 429), so load never turns into unbounded memory.

    await admission.acquire()    # a slot now, or after queueing; Overloaded if none
    ...                          # the request runs
    admission.release()          # hands the slot to the oldest waiter, if any
"""

from __future__ import annotations

import asyncio
from collections import deque


class Overloaded(Exception):
    """No slot for the request; ``str(exc)`` says why, for the client."""


class Admission:
    def __init__(self, max_running: int, max_waiting: int, wait_timeout_s: float):
        self.max_running, self.max_waiting, self.wait_timeout_s = (
            max_running,
            max_waiting,
            wait_timeout_s,
        )
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()  # each resolves when handed a slot

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, queueing for one if all are busy. Raises Overloaded when the queue is
        full or no slot frees within ``wait_timeout_s``. Cancelling the caller leaves the queue."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(
                f"the server is at capacity ({self.running} requests in flight, {len(self._waiters)} "
                f"waiting; limits {self.max_running} and {self.max_waiting}); retry later"
            )
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:  # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
            done, _ = await asyncio.wait({slot}, timeout=self.wait_timeout_s)
        except asyncio.CancelledError:
            self._give_up(slot)
            raise
        if not done:
            self._give_up(slot)
            raise Overloaded(
                f"no request slot freed within {self.wait_timeout_s:g} s "
                f"({self.running} requests in flight); retry later"
            )

    def _give_up(self, slot: asyncio.Future) -> None:
        if slot.done():  # handed a slot just as the waiter gave up: pass it on
            self.release()
        else:
            slot.cancel()
            self._waiters.remove(slot)

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one (``running`` stays the same)."""
        if self._waiters:
            self._waiters.popleft().set_result(None)
        else:
            self.running -= 1
