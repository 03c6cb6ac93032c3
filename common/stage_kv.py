"""A request's KV reservation at a stage, and the invariant the engine keeps on it.

A request holds a reservation from its first pass (its worst case: prompt + max_tokens, so that
a pass never finds the pool full half-way through a request) until it ends. What the reservation
holds is always a prefix of ``prompt + tokens[:-1]``: the next pass then has at least the last
token to feed, and feeds whatever the cache lacks. The cache is only ever cut, never extended
(:func:`sync_cache`).
"""

from __future__ import annotations

from common.backends.batched import BatchedBackend
from common.level_request import LevelRequest


def try_open(backend: BatchedBackend, r: LevelRequest) -> bool:
    """Whether ``r`` holds a reservation, taking one if the pool has room; if not, it waits
    (``r.waiting_kv``) until a request closes."""
    if r.opened:
        return True
    capacity = len(r.prompt) + r.max_tokens
    if not backend.can_open(capacity):
        r.waiting_kv = True
        return False
    backend.open(r.request_id, capacity)
    r.opened, r.waiting_kv = True, False
    return True


def sync_cache(backend: BatchedBackend, r: LevelRequest, valid: int | None = None) -> None:
    """Enforce the invariant after anything that changes ``r.tokens`` or feeds the cache.

    ``valid``: how many of ``r.tokens`` the cache may still hold as they are now (after a
    rollback, the positions from the divergence on held other tokens); default all.
    """
    if not r.opened:
        return
    keep = len(r.tokens) - 1 if valid is None else min(valid, len(r.tokens) - 1)
    if len(r.prompt) + keep < backend.length(r.request_id):
        backend.crop(r.request_id, len(r.prompt) + keep)


def close(backend: BatchedBackend, r: LevelRequest) -> None:
    """Give the reservation back (a request that ends, fails or is dropped)."""
    if r.opened:
        backend.close(r.request_id)
        r.opened = False
