"""Gateway over real loopback sockets with faked stages: streaming, statistics, cancellation,
early stops, admission, rerouting off dead replicas, timeouts, stage errors and undecodable
frames."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import zmq

from common.codec import encode
from common.protocol import RequestError
from common.tokenization import fingerprint
from services.gateway.admission import Overloaded
from services.gateway.core import Gateway
from services.gateway.events import (
    FinishEvent,
    GenerationError,
    GenerationTimeout,
    RequestCancelled,
    TokensEvent,
)
from services.gateway.registry import NoRoute
from tests.services.gateway.fake_stage import FakeStage

TEXT = "Ça coûte 3 € — 日本語 🙂"


@pytest.fixture
def script(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT) + [tokenizer.eos_token_id]


@pytest.fixture
def running_gateway(tokenizer, gateway_settings):
    """``async with running_gateway(**overrides) as (gateway, stage)``: a started gateway on the
    shared test settings (quick heartbeat timeout and re-sync, then ``overrides``), and
    ``stage(level, script, **kw)`` to start a fake stage for it."""

    @contextlib.asynccontextmanager
    async def run(**overrides):
        settings = gateway_settings(
            **(dict(heartbeat_timeout_s=0.3, resend_after_s=0.2) | overrides)
        )
        gateway = Gateway(settings, fingerprint(tokenizer), [tokenizer.eos_token_id])
        await gateway.start()
        stages: list[FakeStage] = []

        def stage(level: int, script=None, **kw) -> FakeStage:
            stages.append(
                FakeStage(gateway.reply_to, level, script, fingerprint=fingerprint(tokenizer), **kw)
            )
            return stages[-1]

        try:
            yield gateway, stage
            await until(lambda: not gateway.tracker.requests)
            assert gateway.requests_running == 0, "every ended request gives its slot back"
        finally:
            for s in stages:
                s.stop()
            await gateway.stop()

    return run


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def collect(generation) -> tuple[list[int], FinishEvent]:
    ids = []
    async for event in generation:
        if isinstance(event, TokensEvent):
            ids += event.token_ids
        else:
            return ids, event
    raise AssertionError("no finish event")


def test_streams_the_targets_output_with_statistics(running_gateway, tokenizer, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            drafter, target = stage(0), stage(1, script)
            await until(lambda: gateway.unavailable_reason() is None)
            ids, finish = await collect(
                await gateway.generate(tokenizer.encode("Le café"), max_tokens=64)
            )
            assert ids == script and finish.finish_reason == "stop"
            s = finish.stats
            assert (s.completion_tokens, s.target_forward_passes, s.tokens_per_target_pass) == (
                len(script),
                4,
                len(script) / 4,
            )
            assert [(a.level, a.acceptance_rate, a.rollbacks) for a in s.acceptance] == [
                (1, 0.75, 2)
            ]
            start = target.starts()[0]
            assert start.eos_ids == [tokenizer.eos_token_id] and start.reply_to == gateway.reply_to
            assert [hop.replica for hop in start.route] == [drafter.replica, target.replica]
            assert drafter.starts()[0] == start
            assert gateway.tracker.requests == {}
            text = gateway.metrics.exposition().decode()
            assert 'pipespec:spec_decode_num_accepted_tokens_total{level="1"} 9.0' in text
            assert 'pipespec:requests_total{outcome="stop"} 1.0' in text

    asyncio.run(main())


def test_max_tokens_is_passed_to_the_target(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            stage(0), stage(1, script)
            await until(lambda: gateway.unavailable_reason() is None)
            ids, finish = await collect(await gateway.generate([5, 6], max_tokens=3))
            assert ids == script[:3] and finish.finish_reason == "length"

    asyncio.run(main())


def test_leaving_early_cancels_at_every_stage(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            drafter, target = stage(0), stage(1, script, piece=1, delay_s=0.05)
            await until(lambda: gateway.unavailable_reason() is None)
            async with await gateway.generate([5, 6], max_tokens=64) as generation:
                assert isinstance(await generation.__anext__(), TokensEvent)
            await until(lambda: drafter.cancels() and target.cancels())
            assert gateway.tracker.requests == {}
            generation.cancel()  # idempotent: nothing more is sent
            await asyncio.sleep(0.1)
            assert len(target.cancels()) == 1

    asyncio.run(main())


def test_task_cancellation_while_waiting_cancels_the_request(running_gateway):
    async def main():
        async with running_gateway() as (gateway, stage):
            stage(0), stage(1)  # a target that never answers
            await until(lambda: gateway.unavailable_reason() is None)
            task = asyncio.create_task(collect(await gateway.generate([5], max_tokens=4)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gateway.tracker.requests == {}

    asyncio.run(main())


def test_a_dead_target_is_replaced_when_one_appears(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            stage(0), stage(1, script, die_on_start=True)
            await until(lambda: gateway.unavailable_reason() is None)
            generation = await gateway.generate([5, 6], max_tokens=64)
            await asyncio.sleep(0.5)  # the first target is gone; the request waits for another
            replacement = stage(1, script)
            ids, finish = await collect(generation)
            assert ids == script
            assert replacement.starts()[0].route[1].replica == replacement.replica
            assert "pipespec:reroutes_total 1.0" in gateway.metrics.exposition().decode()

    asyncio.run(main())


def test_a_request_waits_for_a_level_without_replicas_then_gets_no_route(running_gateway, script):
    """A level with no live replica (a late heartbeat, a restart) holds a new request for up to
    ``route_wait_s``: it runs if a replica appears in time, and fails with NoRoute if not."""

    async def main():
        async with running_gateway(route_wait_s=2.0) as (gateway, stage):
            stage(0)
            waiting = asyncio.create_task(gateway.generate([5, 6], max_tokens=64))
            await asyncio.sleep(0.5)
            assert not waiting.done() and not gateway.tracker.requests  # nothing sent yet
            stage(1, script)
            ids, finish = await collect(await waiting)
            assert ids == script and finish.finish_reason == "stop"
        async with running_gateway(route_wait_s=0.4) as (gateway, stage):
            stage(0)
            started = time.monotonic()
            with pytest.raises(NoRoute, match="no live replica at level 1"):
                await gateway.generate([5, 6], max_tokens=64)
            assert 0.4 <= time.monotonic() - started < 2.0
            assert gateway.requests_running == 0  # the slot it held while waiting is back

    asyncio.run(main())


def test_a_dead_drafter_without_replacement_does_not_stop_the_request(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            drafter, _ = stage(0, die_on_start=True), stage(1, script, piece=1, delay_s=0.025)
            await until(lambda: gateway.unavailable_reason() is None)
            ids, finish = await collect(await gateway.generate([5, 6], max_tokens=64))
            assert ids == script and finish.finish_reason == "stop"
            assert not gateway.registry.is_live(drafter.replica)  # it died while the target decoded

    asyncio.run(main())


def test_requests_time_out_and_are_cancelled(running_gateway):
    async def main():
        async with running_gateway(request_timeout_s=0.3) as (gateway, stage):
            _, target = stage(0), stage(1)
            await until(lambda: gateway.unavailable_reason() is None)
            with pytest.raises(GenerationTimeout, match="timed out"):
                await collect(await gateway.generate([5], max_tokens=4))
            await until(lambda: target.cancels())

    asyncio.run(main())


def test_a_stage_error_fails_the_request(running_gateway):
    async def main():
        async with running_gateway() as (gateway, stage):
            stage(0), stage(1)
            await until(lambda: gateway.unavailable_reason() is None)
            generation = await gateway.generate([5], max_tokens=4)
            push = gateway.context.socket(zmq.PUSH)
            push.connect(gateway.reply_to)
            await push.send(
                encode(
                    RequestError(
                        request_id=generation.request_id,
                        replica="r",
                        level=1,
                        message="prompt too long",
                    )
                )
            )
            with pytest.raises(GenerationError, match="level 1 \\(r\\): prompt too long"):
                await collect(generation)
            push.close(linger=0)

    asyncio.run(main())


def test_undecodable_frames_are_counted_and_dropped(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            push = gateway.context.socket(zmq.PUSH)
            push.connect(gateway.reply_to)
            for junk in (
                b"\x00garbage",
                b"\x81\xa1v\x63",
                encode(RequestError(request_id="x", replica="r", level=0, message="m"))[:-3],
            ):
                await push.send(junk)
            stage(0), stage(1, script)
            await until(lambda: gateway.unavailable_reason() is None)
            ids, _ = await collect(await gateway.generate([5], max_tokens=64))
            assert ids == script
            assert (
                'pipespec:decode_rejects_total{socket="registry"} 3.0'
                in gateway.metrics.exposition().decode()
            )
            push.close(linger=0)

    asyncio.run(main())


def test_cancelling_wakes_a_waiting_consumer(running_gateway):
    async def main():
        async with running_gateway() as (gateway, stage):
            _, target = stage(0), stage(1)  # a target that never answers
            await until(lambda: gateway.unavailable_reason() is None)
            generation = await gateway.generate([5], max_tokens=4)
            waiting = asyncio.create_task(collect(generation))
            await asyncio.sleep(0.05)
            gateway.cancel(generation.request_id, "client disconnected")
            with pytest.raises(RequestCancelled, match="client disconnected"):
                await asyncio.wait_for(waiting, 1)
            await until(lambda: target.cancels())

    asyncio.run(main())


def test_stop_ends_the_request_early_with_statistics(running_gateway, script):
    async def main():
        async with running_gateway() as (gateway, stage):
            _, target = stage(0), stage(1, script, piece=1, delay_s=0.02)
            await until(lambda: gateway.unavailable_reason() is None)
            generation = await gateway.generate([5, 6], max_tokens=64)
            assert isinstance(await generation.__anext__(), TokensEvent)
            stats = generation.stop(completion_tokens=1)
            assert (stats.completion_tokens, stats.prompt_tokens, stats.acceptance) == (1, 2, [])
            await until(lambda: target.cancels())
            assert [c.reason for c in target.cancels()] == ["stop string"]
            assert (
                'pipespec:requests_total{outcome="stop"} 1.0'
                in gateway.metrics.exposition().decode()
            )

    asyncio.run(main())


def test_admission_queues_then_refuses_and_counts(running_gateway, script):
    async def main():
        limits = dict(max_requests_in_flight=1, max_queued_requests=1, queue_timeout_s=5)
        async with running_gateway(**limits) as (gateway, stage):
            stage(0), stage(1, script, piece=1, delay_s=0.02)
            await until(lambda: gateway.unavailable_reason() is None)
            first = await gateway.generate([5], max_tokens=5)
            second = asyncio.create_task(gateway.generate([6], max_tokens=5))
            await until(lambda: gateway.requests_waiting == 1)
            with pytest.raises(Overloaded, match="at capacity"):
                await gateway.generate([7], max_tokens=5)
            assert "pipespec:num_requests_waiting 1.0" in gateway.metrics.exposition().decode()
            await collect(first)  # its end hands the slot to the queued request
            ids, _ = await collect(await second)
            assert ids == script[:5]
            text = gateway.metrics.exposition().decode()
            assert "pipespec:request_queue_time_seconds_count 2.0" in text
            assert "pipespec:inter_token_latency_seconds_count 8.0" in text  # 4 gaps per request

    asyncio.run(main())
