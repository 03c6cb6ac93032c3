"""Real tiny transformer models on the fake network, with random delays, reordering,
duplication and loss of every message: the output must be the target's own output (the reference
decoder: greedy, or for the half of the runs that sample, its seeded Gumbel-max sample with
top-p), always, and no run may hang. Drafts are often wrong (rollback-heavy)."""

import random
from dataclasses import replace

import pytest
import torch

from common.backends.hf import HFBackend
from common.sampling import GREEDY, SamplingParams
from common.simnet import Faults, build, default_engine, reference_decode, run_request
from tests.tiny_models import EOS, VOCAB_SIZE, noisy_copy, tiny_llama

RUNS = 500


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fault-models")
    target = tiny_llama(root / "target", layers=3)
    mid = noisy_copy(target, root / "mid", noise=0.02)
    low = noisy_copy(target, root / "low", noise=0.08, seed=2)
    return {
        name: HFBackend(str(path))
        for name, path in (("target", target), ("mid", mid), ("low", low))
    }


def test_every_seed_reproduces_the_reference_decoder(models):
    failures, rollbacks, drafted, sampled = [], 0, 0, 0
    references: dict[tuple, list[int]] = {}
    for seed in range(RUNS):
        rng = random.Random(seed)
        k = rng.choice((2, 3))
        backends = (
            [models["low"], models["mid"], models["target"]][-k:]
            if k == 3
            else [models[rng.choice(("low", "mid"))], models["target"]]
        )
        prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 8))]
        max_tokens = rng.randint(1, 24)
        sampling = GREEDY
        if seed % 2:
            temperature = rng.choice((0.3, 0.7, 1.0))
            sampling = SamplingParams(temperature, seed=rng.randrange(2**63), top_p=0.9)
        key = (tuple(prompt), max_tokens, sampling)
        if key not in references:
            references[key] = reference_decode(
                models["target"], prompt, max_tokens, eos=[EOS], sampling=sampling
            )
        faults = Faults(
            drop=rng.uniform(0, 0.3), duplicate=rng.uniform(0, 0.3), max_delay=rng.uniform(0, 10)
        )
        costs = [1.0, 3.0, 8.0][-k:]
        h = build(
            backends,
            costs,
            seed=seed,
            faults=faults,
            config=replace(
                default_engine(), max_lead=rng.randint(1, 10), max_verify_tokens=rng.randint(1, 12)
            ),
        )
        req = run_request(h, prompt, max_tokens, eos=[EOS], sampling=sampling)
        if req is None or req.tokens != references[key]:
            failures.append((seed, None if req is None else req.tokens, references[key]))
            continue
        rollbacks += sum(s.rollbacks_issued for s in req.stats)
        drafted += sum(s.draft_tokens for s in req.stats)
        sampled += not sampling.greedy
    assert not failures, f"{len(failures)} of {RUNS} runs wrong or hung; first: {failures[:3]}"
    assert drafted > 0 and rollbacks > RUNS, "the runs must exercise drafts and rollbacks"
    assert sampled >= RUNS // 2 - 1
