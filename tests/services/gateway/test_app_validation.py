"""The HTTP API of a gateway with no stages: bad input -> 4xx in OpenAI's error shape, no route
-> 503 with the reason, /health, /health/live, /v1/models, /metrics and /openapi.json."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from common.protocol import Heartbeat
from common.tokenization import fingerprint
from services.gateway.app import create_app
from services.gateway.core import Gateway

MODEL = "tiny-pipespec"
LIMIT = 1000
BODY_LIMIT = 4096


@pytest.fixture
def gateway(tokenizer, gateway_settings) -> Gateway:
    settings = gateway_settings(
        served_model_name=MODEL,
        max_tokens_limit=LIMIT,
        max_request_bytes=BODY_LIMIT,
        route_wait_s=0.1,  # no stages here: requests that pass validation end in 503 quickly
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
        ({"prompt": 42}, "prompt", "prompt must be a string or a list of token ids"),
        ({"prompt": ["a", "b"]}, "prompt", "only one prompt per request"),
        ({"prompt": [1, "b"]}, "prompt", "prompt must be a string or a list of token ids"),
        ({"prompt": [5, 10_000_000]}, "prompt", "token id 10000000 is outside the vocabulary"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": 4.5}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens", "at least 1"),
        ({"prompt": "hi", "max_tokens": LIMIT + 1}, "max_tokens", f"at most {LIMIT}"),
        ({"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "hi", "top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"prompt": "hi", "top_k": 2**105}, "top_k", "less than or equal to 2147483647"),
        ({"prompt": "hi", "min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"prompt": "hi", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "hi", "n": 17}, "n", "less than or equal to 16"),
        ({"prompt": "hi", "seed": 2**64}, "seed", "less than"),
        ({"prompt": "hi", "user": 7}, "user", "valid string"),
        ({"prompt": "hi", "echo": "yes"}, "echo", "valid boolean"),
        ({"prompt": "hi", "stop": 3}, "stop", "string or a list of strings"),
        ({"prompt": "hi", "stop": ["a", ""]}, "stop", "must not be empty"),
        ({"prompt": "hi", "stop": list("abcdefghijklmnopq")}, "stop", "at most 16 stop strings"),
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "only 0 is accepted"),
        (
            {"prompt": "hi", "stream_options": {"include_usage": True}},
            None,
            "only allowed with stream",
        ),
        (
            {"prompt": "hi", "stream": True, "stream_options": {"x": 1}},
            "stream_options.x",
            "unsupported",
        ),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "hi", "logprobs": 1, "echo": True}, "echo", "echo with logprobs"),
        ({"prompt": "hi", "best_of": 2}, "best_of", "unsupported field 'best_of' (supported:"),
        ({"prompt": ""}, "prompt", "must not be empty"),
    ],
)
def test_bad_fields_are_400_with_the_field_named(client, body, param, words):
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "messages", "field 'messages' is required"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": "hi"}, "messages", "valid list"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages.0.role",
            "'system', 'developer'",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages.0.content",
            "string or a list of text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
            "part 0: type",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "is required"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            None,
            "top_logprobs is only allowed with logprobs: true",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1},
            "logprobs",
            "valid boolean",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "echo": True},
            "echo",
            "unsupported field",
        ),
    ],
)
def test_bad_chat_fields_are_400_with_the_field_named(client, body, param, words):
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param and words in error["message"], error


def test_chat_without_a_template_says_how_to_get_one(client):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert "no chat template" in error["message"] and "chat_template" in error["message"]


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "hi"', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8: invalid continuation byte at byte 15"),
        (b'{"prompt": "\\ud800 lone"}', "unpaired surrogate"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"null", "must be a JSON object, got NoneType"),
    ],
)
def test_malformed_bodies_are_400(client, raw, words):
    error = error_of(client.post("/v1/completions", content=raw), 400)
    assert words in error["message"]


def test_oversized_bodies_are_413_whether_declared_or_streamed(client):
    big = b'{"prompt": "' + b"a" * BODY_LIMIT + b'"}'
    error = error_of(client.post("/v1/completions", content=big), 413)
    assert f"over the limit of {BODY_LIMIT} bytes" in error["message"]
    chunked = iter([big[:1000], big[1000:]])  # no content-length: counted while reading
    error_of(client.post("/v1/chat/completions", content=chunked), 413)


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
    error = error_of(
        client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 17 - n}), 400
    )
    assert "context of 16 tokens" in error["message"] and error["param"] == "max_tokens"
    long = "The quick brown fox jumps over the lazy dog. " * 3
    error = error_of(client.post("/v1/completions", json={"prompt": long}), 400)
    assert (
        f"the prompt is {len(tokenizer.encode(long))} tokens, but the model's context is 16"
        in error["message"]
    )
    # without max_tokens, the default is capped to what the context leaves: no error, but no route
    error_of(client.post("/v1/completions", json={"prompt": prompt}), 503)


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


def test_health_says_the_transport_is_insecure(client):
    """This gateway runs with insecure = true (plain TCP): /health must say so. (The launched
    systems of tests/e2e use CURVE and check "insecure": false.)"""
    body = client.get("/health").json()
    assert body["insecure"] is True and body["restarts"] == 0


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
    assert 'pipespec:rejected_requests_total{api="http",code="400"} 1.0' in text
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


def test_liveness_needs_no_stages(client):
    assert client.get("/health/live").json() == {"status": "alive"}


def test_openapi_documents_the_request_bodies(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions"} <= set(
        components
    )
    assert {"prompt", "max_tokens", "stop", "echo", "stream_options"} <= set(
        components["CompletionRequest"]["properties"]
    )
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
