"""The real SmolLM2-135M hierarchy through the full multi-process system: for 20 prompts,
k=2 and k=3, the text equals the target's own greedy ``generate``; and the early-exit drafter's
acceptance measured through the pipeline matches its acceptance measured offline on the same text
(drafter-state bugs lower the first and leave the output unchanged)."""

import pytest
import torch

from common import model_catalog
from common.backends.hf import load_causal_lm
from tests.harness import GreedyOracle, assert_same_as_oracle, complete_all, config, launched

MODEL = "smollm2-135m"
pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        not model_catalog.is_prepared(MODEL),
        reason=f"run `{model_catalog.PREPARE_COMMAND} smollm2` first",
    ),
]
MAX_TOKENS = 32

PROMPTS = [
    "def fibonacci(n):",
    "def quicksort(arr):",
    "class Stack:\n    def __init__(self):",
    "import numpy as np\n\ndef normalize(x):",
    "def is_prime(n):",
    "for i in range(10):",
    "def binary_search(items, target):",
    "# Read a CSV file and print each row\nimport csv\n",
    "SELECT name, email FROM users WHERE",
    "def merge_sorted(a, b):",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "Photosynthesis is the process by which",
    "A haiku about the sea:",
    "The best way to learn a new language is",
    "Water boils at",
    "In 1969, the first humans",
    "The recipe for pancakes:",
    "Dear hiring manager,",
]


@pytest.fixture(scope="module")
def oracle():
    return GreedyOracle(str(model_catalog.model_dir(MODEL)))


HIERARCHIES = {
    "k2-ngram": [{"backend": "ngram"}, {"backend": "hf", "model": MODEL}],
    "k3-ngram-earlyexit": [
        {"backend": "ngram"},
        {"backend": "early-exit", "model": MODEL, "early_exit_layers": 25},
        {"backend": "hf", "model": MODEL},
    ],
}


@pytest.mark.parametrize("name", HIERARCHIES)
def test_twenty_prompts_equal_target_greedy(oracle, tmp_path, name):
    stages = [{"level": i, **s} for i, s in enumerate(HIERARCHIES[name])]
    with launched(config(MODEL, stages), tmp_path / "logs") as system:
        results = complete_all(system.plan, PROMPTS, MAX_TOKENS, concurrency=2)
    assert_same_as_oracle(oracle, PROMPTS, results, MAX_TOKENS)


def offline_acceptance(
    oracle: GreedyOracle, drafter_layers: int, max_tokens: int
) -> tuple[int, int]:
    """Teacher-forced on the target's greedy text: positions where the drafter's argmax equals
    the target's token, and positions checked."""
    drafter = load_causal_lm(str(model_catalog.model_dir(MODEL)), layers=drafter_layers)
    hits = total = 0
    for prompt in PROMPTS:
        prompt_ids = oracle.tokenizer.encode(prompt)
        out = oracle.ids(prompt, max_tokens)
        with torch.inference_mode():
            logits = drafter(torch.tensor([prompt_ids + out])).logits[0]
        preds = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(out)].argmax(-1).tolist()
        hits += sum(p == t for p, t in zip(preds, out))
        total += len(out)
    return hits, total


def test_pipeline_acceptance_matches_offline(oracle, tmp_path):
    layers, max_tokens = 25, 64
    stages = [
        {"level": 0, "backend": "early-exit", "model": MODEL, "early_exit_layers": layers},
        {"level": 1, "backend": "hf", "model": MODEL},
    ]
    with launched(config(MODEL, stages), tmp_path / "logs") as system:
        results = complete_all(system.plan, PROMPTS, max_tokens, concurrency=2)
    assert_same_as_oracle(oracle, PROMPTS, results, max_tokens)
    # Each verification checks drafts in order until the first mismatch, so every checked
    # position is either accepted or the one rejection of its pass.
    level1 = [r["spec_decode_stats"]["acceptance"][0] for r in results]
    accepted = sum(a["accepted_tokens"] for a in level1)
    checked = accepted + sum(a["rollbacks"] for a in level1)
    hits, total = offline_acceptance(oracle, layers, max_tokens)
    online, offline = accepted / checked, hits / total
    print(
        f"acceptance per checked position: pipeline {online:.3f} ({checked} positions), "
        f"offline {offline:.3f} ({total} positions)"
    )
    assert abs(online - offline) <= 0.05
    assert checked >= 100, "too few drafts were checked for a meaningful comparison"
