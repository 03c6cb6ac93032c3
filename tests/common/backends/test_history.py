"""Backends that feed each request's history in turn (n-gram, simulator): the same predictions
as one history fed alone, one cost per pass for the simulator, bounded reservations."""

import random

import pytest
import torch

from common.backends.batched import PoolExhausted, Run
from common.backends.ngram import NgramBackend
from common.backends.simulated import SimulatedBackend
from common.draft_policy import relative_cost


def interleaved(batched, alone, seqs, seed=0):
    """Feed ``seqs`` in random ragged chunks, with wrong tails cropped off; compare every row with
    ``alone(history, tokens)``: the predictions of one fresh history fed ``tokens`` by itself."""
    rng = random.Random(seed)
    for name, seq in seqs.items():
        batched.open(name, len(seq) + 4)
    while any(batched.length(n) < len(s) for n, s in seqs.items()):
        runs, fed = [], {}
        for name, seq in seqs.items():
            done = batched.length(name)
            if done < len(seq) and rng.random() < 0.7:
                good = seq[done : done + rng.randrange(1, 6)]
                runs.append(Run(name, good + [rng.randrange(50)] * rng.choice((0, 2))))
                fed[name] = (done, len(good))
        out = batched.step(runs)
        for name, (done, n) in fed.items():
            assert out[name].greedy[:n] == alone(seqs[name][:done], seqs[name][done : done + n])
            batched.crop(name, done + n)


def test_ngram_batched_predicts_like_one_index_alone():
    rng = random.Random(1)
    seqs = {f"r{i}": [rng.randrange(6) for _ in range(30)] for i in range(3)}
    ngram = NgramBackend(3, 1)
    interleaved(NgramBackend(3, 1), lambda done, fed: ngram.index(done).forward(fed), seqs)


def test_simulated_predicts_from_the_history_and_pays_once_per_pass():
    slept = []
    batched = SimulatedBackend(agreement=0.6, seed=3, vocab=50, cost_ms=20.0, sleep=slept.append)
    seqs = {f"r{i}": list(range(i, i + 25)) for i in range(4)}
    sim = SimulatedBackend(agreement=0.6, seed=3, vocab=50)

    def alone(done, fed):
        return [sim.predict(done + fed[: i + 1]) for i in range(len(fed))]

    interleaved(batched, alone, seqs)
    assert slept and all(s >= 0.02 for s in slept)
    slept.clear()
    batched.open("x", 40)
    batched.open("y", 40)
    batched.step([Run("x", list(range(10))), Run("y", list(range(6)))])
    assert slept == [pytest.approx(0.02 * relative_cost(16))]


def test_the_cost_curve_grows_with_batch_tokens():
    costs = [relative_cost(n) for n in range(1, 80)]
    assert costs == sorted(costs) and costs[0] == 1.0


def test_reservations_are_bounded():
    batched = NgramBackend(2, 1, kv_pool_tokens=20)
    batched.open("a", 15)
    assert not batched.can_open(6)
    with pytest.raises(PoolExhausted, match="5 of 20 free"):
        batched.open("b", 6)
    with pytest.raises(ValueError, match="exceed its capacity of 15"):
        batched.step([Run("a", [1] * 16)])
    with pytest.raises(ValueError, match="exceeds the pool's 20"):
        batched.open("c", 21)
    batched.close("a")
    batched.open("b", 20)
    assert batched.usage().perc == 1.0


def test_stage_settings_pick_the_batched_backend(tmp_path):
    from common.backends import load_backend
    from common.backends.batched_hf import HFBatchedBackend
    from common.settings import StageSettings
    from tests.tiny_models import tiny_llama

    ngram = load_backend(StageSettings(level=0, backend="ngram"))
    assert isinstance(ngram, NgramBackend) and ngram.usage().capacity_tokens == 0  # unbounded
    sim = load_backend(StageSettings(level=1, backend="simulated", sim_cost_ms=5.0))
    assert isinstance(sim, SimulatedBackend) and sim.pass_seconds(1) == 0.005
    before = torch.get_num_threads()
    try:
        hf = load_backend(
            StageSettings(
                level=2, backend="early-exit", model=str(tiny_llama(tmp_path)), early_exit_layers=2
            )
        )
        assert torch.get_num_threads() == 1  # one intra-op thread unless the settings say otherwise
    finally:
        torch.set_num_threads(before)
    assert isinstance(hf, HFBatchedBackend) and len(hf.lm.model.layers) == 2
