"""The sampler (``common.sampling``): transformers' processors reproduced exactly, noise bits fixed for all time and devices, and the distribution it samples: chi-square
tests over >= 2000 seeds on peaked synthetic logits and on a tiny model, for the first token and
for the joint of two positions. The same tests are run on deliberately wrong samplers (noise
reused across positions; temperature applied after top-p) and must fail there."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.backends.hf import HFBackend
from common.sampling import Chooser, SamplingParams, choose, gumbel, noise_bits, process
from tests.tiny_models import tiny_llama

Z_999 = 3.0902  # standard normal quantile at 0.999


def chi2_threshold(df: int) -> float:
    """The chi-square 0.999 quantile (Wilson-Hilferty; within 1 % for df >= 3): a fixed bar that
    a correct sampler fails once in a thousand seeds-sets, and these seed sets are fixed."""
    a = 2 / (9 * df)
    return df * (1 - a + Z_999 * math.sqrt(a)) ** 3


def chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled into one.
    A sample in a cell of probability 0 gives infinity."""
    big = {k: p for k, p in probs.items() if p * n >= 5}
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in big.items())
    rest_p = 1 - sum(big.values())
    rest_o = n - sum(counts.get(k, 0) for k in big)
    if any(probs.get(k, 0) == 0 for k in counts):
        return math.inf, len(big)
    if rest_p * n >= 1:
        stat += (rest_o - n * rest_p) ** 2 / (n * rest_p)
        return stat, len(big)
    return stat, max(1, len(big) - 1)


def passes(counts: Counter, probs: dict, n: int) -> bool:
    stat, df = chi2(counts, probs, n)
    print(f"chi2 {stat:.1f} df {df} threshold {chi2_threshold(df):.1f}")
    return stat < chi2_threshold(df)


def expected(logits: torch.Tensor, p: SamplingParams) -> dict[int, float]:
    probs = torch.softmax(process(logits[None], p)[0].double(), dim=-1)
    return {i: float(x) for i, x in enumerate(probs) if x > 0}


# -- samplers under test: the real one and two deliberately wrong ones ---------------------------


def right(row: torch.Tensor, p: SamplingParams, position: int) -> int:
    return choose(row[None], p, [position])[0]


def reused_noise(row: torch.Tensor, p: SamplingParams, position: int) -> int:
    """Wrong: the same noise at every position (the position is ignored)."""
    return choose(row[None], p, [0])[0]


def temperature_after_top_p(row: torch.Tensor, p: SamplingParams, position: int) -> int:
    """Wrong: masks computed on the raw logits, temperature applied after."""
    masked = process(row[None], SamplingParams(1.0, p.seed, p.top_p, p.top_k, p.min_p))
    return choose(masked / p.temperature, SamplingParams(1.0, p.seed), [position])[0]


PEAKED = torch.tensor([6.0, 5.2, 4.7, 3.0, 2.5] + [0.5 - 0.05 * i for i in range(45)])
PARAMS = dict(temperature=0.7, top_p=0.9)
SEEDS = 4000


def first_token_ok(sampler, logits: torch.Tensor, seeds: int, **params) -> bool:
    counts = Counter(sampler(logits, SamplingParams(seed=s, **params), 0) for s in range(seeds))
    return passes(counts, expected(logits, SamplingParams(**params)), seeds)


def two_positions_ok(sampler, logits: torch.Tensor, seeds: int, **params) -> bool:
    """Joint of positions 0 and 1 (same logits at both) against the product of the marginals."""
    counts = Counter(
        (
            sampler(logits, SamplingParams(seed=s, **params), 0),
            sampler(logits, SamplingParams(seed=s, **params), 1),
        )
        for s in range(seeds)
    )
    marginal = expected(logits, SamplingParams(**params))
    joint = {(a, b): pa * pb for a, pa in marginal.items() for b, pb in marginal.items()}
    return passes(counts, joint, seeds)


def test_first_token_matches_softmax_on_peaked_logits():
    assert first_token_ok(right, PEAKED, SEEDS, **PARAMS)
    assert first_token_ok(right, PEAKED, SEEDS, temperature=1.0, top_k=4)
    assert first_token_ok(right, PEAKED, SEEDS, temperature=0.3, min_p=0.05)
    assert first_token_ok(right, PEAKED, SEEDS, temperature=1.5, top_p=0.9)


