"""The HTTP and ZMQ client APIs end to end over faked stages: streamed text, final statistics,
bad client input, and cancellation when an HTTP client disconnects."""

from __future__ import annotations

import json
import socket
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
from services.gateway.app import create_app
from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway
from services.gateway.zmq_client import PipeSpecClient, PipeSpecError
from tests.services.gateway.fake_stage import FakeStage

TEXT = "Ça coûte 3 € — 日本語 🙂"


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class System:
    """App + gateway + client API, and a faked drafter and target that reply with TEXT."""

    def __init__(self, tokenizer, **target_options):
        settings = GatewaySettings(
            tokenizer="built-in-test",
            num_levels=2,
            registry_port=0,
            client_port=0,
            linger_ms=0,
            default_max_tokens=64,
        )
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
def system(tokenizer):
    system = System(tokenizer)
    with TestClient(system.app) as http:
        system.http = http
        system.start_stages()
        yield system
        system.stop_stages()


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") for frame in frames)
    return [frame[len("data: ") :] for frame in frames]


def test_http_stream_is_openai_sse_and_adds_up_to_the_text(system):
    response = system.http.post(
        "/v1/completions", json={"prompt": "Le café", "max_tokens": 64, "stream": True}
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "pipespec" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == TEXT
    assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    final = chunks[-1]
    assert final["usage"]["completion_tokens"] == len(system.script)
    stats = final["spec_decode_stats"]
    assert stats["acceptance"][0]["acceptance_rate"] == 0.75 and stats["target_forward_passes"] == 4


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


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\xc1 not msgpack", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"max_tokens": 3}), "prompt: Field required"),
        (msgpack.packb({"prompt": "hi", "max_tokens": "3"}), "max_tokens: Input should be a valid integer"),
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
def test_http_client_disconnect_cancels_the_request(tokenizer, stream):
    system = System(tokenizer, piece=1, delay_s=0.05)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(system.app, host="127.0.0.1", port=port, log_level="warning"))
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
