"""Random Llama models and a word-level tokenizer, built on the spot and saved like real ones, so
tests and benchmarks load them through the real ``from_pretrained`` path with nothing downloaded.

    target = tiny_llama(tmp / "target")                    # seed 0, 4 layers, hidden 32
    draft = tiny_llama(tmp / "draft", seed=1, layers=2)    # same tokenizer, unrelated weights
    big = random_llama(vocab=32000, hidden=2048, layers=20, heads=32, kv_heads=4, init=0.05)

The tokenizer has ``words`` tokens: "<unk>", "<s>", "</s>", then "w3" ... "w{words - 1}", split
on whitespace. The tiny models' weights are drawn with a large ``init`` (initializer range) so
logits are far apart and argmax is stable under the tiny float differences between one-token and
many-token forward passes.

>>> import tempfile
>>> from transformers import AutoTokenizer
>>> with tempfile.TemporaryDirectory() as d:
...     tok = AutoTokenizer.from_pretrained(save_tokenizer(Path(d), words=8))
>>> tok.encode("w3 w7 w9"), tok.eos_token_id, len(tok)
([3, 7, 0], 2, 8)
>>> model = random_llama(layers=1)
>>> model.config.vocab_size, model.config.num_hidden_layers, model.training
(96, 1, False)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 96
BOS, EOS = 1, 2
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}


def save_tokenizer(path: Path, words: int = VOCAB_SIZE, **specials: str) -> Path:
    """The word-level tokenizer, saved to ``path``; ``specials``: its special tokens
    (``eos_token=...``; default ``SPECIALS``), "<unk>" always."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(3, words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", **(specials or SPECIALS)
    )
    fast.save_pretrained(path)
    return path


def random_llama(
    *,
    vocab: int = VOCAB_SIZE,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    init: float = 0.3,
    max_positions: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """A random fp32 LlamaForCausalLM (eval mode) built on ``device`` from ``seed``;
    ``intermediate`` defaults to 2 x ``hidden``."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def tiny_llama(path: Path, *, seed: int = 0, layers: int = 4, hidden: int = 32) -> Path:
    """A tiny ``random_llama`` with the tokenizer, saved to ``path``."""
    random_llama(seed=seed, layers=layers, hidden=hidden).save_pretrained(path)
    save_tokenizer(path)
    return path
