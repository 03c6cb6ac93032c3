"""The gateway in front of real stage processes (n-gram drafter -> tiny random Llama target),
driven by the official ``openai`` package and by raw HTTP: completions and chat, streamed and
not, equal the target's own greedy ``generate``; bad input fired while a good stream runs gets
4xx and leaves that stream's output intact; the ZMQ client agrees; metrics add up."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from common.backends.hf import HFBackend, load_causal_lm
from common.sampling import SamplingParams
from common.simnet import reference_decode
from services.gateway.zmq_client import PipeSpecClient
from tests.harness import SERVED_MODEL, GreedyOracle, config, launched, sse_chunks
from tests.tiny_models import EOS, tiny_llama

pytestmark = pytest.mark.slow

PROMPT = "w5 w6 w7 w5 w6 w7 w5"
LONG_PROMPT, LONG_TOKENS = "w11", 500  # the target's greedy output runs 500 tokens without EOS
MAX_TOKENS = 24
CONTEXT = 512  # the tiny models' max_position_embeddings
BODY_LIMIT = 64 << 10
# the word-level test tokenizer has no chat template: the gateway's setting supplies one
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w3{% else %}w4{% endif %} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}w10{% endif %}"
)
MESSAGES = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": PROMPT}]


class Tiny:
    def __init__(self, plan, target):
        self.plan, self.target, self.oracle = plan, target, GreedyOracle(target)
        self.url = plan.http_url
        self.tokenizer = self.oracle.tokenizer
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60
        )

    def expected(self, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
        ids = self.oracle.generate(prompt_ids, max_tokens)
        return self.oracle.text(ids), len(ids)

    def chat_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = tiny_llama(root / "target")
    stages = [{"level": 0, "backend": "ngram"}, {"level": 1, "model": str(target)}]
    cfg = config(str(target), stages, chat_template=TEMPLATE, max_request_bytes=BODY_LIMIT)
    with launched(cfg, root / "logs") as system:
        yield Tiny(system.plan, target)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions(tiny, stream):
    text, count = tiny.expected(tiny.tokenizer.encode(PROMPT))
    kwargs = dict(
        model=SERVED_MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, seed=3, user="u1"
    )
    if not stream:
        response = tiny.client.completions.create(**kwargs)
        assert response.choices[0].text == text and response.usage.completion_tokens == count
        assert response.choices[0].finish_reason in ("stop", "length")
        assert response.model_extra["spec_decode_stats"]["completion_tokens"] == count
        return
    chunks = list(
        tiny.client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count
    stats = chunks[-2].model_extra["spec_decode_stats"]
    assert stats["target_forward_passes"] >= 1 and stats["acceptance"][0]["level"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat(tiny, stream):
    text, count = tiny.expected(tiny.chat_ids())
    kwargs = dict(
        model=SERVED_MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    if not stream:
        response = tiny.client.chat.completions.create(**kwargs)
        assert response.choices[0].message.role == "assistant"
        assert response.choices[0].message.content == text
        assert (
            response.usage.prompt_tokens == len(tiny.chat_ids())
            and response.usage.completion_tokens == count
        )
        return
    chunks = list(tiny.client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_errors_and_models(tiny):
    assert [m.id for m in tiny.client.models.list()] == [SERVED_MODEL]
    with pytest.raises(openai.BadRequestError, match="less than or equal to 2"):
        tiny.client.completions.create(model=SERVED_MODEL, prompt=PROMPT, temperature=2.5)
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        tiny.client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, n=17)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        tiny.client.completions.create(model="gpt-4", prompt=PROMPT)


def sampled_reference(tiny, prompt_ids: list[int], p: SamplingParams) -> tuple[str, list[int]]:
    ids = reference_decode(HFBackend(tiny.target), prompt_ids, MAX_TOKENS, [EOS], p)
    return tiny.tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sampled_chat_with_logprobs(tiny, stream):
    """temperature 0.7 with logprobs: the text is the reference decoder's seeded sample, and each
    token's logprob is the target's raw log-softmax at that position."""
    p = SamplingParams(0.7, seed=1234, top_p=0.9)
    text, ids = sampled_reference(tiny, tiny.chat_ids(), p)
    kwargs = dict(
        model=SERVED_MODEL,
        messages=MESSAGES,
        max_completion_tokens=MAX_TOKENS,
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        logprobs=True,
        top_logprobs=3,
    )
    if stream:
        chunks = list(tiny.client.chat.completions.create(**kwargs, stream=True))
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        content = [
            e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        stats = chunks[-1].model_extra["spec_decode_stats"]
    else:
        response = tiny.client.chat.completions.create(**kwargs)
        got, content = response.choices[0].message.content, response.choices[0].logprobs.content
        stats = response.model_extra["spec_decode_stats"]
    assert got == text
    assert stats["sampling"] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "min_p": 0.0,
        "seed": 1234,
    }
    assert [e.token for e in content] == [tiny.tokenizer.decode([i]) for i in ids]
    expected = raw_logprobs(tiny, tiny.chat_ids(), ids)
    assert all(abs(e.logprob - x) < 1e-4 for e, x in zip(content, expected))
    assert all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def raw_logprobs(tiny, prompt_ids: list[int], ids: list[int]) -> list[float]:
    model = load_causal_lm(tiny.target)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0]
    rows = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    return rows.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_openai_n_choices_and_seed_reproduces(tiny):
    kwargs = dict(model=SERVED_MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0)
    two = tiny.client.completions.create(**kwargs, n=2, seed=77)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text != two.choices[1].text
    again = tiny.client.completions.create(**kwargs, n=2, seed=77)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    one = tiny.client.completions.create(**kwargs, seed=77)  # choice 0 keeps the seed
    assert one.choices[0].text == two.choices[0].text
    assert (
        two.choices[0].text
        == sampled_reference(tiny, tiny.tokenizer.encode(PROMPT), SamplingParams(1.0, seed=77))[0]
    )
    drawn = tiny.client.completions.create(**kwargs)  # no seed: one is drawn and reported
    seed = drawn.model_extra["spec_decode_stats"]["sampling"]["seed"]
    replay = tiny.client.completions.create(**kwargs, seed=seed)
    assert replay.choices[0].text == drawn.choices[0].text
    streamed = list(tiny.client.completions.create(**kwargs, n=2, seed=77, stream=True))
    texts = [
        "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
        for i in (0, 1)
    ]
    assert texts == [c.text for c in two.choices]


def test_stop_string_across_tokens_over_raw_http(tiny):
    text, _ = tiny.expected(tiny.tokenizer.encode(PROMPT))
    words = text.split()
    stop = (
        f"{words[2][1:]} {words[3][:2]}"  # the end of one token, the space, the start of the next
    )
    expected = text[: text.find(stop)]
    body = {"model": SERVED_MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stop": [stop]}
    with httpx.Client(base_url=tiny.url, timeout=60) as http:
        whole = http.post("/v1/completions", json=body).json()
        chunks = sse_chunks(http.post("/v1/completions", json=body | {"stream": True}).text)
    assert (
        whole["choices"][0]["text"] == expected and whole["choices"][0]["finish_reason"] == "stop"
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


BAD_REQUESTS = [  # (path, httpx keyword arguments, status, words in the message)
    ("/v1/completions", {"content": b'{"prompt": "w5'}, 400, "not valid JSON"),
    ("/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": "many"}}, 400, "valid integer"),
    ("/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": -5}}, 400, "at least 1"),
    ("/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": 10**9}}, 400, "at most 65536"),
    ("/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": 510}}, 400, "context of 512"),
    ("/v1/completions", {"json": {"prompt": "w5 " * 600}}, 400, "model's context is 512 tokens"),
    ("/v1/completions", {"json": {"model": "gpt-4", "prompt": PROMPT}}, 404, "does not exist"),
    ("/v1/completions", {"json": {"prompt": ""}}, 400, "must not be empty"),
    ("/v1/completions", {"content": b'{"prompt": "w5 \xff"}'}, 400, "not valid UTF-8"),
    (
        "/v1/completions",
        {"content": b'{"prompt": "' + b"w5 " * 30_000 + b'"}'},
        413,
        "over the limit",
    ),
    ("/v1/completions", {"json": {"prompt": PROMPT, "temperature": 2.5}}, 400, "or equal to 2"),
    ("/v1/chat/completions", {"json": {"messages": [{"role": "user"}]}}, 400, "is required"),
    ("/v1/chat/completions", {"json": {"messages": MESSAGES, "n": 17}}, 400, "or equal to 16"),
]


def test_bad_input_gets_4xx_and_leaves_a_running_stream_intact(tiny):
    """Every bad request is fired over and over, from its own thread, for as long as a good
    stream runs; every answer is its 4xx, and the stream still equals the greedy reference."""
    text, count = tiny.expected(tiny.tokenizer.encode(LONG_PROMPT), LONG_TOKENS)
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    answers: list[tuple[float, int, int, str]] = []  # (when, case, status, message)
    stop = threading.Event()

    def fire(case: int) -> None:
        path, kwargs, _, _ = BAD_REQUESTS[case]
        with httpx.Client(base_url=tiny.url, timeout=30) as http:
            while not stop.is_set():
                response = http.post(path, **kwargs)
                answers.append(
                    (
                        time.monotonic(),
                        case,
                        response.status_code,
                        response.json()["error"]["message"],
                    )
                )

    firing = [threading.Thread(target=fire, args=(i,)) for i in range(len(BAD_REQUESTS))]
    for thread in firing:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while (
            len({case for _, case, _, _ in answers}) < len(BAD_REQUESTS)
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        with httpx.Client(base_url=tiny.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                stream = response.iter_lines()
                lines = [next(stream)]
                began = time.monotonic()  # the good request is running
                lines += list(stream)
                ended = time.monotonic()
    finally:
        stop.set()
        for thread in firing:
            thread.join(timeout=30)
    for _, case, status, message in answers:
        path, _, expected_status, words = BAD_REQUESTS[case]
        assert (status, words in message) == (expected_status, True), (path, status, message)
    assert len({case for _, case, _, _ in answers}) == len(BAD_REQUESTS)
    assert any(began < when < ended for when, _, _, _ in answers), (
        "no bad request overlapped the stream"
    )
    chunks = sse_chunks("".join(f"{line}\n\n" for line in lines if line))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert chunks[-1]["usage"]["completion_tokens"] == count


def test_zmq_client_agrees(tiny):
    text, count = tiny.expected(tiny.tokenizer.encode(PROMPT))
    with PipeSpecClient(
        tiny.plan.client_endpoint, timeout_s=60, keys_dir=tiny.plan.keys_dir
    ) as client:
        assert "".join(client.stream(PROMPT, max_tokens=MAX_TOKENS)) == text
        completion, stats = client.complete(PROMPT, max_tokens=MAX_TOKENS)
        assert completion == text and stats["completion_tokens"] == count
        sampled, stats = client.complete(PROMPT, MAX_TOKENS, temperature=1.0, seed=77)
        reference = sampled_reference(
            tiny, tiny.tokenizer.encode(PROMPT), SamplingParams(1.0, seed=77)
        )[0]
        assert sampled == reference and stats["sampling"]["seed"] == 77


def test_metrics_after_traffic(tiny):
    tiny.client.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=8)
    tiny.client.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0)
    text = httpx.get(f"{tiny.url}/metrics").text
    for line in (
        'pipespec:rejected_requests_total{api="http",code="400"}',
        'pipespec:spec_decode_num_draft_tokens_total{level="1"}',
        'pipespec:spec_decode_sampled_num_draft_tokens_total{level="1"}',
        'pipespec:spec_decode_num_accepted_tokens_total{level="1"}',
        'pipespec:rollbacks_total{level="1"}',
        "pipespec:time_to_first_token_seconds_count",
        "pipespec:inter_token_latency_seconds_count",
        "pipespec:e2e_request_latency_seconds_count",
        "pipespec:num_requests_waiting 0.0",
        "pipespec:num_requests_running 0.0",
    ):
        assert line in text, line
    assert 'pipespec:requests_total{outcome="length"}' in text
