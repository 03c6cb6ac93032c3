"""Tiny random Llama and Qwen2 models for the batched-runner tests, saved and loaded the users' way.

Qwen2 is the architecture with q/k/v biases and tied embeddings; its biases are drawn at random
(transformers initialises them to zero), so the tests would see a runner that dropped them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.tiny_models import BOS, EOS, VOCAB_SIZE, save_tokenizer, tiny_llama


def tiny_qwen2(path: Path, *, seed: int = 0, layers: int = 3, hidden: int = 32) -> Path:
    """A random fp32 Qwen2ForCausalLM (GQA 4:2, tied embeddings, random q/k/v biases)."""
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
