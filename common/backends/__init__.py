"""Backends: one loaded model each, all behind one interface,
:class:`~common.backends.batched.BatchedBackend` (a pass serves every request that wants one).

``load_backend(settings)`` is the one factory: the backend a stage's settings describe, what a
stage service serves with. Constructors import their module lazily, so an n-gram stage never
imports torch.

``kv_pool_tokens`` (positions in the stage's KV pool, all requests together), ``min_rows``
(rows every matrix product gets; 0 probes the fewest that keep logits batch-invariant),
``weight_layout`` (row- or column-major linear weights; ``auto`` probes) and
``cuda_graph_max_tokens`` (the largest pass that replays CUDA graphs) come from the settings.
The transformers runner gets one intra-op thread unless ``threads`` says otherwise; more than
one voids the row invariance (at 2 threads a 7-row product differs; ``docs/batched-runner.md``).
The n-gram drafter feeds each request's history in turn (its passes cost nothing worth batching)
and holds no KV, so its pool is unbounded whatever ``kv_pool_tokens`` says.
The simulator's per-pass cost is ``sim_cost_ms`` times a batch curve: the measured one, or, with
``sim_cost_per_token_ms``, a line (each token of the whole batch past the first adds that much).

>>> from common.settings import StageSettings
>>> b = load_backend(StageSettings(level=1, backend="simulated", sim_cost_ms=10,
...                                 sim_cost_per_token_ms=1, kv_pool_tokens=64))
>>> b.pass_seconds(1), b.pass_seconds(5), b.usage().capacity_tokens
(0.01, 0.014, 64)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.backends.batched import BatchedBackend

if TYPE_CHECKING:
    from common.settings import StageSettings

BACKENDS = "quantized, hf, early-exit, ngram, simulated"


def load_backend(settings: StageSettings) -> BatchedBackend:
    """The backend ``settings`` describe, loaded and ready to open requests."""
    pool = settings.kv_pool_tokens
    if settings.backend == "quantized":
        from common.backends.quantized import QuantizedRunner
        from common.model_catalog import locate_gguf

        path, tokenizer = locate_gguf(settings.model)
        return QuantizedRunner(
            str(path),
            kv_pool_tokens=pool,
            threads=settings.threads,
            name=settings.model,
            tokenizer=settings.tokenizer or str(tokenizer),
            draft_vocab=settings.draft_vocab,
        )
    if settings.backend in ("hf", "early-exit"):
        from common.backends.batched_hf import HFBatchedBackend

        if settings.backend == "hf" and settings.early_exit_layers is not None:
            raise ValueError(
                "early_exit_layers is set but backend is 'hf'; use backend 'early-exit'"
            )
        return HFBatchedBackend(
            settings.model,
            tokenizer=settings.tokenizer,
            dtype=settings.dtype,
            device=settings.device,
            threads=settings.threads or 1,
            early_exit_layers=settings.early_exit_layers,
            kv_pool_tokens=pool,
            min_rows=settings.min_rows,
            weight_layout=settings.weight_layout,
            cuda_graph_max_tokens=settings.cuda_graph_max_tokens,
        )
    if settings.backend == "ngram":
        from common.backends.ngram import NgramBackend

        if settings.model:
            raise ValueError(
                f"the n-gram backend has no weights; unset model (got {settings.model!r})"
            )
        return NgramBackend(settings.ngram_max, settings.ngram_min)  # no KV: unbounded
    if settings.backend == "simulated":
        from common.backends.simulated import SimulatedBackend
        from common.draft_policy import DEFAULT_CURVE

        curve = DEFAULT_CURVE
        if settings.sim_cost_per_token_ms and settings.sim_cost_ms:
            curve = ((1, 1.0), (2, 1.0 + settings.sim_cost_per_token_ms / settings.sim_cost_ms))
        return SimulatedBackend(
            curve=curve,
            agreement=settings.sim_agreement,
            seed=settings.sim_seed,
            vocab=settings.sim_vocab,
            cost_ms=settings.sim_cost_ms,
            cost_per_token_ms=settings.sim_cost_per_token_ms,
            tokenizer=settings.tokenizer,
            kv_pool_tokens=pool,
        )
    raise ValueError(f"backend {settings.backend!r} is not available (available: {BACKENDS})")


__all__ = ["BatchedBackend", "BACKENDS", "load_backend"]
