"""Schemathesis against the gateway's own /openapi.json: every operation, at least 500 generated
cases (valid and invalid), served over real HTTP by uvicorn with the real app, gateway and client
API, and faked stages over real ZeroMQ (``fake_stage``) that answer with a short script, so it
stays fast (``max_tokens`` capped at 64; ``n`` above 1 is refused by the server).

Every response must be free of 5xx and conform to the schema (status codes, content types,
bodies and headers as documented), and invalid input must be refused with a 4xx."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS

from common.tokenization import fingerprint
from deploy.launch import free_port
from services.gateway.__main__ import Server
from services.gateway.app import create_app
from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway
from tests.services.gateway.fake_stage import FakeStage

pytestmark = pytest.mark.slow
CASES_PER_OPERATION = 130  # per operation and mode (valid, invalid)
MIN_CASES = 500
TEXT = "Hello, schema!"


@pytest.fixture
def served(tokenizer, gateway_settings):
    settings = gateway_settings(
        http_port=free_port(),
        max_tokens_limit=64,
        default_max_tokens=16,
        max_requests_in_flight=8,
    )
    gateway = Gateway(settings, fingerprint(tokenizer), [tokenizer.eos_token_id])
    app = create_app(gateway, tokenizer, ClientApi(gateway, tokenizer))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.http_port, log_level="warning", lifespan="on"
    )
    server = Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    fp = fingerprint(tokenizer)
    script = tokenizer.encode(TEXT) + [tokenizer.eos_token_id]
    stages = [
        FakeStage(gateway.reply_to, 0, fingerprint=fp),
        FakeStage(gateway.reply_to, 1, script, fingerprint=fp),
    ]
    while gateway.unavailable_reason() is not None:
        assert time.monotonic() < deadline, gateway.unavailable_reason()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.http_port}"
    finally:
        for stage in stages:
            stage.stop()
        server.should_exit = True
        thread.join(timeout=15)


def test_every_operation_conforms_to_the_schema_and_never_5xx(served):
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    # Every check but "schema-valid data must be accepted": the 400s JSON Schema cannot express
    # (n, sampling, context and vocabulary limits) are documented on the routes instead.
    checks = [c for c in CHECKS.get_all() if c.__name__ != "positive_data_acceptance"]
    assert len(checks) == len(CHECKS.get_all()) - 1
    cases: dict[str, int] = {}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/health/live",
        "/metrics",
    }
    for op in operations:
        for mode in GenerationMode:
            if mode is GenerationMode.NEGATIVE and op.method.lower() != "post":
                continue  # nothing to make invalid: no parameters, no body
            runner(op, mode, served, checks, cases, failures)()
    print(f"\nschemathesis: {sum(cases.values())} cases: {cases}; failures: {len(failures)}")
    assert sum(cases.values()) >= MIN_CASES, cases
    assert not failures, "\n".join(failures[:5])


def runner(op, mode, base_url: str, checks, cases: dict[str, int], failures: list[str]):
    """A hypothesis test sending ``op``'s generated cases of ``mode`` and collecting what fails."""
    label = f"{op.method.upper()} {op.path} {mode.value}"

    @settings(
        max_examples=CASES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        cases[label] = cases.get(label, 0) + 1
        try:
            case.call_and_validate(base_url=base_url, checks=checks, timeout=30)
        except Exception as exc:  # every failure is collected and reported by the caller
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:600]}")

    return run
