"""The real SmolLM2-135M hierarchy through the full multi-process system: for 20 prompts,
k=2 and k=3, the text equals the target's own greedy ``generate``; and every verdict the target
gave on an early-exit drafter's drafts equals the drafter's argmax offline on the same text
(drafter-state bugs lower acceptance and leave the output unchanged)."""

import re

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


def drafter_predictions(
    oracle: GreedyOracle, drafter_layers: int, max_tokens: int
) -> dict[str, tuple[list[int], list[int], list[float]]]:
    """Per prompt, teacher-forced on the target's greedy text: that text, the drafter's argmax at
    each of its positions, and the drafter's margin there (top-1 minus top-2 logit)."""
    drafter = load_causal_lm(str(model_catalog.model_dir(MODEL)), layers=drafter_layers)
    out = {}
    for prompt in PROMPTS:
        prompt_ids = oracle.tokenizer.encode(prompt)
        text = oracle.ids(prompt, max_tokens)
        with torch.inference_mode():
            logits = drafter(torch.tensor([prompt_ids + text])).logits[0]
        rows = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(text)]
        top2 = rows.topk(2, dim=-1).values
        out[prompt] = (text, rows.argmax(-1).tolist(), (top2[:, 0] - top2[:, 1]).tolist())
    return out


FIELD = re.compile(r"(\w+)=(\S+)")


def verifications(log_text: str) -> list[dict[str, str]]:
    """The target's ``drafts_verified`` debug events (key=value log lines)."""
    return [
        dict(FIELD.findall(line))
        for line in log_text.splitlines()
        if "event=drafts_verified" in line
    ]


NEAR_TIE = 1e-3  # logits this close may order differently in windows of another size


def test_every_verification_matches_the_drafter_offline(oracle, tmp_path):
    """Each pass of the target checks drafts in order until the first mismatch, so it says, for
    every checked position, whether the drafter's token was the target's. The early-exit
    drafter's drafts are its argmax on the committed prefix, so replaying each verification
    against the drafter run offline, teacher-forced on the same text, must give the same
    verdict at every position (a stale cache, a missed rollback or a misplaced span would not)."""
    layers, max_tokens = 25, 64
    stages = [
        {"level": 0, "backend": "early-exit", "model": MODEL, "early_exit_layers": layers},
        {"level": 1, "backend": "hf", "model": MODEL, "log_level": "debug"},
    ]
    with launched(config(MODEL, stages), tmp_path / "logs") as system:
        results = complete_all(system.plan, PROMPTS, max_tokens, concurrency=2)
        target_log = next(c.log_path for c in system.children if c.spec.role == "level1")
    assert_same_as_oracle(oracle, PROMPTS, results, max_tokens)
    prompt_of = {res["id"]: prompt for prompt, res in zip(PROMPTS, results)}
    offline = drafter_predictions(oracle, layers, max_tokens)
    checked = accepted = 0
    wrong = []
    for event in verifications(target_log.read_text()):
        request_id = event["request_id"]
        position, drafts, m = (int(event[k]) for k in ("position", "drafts", "accepted"))
        text, preds, margins = offline[prompt_of[request_id]]
        for pos in range(position, min(position + min(m + 1, drafts), len(text))):
            verdict = pos < position + m  # accepted, or the one rejection of the pass
            checked += 1
            accepted += verdict
            if (preds[pos] == text[pos]) != verdict and margins[pos] >= NEAR_TIE:
                wrong.append((prompt_of[request_id], pos, verdict, round(margins[pos], 4)))
    all_hits = sum(p == t for text, p_, _ in offline.values() for p, t in zip(p_, text))
    all_positions = sum(len(text) for text, _, _ in offline.values())
    print(
        f"acceptance per checked position: pipeline {accepted / checked:.3f} ({checked} "
        f"positions); offline over every position {all_hits / all_positions:.3f} "
        f"({all_positions} positions)"
    )
    assert checked >= 100, "too few drafts were checked for a meaningful comparison"
    assert not wrong, (
        f"{len(wrong)}/{checked} verdicts differ from the drafter offline: {wrong[:5]}"
    )
