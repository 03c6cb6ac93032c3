"""The batched runner on real SmolLM2-135M: exact against its own oracle, and ``generate``'s output.

Agreement with transformers ``generate`` is exact unless a position is a near-tie: at the first
divergence, if any, the target's top-2 logit margin must be below 1e-3 (printed either way).
"""

import pytest
import torch
from transformers import AutoTokenizer

from common import model_catalog
from common.backends.batched import Run, greedy_decode
from common.backends.batched_hf import HFBatchedBackend
from tests.common.backends.test_batched_hf import generate, oracle

MODEL = "smollm2-135m"
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\ndef softmax(x):",
]
NEW_TOKENS = 16

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not model_catalog.is_prepared(MODEL), reason=f"{MODEL} is not prepared"),
]


@pytest.fixture(scope="module")
def runner():
    before = torch.get_num_threads()
    yield HFBatchedBackend(MODEL, threads=1, kv_pool_tokens=2048)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompts():
    tokenizer = AutoTokenizer.from_pretrained(model_catalog.model_dir(MODEL))
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def top2_margin(runner, context: list[int]) -> float:
    runner.open("margin", len(context))
    try:
        logits = runner.step([Run("margin", context, rows=1)])["margin"].logits[0]
    finally:
        runner.close("margin")
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


def test_greedy_batched_decoding_equals_generate_or_differs_only_at_a_near_tie(runner, prompts):
    ours = greedy_decode(runner, prompts, NEW_TOKENS)
    equal = 0
    for prompt, got in zip(prompts, ours):
        reference = generate(runner.lm, prompt, NEW_TOKENS)
        if got == reference:
            equal += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, reference)) if a != b)
        margin = top2_margin(runner, prompt + got[:first])
        print(f"diverges at {first}: top-2 margin {margin:.2e}")
        assert margin < 1e-3
    print(f"{equal}/{len(prompts)} prompts equal to generate")


def test_mixed_batch_equals_the_oracle_and_is_close_to_transformers(runner, prompts):
    seq = prompts[0] + [28, 2000, 314, 50, 7]
    expected = oracle(runner, seq)
    runner.open("a", len(seq) + 4)
    runner.open("b", 64)
    try:
        first = runner.step([Run("a", seq[:3]), Run("b", prompts[1])])["a"].logits
        rest = runner.step([Run("a", seq[3:] + [99, 98]), Run("b", [11, 12])])["a"].logits
    finally:
        runner.close("a")
        runner.close("b")
    got = torch.cat([first, rest[: len(seq) - 3]])
    assert torch.equal(got, expected)
    reference = runner.lm(torch.tensor([seq])).logits[0].detach()
    delta = (expected - reference).abs().max().item()
    print(f"max |logit - transformers| = {delta:.2e}")
    assert delta < 1e-3
