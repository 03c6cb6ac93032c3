"""The HTTP API of a gateway with no stages: bad input -> 4xx in OpenAI's error shape, no route
-> 503 with the reason, /health, /v1/models and /metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from common.protocol import Heartbeat
from common.settings import GatewaySettings
from common.tokenization import fingerprint
from services.gateway.app import create_app
from services.gateway.core import MAX_TOKENS_LIMIT, Gateway

MODEL = "tiny-pipespec"


@pytest.fixture
def gateway(tokenizer) -> Gateway:
    settings = GatewaySettings(
        tokenizer="built-in-test",
        num_levels=2,
        served_model_name=MODEL,
        registry_port=0,
        client_port=0,
        linger_ms=0,
    )
    return Gateway(settings, fingerprint(tokenizer), [tokenizer.eos_token_id])


@pytest.fixture
def client(gateway, tokenizer):
    with TestClient(create_app(gateway, tokenizer)) as client:
        yield client


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"max_tokens": 4}, "prompt", "field 'prompt' is required"),
        ({"prompt": 42}, "prompt", "valid string"),
        ({"prompt": ["a", "b"]}, "prompt", "valid string"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": 4.5}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens", "at least 1"),
        ({"prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens", f"at most {MAX_TOKENS_LIMIT}"),
        ({"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": "hi", "temperature": 0.7}, "temperature", "unsupported field 'temperature'"),
        ({"prompt": ""}, "prompt", "must not be empty"),
    ],
)
def test_bad_fields_are_400_with_the_field_named(client, body, param, words):
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_malformed_bodies_are_400(client, raw):
    error = error_of(client.post("/v1/completions", content=raw), 400)
    assert "JSON" in error["message"]


def test_unknown_model_is_404(client):
    error = error_of(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404)
    assert MODEL in error["message"] and error["param"] == "model"


def test_prompt_plus_max_tokens_beyond_the_targets_context_is_400(client, gateway, tokenizer):
    gateway.registry.apply(
        Heartbeat(
            replica="t",
            incarnation="t",
            level=1,
            inbox="tcp://127.0.0.1:9",
            notices="tcp://127.0.0.1:9",
            ready=True,
            max_context=16,
        )
    )
    prompt = "The quick brown fox"
    n = len(tokenizer.encode(prompt))
    error = error_of(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 17 - n}), 400)
    assert "context of 16 tokens" in error["message"] and error["param"] == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_valid_request_without_stages_is_503_with_the_reason(client, stream):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": stream}
    error = error_of(client.post("/v1/completions", json=body), 503)
    assert "no live replica at level 0" in error["message"]


def test_health_is_503_and_says_which_level_is_missing(client):
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "level 0" in response.json()["reason"]


def test_health_names_refused_replicas(client, gateway):
    gateway.registry.apply(
        Heartbeat(
            replica="odd",
            incarnation="odd",
            level=0,
            inbox="tcp://127.0.0.1:9",
            notices="tcp://127.0.0.1:9",
            ready=True,
            tokenizer_fingerprint="other",
        )
    )
    body = client.get("/health").json()
    assert "tokenizer fingerprint other differs" in body["refused"]["odd"]
    assert "odd: tokenizer fingerprint" in body["reason"]


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]


def test_metrics_count_rejections_and_use_vllm_names(client):
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    text = client.get("/metrics").text
    assert 'pipespec:rejected_requests_total{api="http"} 1.0' in text
    for name in (
        "spec_decode_num_drafts",
        "spec_decode_num_draft_tokens",
        "spec_decode_num_accepted_tokens",
        "rollbacks",
        "decode_rejects",
        "requests",
        "generation_tokens",
    ):
        assert f"# TYPE pipespec:{name}_total counter" in text


def test_unknown_path_uses_the_error_shape(client):
    error_of(client.get("/v1/nothing"), 404)
