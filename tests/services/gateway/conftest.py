"""A real byte-level BPE tokenizer built offline in milliseconds: small enough that most
non-ASCII characters stay split into several byte tokens, which is what detokenization must
survive."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.settings import GatewaySettings

EOS = "<|endoftext|>"
CORPUS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
    "Le café est très bon. Ça coûte 3 €.",  # a few accented letters get merged, most do not
] * 20


def byte_level_bpe(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


# What every gateway test runs on: two levels, ports the OS picks, no lingering sockets, and plain
# TCP (fake stages; CURVE is tested in tests/e2e/test_security.py).
GATEWAY_TEST_SETTINGS = dict(
    tokenizer="built-in-test",
    num_levels=2,
    registry_port=0,
    client_port=0,
    linger_ms=0,
    insecure=True,
)


@pytest.fixture
def gateway_settings() -> Callable[..., GatewaySettings]:
    """``gateway_settings(**overrides)``: the gateway settings of these tests, with ``overrides``
    (any ``GatewaySettings`` field) on top."""

    def make(**overrides) -> GatewaySettings:
        return GatewaySettings(**(GATEWAY_TEST_SETTINGS | overrides))

    return make
