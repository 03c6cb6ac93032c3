"""Sampled requests on the real SmolLM2-135M hierarchy through the full multi-process system:
20 prompts x temperatures 0.3, 0.7, 1.0 (top_p 0.9), k=2 and k=3, a few tokens each and four
at a time; every output equals the reference decoder (the target alone, token by token, same
processors and noise)."""

import pytest
import torch

from common import model_catalog
from common.backends.hf import HFBackend
from common.sampling import SamplingParams
from common.simnet import reference_decode
from common.tokenization import eos_token_ids, load_tokenizer
from tests.e2e.test_lossless_smollm2 import HIERARCHIES, MODEL, PROMPTS
from tests.e2e.test_sampling_tiny import TEMPERATURES, run_all
from tests.harness import config as e2e_config
from tests.harness import launched

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        not model_catalog.is_prepared(MODEL),
        reason=f"run `{model_catalog.PREPARE_COMMAND} smollm2` first",
    ),
]
MAX_TOKENS = 6
CASES = [
    (prompt, SamplingParams(t, seed=104729 * i + j, top_p=0.9))
    for i, prompt in enumerate(PROMPTS)
    for j, t in enumerate(TEMPERATURES)
]


@pytest.fixture(scope="module")
def expected():
    torch.set_num_threads(1)
    target = str(model_catalog.model_dir(MODEL))
    tokenizer = load_tokenizer(target)
    backend, eos = HFBackend(target), eos_token_ids(tokenizer, target)
    out = []
    for prompt, p in CASES:
        ids = reference_decode(backend, tokenizer.encode(prompt), MAX_TOKENS, eos, p)
        out.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return out


@pytest.mark.parametrize("name", HIERARCHIES)
def test_sampled_output_equals_the_reference_decoder(expected, tmp_path, name):
    stages = [{"level": i, **s} for i, s in enumerate(HIERARCHIES[name])]
    with launched(e2e_config(MODEL, stages), tmp_path / "logs") as system:
        results = run_all(system.plan, CASES, MAX_TOKENS)
    got = [(r["choices"][0]["text"], r["usage"]["completion_tokens"]) for r in results]
    wrong = [(c, g, e) for c, g, e in zip(CASES, got, expected) if g != e]
    assert not wrong, f"{len(wrong)}/{len(CASES)} differ from the reference decoder: {wrong[:2]}"
