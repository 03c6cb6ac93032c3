"""Block bookkeeping for a bounded KV pool: which pool rows each request owns.

The pool holds ``capacity_tokens`` positions in blocks of ``block_size``. A request reserves its
worst case when it opens (so a pass can never run out of room half-way) and gets the flat pool
rows of its positions, in order; it frees them when it closes.

>>> pool = BlockPool(capacity_tokens=64, block_size=16)
>>> pool.reserve("a", 20)            # 2 blocks
[0, 1]
>>> pool.reserve("b", 16)
[2]
>>> pool.usage()
(48, 64)
>>> pool.rows("b")[:3]               # flat pool rows of b's positions 0, 1, 2
[32, 33, 34]
>>> pool.reserve("c", 17)
Traceback (most recent call last):
...
common.backends.batched.PoolExhausted: KV pool full: 17 positions need 2 blocks of 16, 1 of 4 free
>>> pool.release("a"); pool.reserve("c", 17)   # freed blocks are reused
[0, 1]
"""

from __future__ import annotations

from collections.abc import Hashable

from common.backends.batched import PoolExhausted


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` positions.

    >>> blocks_for(0, 16), blocks_for(1, 16), blocks_for(16, 16), blocks_for(17, 16)
    (0, 1, 1, 2)
    """
    return -(-tokens // block_size)


class BlockPool:
    def __init__(self, capacity_tokens: int, block_size: int = 16):
        if block_size < 1 or capacity_tokens < block_size:
            raise ValueError(
                f"KV pool of {capacity_tokens} tokens cannot hold one block of {block_size}"
            )
        self.block_size = block_size
        self.n_blocks = capacity_tokens // block_size
        self._free = list(range(self.n_blocks - 1, -1, -1))  # pop() gives the lowest first
        self._owned: dict[Hashable, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    def can_reserve(self, tokens: int) -> bool:
        return blocks_for(tokens, self.block_size) <= len(self._free)

    def reserve(self, request: Hashable, tokens: int) -> list[int]:
        if request in self._owned:
            raise ValueError(f"request {request!r} is already open")
        if tokens < 1:
            raise ValueError(f"request {request!r}: capacity {tokens} must be at least 1")
        need = blocks_for(tokens, self.block_size)
        if need > len(self._free):
            raise PoolExhausted(
                f"KV pool full: {tokens} positions need {need} blocks of {self.block_size}, "
                f"{len(self._free)} of {self.n_blocks} free"
            )
        blocks = [self._free.pop() for _ in range(need)]
        self._owned[request] = blocks
        return blocks

    def release(self, request: Hashable) -> None:
        self._free.extend(reversed(self._owned.pop(request, [])))

    def rows(self, request: Hashable) -> list[int]:
        """The flat pool row of each of the request's reserved positions."""
        b = self.block_size
        return [block * b + i for block in self._owned[request] for i in range(b)]

    def usage(self) -> tuple[int, int]:
        """(reserved tokens, capacity tokens)."""
        return (self.n_blocks - len(self._free)) * self.block_size, self.capacity_tokens