def test_positions_are_independent():
    assert two_positions_ok(right, PEAKED, SEEDS, temperature=1.0)


def test_the_tests_catch_wrong_samplers():
    assert not two_positions_ok(reused_noise, PEAKED, SEEDS, temperature=1.0)
    # T > 1 widens the nucleus; masking the raw logits keeps too few tokens
    assert not first_token_ok(temperature_after_top_p, PEAKED, SEEDS, temperature=1.5, top_p=0.9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return HFBackend(str(tiny_llama(tmp_path_factory.mktemp("sampling") / "m", seed=5)))


def test_tiny_model_first_and_second_token(tiny):
    """The model's first token over 2000 seeds matches its softmax after temperature and top-p;
    the pair (first, second) matches p(first) x p(second | first): positions independent."""
    prompt, params, n = [5, 17, 33, 9], dict(temperature=1.0, top_p=0.9), 2000
    first = logits_of(tiny, prompt[:-1], prompt[-1])
    after: dict[int, torch.Tensor] = {}

    def logits_after(token: int) -> torch.Tensor:
        if token not in after:
            after[token] = logits_of(tiny, prompt, token)
        return after[token]

    pairs = Counter()
    for seed in range(n):
        p = SamplingParams(seed=seed, **params)
        t0 = Chooser(p, 0)(first[None])[0]
        pairs[(t0, Chooser(p, 1)(logits_after(t0)[None])[0])] += 1
    p0 = expected(first, SamplingParams(**params))
    assert passes(_sum_first(pairs), p0, n)
    joint = {
        (a, b): pa * pb
        for a, pa in p0.items()
        for b, pb in expected(logits_after(a), SamplingParams(**params)).items()
    }
    assert passes(pairs, joint, n)
    assert len(p0) >= 3, "the test needs a first token with several likely values"


def logits_of(backend, context: list[int], token: int) -> torch.Tensor:
    """The model's logits after ``context + [token]``, through a session (a chooser that keeps
    the logits instead of choosing)."""
    kept = []
    backend.new_session(context).forward([token], lambda logits: kept.append(logits) or [None])
    return kept[0][0]


def _sum_first(pairs: Counter) -> dict:
    out: Counter = Counter()
    for (a, _), c in pairs.items():
        out[a] += c
    return out


def test_processors_equal_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    for t, k, p, mp in [
        (0.7, 0, 0.9, 0.0),
        (1.3, 20, 1.0, 0.0),
        (0.5, 50, 0.8, 0.1),
        (1.0, 0, 1.0, 0.2),
    ]:
        ref = TemperatureLogitsWarper(t)(None, logits)
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        if mp:
            ref = MinPLogitsWarper(mp)(None, ref)
        ours = process(logits, SamplingParams(t, top_k=k, top_p=p, min_p=mp))
        assert torch.equal(ours, ref), (t, k, p, mp)


def test_noise_bits_are_fixed():
    """The same bits on every machine: these values are part of the contract (a change would
    change every seeded output), keyed by token id whatever the vocabulary size."""
    bits = noise_bits(12345, 7, torch.arange(100_000))
    assert bits[:4].tolist() == FIXED_BITS and int(bits.sum()) == FIXED_SUM
    assert bits.min() >= 0 and bits.max() < 2**32
    assert torch.equal(noise_bits(12345, 7, torch.arange(500)), bits[:500])
    assert (
        noise_bits(-1, 2**31, torch.tensor([0])).item()
        == noise_bits(2**64 - 1, 2**31, torch.tensor([0])).item()
    )


FIXED_BITS = [2606334412, 559861336, 2441702995, 353031887]
FIXED_SUM = 214900789164031


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_noise_and_picks_on_cuda():
    ids = torch.arange(151_936)
    assert torch.equal(noise_bits(99, 3, ids), noise_bits(99, 3, ids.cuda()).cpu())
    assert torch.equal(gumbel(99, 3, ids), gumbel(99, 3, ids.cuda()).cpu())
    logits = torch.randn(8, 151_936, generator=torch.Generator().manual_seed(1)) * 4
    p = SamplingParams(0.8, seed=99, top_p=0.95)
    assert choose(logits, p, range(8)) == choose(logits.cuda(), p, range(8))
