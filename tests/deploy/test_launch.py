"""deploy.launch's config handling (no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import model_catalog
from deploy import launch
from deploy.demo import format_stats
from deploy.launch import LaunchError, load_plan, plan_from_config

CONFIGS = Path(__file__).parents[2] / "deploy" / "configs"


def config(**gateway) -> dict:
    return {
        "gateway": {"tokenizer": "/models/t", "num_levels": 2} | gateway,
        "stages": [
            {"level": 0, "backend": "ngram"},
            {"level": 1, "model": "/models/t", "replicas": 2},
        ],
    }


def test_children_get_their_settings_as_environment_variables():
    plan = plan_from_config(config(registry_port=5600, served_model_name="m"))
    assert [c.name for c in plan.children] == ["gateway", "stage0", "stage1.0", "stage1.1"]
    gateway, *stages = plan.children
    assert (
        gateway.module == "services.gateway"
        and gateway.env["PIPESPEC_GATEWAY_SERVED_MODEL_NAME"] == "m"
    )
    assert all(s.module == "services.stage" for s in stages)
    assert {s.env["PIPESPEC_STAGE_GATEWAY"] for s in stages} == {"tcp://127.0.0.1:5600"}
    assert "PIPESPEC_STAGE_REPLICAS" not in stages[1].env
    assert (
        plan.http_url == "http://127.0.0.1:8000" and plan.client_endpoint == "tcp://127.0.0.1:5551"
    )


def test_port_zero_means_a_free_port():
    plan = plan_from_config(config(http_port=0, registry_port=0, client_port=0))
    ports = [plan.gateway.http_port, plan.gateway.registry_port, plan.gateway.client_port]
    assert 0 not in ports
    assert plan.children[1].env["PIPESPEC_STAGE_GATEWAY"].endswith(f":{plan.gateway.registry_port}")


def test_free_ports_are_never_handed_out_twice_even_when_the_os_offers_one_again(monkeypatch):
    """The OS may offer a port it has just closed again at once: free_port skips it."""
    offers = iter([41001, 41001, 41002, 41001, 41003])

    class Offering:
        def __init__(self):
            self.port = next(offers)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    monkeypatch.setattr(launch.socket, "socket", Offering)
    assert [launch.free_port() for _ in range(3)] == [41001, 41002, 41003]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["stages"].pop(), "stages cover levels [0], but the gateway needs 0..1"),
        (lambda c: c["stages"][1].update(replicas=0), "replicas must be a positive integer"),
        (lambda c: c["stages"][1].update(colour="red"), "[[stages]] #2"),
        (lambda c: c["gateway"].pop("num_levels"), "[gateway]"),
        (lambda c: c.update(stage=[]), "unknown top-level key(s) ['stage']"),
        (lambda c: c["stages"][0].update(model="@no-such-model"), "unknown model 'no-such-model'"),
        (lambda c: c["stages"][1].update(draft_vocab=64), "a setting of the quantized backend"),
        (
            lambda c: c["stages"][1].update(backend="quantized", draft_vocab=64),
            "draft_vocab is for drafters",
        ),
    ],
)
def test_config_errors_say_what_is_wrong(change, words):
    bad = config()
    change(bad)
    with pytest.raises(LaunchError) as exc:
        plan_from_config(bad)
    assert words in str(exc.value)


def test_a_missing_model_names_the_prepare_command(monkeypatch):
    monkeypatch.setattr(model_catalog, "is_prepared", lambda name, root=None: False)
    with pytest.raises(LaunchError, match="python -m common.model_store prepare smollm2"):
        load_plan(CONFIGS / "smollm2-k3.toml")


@pytest.mark.parametrize("name, levels", [("smollm2-k2", 2), ("smollm2-k3", 3)])
def test_shipped_configs_describe_one_stage_per_level(monkeypatch, name, levels):
    monkeypatch.setattr(model_catalog, "is_prepared", lambda name, root=None: True)
    plan = load_plan(CONFIGS / f"{name}.toml")
    assert plan.gateway.num_levels == levels and plan.gateway.http_port == 8000
    assert [c.name for c in plan.children] == ["gateway"] + [f"stage{i}" for i in range(levels)]
    assert plan.children[-1].env["PIPESPEC_STAGE_BACKEND"] == "hf"


def test_stats_are_printed_for_people():
    stats = {
        "request_id": "cmpl-1",
        "completion_tokens": 8,
        "wall_time_s": 0.5,
        "tokens_per_s": 16.0,
        "time_to_first_token_s": 0.1,
        "target_forward_passes": 4,
        "tokens_per_target_pass": 2.0,
        "acceptance": [
            {
                "level": 1,
                "accepted_tokens": 3,
                "draft_tokens": 4,
                "acceptance_rate": 0.75,
                "drafts": 2,
                "rollbacks": 1,
            }
        ],
    }
    text = format_stats(stats)
    assert "8 tokens in 0.50 s (16.0 tokens/s), first token after 0.10 s" in text
    assert "level 1 accepted 3/4 draft tokens (75.0%) in 2 verifications, 1 rollbacks" in text


def test_each_run_makes_fresh_keys_and_gives_each_child_only_its_own_secret(tmp_path):
    from common.security import load_curve
    from deploy.launch import System

    runs = []
    for _ in range(2):
        system = System(plan_from_config(config()), tmp_path / "logs")
        system._make_keys()  # what start() does before spawning
        keys = system.plan.keys_dir
        for child in system.plan.children:
            prefix = "PIPESPEC_GATEWAY_" if child.name == "gateway" else "PIPESPEC_STAGE_"
            secret = Path(child.env[f"{prefix}SECRET_KEY"])
            assert secret.parent.name == child.role and secret.is_relative_to(keys)
            assert secret.stat().st_mode & 0o077 == 0, "secret keys are private"
            curve = load_curve(child.role, child.env[f"{prefix}PUBLIC_KEYS"], secret)
            assert set(curve.peers) == {"gateway", "client", "level0", "level1"}
        runs.append(curve.public)
        system.stop()
        assert not keys.exists(), "the run's keys are removed when it stops"
    assert runs[0] != runs[1], "a fresh set per run"


def test_insecure_gateway_makes_the_whole_system_plain_tcp():
    plan = plan_from_config(config(insecure=True))
    assert not plan.secure
    assert all(c.env["PIPESPEC_STAGE_INSECURE"] == "true" for c in plan.children[1:])
