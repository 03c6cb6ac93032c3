"""deploy.harness's config helpers (the system runner itself is exercised by every
multi-process test: tests/e2e, tests/services/gateway/test_real_models.py, ...)."""

from __future__ import annotations

import pytest

from deploy import harness
from deploy.launch import plan_from_config


@pytest.mark.parametrize(
    "stage, threads, expected",
    [
        ({"level": 0}, 1, {"threads": 1, "level": 0}),  # backend hf by default
        ({"level": 0, "backend": "hf"}, 2, {"threads": 2, "level": 0, "backend": "hf"}),
        (
            {"level": 0, "backend": "early-exit"},
            1,
            {"threads": 1, "level": 0, "backend": "early-exit"},
        ),
        ({"level": 0, "backend": "ngram"}, 1, {"level": 0, "backend": "ngram"}),  # no torch
        ({"level": 0, "backend": "simulated"}, 1, {"level": 0, "backend": "simulated"}),
        ({"level": 0, "threads": 4}, 1, {"level": 0, "threads": 4}),  # the stage's own wins
        ({"level": 0}, None, {"level": 0}),  # no threads asked for
    ],
)
def test_threads_go_to_model_stages(stage, threads, expected):
    assert harness.loopback_config("t", [stage], threads=threads)["stages"] == [expected]


def test_loopback_config_plans_on_free_ports():
    stages = [{"level": 0, "backend": "ngram"}, {"level": 1, "model": "/models/t"}]
    config = harness.loopback_config("/models/t", stages, served_model_name="m", http_port=0)
    plan = plan_from_config(config)
    assert plan.gateway.num_levels == 2 and plan.gateway.served_model_name == "m"
    ports = {plan.gateway.http_port, plan.gateway.registry_port, plan.gateway.client_port}
    assert 0 not in ports and len(ports) == 3


def test_with_metrics_ports_copies_and_sorts_by_level():
    config = harness.loopback_config("t", [{"level": 1}, {"level": 0, "backend": "ngram"}])
    copy, ports = harness.with_metrics_ports(config)
    assert [s["level"] for s in copy["stages"]] == [0, 1]
    assert [s["metrics_port"] for s in copy["stages"]] == ports and len(set(ports)) == 2
    assert all("metrics_port" not in s for s in config["stages"])  # the original is untouched


def test_a_shipped_config_on_loopback_moves_off_its_fixed_ports(monkeypatch):
    from pathlib import Path

    from common import model_catalog
    from deploy.launch import read_config

    monkeypatch.setattr(model_catalog, "is_prepared", lambda name, root=None: True)
    path = Path(__file__).parents[2] / "deploy" / "configs" / "smollm2-k3.toml"
    shipped = read_config(path)
    plan = plan_from_config(harness.on_loopback(shipped))
    gateway = plan.gateway
    ports = {gateway.http_port, gateway.registry_port, gateway.client_port}
    assert len(ports) == 3 and not ports & {8000, 5550, 5551, 0}
    assert plan.http_url.startswith("http://127.0.0.1:")
    registry = f"tcp://127.0.0.1:{gateway.registry_port}"
    assert all(c.env["PIPESPEC_STAGE_GATEWAY"] == registry for c in plan.children[1:])
    assert shipped["gateway"]["http_port"] == 8000  # the file's own config is left alone


def test_status_kb_reads_a_live_process_and_none_for_a_gone_one():
    import os
    import subprocess
    import sys

    rss = harness.status_kb(os.getpid(), "VmRSS")
    assert rss is not None and rss > 1000  # a Python with pytest: more than a megabyte
    assert harness.status_kb(os.getpid(), "VmHWM") >= rss
    assert harness.status_kb(os.getpid(), "NoSuchField") is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: no /proc entry
    assert harness.status_kb(gone.pid, "VmRSS") is None
