"""The OpenAI API over the prepared SmolLM2-135M-Instruct (n-gram drafter -> SmolLM2 target),
with the tokenizer's own chat template: the official ``openai`` client gets the target's greedy
output, streamed and not. Skipped unless ``python -m common.model_store prepare smollm2`` ran."""

from __future__ import annotations

import openai
import pytest

from common import model_catalog
from tests.harness import SERVED_MODEL, GreedyOracle, config, launched

MODEL = "smollm2-135m"
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "def fibonacci(n):"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.models,
    pytest.mark.skipif(not model_catalog.is_prepared(MODEL), reason=f"{MODEL} is not prepared"),
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    model_dir = model_catalog.model_dir(MODEL)
    stages = [{"level": 0, "backend": "ngram"}, {"level": 1, "model": str(model_dir)}]
    with launched(
        config(str(model_dir), stages), tmp_path_factory.mktemp("smol"), startup_timeout_s=300
    ) as system:
        client = openai.OpenAI(
            base_url=f"{system.plan.http_url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        yield client, GreedyOracle(model_dir)


def expected(oracle: GreedyOracle, prompt_ids: list[int]) -> str:
    return oracle.text(oracle.generate(prompt_ids, MAX_TOKENS))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_uses_the_tokenizers_template(smol, stream):
    client, oracle = smol
    tokenizer = oracle.tokenizer
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    want = expected(oracle, prompt_ids)
    kwargs = dict(model=SERVED_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    else:
        assert client.chat.completions.create(**kwargs).choices[0].message.content == want


@pytest.mark.parametrize("stream", [False, True])
def test_completions(smol, stream):
    client, oracle = smol
    want = expected(oracle, oracle.tokenizer.encode(PROMPT))
    kwargs = dict(model=SERVED_MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
    if stream:
        chunks = client.completions.create(**kwargs, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    else:
        assert client.completions.create(**kwargs).choices[0].text == want
