"""StageEngines on the fake network with simulated backends: fast checks of the protocol."""

import pytest

from common.backends.simulated import SimulatedBackend
from common.request_tracker import TrackedRequest
from common.simnet import GATEWAY, Faults, build, greedy_reference, run_request


def sims(agreements, seed=3):
    return [
        SimulatedBackend(agreement=a, seed=seed, vocab=50, sleep=lambda s: None) for a in agreements
    ]


@pytest.mark.parametrize("agreements", [(0.9, 1.0), (0.6, 0.8, 1.0), (0.2, 0.5, 1.0)])
def test_clean_network_matches_target(agreements):
    backends = sims(agreements)
    prompt = [1, 2, 3, 4]
    want = greedy_reference(backends[-1], prompt, 60, eos=())
    h = build(backends, costs=[1.0, 3.0, 9.0][-len(backends) :], seed=0)
    req = run_request(h, prompt, 60)
    assert req is not None and req.tokens == want and req.finish_reason == "length"
    stats = {s.level: s for s in req.stats}
    assert stats[len(backends) - 1].forward_passes < 60  # drafts were used
    for s in req.stats[1:]:  # windows are at most 16 drafts, so every position is counted
        assert sum(s.accepted_per_pos) == s.accepted_tokens
        assert s.accepted_per_pos == sorted(s.accepted_per_pos, reverse=True)


@pytest.mark.parametrize("seed", range(40))
def test_faulty_network_matches_target(seed):
    backends = sims((0.5, 0.8, 1.0), seed=seed)
    prompt = [seed % 7 + 1, 5, 9]
    want = greedy_reference(backends[-1], prompt, 40, eos=())
    h = build(
        backends,
        costs=[1.0, 3.0, 9.0],
        seed=seed,
        faults=Faults(drop=0.15, duplicate=0.15, max_delay=6.0),
    )
    req = run_request(h, prompt, 40)
    assert req is not None, "hung"
    assert req.tokens == want


def refusal(backends, prompt: list[int], **fields) -> str | None:
    """The error a two-level simulated system gives a request for ``prompt``."""
    h = build(backends, [1.0, 2.0])
    req = TrackedRequest(
        request_id="r",
        prompt=prompt,
        max_tokens=4,
        eos_ids=[],
        route=h.route,
        reply_to=GATEWAY,
        created=0.0,
        **fields,
    )
    h.gateway.submit(req)
    assert h.net.run_until(lambda: req.done, 1e5)
    return req.error


def test_logprobs_from_a_target_without_logits_is_a_clear_error():
    backends = [SimulatedBackend(0.9, vocab=50), SimulatedBackend(1.0, vocab=50)]
    error = refusal(backends, [1, 2], top_logprobs=2)
    assert "has no logits: it cannot return logprobs" in error


def test_a_prompt_token_outside_the_models_vocabulary_is_refused_with_a_clear_error():
    backends = [SimulatedBackend(0.9, vocab=50), SimulatedBackend(1.0, vocab=50)]
    backends[-1].vocab_size = 50  # as a transformers backend reports its embedding table
    error = refusal(backends, [1, 50])
    assert "token id 50 is outside the model's vocabulary (0..49)" in error
