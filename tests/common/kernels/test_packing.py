"""The weight layouts (common/kernels/packing.py): tiling round-trips, with float32 or factored
scales; factors rebuild s and z exactly; concatenation keeps factors only where all have them."""

from __future__ import annotations

import pytest
import torch

from common.kernels.packing import BlockScales, Factors, RowWeight, concat, first_rows, tile, untile
from tests.common.kernels.test_reference import (
    FACTORED_KINDS,
    random_block_weight,
    random_factored_weight,
    random_weight,
)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to the bit (the sign of zero included)."""
    assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("bits", "group", "superblock"), FACTORED_KINDS)
def test_factored_round_trip(bits, group, superblock):
    w = random_factored_weight(48, 512, group, bits, superblock, seed=1)
    t = tile(w)
    assert t.s is None and t.z is None
    assert tuple(t.factors.d.shape) == (3, 512 // superblock, 16)
    assert tuple(t.factors.sc.shape) == (3, 512 // group, 16)
    back = untile(t)
    assert torch.equal(back.u, w.u)
    assert_same_bits(back.s, w.s)
    assert_same_bits(back.z, w.z)
    for name in ("d", "dm", "sc", "mi"):
        assert torch.equal(getattr(back.factors, name), getattr(w.factors, name))
    plain = tile(RowWeight(w.u, w.s, w.z, bits))  # the float32 layout of the same numbers
    assert t.nbytes() < plain.nbytes()


def test_bytes_per_weight():
    """Q4_K's shape: 4.625 bits per weight factored, 6 as float32; Q6_K's: 7.125 and 10 (6-bit
    codes), 9.125 and 12 with 8-bit codes; Q8_0's 9.5 and 10; Q5_0's 6.5 and 7."""
    kinds = {(4, 32, 256): (4.625, 6), (6, 16, 256): (7.125, 10), (8, 16, 256): (9.125, 12)}
    kinds[8, 32, 32] = (9.5, 10)
    kinds[5, 32, 32] = (6.5, 7)
    for (bits, group, superblock), (factored, plain) in kinds.items():
        w = random_factored_weight(32, 1024, group, bits, superblock)
        assert tile(w).nbytes() * 8 / w.u.numel() == factored
        assert tile(RowWeight(w.u, w.s, w.z, bits)).nbytes() * 8 / w.u.numel() == plain


def test_float32_round_trip():
    w = random_weight(32, 64, 16, 8, seed=2)
    t = tile(w)
    assert t.factors is None
    back = untile(t)
    assert back.factors is None and torch.equal(back.s, w.s) and torch.equal(back.z, w.z)


def test_concat_keeps_factors_where_all_have_them():
    a = random_factored_weight(16, 256, 32, 4, 256, seed=3)
    b = random_factored_weight(32, 256, 32, 4, 256, seed=4)
    both = concat([a, b])
    assert both.factors is not None and both.factors.d.shape == (48, 1)
    s, z = both.factors.scales()
    assert_same_bits(s, both.s)
    assert_same_bits(z, both.z)
    plain = RowWeight(a.u, a.s, a.z, 4)
    assert concat([plain, b]).factors is None
    c = random_factored_weight(16, 256, 32, 4, 32, seed=5)  # another super-block
    mixed = concat([a, c])
    assert mixed.factors is None and torch.equal(mixed.s, torch.cat([a.s, c.s]))


def test_factors_are_checked():
    w = random_factored_weight(16, 256, 32, 4, 256)
    f = w.factors
    with pytest.raises(TypeError, match="float16"):
        Factors(f.d.float(), f.dm, f.sc, f.mi, 256)
    with pytest.raises(TypeError, match="int8"):
        Factors(f.d, f.dm, f.sc.to(torch.uint8), f.mi, 256)
    with pytest.raises(ValueError, match="do not fit"):
        RowWeight(w.u, w.s, w.z, 4, Factors(f.d, f.dm, f.sc, f.mi, 128))


def test_five_bit_codes_need_groups_of_32():
    """The kernel reads a group's fifth bits in one load of 32 k."""
    u = torch.zeros(16, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="groups of 32"):
        RowWeight(u, torch.ones(16, 4), torch.zeros(16, 4), bits=5)
    assert RowWeight(u, torch.ones(16, 2), torch.zeros(16, 2), bits=5).group == 32


@pytest.mark.parametrize(("bits", "per_weight"), [(4, 4.5), (5, 5.5), (8, 8.5)])
def test_block_scales_round_trip(bits, per_weight):
    """Q4_0, Q5_0 and Q8_0 stream d alone: the file's bits per weight."""
    w = random_block_weight(48, 512, bits, seed=5)
    t = tile(w)
    assert isinstance(t.factors, BlockScales) and tuple(t.factors.d.shape) == (3, 16, 16)
    assert t.nbytes() * 8 / w.u.numel() == per_weight
    back = untile(t)
    assert torch.equal(back.u, w.u) and back.factors.offset == w.factors.offset
    assert_same_bits(back.s, w.s)
    assert_same_bits(back.z, w.z)


def test_concat_keeps_block_scales_of_one_offset():
    a, b = random_block_weight(16, 256, 5, seed=1), random_block_weight(32, 256, 5, seed=2)
    both = concat([a, b])
    assert isinstance(both.factors, BlockScales) and both.factors.d.shape == (48, 8)
    assert_same_bits(both.z, torch.cat([a.z, b.z]))
    eight = random_block_weight(16, 256, 8, seed=3)
    mixed = RowWeight(eight.u & 0x1F, eight.s, eight.z, 5, eight.factors)  # offset 128
    assert concat([a, mixed]).factors is None


@pytest.mark.parametrize("kind", ["float32", "factored", "block"])
def test_first_rows_keep_every_row_as_it_was(kind):
    w = {
        "float32": lambda: random_weight(48, 64, 16, 8, seed=4),
        "factored": lambda: random_factored_weight(48, 512, 32, 4, 256, seed=4),
        "block": lambda: random_block_weight(48, 512, 5, seed=4),
    }[kind]()
    head = first_rows(w, 32)
    assert torch.equal(head.u, w.u[:32]) and type(head.factors) is type(w.factors)
    assert_same_bits(head.s, w.s[:32])
    assert_same_bits(head.z, w.z[:32])
    assert torch.equal(tile(head).codes, tile(w).codes[:2])
    with pytest.raises(ValueError, match="rows"):
        first_rows(w, 49)
