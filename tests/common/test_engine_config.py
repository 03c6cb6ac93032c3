"""The engine's own config, its schedules and its KV cache invariant, on engines driven by
hand."""

from __future__ import annotations

import dataclasses

import pytest

from common.backends.simulated import SimulatedBackend
from common.engine_config import EngineConfig
from common.protocol import Notice, RouteHop, Span, Start
from common.settings import StageSettings
from common.stage_engine import StageEngine


def test_defaults_are_the_stage_settings_defaults():
    assert StageSettings(level=2, backend="ngram").engine_config() == EngineConfig(level=2)


def test_stage_settings_pass_every_engine_field_they_have():
    changed = dict(
        schedule="sync",
        max_lead=3,
        lookahead=5,
        sync_wait_s=0.25,
        max_verify_tokens=7,
        request_ttl_s=9.0,
        done_retention_s=11.0,
    )
    config = StageSettings(level=1, backend="ngram", **changed).engine_config()
    assert config == EngineConfig(level=1, **changed)
    service_only = {"republish_interval_s"}  # set only by simulations
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields - service_only <= set(StageSettings.model_fields)


class Recorder:
    """An Outbox that keeps what the engine sends."""

    def __init__(self):
        self.sent: list[object] = []

    def send_span(self, hop, span):
        self.sent.append(span)

    def publish(self, notice):
        self.sent.append(notice)

    def send_reply(self, endpoint, msg):
        self.sent.append(msg)

    def subscribe(self, request_id, hops):
        pass

    def unsubscribe(self, request_id):
        pass


ROUTE = [RouteHop(level=i, replica=f"L{i}", inbox="-", notices="-") for i in range(2)]


def target(config: EngineConfig, now: list[float]) -> StageEngine:
    """Level 1 of a 2-level route, with request "r" started (prompt 1 2 3, 20 tokens)."""
    backend = SimulatedBackend(agreement=1.0, seed=1, vocab=50, sleep=lambda s: None)
    engine = StageEngine(config, backend, Recorder(), "L1", clock=lambda: now[0])
    engine.handle(
        Start(request_id="r", prompt=[1, 2, 3], max_tokens=20, route=ROUTE, reply_to="gw")
    )
    return engine


def drafts(engine: StageEngine, tokens: list[int], epoch: int = 0, request: str = "r") -> None:
    """A span from level 0 extending the target's sequence (a later ``epoch`` replaces it)."""
    r = engine.requests[request]
    engine.handle(
        Span(
            request_id=request,
            level=0,
            replica="L0",
            start=len(r.tokens),
            tokens=tokens,
            base_epoch=r.epoch,
            epoch=epoch,
        )
    )


def test_sync_wait_starts_in_step_only_and_reads_are_pure():
    now = [10.0]
    engine = target(EngineConfig(level=1, schedule="sync", lookahead=4, sync_wait_s=2.0), now)
    r = engine.requests["r"]
    drafts(engine, [7])  # 1 draft of a window of 4: the verifier waits
    assert (engine.queue_depth(), engine.has_work()) == (0, False)
    assert r.waiting_since is None  # a metrics read does not start the wait
    assert engine.step() is False and r.waiting_since == 10.0
    now[0] = 11.9
    assert engine.step() is False and engine.queue_depth() == 0
    now[0] = 12.0
    assert engine.queue_depth() == 1 and engine.has_work()
    assert r.waiting_since == 12.0 - 2.0  # still: reads changed nothing
    assert engine.step() is True and r.stats.forward_passes == 1


def test_a_full_window_ends_the_wait():
    now = [0.0]
    engine = target(EngineConfig(level=1, schedule="sync", lookahead=2), now)
    r = engine.requests["r"]
    engine.step()
    assert r.waiting_since == 0.0
    drafts(engine, [7, 8])
    assert engine.queue_depth() == 1 and r.waiting_since == 0.0
    assert engine.step() is True and r.waiting_since is None


def cached(engine, r) -> list[int]:
    """The tokens the request's KV cache (a simulated history) holds at this level."""
    return engine.backend.state(r.request_id).history


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_the_cache_holds_prompt_and_all_tokens_but_the_last(schedule):
    """After every pass, whatever the drafts (right, wrong, none): prompt + tokens[:-1]."""
    now = [0.0]
    engine = target(EngineConfig(level=1, schedule=schedule, lookahead=3, sync_wait_s=1.0), now)
    r = engine.requests["r"]
    reference = SimulatedBackend(agreement=1.0, seed=1, vocab=50)
    for i in range(6):
        seq = r.prompt + r.tokens
        right = [reference.predict(seq)]
        drafts(engine, right + [(right[0] + 1 + i) % 50] * (i % 3), epoch=i)  # then wrong ones
        now[0] += 5.0
        engine.step()
        engine.step()
        if r.opened:  # once a pass has run
            assert cached(engine, r) == r.prompt + r.tokens[:-1]
    assert r.stats.forward_passes >= 3 and r.stats.rollbacks_issued >= 1


def test_a_rollback_keeps_only_the_agreed_prefix_in_the_cache():
    backend = SimulatedBackend(agreement=1.0, seed=1, vocab=50, sleep=lambda s: None)
    engine = StageEngine(EngineConfig(level=0), backend, Recorder(), "L0", clock=lambda: 0.0)
    engine.handle(
        Start(request_id="r", prompt=[1, 2, 3], max_tokens=20, route=ROUTE, reply_to="gw")
    )
    r = engine.requests["r"]
    for _ in range(5):
        assert engine.step() is True
    assert r.opened and cached(engine, r) == r.prompt + r.tokens[:-1]
    other = (r.tokens[2] + 1) % 50
    engine.handle(
        Notice(request_id="r", level=1, replica="L1", start=2, tokens=[other, 4], epoch=1)
    )
    assert r.tokens[2:] == [other, 4]
    assert cached(engine, r) == r.prompt + r.tokens[:2]  # the adopted tokens are not fed yet
    assert engine.step() is True
    assert cached(engine, r) == r.prompt + r.tokens[:-1]
