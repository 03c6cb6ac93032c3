"""The stage's KV and batching metrics, read from its Prometheus text, and the KV figures its
heartbeat carries (a real StageService on an n-gram backend, sockets on ephemeral ports)."""

from __future__ import annotations

from prometheus_client import generate_latest

from common.backends import load_backend
from common.backends.batched import PoolUsage
from common.settings import StageSettings
from services.stage.metrics import StageMetrics
from services.stage.service import StageService


def text(metrics: StageMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_batch_counters_add_up_passes_requests_and_tokens():
    metrics = StageMetrics(level=2)
    metrics.on_batch(requests=3, tokens=7)
    metrics.on_batch(requests=5, tokens=12)
    body = text(metrics)
    assert 'pipespec:stage_batched_passes_total{level="2"} 2.0' in body
    assert 'pipespec:stage_batched_pass_requests_total{level="2"} 8.0' in body  # mean batch 4
    assert 'pipespec:stage_batched_pass_tokens_total{level="2"} 19.0' in body


def test_kv_usage_and_waiting_requests_gauges():
    metrics = StageMetrics(level=1)
    body = text(metrics)
    assert 'pipespec:kv_cache_usage_perc{level="1"} 0.0' in body
    assert 'pipespec:num_requests_waiting{level="1"} 0.0' in body
    metrics.set_kv(used_tokens=48, capacity_tokens=192, waiting=3)
    body = text(metrics)
    assert 'pipespec:kv_cache_usage_perc{level="1"} 0.25' in body
    assert 'pipespec:num_requests_waiting{level="1"} 3.0' in body
    metrics.set_kv(used_tokens=500, capacity_tokens=0, waiting=0)  # unbounded: no usage
    assert 'pipespec:kv_cache_usage_perc{level="1"} 0.0' in text(metrics)


def test_heartbeat_and_gauges_carry_the_engines_kv_figures():
    settings = StageSettings(level=0, backend="ngram", insecure=True, linger_ms=0)
    service = StageService(settings, load_backend(settings))
    try:
        hb = service.heartbeat()  # an engine without a bounded pool reports zeros
        assert (hb.kv_used_tokens, hb.kv_capacity_tokens, hb.waiting_requests) == (0, 0, 0)
        # The batched engine's interface (kv_usage, waiting_for_kv), as the service reads it:
        service.engine.kv_usage = lambda: PoolUsage(used_tokens=64, capacity_tokens=256)
        service.engine.waiting_for_kv = lambda: 2
        assert service.heartbeat().kv_used_tokens == 0  # sampled on the main loop, not here
        service._sample()  # what the main loop does each heartbeat interval
        hb = service.heartbeat()
        assert (hb.kv_used_tokens, hb.kv_capacity_tokens, hb.waiting_requests) == (64, 256, 2)
        assert hb.kv_cache_usage_perc == 0.25
        body = text(service.metrics)
        assert 'pipespec:kv_cache_usage_perc{level="0"} 0.25' in body
        assert 'pipespec:num_requests_waiting{level="0"} 2.0' in body
    finally:
        service.close()
