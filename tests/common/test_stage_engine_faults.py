"""Real tiny transformer models on the fake network, with random delays, reordering,
duplication and loss of every message: every output must be the target's own output (the
reference decoder: the same batched runner decoding the request alone, one token per pass;
greedy, or for the half of the runs that sample, its seeded Gumbel-max sample with top-p),
always, and no run may hang. Drafts are often wrong (rollback-heavy). A quarter of the runs send
several requests at once, which share the levels' batched passes."""

import random
from dataclasses import replace

import pytest
import torch

from common.backends.batched_hf import BatchedRunner, HFBatchedBackend
from common.backends.quantized import QuantizedRunner
from common.sampling import GREEDY, SamplingParams
from common.simnet import (
    Faults,
    RequestSpec,
    build,
    default_engine,
    reference_decode,
    run_requests,
)
from tests.tiny_models import EOS, VOCAB_SIZE, noisy_copy, tiny_llama, to_gguf

pytestmark = pytest.mark.slow  # 500 runs per runner: over a minute each

RUNS = 500
POOL_TOKENS = 1024  # per level and run: room for every request of a run


@pytest.fixture(scope="module", params=["hf", "quantized"])
def models(request, tmp_path_factory):
    """Per level, a function that gives a runner over its loaded weights with a fresh KV pool
    (every run starts with an empty pool): the transformers runner, or the quantized runner on
    the same models written as GGUF files."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fault-models")
    target = tiny_llama(root / "target", layers=3, hidden=64)  # head_dim 16 (quantized kernels)
    mid = noisy_copy(target, root / "mid", noise=0.02)
    low = noisy_copy(target, root / "low", noise=0.08, seed=2)
    paths = (("target", target), ("mid", mid), ("low", low))
    if request.param == "quantized":
        return {
            name: QuantizedRunner(
                str(to_gguf(path, root / f"{name}.gguf")), kv_pool_tokens=POOL_TOKENS, threads=1
            ).with_new_pool
            for name, path in paths
        }
    lms = {
        name: HFBatchedBackend(str(path), threads=1, kv_pool_tokens=POOL_TOKENS).lm
        for name, path in paths
    }
    return {
        name: (lambda lm=lm: BatchedRunner(lm, kv_pool_tokens=POOL_TOKENS))
        for name, lm in lms.items()
    }


def runner(fresh):
    """A fresh pool over loaded weights: every run starts with an empty KV pool."""
    return fresh()


def random_request(rng: random.Random, sampled: bool) -> RequestSpec:
    prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 8))]
    sampling = GREEDY
    if sampled:
        temperature = rng.choice((0.3, 0.7, 1.0))
        sampling = SamplingParams(temperature, seed=rng.randrange(2**63), top_p=0.9)
    return RequestSpec(prompt, rng.randint(1, 24), (EOS,), sampling)


def key(spec: RequestSpec) -> tuple:
    return tuple(spec.prompt), spec.max_tokens, spec.sampling


def test_every_seed_reproduces_the_reference_decoder(models):
    failures, rollbacks, drafted, sampled, shared = [], 0, 0, 0, 0
    references: dict[tuple, list[int]] = {}
    oracle = runner(models["target"])
    for seed in range(RUNS):
        rng = random.Random(seed)
        k = rng.choice((2, 3))
        names = ["low", "mid", "target"] if k == 3 else [rng.choice(("low", "mid")), "target"]
        n = rng.randint(2, 6) if seed % 4 == 0 else 1
        specs = [random_request(rng, sampled=bool((seed + i) % 2)) for i in range(n)]
        for spec in specs:
            if key(spec) not in references:
                references[key(spec)] = reference_decode(
                    oracle, spec.prompt, spec.max_tokens, spec.eos, spec.sampling
                )
        faults = Faults(
            drop=rng.uniform(0, 0.3), duplicate=rng.uniform(0, 0.3), max_delay=rng.uniform(0, 10)
        )
        costs = [1.0, 3.0, 8.0][-k:]
        h = build(
            [runner(models[name]) for name in names],
            costs,
            seed=seed,
            faults=faults,
            config=replace(
                default_engine(), max_lead=rng.randint(1, 10), max_verify_tokens=rng.randint(1, 12)
            ),
        )
        for spec, req in zip(specs, run_requests(h, specs)):
            want = references[key(spec)]
            if req is None or req.tokens != want:
                failures.append((seed, None if req is None else req.tokens, want))
                continue
            rollbacks += sum(s.rollbacks_issued for s in req.stats)
            drafted += sum(s.draft_tokens for s in req.stats)
            sampled += not spec.sampling.greedy
        shared += h.nodes[-1].passes.most_requests > 1
    assert not failures, f"{len(failures)} requests wrong or hung; first: {failures[:3]}"
    assert drafted > 0 and rollbacks > RUNS, "the runs must exercise drafts and rollbacks"
    assert sampled >= RUNS // 2 - 1
    assert shared >= RUNS // 8, "requests sent together must share the target's passes"
