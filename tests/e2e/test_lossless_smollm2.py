"""The real SmolLM2-135M hierarchy through the full multi-process system: for 20 prompts,
k=2 and k=3, the text equals the target's own greedy ``generate``; and every verdict the target
gave on an early-exit drafter's drafts equals the drafter's argmax offline on the same text
(drafter-state bugs lower acceptance and leave the output unchanged)."""

import pytest

from benchmarks.acceptance_replay import (
    drafter_picks,
    replay,
    teacher_forced_logits,
    verifications,
)
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
        results = complete_all(system.plan, PROMPTS, MAX_TOKENS, concurrency=4)
    assert_same_as_oracle(oracle, PROMPTS, results, MAX_TOKENS)


def test_every_verification_matches_the_drafter_offline(oracle, tmp_path):
    """Each pass of the target checks drafts in order until the first mismatch, so it gives a
    verdict for every checked position. The early-exit drafter's drafts are its argmax on the
    committed prefix, so replaying each verdict against the drafter run offline, teacher-forced
    on the same text, must agree at every checked position (a stale cache, a missed rollback or
    a misplaced span would not); see ``benchmarks.acceptance_replay``."""
    layers, max_tokens = 25, 64
    # Lockstep (sync) windows of 4: the drafter at 25 of 30 layers is barely faster than a target
    # that serves both requests in one pass, so asynchronously few of its drafts would arrive in
    # time to be checked; the verdicts it gets must match offline the same way in either schedule.
    sync = {"schedule": "sync", "lookahead": 4}
    stages = [
        {"level": 0, "backend": "early-exit", "model": MODEL, "early_exit_layers": layers} | sync,
        {"level": 1, "backend": "hf", "model": MODEL, "log_level": "debug"} | sync,
    ]
    with launched(config(MODEL, stages), tmp_path / "logs") as system:
        # 8 at a time: the passes of both levels serve them together (a drafter's step of 8 rows
        # costs about what one of 1 does), so the run takes a third of the time 2 at a time did
        results = complete_all(system.plan, PROMPTS, max_tokens, concurrency=8)
        target_log = next(c.log_path for c in system.children if c.spec.role == "level1")
    assert_same_as_oracle(oracle, PROMPTS, results, max_tokens)
    drafter = load_causal_lm(str(model_catalog.model_dir(MODEL)), layers=layers)
    texts, picks = {}, {}
    for prompt, res, text in zip(PROMPTS, results, oracle.ids_many(PROMPTS, max_tokens)):
        prompt_ids = oracle.tokenizer.encode(prompt)
        texts[res["id"]] = text
        picks[res["id"]] = drafter_picks(teacher_forced_logits(drafter, prompt_ids, text))
    r = replay(verifications(target_log.read_text()), texts, picks)
    every = sum(len(t) for t in texts.values())
    every_hits = sum(a == b for rid, t in texts.items() for a, b in zip(picks[rid][0], t))
    print(
        f"acceptance over the {r.checked} positions the pipeline checked: {r.acceptance:.3f}; "
        f"offline over every position: {every_hits / every:.3f} ({every}); "
        f"near-ties {r.near_ties}"
    )
    assert r.checked >= 100, "too few drafts were checked for a meaningful comparison"
    assert not r.differ, f"{len(r.differ)}/{r.checked} verdicts differ offline: {r.differ[:5]}"
