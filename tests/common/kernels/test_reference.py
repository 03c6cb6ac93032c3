"""The torch reference is batch invariant on its own: a row computed among M rows equals the row
computed alone, for every operation, at decode sizes (M = 1..70) and prefill sizes.

The reference is slow, so sizes are small and only a few rows of each call are compared."""

from __future__ import annotations

import pytest
import torch

from common.kernels import reference
from common.kernels.packing import BlockScales, Factors, RowWeight

ROW_COUNTS = [*range(1, 71), 128, 256, 257, 511, 512, 513]
MAX_ROWS = max(ROW_COUNTS)


def random_weight(n: int, k: int, group: int, bits: int, seed: int = 0) -> RowWeight:
    """Random codes, scales and offsets of the given shape."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    s = torch.randn(n, k // group, generator=gen) * 0.01
    z = torch.randn(n, k // group, generator=gen) * 0.01
    return RowWeight(u, s, z, bits)


def random_factored_weight(
    n: int, k: int, group: int, bits: int, superblock: int, seed: int = 0
) -> RowWeight:
    """Random codes and random factors (``s = d * sc``, ``z = dm * mi``), with zeros, subnormal
    and negative float16 factors and the extreme int8 ones among them."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)

    def halves() -> torch.Tensor:
        h = (torch.randn(n, k // superblock, generator=gen) * 1e-3).half()
        h.view(-1)[:4] = torch.tensor([0.0, 6e-8, -3e-6, -0.0]).half()  # zero, subnormals
        return h

    def small() -> torch.Tensor:
        i = torch.randint(-128, 128, (n, k // group), generator=gen).to(torch.int8)
        i.view(-1)[:3] = torch.tensor([0, -128, 127], dtype=torch.int8)
        return i

    factors = Factors(halves(), halves(), small(), small(), superblock)
    return RowWeight(u, *factors.scales(), bits, factors)


def random_block_weight(n: int, k: int, bits: int, seed: int = 0) -> RowWeight:
    """Random codes and one random float16 scale per group of 32 (Q4_0, Q5_0, Q8_0's shape:
    ``z = -offset * d``, offset ``2 ** (bits - 1)``), zeros, subnormals and negatives among them."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.randn(n, k // 32, generator=gen) * 1e-3).half()
    d.view(-1)[:5] = torch.tensor([0.0, 6e-8, -3e-6, -0.0, 60000.0]).half()
    block = BlockScales(d, 2 ** (bits - 1))
    return RowWeight(u, *block.scales(), bits, block)


# (bits, group, super-block): Q4_K's, Q6_K's, Q8_0's, Q5_0's and Q4_0 / Q4_1's shapes
FACTORED_KINDS = [(4, 32, 256), (6, 16, 256), (8, 16, 256), (8, 32, 32), (5, 32, 32), (4, 32, 32)]


def probe_rows(m: int) -> list[int]:
    """The rows of an M-row call that are compared with the row alone."""
    return sorted({0, m // 2, m - 1})


def assert_rows_invariant(op, inputs: torch.Tensor, counts=ROW_COUNTS, every_row=False) -> None:
    """``op(inputs[:m])[i]`` equals ``op(inputs[i:i+1])[0]`` bit for bit for the probed rows (or
    for every row)."""
    alone: dict[int, torch.Tensor] = {}
    for m in counts:
        out = op(inputs[:m])
        for i in range(m) if every_row else probe_rows(m):
            if i not in alone:
                alone[i] = op(inputs[i : i + 1])[0]
            assert torch.equal(out[i], alone[i]), f"row {i} of {m} differs from the row alone"


class Attention:
    """Query rows over a shared pool of keys: row n reads ``counts[n]`` pool rows from its start."""

    def __init__(self, rows: int, heads: int = 4, kv_heads: int = 2, dim: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        pool = 96
        self.q = torch.randn(rows, heads, dim, generator=gen)
        self.k = torch.randn(pool, kv_heads, dim, generator=gen)
        self.v = torch.randn(pool, kv_heads, dim, generator=gen)
        self.key_rows = torch.randperm(pool, generator=gen)
        self.counts = torch.randint(1, pool // 2, (rows,), generator=gen)
        self.starts = torch.randint(0, pool // 2, (rows,), generator=gen)

    def run(self, op, rows: slice) -> torch.Tensor:
        """``op`` on the query rows ``rows`` (each keeps its own keys)."""
        return op(
            self.q[rows], self.k, self.v, self.key_rows, self.starts[rows], self.counts[rows], 0.125
        )

    def indices(self) -> torch.Tensor:
        """Row indices, to slice with the same helper as a plain input."""
        return torch.arange(self.q.shape[0])


def attention_op(case: Attention, op):
    """An op of row indices: attention of those query rows."""
    return lambda idx: case.run(op, slice(int(idx[0]), int(idx[-1]) + 1))


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 16), (8, 32)])
def test_qmatmul_rows_invariant(bits, group):
    w = random_weight(32, 64, group, bits)
    x = torch.randn(MAX_ROWS, 64, generator=torch.Generator().manual_seed(1))
    assert_rows_invariant(lambda a: reference.qmatmul(a, w), x)


def test_rmsnorm_rows_invariant():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(MAX_ROWS, 64, generator=gen)
    weight = torch.rand(64, generator=gen) + 0.5
    assert_rows_invariant(lambda a: reference.rmsnorm(a, weight, 1e-6), x, every_row=True)


def test_silu_mul_rows_invariant():
    x = torch.randn(MAX_ROWS, 2 * 40, generator=torch.Generator().manual_seed(3)) * 4
    assert_rows_invariant(reference.silu_mul, x)


def test_attention_rows_invariant():
    case = Attention(MAX_ROWS)
    assert_rows_invariant(attention_op(case, reference.attention), case.indices())
