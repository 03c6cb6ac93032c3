"""Admission control: a bounded number of running requests, a bounded FIFO queue with a wait
limit, and no slot ever lost when a waiter gives up or is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.admission import Admission, Overloaded


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_slots_then_queue_then_overloaded():
    async def main():
        a = Admission(max_running=2, max_waiting=1, wait_timeout_s=5)
        await a.acquire()
        await a.acquire()
        waiter = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        assert (a.running, a.waiting) == (2, 1)
        with pytest.raises(Overloaded, match=r"2 requests in flight, 1 waiting; limits 2 and 1"):
            await a.acquire()
        a.release()  # handed to the waiter: still two running
        await waiter
        assert (a.running, a.waiting) == (2, 0)
        a.release()
        a.release()
        assert a.running == 0

    run(main())


def test_waiters_are_served_first_come_first_served():
    async def main():
        a = Admission(max_running=1, max_waiting=3, wait_timeout_s=5)
        await a.acquire()
        order = []

        async def wait(name):
            await a.acquire()
            order.append(name)

        tasks = [asyncio.create_task(wait(n)) for n in "abc"]
        await asyncio.sleep(0)
        for _ in "abc":
            a.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"] and a.running == 1

    run(main())


def test_a_new_request_does_not_overtake_waiters():
    async def main():
        a = Admission(max_running=1, max_waiting=2, wait_timeout_s=5)
        await a.acquire()
        first = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        a.release()  # the slot is the waiter's, not free for a newcomer
        late = asyncio.create_task(a.acquire())
        await asyncio.sleep(0.01)
        assert first.done() and not late.done()
        a.release()
        await late
        assert (a.running, a.waiting) == (1, 0)

    run(main())


def test_waiting_too_long_is_overloaded_and_leaves_the_queue():
    async def main():
        a = Admission(max_running=1, max_waiting=1, wait_timeout_s=0.05)
        await a.acquire()
        with pytest.raises(Overloaded, match="no request slot freed within 0.05 s"):
            await a.acquire()
        assert a.waiting == 0
        a.release()
        assert a.running == 0

    run(main())


def test_a_cancelled_waiter_leaves_the_queue():
    async def main():
        a = Admission(max_running=1, max_waiting=1, wait_timeout_s=5)
        await a.acquire()
        waiter = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert a.waiting == 0
        a.release()
        assert a.running == 0

    run(main())


def test_a_slot_handed_over_to_a_waiter_that_was_just_cancelled_is_passed_on():
    async def main():
        a = Admission(max_running=1, max_waiting=2, wait_timeout_s=5)
        await a.acquire()
        first = asyncio.create_task(a.acquire())
        second = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        a.release()  # hands the slot to `first` ...
        first.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await first
        await second  # the slot went on to the next waiter
        assert (a.running, a.waiting) == (1, 0)

    run(main())
