"""Tiny random Llama models saved like real ones, so tests use the real ``from_pretrained`` path.

    target = tiny_llama(tmp / "target")                    # seed 0, 4 layers
    draft = tiny_llama(tmp / "draft", seed=1, layers=2)    # same tokenizer, unrelated weights
    close = noisy_copy(target, tmp / "close")  # target + 2 % noise: agrees about half the time

Every directory holds a ``config.json``, ``model.safetensors`` and a word-level tokenizer over
``VOCAB_SIZE`` tokens ("<unk>", "<s>", "</s>", then "w3" ... "w95") that ``AutoTokenizer`` loads.
Weights are drawn with a large ``initializer_range`` so logits are far apart and argmax is stable
under the tiny float differences between one-token and many-token forward passes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 96
BOS, EOS = 1, 2


def save_tokenizer(path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(path)


def tiny_llama(path: Path, *, seed: int = 0, layers: int = 4, hidden: int = 32) -> Path:
    """A random fp32 LlamaForCausalLM with the shared tokenizer, saved to ``path``."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    save_tokenizer(path)
    return path


def noisy_copy(source: Path, path: Path, *, noise: float = 0.02, seed: int = 1) -> Path:
    """``source``'s weights plus Gaussian noise of ``noise`` x each tensor's std, saved to ``path``."""
    model = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    model.save_pretrained(path)
    save_tokenizer(path)
    return path
