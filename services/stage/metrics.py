"""A stage's Prometheus metrics (vLLM spec-decode vocabulary) and its HTTP side:
``/metrics``, ``/health/live`` (main loop responsive) and ``/health/ready`` (model loaded and
taking requests), served by the standard library's WSGI server in a daemon thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily

MAX_POSITION_LABEL = 32  # accepted-per-position is counted for the first 32 draft positions


class StageMetrics:
    """Implements the engine's PassObserver."""

    def __init__(self, level: int):
        self.registry = CollectorRegistry()
        lv = {"level": str(level)}
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pipespec:{name}", doc, ["level"], registry=r).labels(**lv)

        self.forward_passes = counter("stage_forward_passes", "Model forward passes")
        self.drafts = counter("spec_decode_num_drafts", "Passes that verified >= 1 draft token")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.emitted_tokens = counter("stage_emitted_tokens", "Tokens appended by passes")
        self.rollbacks_issued = counter("stage_rollbacks_issued", "Passes that rejected a draft")
        self.rollbacks_applied = counter("stage_rollbacks_applied", "Rewrites from a level above")
        self.stale_spans = counter("stage_stale_spans", "Spans dropped as stale")
        self.rejected_frames = counter("stage_rejected_frames", "Frames that failed to decode")
        self.accepted_per_pos = Counter(
            "pipespec:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafts by position",
            ["level", "position"],
            registry=r,
        )
        self.pass_seconds = Histogram(
            "pipespec:stage_pass_seconds",
            "Forward pass wall time",
            ["level"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        ).labels(**lv)
        self.active_requests = Gauge(
            "pipespec:stage_active_requests", "Requests held", ["level"], registry=r
        ).labels(**lv)
        self.queue_depth = Gauge(
            "pipespec:stage_queue_depth", "Requests waiting for a pass", ["level"], registry=r
        ).labels(**lv)
        # vLLM's names: KV pool occupancy (reserved / capacity; 0 when the pool is unbounded)
        # and requests held but waiting for KV room.
        self.kv_cache_usage = Gauge(
            "pipespec:kv_cache_usage_perc",
            "KV pool usage, 0..1: positions reserved by open requests / capacity (0 = unbounded)",
            ["level"],
            registry=r,
        ).labels(**lv)
        self.requests_waiting = Gauge(
            "pipespec:num_requests_waiting",
            "Requests held but waiting for room in the KV pool",
            ["level"],
            registry=r,
        ).labels(**lv)
        # Batched passes: mean batch size = rate(..._pass_requests_total) / rate(..._passes_total)
        self.batched_passes = counter("stage_batched_passes", "Batched forward passes")
        self.batched_pass_requests = counter(
            "stage_batched_pass_requests", "Requests served, summed over batched passes"
        )
        self.batched_pass_tokens = counter(
            "stage_batched_pass_tokens", "Tokens fed, summed over batched passes"
        )
        self._level = str(level)

    def watch(
        self,
        engine_counters: Callable[[], dict[str, int]],
        dropped_sends: Callable[[], int],
        denied_handshakes: Callable[[], int],
    ) -> None:
        """Export counts the service keeps elsewhere, read at each scrape: the engine's reject
        and repair counters (by reason), sends dropped at the high-water mark, and CURVE
        handshakes the authenticator refused."""
        self.registry.register(
            _Counts(self._level, engine_counters, dropped_sends, denied_handshakes)
        )

    def on_pass(
        self, drafts: int, accepted: int, emitted: int, rejected: bool, seconds: float
    ) -> None:
        self.forward_passes.inc()
        self.emitted_tokens.inc(emitted)
        self.pass_seconds.observe(seconds)
        if drafts:
            self.drafts.inc()
            self.draft_tokens.inc(drafts)
            self.accepted_tokens.inc(accepted)
            for pos in range(min(accepted, MAX_POSITION_LABEL)):
                self.accepted_per_pos.labels(level=self._level, position=str(pos)).inc()
        if rejected:
            self.rollbacks_issued.inc()

    def on_batch(self, requests: int, tokens: int) -> None:
        """One batched forward pass that served ``requests`` requests with ``tokens`` tokens."""
        self.batched_passes.inc()
        self.batched_pass_requests.inc(requests)
        self.batched_pass_tokens.inc(tokens)

    def set_kv(self, used_tokens: int, capacity_tokens: int, waiting: int) -> None:
        """The KV pool's occupancy and the requests waiting for room (capacity 0: unbounded)."""
        self.kv_cache_usage.set(used_tokens / capacity_tokens if capacity_tokens else 0.0)
        self.requests_waiting.set(waiting)

    def on_rollback_applied(self) -> None:
        self.rollbacks_applied.inc()

    def on_stale_span(self) -> None:
        self.stale_spans.inc()


class _Counts:
    """A custom collector: counters owned by the engine, the outbox and the authenticator."""

    def __init__(self, level: str, engine, dropped, denied):
        self.level, self.engine, self.dropped, self.denied = level, engine, dropped, denied

    def collect(self):
        events = CounterMetricFamily(
            "pipespec:stage_engine_events",
            "Messages the engine refused or repaired, by reason",
            labels=["level", "reason"],
        )
        for reason, count in sorted(dict(self.engine()).items()):
            events.add_metric([self.level, reason], count)
        yield events
        yield _one(
            "pipespec:stage_send_drops",
            "Messages dropped at a peer's high-water mark",
            self.level,
            self.dropped(),
        )
        yield _one(
            "pipespec:stage_denied_handshakes",
            "CURVE handshakes refused (key not on the socket's allow-list)",
            self.level,
            self.denied(),
        )


def _one(name: str, doc: str, level: str, value: int) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["level"])
    family.add_metric([level], value)
    return family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds would flood the log
        pass


def serve_http(
    metrics: StageMetrics, host: str, port: int, live: Callable[[], bool], ready: Callable[[], bool]
) -> WSGIServer:
    """Start the stage's HTTP endpoints in a daemon thread; returns the server (``.server_port``)."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/health/live", "/health/ready"):
            ok = live() if path.endswith("live") else (live() and ready())
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"unavailable\n"]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="stage-http", daemon=True).start()
    return server


class LoopWatch:
    """Liveness: the main loop calls ``beat()``; live while the last beat is recent."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.last = timeout_s, time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.timeout_s
