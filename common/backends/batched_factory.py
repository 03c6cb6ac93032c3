"""The batched backend a stage's settings describe (what the engine switch will call).

``kv_pool_tokens`` (positions in the stage's KV pool, all requests together) and ``min_rows``
(rows every matrix product gets; 4 keeps logits batch-invariant) are read from the settings when
they have them, else the defaults below: the settings class gains them with the engine switch.
The transformers runner gets one intra-op thread unless ``threads`` says otherwise; more than
one voids the row invariance (at 2 threads a 7-row product differs; batching-sampling.md §3).
The simulator's per-pass cost is ``sim_cost_ms`` times the measured batch curve.
"""

from __future__ import annotations

from common.backends.batched import BatchedBackend

KV_POOL_TOKENS = 4096
MIN_ROWS = 4


def load_batched_backend(settings) -> BatchedBackend:
    pool = getattr(settings, "kv_pool_tokens", None) or KV_POOL_TOKENS
    if settings.backend in ("hf", "early-exit"):
        from common.backends.batched_hf import HFBatchedBackend

        if settings.backend == "hf" and settings.early_exit_layers is not None:
            raise ValueError("early_exit_layers is set but backend is 'hf'; use 'early-exit'")
        return HFBatchedBackend(
            settings.model,
            tokenizer=settings.tokenizer,
            dtype=settings.dtype,
            device=settings.device,
            threads=settings.threads or 1,
            early_exit_layers=settings.early_exit_layers,
            kv_pool_tokens=pool,
            min_rows=getattr(settings, "min_rows", None) or MIN_ROWS,
        )
    if settings.backend == "ngram":
        from common.backends.batched_loop import LoopedBatched
        from common.backends.ngram import NgramBackend

        return LoopedBatched(NgramBackend(settings.ngram_max, settings.ngram_min), pool)
    if settings.backend == "simulated":
        from common.backends.batched_sim import SimulatedBatched

        return SimulatedBatched(
            agreement=settings.sim_agreement,
            seed=settings.sim_seed,
            vocab=settings.sim_vocab,
            cost_ms=settings.sim_cost_ms,
            tokenizer=settings.tokenizer,
            kv_pool_tokens=pool,
        )
    raise ValueError(f"backend {settings.backend!r} has no batched implementation")
