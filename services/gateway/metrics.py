"""Prometheus metrics of the gateway, in vLLM's vocabulary with a ``pipespec:`` prefix.

Counters get ``_total`` on exposition. Derived values, as in vLLM's docs:
    acceptance rate per level = rate(pipespec:spec_decode_num_accepted_tokens_total{level="i"})
                              / rate(pipespec:spec_decode_num_draft_tokens_total{level="i"})
    mean acceptance length    = 1 + rate(..._num_accepted_tokens_total) / rate(..._num_drafts_total)

The spec-decode counters here are summed from the per-request statistics the target reports with
its output (cumulative, so a request ended early by a stop string or a disconnect still counts
what it did), accepted tokens per draft position
(``pipespec:spec_decode_num_accepted_tokens_per_pos_total{level,position}``) included.
Each stage's own /metrics has the same counters, live. Sampled requests (temperature > 0) are
also counted apart, as ``pipespec:spec_decode_sampled_num_{drafts,draft_tokens,accepted_tokens}``
(acceptance under sampling per level, with the same formulas).

``pipespec:kv_cache_usage_perc{level}`` is the *maximum* over the level's live replicas of what
each last reported (reserved / capacity): the fullest replica is the one about to make requests
wait, and a max over replicas agrees with ``max by (level)`` over the stages' own gauges of the
same name. A mean would hide one full replica behind idle ones. Per-replica figures are on
``/health``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from common.protocol import LevelStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    """One registry per gateway (not the process-global one), so tests can build several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipespec:requests", "Requests ended, by outcome", ["outcome"], registry=r
        )
        self.rejected_requests = Counter(
            "pipespec:rejected_requests",
            "Requests refused before they started, by HTTP status (429: overloaded)",
            ["api", "code"],
            registry=r,
        )
        self.requests_running = Gauge(
            "pipespec:num_requests_running", "Requests in flight", registry=r
        )
        self.requests_waiting = Gauge(
            "pipespec:num_requests_waiting",
            "Requests queued for a slot (admission control)",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pipespec:prompt_tokens", "Prompt tokens of ended requests", registry=r
        )
        self.generation_tokens = Counter(
            "pipespec:generation_tokens", "Output tokens of ended requests", registry=r
        )
        self.target_forward_passes = Counter(
            "pipespec:target_forward_passes", "Target model passes of finished requests", registry=r
        )
        self.num_drafts = Counter(
            "pipespec:spec_decode_num_drafts",
            "Verification passes that checked >= 1 draft token",
            ["level"],
            registry=r,
        )
        self.num_draft_tokens = Counter(
            "pipespec:spec_decode_num_draft_tokens",
            "Draft tokens checked by this verifier level",
            ["level"],
            registry=r,
        )
        self.num_accepted_tokens = Counter(
            "pipespec:spec_decode_num_accepted_tokens",
            "Draft tokens accepted by this verifier level",
            ["level"],
            registry=r,
        )
        self.num_accepted_tokens_per_pos = Counter(
            "pipespec:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of a verification window",
            ["level", "position"],
            registry=r,
        )
        self.sampled_num_drafts = Counter(
            "pipespec:spec_decode_sampled_num_drafts",
            "Verification passes that checked >= 1 draft token, sampled requests only",
            ["level"],
            registry=r,
        )
        self.sampled_num_draft_tokens = Counter(
            "pipespec:spec_decode_sampled_num_draft_tokens",
            "Draft tokens checked by this verifier level, sampled requests only",
            ["level"],
            registry=r,
        )
        self.sampled_num_accepted_tokens = Counter(
            "pipespec:spec_decode_sampled_num_accepted_tokens",
            "Draft tokens accepted by this verifier level, sampled requests only",
            ["level"],
            registry=r,
        )
        self.rollbacks = Counter(
            "pipespec:rollbacks",
            "Passes of this verifier level that rejected a draft",
            ["level"],
            registry=r,
        )
        self.decode_rejects = Counter(
            "pipespec:decode_rejects",
            "Frames dropped because they did not decode",
            ["socket"],
            registry=r,
        )
        self.send_drops = Counter(
            "pipespec:send_drops", "Messages to stages dropped at the high-water mark", registry=r
        )
        self.resyncs = Counter(
            "pipespec:resyncs", "Start messages re-sent to repair lost or late output", registry=r
        )
        self.reroutes = Counter(
            "pipespec:reroutes", "Requests moved off a lost replica", registry=r
        )
        self.replicas_refused = Counter(
            "pipespec:replicas_refused", "Replicas refused at registration", registry=r
        )
        self.live_replicas = Gauge("pipespec:live_replicas", "Live replicas", ["level"], registry=r)
        self.kv_cache_usage = Gauge(
            "pipespec:kv_cache_usage_perc",
            "KV pool usage of the fullest live replica of the level, 0..1, from heartbeats "
            "(0: no bounded pool reported)",
            ["level"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "pipespec:time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "pipespec:inter_token_latency_seconds",
            "Time between output tokens",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "pipespec:e2e_request_latency_seconds",
            "Request latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "pipespec:request_queue_time_seconds",
            "Time waiting for admission",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch_rejects(self, heartbeats: Callable[[], dict[str, int]], denied: Callable[[], int]):
        """Export, at each scrape, heartbeats the registry dropped (by reason: wrong_key,
        takeover, too_fast) and CURVE handshakes the authenticator refused."""
        self.registry.register(_Rejects(heartbeats, denied))

    def record_levels(self, levels: list[LevelStats], sampled: bool = False) -> None:
        """Add one finished request's per-level counters (verifier levels only); ``sampled``:
        it was a sampled request (also counted in the ``sampled`` counters)."""
        for s in levels:
            if s.level < 1:
                continue
            level = str(s.level)
            self.num_drafts.labels(level).inc(s.drafts)
            self.num_draft_tokens.labels(level).inc(s.draft_tokens)
            self.num_accepted_tokens.labels(level).inc(s.accepted_tokens)
            for position, count in enumerate(s.accepted_per_pos):
                self.num_accepted_tokens_per_pos.labels(level, str(position)).inc(count)
            self.rollbacks.labels(level).inc(s.rollbacks_issued)
            if sampled:
                self.sampled_num_drafts.labels(level).inc(s.drafts)
                self.sampled_num_draft_tokens.labels(level).inc(s.draft_tokens)
                self.sampled_num_accepted_tokens.labels(level).inc(s.accepted_tokens)
        if levels:
            self.target_forward_passes.inc(levels[-1].forward_passes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Rejects:
    """Custom collector over counts the registry and the authenticator keep."""

    def __init__(self, heartbeats: Callable[[], dict[str, int]], denied: Callable[[], int]):
        self.heartbeats, self.denied = heartbeats, denied

    def collect(self):
        family = CounterMetricFamily(
            "pipespec:heartbeats_rejected",
            "Heartbeats dropped: wrong_key, takeover of a live replica id, too_fast",
            labels=["reason"],
        )
        for reason in ("wrong_key", "takeover", "too_fast"):
            family.add_metric([reason], self.heartbeats().get(reason, 0))
        yield family
        yield CounterMetricFamily(
            "pipespec:denied_handshakes",
            "CURVE handshakes refused (key not on the socket's allow-list)",
            value=self.denied(),
        )
