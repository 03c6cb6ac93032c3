"""A GGUF file's model, read for the quantized runner: its shape from the metadata, its weights
repacked block by block into ``common.kernels`` layouts, with no fp32 copy of the model.

Each weight is read from the file alone (``os.pread`` of its bytes, not a memory map of the whole
file, so the process holds at most one tensor's raw blocks at a time), decoded to codes, scales
and offsets (``common.kernels.gguf_blocks``), and laid out for the kernels
(``common.kernels.prepare_weight``). The token embedding stays in the file: a pass reads and
dequantizes only the rows of the tokens it embeds.

Supported architectures: ``llama`` (SmolLM2) and ``qwen2`` (Qwen2.5), full attention, no rope
scaling. llama.cpp's converter stores a llama model's q and k rows permuted for its "normal"
rope (rotating adjacent pairs); Qwen2 uses the NeoX rope (rotating halves); :class:`ModelShape`
records which, and the runner rotates accordingly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = {"llama": "adjacent", "qwen2": "halves"}


@dataclass(frozen=True)
class ModelShape:
    """What the runner needs to know of a model, from the GGUF metadata."""

    architecture: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_base: float
    rope: str  # "adjacent" (llama.cpp's normal rope) or "halves" (NeoX)
    context: int
    vocab: int
    eos_token_ids: tuple[int, ...]


def read_shape(metadata: dict, embedding_rows: int) -> ModelShape:
    """The :class:`ModelShape` of a GGUF file's metadata (``gguf_blocks.read_index``) and its
    embedding table's row count; ``ValueError`` if the runner cannot serve it."""
    field = metadata.get
    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"the quantized runner supports {', '.join(ARCHITECTURES)} GGUF models, not {arch!r}"
        )
    if field(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ValueError("the quantized runner does not support rope scaling")
    hidden = int(field(f"{arch}.embedding_length"))
    heads = int(field(f"{arch}.attention.head_count"))
    eos = {
        field("tokenizer.ggml.eos_token_id"),
        field("tokenizer.ggml.eot_token_id"),
    }
    return ModelShape(
        architecture=arch,
        layers=int(field(f"{arch}.block_count")),
        hidden=hidden,
        ffn=int(field(f"{arch}.feed_forward_length")),
        heads=heads,
        kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_base=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rope=ARCHITECTURES[arch],
        context=int(field(f"{arch}.context_length", 0)),
        vocab=int(embedding_rows),
        eos_token_ids=tuple(sorted(int(e) for e in eos if e is not None)),
    )


class GGUFTensors:
    """Reads a GGUF file's tensors one at a time by name."""

    def __init__(self, path: str | Path):
        from common.kernels.gguf_blocks import read_index

        self.path = str(path)
        index = read_index(self.path)  # the header only; tensor bytes are read below, not mapped
        self._info = {
            t.name: (t.offset, t.n_bytes, t.qtype, [int(d) for d in t.shape])
            for t in index.tensors.values()
        }
        if "token_embd.weight" not in self._info:
            raise ValueError(f"{self.path}: no token_embd.weight tensor")
        self.shape = read_shape(index.metadata, self._info["token_embd.weight"][3][1])

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def _bytes(self, name: str) -> np.ndarray:
        offset, n_bytes, _, _ = self._info[name]
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), n_bytes, offset)
        return np.frombuffer(data, dtype=np.uint8)

    def vector(self, name: str) -> torch.Tensor:
        """A float32 tensor (norm weights, biases)."""
        from gguf import GGMLQuantizationType, quants

        _, _, qtype, dims = self._info[name]
        data = self._bytes(name)
        if qtype == GGMLQuantizationType.F32:
            values = data.view(np.float32)
        else:
            values = quants.dequantize(data, qtype).reshape(-1)
        return torch.from_numpy(values.astype(np.float32, copy=True)).reshape(dims[::-1])

    def weight(self, name: str):
        """A matrix as a ``RowWeight`` (``w = s * u + z``), decoded from the file's blocks."""
        from common.kernels.gguf_blocks import decode

        _, _, qtype, dims = self._info[name]
        k, n = dims
        try:
            return decode(self._bytes(name), qtype, n, k)
        except ValueError as exc:
            raise ValueError(f"{self.path}: tensor {name}: {exc}") from None

    def embedding_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of an embedding table, dequantized: ``[len(rows), K]`` float32."""
        from common.kernels.gguf_blocks import decode_rows

        offset, n_bytes, qtype, (k, n) = self._info[name]
        row_bytes = n_bytes // n
        with open(self.path, "rb") as f:
            blobs = [os.pread(f.fileno(), row_bytes, offset + r * row_bytes) for r in rows]
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(rows), row_bytes)
        return decode_rows(data, qtype, k, range(len(rows)))
