"""The HTTP and ZMQ client APIs end to end over faked stages: completions and chat, streamed
and not, stop strings, echo, usage, admission control (429), bad ZMQ input, and cancellation
when an HTTP client disconnects."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import msgpack
import pytest
import uvicorn
import zmq
from fastapi.testclient import TestClient

from common.settings import GatewaySettings
from common.sockets import open_socket
from common.tokenization import fingerprint
from deploy.launch import free_port
from services.gateway.app import create_app
from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway
from services.gateway.zmq_client import PipeSpecClient, PipeSpecError
from tests.services.gateway.fake_stage import FakeStage

TEXT = "Ça coûte 3 € — 日本語 🙂"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class System:
    """App + gateway + client API, and a faked drafter and target that reply with TEXT."""

    def __init__(self, tokenizer, settings: GatewaySettings, **target_options):
        self.gateway = Gateway(settings, fingerprint(tokenizer), [tokenizer.eos_token_id])
        self.client_api = ClientApi(self.gateway, tokenizer)
        self.app = create_app(self.gateway, tokenizer, self.client_api)
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(TEXT) + [tokenizer.eos_token_id]
        self.target_options = target_options
        self.stages: list[FakeStage] = []

    def start_stages(self) -> None:
        fp = self.gateway.registry.tokenizer_fingerprint
        self.stages = [
            FakeStage(self.gateway.reply_to, 0, fingerprint=fp),
            FakeStage(self.gateway.reply_to, 1, self.script, fingerprint=fp, **self.target_options),
        ]
        wait_until(lambda: self.gateway.unavailable_reason() is None)

    def stop_stages(self) -> None:
        for stage in self.stages:
            stage.stop()


@pytest.fixture
def make_system(tokenizer, gateway_settings):
    """``make_system(settings=None, **target_options)``: a System on the shared test settings
    with 64 tokens by default and the test chat template, then the fields in ``settings``."""

    def make(settings: dict | None = None, **target_options) -> System:
        fields = dict(default_max_tokens=64, chat_template=CHAT_TEMPLATE) | (settings or {})
        return System(tokenizer, gateway_settings(**fields), **target_options)

    return make


@contextlib.contextmanager
def running(system: System):
    """``system`` served by a TestClient (``system.http``), with its stages up."""
    with TestClient(system.app) as http:
        system.http = http
        system.start_stages()
        try:
            yield system
        finally:
            system.stop_stages()


@pytest.fixture
def system(make_system):
    with running(make_system()) as system:
        yield system


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") for frame in frames)
    return [frame[len("data: ") :] for frame in frames]


def stream_chunks(system, path: str, body: dict) -> list[dict]:
    response = system.http.post(path, json=body | {"stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_http_stream_is_openai_sse_and_adds_up_to_the_text(system):
    body = {"prompt": "Le café", "max_tokens": 64, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(system, "/v1/completions", body)
    assert all(c["object"] == "text_completion" and c["model"] == "pipespec" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *texts, final, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in texts) == TEXT
    assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in (*texts, final)][-2:] == [None, "stop"]
    assert all(c["usage"] is None for c in (*texts, final))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(system.script)
    stats = final["spec_decode_stats"]
    assert stats["acceptance"][0]["acceptance_rate"] == 0.75 and stats["target_forward_passes"] == 4


def test_http_stream_without_include_usage_has_no_usage(system):
    chunks = stream_chunks(system, "/v1/completions", {"prompt": "Le café"})
    assert (
        all("usage" not in c for c in chunks)
        and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    )


def test_chat_renders_the_template_and_answers_as_the_assistant(system):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Le café ?"},
    ]
    response = system.http.post(
        "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 5}
    )
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": system.tokenizer.decode(system.script[:5]),
    }
    assert body["choices"][0]["finish_reason"] == "length"
    prompt = system.stages[1].starts()[-1].prompt
    expected = "<system>Be brief.<user>Le café ?<assistant>"
    assert prompt == system.tokenizer.encode(expected, add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_chat_max_completion_tokens_wins_and_is_named_in_errors(system):
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_tokens": 9, "max_completion_tokens": 2}
    assert (
        system.http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
        == 2
    )
    error = system.http.post(
        "/v1/chat/completions", json=body | {"max_completion_tokens": 0}
    ).json()["error"]
    assert (
        error["param"] == "max_completion_tokens"
        and "max_completion_tokens must be at least 1" in error["message"]
    )


def test_chat_stream_starts_with_the_role_and_ends_with_an_empty_delta(system):
    parts = [{"type": "text", "text": "Le "}, {"type": "text", "text": "café"}]
    chunks = stream_chunks(
        system, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TEXT
    assert chunks[-1]["choices"][0] | {"logprobs": None} == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert system.stages[1].starts()[-1].prompt == system.tokenizer.encode(
        "<user>Le café<assistant>", add_special_tokens=False
    )


@pytest.mark.parametrize(
    "stop, expected",
    [
        ("€ —", "Ça coûte 3 "),  # spans tokens and multi-byte characters
        (["日本", "3"], "Ça coûte "),  # the earliest of several
        ("🙂", "Ça coûte 3 € — 日本語 "),
        ("Ç", ""),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
def test_stop_strings_end_the_request_and_never_reach_the_client(
    make_system, stop, expected, stream
):
    with running(make_system(piece=1, delay_s=0.01)) as system:
        body = {"prompt": "Le café", "stop": stop}
        if stream:
            chunks = stream_chunks(system, "/v1/completions", body)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            final = chunks[-1]
        else:
            final = system.http.post("/v1/completions", json=body).json()
            text = final["choices"][0]["text"]
        assert text == expected and final["choices"][0]["finish_reason"] == "stop"
        assert 0 < final["spec_decode_stats"]["completion_tokens"] < len(system.script)
        wait_until(lambda: system.stages[1].cancels())  # the rest is not generated


def test_a_stop_string_that_never_comes_changes_nothing(system):
    body = {"prompt": "Le café", "stop": ["nope", "€€"]}
    chunks = stream_chunks(system, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_echo_and_token_id_prompts(system):
    ids = system.tokenizer.encode("Le café")
    body = system.http.post(
        "/v1/completions", json={"prompt": ids, "echo": True, "max_tokens": 3}
    ).json()
    assert body["choices"][0]["text"] == "Le café" + system.tokenizer.decode(system.script[:3])
    assert system.stages[1].starts()[-1].prompt == ids
    chunks = stream_chunks(system, "/v1/completions", {"prompt": "Le café", "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Le café" + TEXT


def test_requests_beyond_the_admission_limits_get_429(make_system):
    settings = {"max_requests_in_flight": 1, "max_queued_requests": 1, "queue_timeout_s": 0.2}
    with running(make_system(settings, piece=1, delay_s=0.05)) as system:
        first = threading.Thread(
            target=system.http.post, args=("/v1/completions",), kwargs={"json": {"prompt": "a"}}
        )
        first.start()
        wait_until(lambda: system.gateway.requests_running == 1)
        queued = []
        second = threading.Thread(
            target=lambda: queued.append(system.http.post("/v1/completions", json={"prompt": "b"}))
        )
        second.start()
        wait_until(lambda: system.gateway.requests_waiting == 1)
        over = system.http.post("/v1/completions", json={"prompt": "c"})
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert "at capacity (1 requests in flight, 1 waiting" in over.json()["error"]["message"]
        second.join(timeout=5)
        assert queued[0].status_code == 429  # waited past queue_timeout_s
        assert "no request slot freed within 0.2 s" in queued[0].json()["error"]["message"]
        first.join(timeout=10)
        assert (
            system.http.post("/v1/completions", json={"prompt": "d", "max_tokens": 2}).status_code
            == 200
        )
        assert (system.gateway.requests_running, system.gateway.requests_waiting) == (0, 0)
        metrics = system.http.get("/metrics").text
        assert 'pipespec:rejected_requests_total{api="http",code="429"} 2.0' in metrics
        assert "pipespec:num_requests_waiting 0.0" in metrics


def test_http_non_stream_returns_one_completion_object(system):
    response = system.http.post("/v1/completions", json={"prompt": "Le café", "max_tokens": 5})
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert body["spec_decode_stats"]["completion_tokens"] == 5


def test_zmq_client_streams_and_completes(system):
    with PipeSpecClient(system.client_api.endpoint, timeout_s=5) as client:
        assert "".join(client.stream("Le café", max_tokens=64)) == TEXT
        text, stats = client.complete("Le café")
        assert text == TEXT and stats["completion_tokens"] == len(system.script)


def test_each_request_is_checked_against_the_limits_once(system, monkeypatch):
    """One check per request, whatever the API and however many choices it runs as."""
    checks = []
    check = system.gateway.check
    monkeypatch.setattr(
        system.gateway, "check", lambda *args, **kw: checks.append(args) or check(*args, **kw)
    )
    response = system.http.post("/v1/completions", json={"prompt": "Le café", "n": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3 and len(checks) == 1
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "n": 2}
    response = system.http.post("/v1/chat/completions", json=body | {"stream": True})
    assert response.status_code == 200, response.text
    assert len(checks) == 2
    with PipeSpecClient(system.client_api.endpoint, timeout_s=5) as client:
        client.complete("Le café", max_tokens=4)
    assert len(checks) == 3


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\xc1 not msgpack", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"max_tokens": 3}), "prompt: Field required"),
        (
            msgpack.packb({"prompt": "hi", "max_tokens": "3"}),
            "max_tokens: Input should be a valid integer",
        ),
        (msgpack.packb({"prompt": "hi", "max_tokens": 0}), "at least 1"),
        (msgpack.packb({"prompt": "", "max_tokens": 3}), "must not be empty"),
        (msgpack.packb({"prompt": "hi", "stream": True}), "stream: Extra inputs are not permitted"),
    ],
)
def test_zmq_bad_input_gets_an_error_and_nothing_breaks(system, payload, words):
    ctx = zmq.Context()
    dealer = open_socket(ctx, zmq.DEALER, system.client_api.endpoint, linger_ms=0)
    try:
        dealer.send(payload)
        assert dealer.poll(5000)
        reply = msgpack.unpackb(dealer.recv())
        assert reply["type"] == "error" and words in reply["message"], reply
    finally:
        dealer.close()
        ctx.term()
    with PipeSpecClient(system.client_api.endpoint, timeout_s=5) as client:
        text, _ = client.complete("still fine", max_tokens=3)
        assert text == system.tokenizer.decode(system.script[:3])
        with pytest.raises(PipeSpecError, match="at least 1"):
            client.complete("hi", max_tokens=0)
    assert "pipespec:rejected_requests_total" in system.http.get("/metrics").text


@pytest.mark.parametrize("stream", [True, False])
def test_http_client_disconnect_cancels_the_request(make_system, stream):
    system = make_system(piece=1, delay_s=0.05)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(system.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        system.start_stages()
        target = system.stages[1]
        body = {"prompt": "hi", "stream": stream}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=0.3) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json=body) as response:
                    assert next(response.iter_lines()).startswith("data: ")
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/completions", json=body)
        wait_until(lambda: target.cancels())
        wait_until(lambda: not system.gateway.tracker.requests)
        assert len(target.cancels()) == 1
    finally:
        system.stop_stages()
        server.should_exit = True
        thread.join(timeout=10)


def test_kv_usage_on_health_and_metrics_and_a_request_no_pool_can_hold(make_system, tokenizer):
    """The target reports 48 of 192 KV positions reserved and 2 requests waiting for room."""
    with running(make_system({"route_wait_s": 0.1}, kv=(48, 192, 2))) as system:
        levels = system.http.get("/health").json()["levels"]
        target, drafter = levels[1][0], levels[0][0]
        assert (target["kv_used_tokens"], target["kv_capacity_tokens"]) == (48, 192)
        assert (target["kv_cache_usage_perc"], target["waiting_requests"]) == (0.25, 2)
        assert (drafter["kv_capacity_tokens"], drafter["kv_cache_usage_perc"]) == (0, 0.0)
        wait_until(
            lambda: (
                'pipespec:kv_cache_usage_perc{level="1"} 0.25' in system.http.get("/metrics").text
            )
        )
        assert 'pipespec:kv_cache_usage_perc{level="0"} 0.0' in system.http.get("/metrics").text
        # Short of free KV now (144 free) is no refusal: the stage queues it until room frees.
        fits = system.http.post("/v1/completions", json={"prompt": "Le café", "max_tokens": 150})
        assert fits.status_code == 200, fits.text
        prompt_ids = tokenizer.encode("Le café")
        never = system.http.post(
            "/v1/completions",
            json={"prompt": prompt_ids, "max_tokens": 193 - len(prompt_ids)},
        )
        assert never.status_code == 503
        assert (
            "no replica at level 1 can hold this request: it needs 193 KV positions"
            in never.json()["error"]["message"]
        )
        assert [s.max_tokens for s in system.stages[1].starts()] == [150]  # nothing sent
