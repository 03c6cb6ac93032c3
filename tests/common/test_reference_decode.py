"""The reference decoders on the batched runner: decoding prompts together in shared passes
gives, bit for bit, each prompt's decoding alone (what lets the multi-prompt tests use it)."""

import random

import torch

from common.backends.batched import greedy_decode
from common.backends.batched_hf import HFBatchedBackend
from common.simnet import reference_decode
from tests.tiny_models import EOS, VOCAB_SIZE, tiny_llama


def test_decoding_together_equals_decoding_alone(tmp_path):
    before = torch.get_num_threads()
    try:
        model = tiny_llama(tmp_path / "m", hidden=192, layers=6)  # stops at EOS often
        backend = HFBatchedBackend(str(model), kv_pool_tokens=1024)
    finally:
        torch.set_num_threads(before)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    together = greedy_decode(backend, prompts, 40, [EOS])
    alone = [reference_decode(backend, p, 40, [EOS]) for p in prompts]
    assert together == alone
    assert len({len(t) for t in alone}) > 1, "some must stop at EOS before max_tokens"
    assert backend.usage().used_tokens == 0, "every reservation is closed"
