"""Backends: one loaded model each, behind :class:`~common.backends.base.Backend`.

``load_backend(settings)`` picks the constructor for ``settings.backend`` from ``CONSTRUCTORS``; a
new kind is one more entry there. Constructors import their module lazily, so an n-gram stage
never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

from common.backends.base import Backend, Session
from common.settings import StageSettings


def _hf(settings: StageSettings) -> Backend:
    from common.backends.hf import HFBackend

    if settings.backend == "hf" and settings.early_exit_layers is not None:
        raise ValueError("early_exit_layers is set but backend is 'hf'; use backend 'early-exit'")
    return HFBackend(
        settings.model,
        tokenizer=settings.tokenizer,
        dtype=settings.dtype,
        device=settings.device,
        threads=settings.threads,
        early_exit_layers=settings.early_exit_layers,
    )


def _ngram(settings: StageSettings) -> Backend:
    from common.backends.ngram import NgramBackend

    if settings.model:
        raise ValueError(f"the n-gram backend has no weights; unset model (got {settings.model!r})")
    return NgramBackend(settings.ngram_max, settings.ngram_min)


def _simulated(settings: StageSettings) -> Backend:
    from common.backends.simulated import SimulatedBackend

    return SimulatedBackend(
        agreement=settings.sim_agreement,
        seed=settings.sim_seed,
        vocab=settings.sim_vocab,
        cost_ms=settings.sim_cost_ms,
        cost_per_token_ms=settings.sim_cost_per_token_ms,
        tokenizer=settings.tokenizer,
    )


CONSTRUCTORS: dict[str, Callable[[StageSettings], Backend]] = {
    "hf": _hf,
    "early-exit": _hf,
    "ngram": _ngram,
    "simulated": _simulated,
}


def load_backend(settings: StageSettings) -> Backend:
    """The backend a stage's settings describe, loaded and ready for ``new_session``."""
    constructor = CONSTRUCTORS.get(settings.backend)
    if constructor is None:
        raise ValueError(
            f"backend {settings.backend!r} is not available (available: {', '.join(CONSTRUCTORS)})"
        )
    return constructor(settings)


__all__ = ["Backend", "Session", "CONSTRUCTORS", "load_backend"]
