"""A compact batched runner over a transformers Llama / Qwen2 model's own modules (gpt-fast style).

One :meth:`BatchedRunner.step` is one forward pass for many requests. Their runs are flattened
into one ``[tokens, hidden]`` batch with per-token positions; the linear layers, norms and the
head see the whole batch; attention runs per request against that request's rows of a static KV
pool (``[kv_heads, pool_tokens, head_dim]`` per layer, blocks handed out by
:class:`~common.backends.kv_pool.BlockPool`); requests with the same padded window and span share
one set of attention ops (batched products, one product per request and kv head).

**Logits independent of window and batch, by construction** (``docs/batched-runner.md``):

* every matrix product gets at least ``min_rows`` and at most ``row_invariance.MAX_ROWS`` rows: the flat batch
  and the rows given to the head are padded with dummy rows (and a long prefill is split into
  slices), each request's queries in attention to ``query_rows``, because a BLAS gives a row
  bit-identical results only within one kernel regime of the row count M
  (``common.backends.row_invariance`` probes this machine at load when ``min_rows`` is 0, the
  default), in the weight layout that needs fewer rows (``weight_layout``: on some CPUs
  column-major products have one regime from 2 rows where the usual layout needs more; the
  probe decides); run one intra-op thread (``threads=1``, the default of
  :class:`HFBatchedBackend`);
* a request's attention always spans its whole reservation (``capacity`` rounded up to a block),
  masked beyond each query's position, so the reductions over keys have the same length whatever
  the request's window, length, or neighbours;
* norms, rotary, residuals and the MLP's activation act on each row alone.

So a request's logits in a mixed ragged batch are bit-identical to the same request fed one token
at a time (``tests/common/backends/test_batched_hf.py`` checks this; ``test_batched_ops.py``
each operation).

It reuses the loaded model's modules and weights (embedding, q/k/v/o with Qwen2's biases, MLP,
RMSNorm, rotary tables, tied or untied lm_head, GQA) and loads through
:func:`common.backends.hf.load_causal_lm`, like every other transformers backend. No kernels.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

import structlog
import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from common.backends.batched import Run, RunResult
from common.backends.pooled import PooledRunner
from common.backends.row_invariance import (
    column_major,
    fewest_rows,
    invariant_min_rows,
    pad_rows,
    rowwise,
    store_column_major,
    warn_not_invariant,
)
from common.backends.segment_graphs import SegmentGraphs, graph_buckets
from common.draft_policy import DEFAULT_CURVE, padded_curve

log = structlog.get_logger()

SUPPORTED = ("llama", "qwen2")
# what BatchedRunner._probe_min_rows found, by what decides it: (rows by layout, attention rows)
_PROBED: dict[tuple, tuple[dict[str, int | None], int]] = {}
WEIGHT_LAYOUTS = ("auto", "row", "column")


def causal_span_mask(positions: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[rows, span]``: 0 where key ``j <= position`` of the row, else -inf.

    >>> causal_span_mask(torch.tensor([1, 2]), 4, torch.float32).tolist()
    [[0.0, 0.0, -inf, -inf], [0.0, 0.0, 0.0, -inf]]
    """
    keys = torch.arange(span, device=positions.device)
    mask = torch.zeros((len(positions), span), dtype=dtype, device=positions.device)
    return mask.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))


def _check_architecture(lm: PreTrainedModel) -> None:
    config = lm.config
    if config.model_type not in SUPPORTED:
        raise ValueError(
            f"the batched runner supports {', '.join(SUPPORTED)} models, not {config.model_type!r}"
        )
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ()
    ):
        raise ValueError("the batched runner does not support sliding-window attention layers")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """``x -> F.linear(x, weight, bias)``."""
    return lambda x: torch.nn.functional.linear(x, weight, bias)


