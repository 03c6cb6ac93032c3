"""A client that disconnects mid-request cancels it at every stage within 1 s. Real stage
processes (k=3, simulated backend) with their own /metrics: each stage's
``pipespec:stage_active_requests`` gauge shows the request, then shows it gone."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from benchmarks.load_test import save_simulation_tokenizer, simulated_config
from deploy.harness import with_metrics_ports
from tests.harness import launched, stage_gauge

pytestmark = pytest.mark.slow

BODY = {"prompt": "w5 w6 w7", "max_tokens": 20_000}  # minutes of output: only a cancel ends it
GAUGE_INTERVAL_S = 0.1  # stages refresh their gauges this often (their heartbeat interval)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    cfg = simulated_config(save_simulation_tokenizer(root / "tokenizer"), levels=3, target_ms=5)
    cfg, ports = with_metrics_ports(cfg)
    for stage in cfg["stages"]:
        stage["heartbeat_interval_s"] = GAUGE_INTERVAL_S
        stage["kv_pool_tokens"] = 1 << 16  # a pool that holds the request's worst case
    with launched(cfg, root / "logs") as system:
        yield system.plan, ports


def wait_for_stages(ports: list[int], active: float, timeout_s: float) -> float:
    """Seconds until every stage reports ``active`` requests; fails after ``timeout_s``."""
    started = time.monotonic()
    while [stage_gauge(port) for port in ports] != [active] * len(ports):
        assert time.monotonic() - started < timeout_s, (
            f"stages did not reach {active} active requests"
        )
        time.sleep(0.02)
    return time.monotonic() - started


def test_stream_disconnect_frees_every_stage_within_a_second(sim):
    plan, ports = sim
    with httpx.Client(base_url=plan.http_url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=BODY | {"stream": True}) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            wait_for_stages(ports, 1, timeout_s=5)
        # leaving the block closed the connection mid-stream
        assert wait_for_stages(ports, 0, timeout_s=5) < 1.0
        assert http.get("/health").json()["requests_running"] == 0
        assert 'pipespec:requests_total{outcome="cancelled"}' in http.get("/metrics").text


def test_non_stream_disconnect_frees_every_stage_within_a_second(sim):
    plan, ports = sim
    gone_at: list[float] = []

    def impatient_client() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{plan.http_url}/v1/completions", json=BODY, timeout=httpx.Timeout(10, read=1.5)
            )
        gone_at.append(time.monotonic())

    client = threading.Thread(target=impatient_client)
    client.start()
    wait_for_stages(ports, 1, timeout_s=5)
    client.join(timeout=10)
    assert gone_at, "the client did not time out"
    wait_for_stages(ports, 0, timeout_s=5)
    assert time.monotonic() - gone_at[0] < 1.0
