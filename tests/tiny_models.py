"""Tiny random Llama models saved like real ones, so tests use the real ``from_pretrained`` path.

    target = tiny_llama(tmp / "target")                    # seed 0, 4 layers
    draft = tiny_llama(tmp / "draft", seed=1, layers=2)    # same tokenizer, unrelated weights
    close = noisy_copy(target, tmp / "close")  # target + 2 % noise: agrees about half the time
    gguf = to_gguf(target, tmp / "t.gguf")  # the same model, quantized as llama.cpp lays it out

The builder and the word-level tokenizer are ``benchmarks.tiny_models``'s (the benchmarks build
the same models); this module adds what only tests need.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.tiny_models import BOS, EOS, VOCAB_SIZE, save_tokenizer, tiny_llama

__all__ = ["BOS", "EOS", "VOCAB_SIZE", "noisy_copy", "save_tokenizer", "tiny_llama", "to_gguf"]


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


# GGUF types the tiny quantized models cycle through, layer tensor by layer tensor, so that every
# 32-element block format gguf can write is served (K-quants need rows of 256: the real files).
TINY_GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0")
_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight`` (llama.cpp's names)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def _permute_for_adjacent_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row order for a llama model (its rope turns adjacent pairs)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def to_gguf(hf_dir: Path, path: Path, types: tuple[str, ...] = TINY_GGUF_TYPES) -> Path:
    """``hf_dir``'s Llama or Qwen2 model quantized into a GGUF file at ``path``, as llama.cpp's
    converter lays it out (names, llama's q/k row order, metadata): 2-D weights cycle through
    ``types``, the embedding is Q8_0, norms and biases stay float32. The tokenizer stays in
    ``hf_dir`` (name it as the stage's ``tokenizer``)."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    config = model.config
    arch = config.model_type
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    cycle = 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute_for_adjacent_rope(data, heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute_for_adjacent_rope(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1:
            writer.add_tensor(_gguf_name(name), array)
            continue
        if name == "model.embed_tokens.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = gguf.GGMLQuantizationType[types[cycle % len(types)]]
            cycle += 1
        writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
