"""The quantized CPU runner: a GGUF model served from its own 4- and 8-bit blocks, every row of a
pass computed the same way whatever else shares the pass.

One :meth:`QuantizedRunner.step` is one forward pass for many requests: their runs are flattened
into one ``[tokens, hidden]`` batch, each token with its request's position. Per layer:

    h = rmsnorm(x);  q, k, v = h @ Wqkv (+ bias);  rotate q, k by position;  write k, v to the pool
    x = x + attention(q, the request's own keys and values) @ Wo
    x = x + silu_mul(rmsnorm(x) @ [Wgate | Wup]) @ Wdown

then the final norm and the head on the rows a run asks for. Every operation is from
``common.kernels``, each of which computes a row in an order fixed by that row alone (their
docstrings and ``docs/cpu-kernels.md`` say how), or is elementwise (embedding lookup, rotary
products with tables, residual adds, biases). So a request's logits do not depend on its
neighbours in the pass, on how many tokens it feeds at once, on padding (there is none) or on the
thread count: decoding a request alone, token by token, gives bit-identical logits to verifying
its drafts among other requests. ``tests/common/backends/test_quantized.py`` checks this on the
real SmolLM2 weights, ``tests/common/kernels`` each operation.

Weights: ``common.backends.gguf_model`` repacks each tensor from the file's blocks (Q4_0, Q4_1,
Q4_K: 4-bit codes; Q5_0, Q6_K, Q8_0: 8-bit codes; each group keeps its own scale and offset), never
making a float copy of the model. q, k and v (and gate and up) share one call where their formats
match. The KV pool (``kv_pool_tokens`` positions, all requests together, float32) is handed out in
blocks (:class:`~common.backends.kv_pool.BlockPool`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Hashable

import structlog
import torch

from common import kernels
from common.backends.batched import Run, RunResult
from common.backends.gguf_model import GGUFTensors, ModelShape
from common.backends.pooled import PooledRunner
from common.kernels.packing import LANES, concat, first_rows

log = structlog.get_logger()

# (tokens in a pass, its cost / a one-token pass's): what the draft policy weighs. Qwen2.5-Coder-
# 1.5B, 2 threads, one request on a 128-token context (docs/cpu-kernels.md); 32 and 64 extend
# the last slope. No padding: every extra token costs something, 8 about half a pass more.
QUANTIZED_CURVE: tuple[tuple[int, float], ...] = (
    (1, 1.0),
    (2, 1.1),
    (4, 1.3),
    (8, 1.5),
    (16, 2.2),
    (32, 3.7),
    (64, 6.6),
)


def rope_tables(shape: ModelShape, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[positions, head_dim / 2]``: angle ``p * base ** (-2 i / head_dim)``.

    >>> from dataclasses import replace
    >>> cos, sin = rope_tables(_TOY, 3)
    >>> cos.shape, float(cos[0, 0]), round(float(sin[1, 0]), 4)
    (torch.Size([3, 2]), 1.0, 0.8415)
    """
    half = shape.head_dim // 2
    inv = shape.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / shape.head_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotary embedding of ``x [N, heads, D]`` with per-row ``cos``/``sin`` ``[N, D/2]``: pairs
    ``(x[2i], x[2i+1])`` (``adjacent``) or ``(x[i], x[i + D/2])`` (``halves``) turned by their
    angle. Elementwise products and sums only, so each row is exact whatever the batch.

    >>> x = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    >>> c, s = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    >>> rotate(x, c, s, "halves").tolist(), rotate(x, c, s, "adjacent").tolist()
    ([[[0.0, 0.0, 1.0, 1.0]]], [[[0.0, 1.0, 0.0, 1.0]]])
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    if style == "halves":
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class _Projection:
    """One or more weights sharing an input, in as few kernel calls as their formats allow:
    ``__call__(h)`` gives each weight's output (plus its bias), in order."""

    def __init__(self, weights: list, biases: list):
        self.widths = [w.n for w in weights]
        self.biases = biases
        self.calls = []  # (prepared weight, how many of the weights it covers)
        run: list = []
        for w in weights:
            if run and (w.k, w.group, w.bits) != (run[0].k, run[0].group, run[0].bits):
                self.calls.append((kernels.prepare_weight(concat(run)), len(run)))
                run = []
            run.append(w)
        self.calls.append(
            (kernels.prepare_weight(concat(run) if len(run) > 1 else run[0]), len(run))
        )

    def __call__(self, h: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        i = 0
        for weight, count in self.calls:
            y = kernels.qmatmul(h, weight)
            outs.extend(y.split(self.widths[i : i + count], dim=1) if count > 1 else [y])
            i += count
        return [y if b is None else y + b for y, b in zip(outs, self.biases)]

    def joined(self, h: torch.Tensor) -> torch.Tensor:
        """Every output side by side ``[M, sum of widths]`` (one call's output as it is)."""
        if len(self.calls) == 1 and all(b is None for b in self.biases):
            return kernels.qmatmul(h, self.calls[0][0])
        return torch.cat(self(h), dim=1)


class _Layer:
    def __init__(self, tensors: GGUFTensors, i: int):
        p = f"blk.{i}."

        def bias(name: str) -> torch.Tensor | None:
            return tensors.vector(p + name) if p + name in tensors else None

        self.attn_norm = tensors.vector(p + "attn_norm.weight")
        self.ffn_norm = tensors.vector(p + "ffn_norm.weight")
        self.qkv = _Projection(
            [tensors.weight(p + f"attn_{x}.weight") for x in "qkv"],
            [bias(f"attn_{x}.bias") for x in "qkv"],
        )
        self.out = _Projection([tensors.weight(p + "attn_output.weight")], [None])
        self.gate_up = _Projection(
            [tensors.weight(p + "ffn_gate.weight"), tensors.weight(p + "ffn_up.weight")],
            [None, None],
        )
        self.down = _Projection([tensors.weight(p + "ffn_down.weight")], [None])


class QuantizedRunner(PooledRunner):
    """Batched passes of a GGUF model (``path``) over a static KV pool; see the module docstring.
    ``threads``: torch's intra-op threads for the process (None: leave torch's default, every
    core); any count gives the same logits."""

    kind = "quantized"
    cost_curve = QUANTIZED_CURVE

    def __init__(
        self,
        path: str,
        *,
        kv_pool_tokens: int = 4096,
        block_size: int = 16,
        threads: int | None = None,
        name: str | None = None,
        tokenizer: str | None = None,
        draft_vocab: int | None = None,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        tensors = GGUFTensors(path)
        shape = self.shape = tensors.shape
        self._tensors = tensors
        self.name = name or path
        self.tokenizer_source = tokenizer or path
        self.max_context = shape.context
        self.vocab_size = shape.vocab
        self.eos_token_ids = shape.eos_token_ids
        self.scale = 1.0 / math.sqrt(shape.head_dim)
        with torch.inference_mode():
            self.layers = [_Layer(tensors, i) for i in range(shape.layers)]
            self.norm = tensors.vector("output_norm.weight")
            head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
            self.head = _Projection([self._head_weight(tensors.weight(head), draft_vocab)], [None])
        self._new_pool(kv_pool_tokens, block_size)
        log.info(
            "quantized_runner_ready",
            model=self.name,
            kernels=kernels.implementation(),
            threads=torch.get_num_threads(),
            seconds=round(time.perf_counter() - started, 1),
        )

    def _head_weight(self, weight, draft_vocab: int | None):
        """The head, or for a drafter with ``draft_vocab`` its first rows: logits for token ids
        ``0 .. draft_vocab - 1`` only (each the full head's, bit for bit), so a drafter reads a
        fraction of the head (BPE vocabularies list tokens in merge order, roughly the most
        frequent first). Such a runner may draft and verify drafts, never be the target."""
        if draft_vocab is None or draft_vocab >= weight.n:
            return weight
        if draft_vocab % LANES:
            raise ValueError(f"draft_vocab {draft_vocab} must be a multiple of {LANES}")
        self.can_target = False
        return first_rows(weight, draft_vocab)

    # -- the pool ---------------------------------------------------------------------------------

    def _new_pool(self, kv_pool_tokens: int, block_size: int) -> None:
        shape = self.shape
        super()._new_pool(kv_pool_tokens, block_size)
        capacity = self.pool.capacity_tokens
        self.positions = min(shape.context or capacity, capacity)
        self.cos, self.sin = rope_tables(shape, self.positions)
        pool_shape = (shape.layers, capacity, shape.kv_heads, shape.head_dim)
        self.k_pool = torch.zeros(pool_shape)
        self.v_pool = torch.zeros(pool_shape)

    def with_new_pool(self) -> QuantizedRunner:
        """A runner sharing these weights, with an empty KV pool of the same size."""
        other = copy.copy(self)
        other._new_pool(self.pool.capacity_tokens, self.pool.block_size)
        return other

    # -- one pass ---------------------------------------------------------------------------------

    def _pass(self, runs: list[Run]) -> dict[Hashable, RunResult]:
        shape = self.shape
        slots = [self._slots[r.request] for r in runs]
        starts = [s.length for s in slots]
        lengths = [len(r.tokens) for r in runs]
        positions = torch.cat([torch.arange(s, s + t) for s, t in zip(starts, lengths)])
        write = torch.cat([slot.rows[s : s + t] for slot, s, t in zip(slots, starts, lengths)])
        # attention: row n reads its request's pool rows 0 .. position
        offsets = torch.tensor([0] + [len(s.rows) for s in slots]).cumsum(0)[:-1]
        key_rows = torch.cat([s.rows for s in slots])
        row_start = torch.repeat_interleave(offsets, torch.tensor(lengths))
        counts = positions + 1
        cos, sin = self.cos[positions], self.sin[positions]

        ids = [t for r in runs for t in r.tokens]
        x = self._tensors.embedding_rows("token_embd.weight", ids)
        n = x.shape[0]
        for i, layer in enumerate(self.layers):
            h = kernels.rmsnorm(x, layer.attn_norm, shape.eps)
            q, k, v = layer.qkv(h)
            q = rotate(q.view(n, shape.heads, shape.head_dim), cos, sin, shape.rope)
            k = rotate(k.view(n, shape.kv_heads, shape.head_dim), cos, sin, shape.rope)
            self.k_pool[i].index_copy_(0, write, k)
            self.v_pool[i].index_copy_(0, write, v.view(n, shape.kv_heads, shape.head_dim))
            a = kernels.attention(
                q, self.k_pool[i], self.v_pool[i], key_rows, row_start, counts, self.scale
            )
            (o,) = layer.out(a.view(n, -1))
            x = x + o
            h = kernels.rmsnorm(x, layer.ffn_norm, shape.eps)
            (d,) = layer.down(kernels.silu_mul(layer.gate_up.joined(h)))
            x = x + d

        keep, offset = [], 0
        for r, t in zip(runs, lengths):
            keep.append(torch.arange(offset + t - r.n_rows(), offset + t))
            offset += t
        wanted = torch.cat(keep)
        if len(wanted):
            (logits,) = self.head(kernels.rmsnorm(x[wanted], self.norm, shape.eps))
        else:
            logits = torch.zeros((0, self.vocab_size))
        results = {}
        for r, slot, s, t, rows in zip(
            runs, slots, starts, lengths, logits.split([len(k) for k in keep])
        ):
            slot.length = s + t
            results[r.request] = RunResult(r.row_positions(s), rows.argmax(dim=-1).tolist(), rows)
        return results


_TOY = ModelShape("llama", 1, 8, 16, 2, 1, 4, 1e-5, 10000.0, "adjacent", 16, 32, (0,))