class BatchedRunner(PooledRunner):
    """Batched forward passes of ``lm`` (a loaded Llama / Qwen2 causal LM) over a static KV pool.

    ``kv_pool_tokens``: positions the pool holds for all requests together (a stage setting);
    ``min_rows``: rows every matrix product gets (0: the fewest that make logits batch-invariant on
    this machine, probed at load, for the linear layers and the head and, separately, for
    attention's products, whose ``query_rows`` per request follow; 1: no padding).
    ``weight_layout``: how the linear weights are stored: ``row`` as loaded, ``column`` re-stored
    column-major in place (``store_column_major``: the runner owns ``lm``), ``auto`` (the default)
    probes both and keeps column-major only where it needs fewer rows (row-major with an explicit
    ``min_rows``).
    ``graph_rows``: passes of up to this many flat rows run on static buffers bucketed by
    ``segment_graphs.graph_buckets`` (0, the default: none); ``capture_graphs`` (default: on a
    CUDA device) captures each bucket's segments as CUDA graphs at load and replays them.
    """

    kind = "hf"

    def __init__(
        self,
        lm: PreTrainedModel,
        *,
        kv_pool_tokens: int = 4096,
        block_size: int = 16,
        min_rows: int = 0,
        weight_layout: str = "auto",
        graph_rows: int = 0,
        capture_graphs: bool | None = None,
    ):
        _check_architecture(lm)
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(
                f"weight_layout must be one of {WEIGHT_LAYOUTS}, not {weight_layout!r}"
            )
        self.lm = lm
        decoder = lm.model
        config = lm.config
        first = decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.groups = self.n_heads // self.n_kv
        self.scaling = first.scaling
        self.max_context = getattr(config, "max_position_embeddings", 0) or 0
        self.vocab_size = config.vocab_size
        weight = decoder.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self._new_pool(kv_pool_tokens, block_size)
        shape = (len(decoder.layers), self.n_kv, self.pool.capacity_tokens, self.head_dim)
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.positions = min(
            self.max_context or self.pool.capacity_tokens, self.pool.capacity_tokens
        )
        with torch.inference_mode():
            positions = torch.arange(self.positions, device=self.device)[None, :]
            cos, sin = decoder.rotary_emb(weight[:1][None], positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        if min_rows > 0:
            self.min_rows, self.query_rows = min_rows, min_rows
            self.weight_layout = "column" if weight_layout == "column" else "row"
        else:
            self.min_rows, self.weight_layout, attention_rows = self._probe_min_rows(weight_layout)
            # a request's queries meet its keys in products of groups x query_rows rows
            self.query_rows = max(self.min_rows, -(-attention_rows // self.groups))
        if self.weight_layout == "column":
            self._store_column_major()
        self.cost_curve = padded_curve(DEFAULT_CURVE, self.min_rows)
        self.graphs = self._build_graphs(graph_rows, capture_graphs)

    def _build_graphs(self, graph_rows: int, capture: bool | None) -> SegmentGraphs | None:
        buckets = graph_buckets(graph_rows, self.min_rows)
        if not buckets:
            return None
        capture = self.device.type == "cuda" if capture is None else capture
        started = time.perf_counter()
        with torch.inference_mode():
            graphs = SegmentGraphs(
                buckets,
                capture=capture,
                segment=self._segment,
                layers=len(self.lm.model.layers),
                hidden=self.lm.config.hidden_size,
                attention_width=self.n_heads * self.head_dim,
                head_dim=self.head_dim,
                device=self.device,
                dtype=self.dtype,
            )
        log.info(
            "segment_graphs_ready",
            buckets=buckets,
            captured=capture,
            seconds=round(time.perf_counter() - started, 2),
        )
        return graphs

    # -- one pass ---------------------------------------------------------------------------------

    def _pass(self, runs: list[Run]) -> dict[Hashable, RunResult]:
        dev = self.device
        starts = [self._slots[r.request].length for r in runs]
        ids = torch.tensor([t for r in runs for t in r.tokens], dtype=torch.long, device=dev)
        positions = torch.cat(
            [torch.arange(s, s + len(r.tokens), device=dev) for s, r in zip(starts, runs)]
        )
        n = len(ids)
        write = torch.cat(
            [
                self._slots[r.request].rows[p]
                for r, p in zip(runs, positions.split([len(r.tokens) for r in runs]))
            ]
        )
        groups = self._groups(runs, starts)
        decoder = self.lm.model
        graphs = self.graphs.for_rows(max(n, self.min_rows)) if self.graphs else None
        if graphs is not None:  # static buffers of a bucket; its segments replay captured graphs
            graphs.load(decoder.embed_tokens(ids), self.cos[positions], self.sin[positions])
            segment, x = graphs.run, graphs.x
            out = graphs.attention_out
        else:
            x = pad_rows(decoder.embed_tokens(ids), self.min_rows)
            padded_pos = pad_rows(positions, self.min_rows)
            cos, sin = self.cos[padded_pos], self.sin[padded_pos]  # [N, d]
            out = x.new_zeros((x.shape[0], self.n_heads * self.head_dim))
            segment = lambda i: self._segment(i, x, out, cos, sin)  # noqa: E731

        layers = len(decoder.layers)
        for i in range(layers + 1):
            qkv = segment(i)
            if i == layers:
                break
            q, k, v = qkv
            self.k_pool[i].index_copy_(1, write, k[:n].transpose(0, 1))
            self.v_pool[i].index_copy_(1, write, v[:n].transpose(0, 1))
            for group in groups:  # every real row is some group's: out's real rows all rewritten
                out.index_copy_(0, group.dest, self._attend(i, q, group))

        # one head call for every request's wanted rows (rows are independent: padding suffices)
        keep, offset = [], 0
        for r in runs:
            t = len(r.tokens)
            keep.append(torch.arange(offset + t - r.n_rows(), offset + t, device=dev))
            offset += t
        wanted = torch.cat(keep)
        if len(wanted):
            logits = rowwise(self.lm.lm_head, decoder.norm(x[wanted]), self.min_rows)
        else:
            logits = x.new_zeros((0, self.lm.config.vocab_size))
        logits = logits[: len(wanted)].split([len(k) for k in keep])
        results = {}
        for r, s, rows in zip(runs, starts, logits):
            self._slots[r.request].length = s + len(r.tokens)
            results[r.request] = RunResult(r.row_positions(s), rows.argmax(dim=-1).tolist(), rows)
        return results

    def _segment(
        self,
        i: int,
        x: torch.Tensor,
        attention_out: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The work between attention ops (``segment_graphs``), in place on ``x``: layer i-1 after
        its attention (``attention_out``), then layer i up to its attention: (q, k, v)."""
        layers = self.lm.model.layers
        if i > 0:
            layer = layers[i - 1]
            h = x + rowwise(layer.self_attn.o_proj, attention_out, self.min_rows)
            x.copy_(h + rowwise(layer.mlp, layer.post_attention_layernorm(h), self.min_rows))
        if i == len(layers):
            return None
        layer = layers[i]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = rowwise(attn.q_proj, h, self.min_rows).view(-1, self.n_heads, self.head_dim)
        k = rowwise(attn.k_proj, h, self.min_rows).view(-1, self.n_kv, self.head_dim)
        v = rowwise(attn.v_proj, h, self.min_rows).view(-1, self.n_kv, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        return q, k, v

    def _store_column_major(self) -> None:
        """Every linear weight (and a tied embedding) column-major (row_invariance)."""
        decoder = self.lm.model
        modules = [m for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear)]
        modules.append(self.lm.lm_head)
        if decoder.embed_tokens.weight is self.lm.lm_head.weight:
            modules.append(decoder.embed_tokens)
        store_column_major(modules)

    def _probe_min_rows(self, weight_layout: str) -> tuple[int, str, int]:
        """The fewest rows that make this model's products row-invariant here (row_invariance):
        for the linear layers and the head, in the layout that needs fewest (``auto``: both
        tried, a tie keeps the row-major layout as loaded), and for attention's two products:
        (rows, layout, attention rows)."""
        decoder, config = self.lm.model, self.lm.config
        layer = decoder.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        hidden = config.hidden_size
        g = torch.Generator().manual_seed(1)
        keys = torch.randn(256, self.head_dim, generator=g).to(self.device, self.dtype)
        # (weight, bias, input width); the head's first 8192 rows stand for it (the whole
        # vocabulary takes seconds)
        products = [
            *((m.weight, m.bias, m.in_features) for m in (attn.q_proj, attn.k_proj, attn.o_proj)),
            *((m.weight, m.bias, m.in_features) for m in (mlp.gate_proj, mlp.down_proj)),
            (self.lm.lm_head.weight[:8192], None, hidden),
        ]

        def ops(layout: str) -> list:
            store = column_major if layout == "column" else (lambda w: w)
            return [(_linear(store(w), b), width) for w, b, width in products]

        # attention's products: queries x keys, then weights x values (a 256-position span)
        attention = [(lambda q: q @ keys.T, self.head_dim), (lambda w: w @ keys, 256)]
        layouts = ("row", "column") if weight_layout == "auto" else (weight_layout,)
        # A BLAS picks its kernels by shape, strides, type, device and threads, never by values:
        # a process probes each such set once (a stage builds one runner; tests build thousands)
        key = (
            str(self.device),
            self.dtype,
            torch.get_num_threads(),
            layouts,
            self.head_dim,
            tuple((tuple(w.shape), w.stride(), b is not None) for w, b, _ in products),
        )
        cached = key in _PROBED
        if not cached:
            with torch.inference_mode():
                found = {
                    layout: fewest_rows(ops(layout), self.device, self.dtype) for layout in layouts
                }
                _PROBED[key] = found, invariant_min_rows(attention, self.device, self.dtype)
        found, attention_rows = _PROBED[key]
        usable = [(rows, layout != "row", layout) for layout, rows in found.items() if rows]
        if usable:
            rows, _, layout = min(usable)
        else:
            rows, layout = warn_not_invariant(), layouts[0]
        log.info(
            "min_rows_probed",
            min_rows=rows,
            weight_layout=layout,
            rows_by_layout=found,
            attention_rows=attention_rows,
            threads=torch.get_num_threads(),
            cached=cached,
        )
        return rows, layout, attention_rows

    def _groups(self, runs: list[Run], starts: list[int]) -> list[_Group]:
        """Requests whose padded query rows and key span match share one set of attention ops."""
        by_shape: dict[tuple[int, int], list] = {}
        offset = 0
        for r, s in zip(runs, starts):
            t = len(r.tokens)
            rows = self._slots[r.request].rows
            by_shape.setdefault((max(t, self.query_rows), len(rows)), []).append(
                (offset, t, s, rows)
            )
            offset += t
        return [_Group(tp, members, self.dtype) for (tp, _), members in by_shape.items()]

    def _attend(self, layer: int, q: torch.Tensor, group: _Group) -> torch.Tensor:
        """Attention of one group's requests (``q``: the whole batch's ``[N, heads, d]``), each
        against its whole reserved span; returns the group's real rows ``[rows, heads * d]``."""
        g, tp, span = len(group.members), group.tp, group.span
        q = q.index_select(0, group.queries).view(g, tp, self.n_heads, self.head_dim)
        q = q.permute(0, 2, 1, 3).reshape(g, self.n_kv, self.groups * tp, self.head_dim)
        k = self.k_pool[layer].index_select(1, group.keys).view(self.n_kv, g, span, -1)
        v = self.v_pool[layer].index_select(1, group.keys).view(self.n_kv, g, span, -1)
        scores = torch.matmul(q, k.transpose(0, 1).transpose(2, 3)) * self.scaling
        scores = scores.view(g, self.n_kv, self.groups, tp, span) + group.mask
        probs = torch.softmax(scores, dim=-1).view(g, self.n_kv, self.groups * tp, span)
        out = torch.matmul(probs, v.transpose(0, 1))  # [g, kv, groups * tp, d]
        out = out.view(g, self.n_heads, tp, self.head_dim).transpose(1, 2)
        return out.reshape(g * tp, -1).index_select(0, group.real)


class _Group:
    """Attention bookkeeping for requests with the same padded rows ``tp`` and key ``span``.

    ``queries``: the flat-batch row of each of the g x tp query rows (a request's dummy rows
    repeat its last row); ``real``: which of those rows are real; ``dest``: where they go in the
    flat batch; ``keys``: the pool rows of every member's span, member after member; ``mask``:
    ``[g, 1, 1, tp, span]``, causal by position (dummy rows take the last row's position).
    """

    def __init__(self, tp: int, members: list, dtype: torch.dtype):
        device = members[0][3].device
        self.tp, self.members, self.span = tp, members, len(members[0][3])
        queries, real, dest, masks = [], [], [], []
        for i, (offset, t, start, _) in enumerate(members):
            queries += [offset + min(j, t - 1) for j in range(tp)]
            real += [i * tp + j for j in range(t)]
            dest += range(offset, offset + t)
            pos = torch.tensor([start + min(j, t - 1) for j in range(tp)], device=device)
            masks.append(causal_span_mask(pos, self.span, dtype))
        self.queries = torch.tensor(queries, device=device)
        self.real = torch.tensor(real, device=device)
        self.dest = torch.tensor(dest, device=device)
        self.keys = torch.cat([rows for *_, rows in members])
        self.mask = torch.stack(masks)[:, None, None]


class HFBatchedBackend(BatchedRunner):
    """:class:`BatchedRunner` over a model loaded the users' way (:func:`load_causal_lm`: a
    prepared name, a directory, a ``.gguf`` or a cached hub id; ``early_exit_layers`` keeps the
    first N layers). ``threads`` (default 1) sets torch's intra-op threads for the process: one
    thread is part of what keeps logits batch-invariant. On a CUDA device, passes of up to
    ``cuda_graph_max_tokens`` flat tokens replay piecewise CUDA graphs (0: eager)."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = 1,
        early_exit_layers: int | None = None,
        kv_pool_tokens: int = 4096,
        block_size: int = 16,
        min_rows: int = 0,
        weight_layout: str = "auto",
        cuda_graph_max_tokens: int = 128,
    ):
        from common.backends.hf import eos_token_ids, load_causal_lm, model_label

        if threads is not None:
            torch.set_num_threads(threads)
        lm = load_causal_lm(model, dtype, early_exit_layers).to(torch.device(device))
        super().__init__(
            lm,
            kv_pool_tokens=kv_pool_tokens,
            block_size=block_size,
            min_rows=min_rows,
            weight_layout=weight_layout,
            graph_rows=cuda_graph_max_tokens if torch.device(device).type == "cuda" else 0,
        )
        self.kind = "hf" if early_exit_layers is None else "early-exit"
        self.name = model_label(model, early_exit_layers)
        self.eos_token_ids = eos_token_ids(lm)
        self.tokenizer_source = tokenizer or model
