"""The one weight format of the quantized runner: unsigned codes, a scale and an offset per group.

Every GGUF block format the runner serves decodes to the same shape of number,

    w[n, k] = s[n, g] * u[n, k] + z[n, g]        g = k // group,  u an unsigned integer code,

with ``u`` in 0..15 (Q4_0, Q4_1, Q4_K: 4-bit codes), 0..31 (Q5_0: 5-bit codes), 0..63 (Q6_K:
6-bit codes) or 0..255 (Q8_0: 8-bit codes) and ``s``, ``z`` float32 per group of 32 (16 for
Q6_K). ``common.kernels.gguf_blocks`` makes the three
arrays from a file's blocks, reproducing every weight exactly; this module lays them out.

Two layouts hold the same numbers:

* :class:`RowWeight`: ``u`` ``[N, K]`` uint8, ``s`` and ``z`` ``[N, K/group]``; what the torch
  reference (``common.kernels.reference``) reads.
* :class:`TiledWeight`: what the C++ kernel reads. Output columns go in tiles of 16 (one AVX-512
  lane each); within a tile, codes are interleaved so that one 64-byte load gives every lane 4
  consecutive k of its column (VNNI's ``vpdpbusd`` multiplies 4 u8 x s8 pairs per 32-bit lane):

  - 8-bit: ``codes[t, q, j, b] = u[16 t + j, 4 q + b]``: shape ``[N/16, K/4, 16, 4]``;
  - 4-bit: ``codes[t, o, j, b] = u[16 t + j, 8 o + b] | u[16 t + j, 8 o + 4 + b] << 4``: shape
    ``[N/16, K/8, 16, 4]`` (a load's low nibbles are k 8o..8o+3, its high nibbles 8o+4..8o+7);
  - 6-bit: 3 loads per 16 k (h = k // 16): two of low 4 bits, laid out as 4-bit codes, then one
    of high 2 bits, ``codes[t, 3 h + 2, j, b] = sum over i of (u[16 t + j, 16 h + 4 i + b] >> 4)
    << 2 i``: shape ``[N/16, 3 K/16, 16, 4]``, 6 bits per code;
  - 5-bit (groups of 32): 5 loads per 32 k (h = k // 32): four of low 4 bits, laid out as 4-bit
    codes, then one of the fifth bits, ``codes[t, 5 h + 4, j, b] = sum over p of
    (u[16 t + j, 32 h + 4 p + b] >> 4) << p``: shape ``[N/16, 5 K/32, 16, 4]``, 5 bits per code
    (the kernel moves bit ``p`` of that load to bit 4 of the ``p``-th group of 4 k);
  - ``s`` and ``z``: ``[N/16, K/group, 16]``.

Factored scales (:class:`Factors`): GGUF files store ``s`` and ``z`` as products of a float16
per super-block of S weights along K and a small integer per group, and so can a weight here:

    s[n, g] = d[n, g G / S] * sc[n, g]        z[n, g] = dm[n, g G / S] * mi[n, g]

with ``d``, ``dm`` float16 and ``sc``, ``mi`` int8, the products taken in float32. They are exact
(11 significant bits times at most 8), so the factors give the float32 ``s`` and ``z`` to the bit.
A :class:`RowWeight` always holds ``s`` and ``z``; where it also holds ``factors``, its
:class:`TiledWeight` keeps only the factors (``d``, ``dm`` as ``[N/16, K/S, 16]``, ``sc``, ``mi``
as ``[N/16, K/group, 16]``) and the kernel rebuilds ``s`` and ``z``: a Q4_K weight then streams
4.625 bits per weight instead of 6, a Q6_K weight (6-bit codes) 7.125 instead of 10.

Block scales (:class:`BlockScales`): where the file keeps one float16 scale per group and the
codes are offset by a constant (Q4_0, Q5_0, Q8_0: ``w = d * (q - offset)``), ``s = d`` and
``z = -offset * d`` (float32, exact), and the kernel reads ``d`` alone (``[N/16, K/group, 16]``):
a Q5_0 weight streams 5.5 bits per weight, a Q8_0 weight 8.5, as in the file.

>>> u = torch.arange(32 * 32, dtype=torch.int64).remainder(16).to(torch.uint8).view(32, 32)
>>> s = torch.ones(32, 1); z = torch.zeros(32, 1)
>>> row = RowWeight(u, s, z, bits=4)
>>> row.n, row.k, row.group
(32, 32, 32)
>>> tiled = tile(row)
>>> tuple(tiled.codes.shape), tuple(tiled.s.shape)
((2, 4, 16, 4), (2, 1, 16))
>>> int(tiled.codes[0, 0, 1, 0]) == int(u[1, 0]) | int(u[1, 4]) << 4
True
>>> torch.equal(untile(tiled).u, u)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LANES = 16  # output columns per tile: one AVX-512 register of int32 / float32


@dataclass(frozen=True)
class Factors:
    """``s`` and ``z`` factored (module docstring): ``d``, ``dm`` float16 ``[N, K/S]``, ``sc``,
    ``mi`` int8 ``[N, K/group]`` (in a :class:`TiledWeight`: ``[N/16, K/S, 16]`` and
    ``[N/16, K/group, 16]``), ``superblock`` S a multiple of the group.

    >>> f = Factors(torch.tensor([[0.5]]).half(), torch.tensor([[-4.0]]).half(),
    ...             torch.tensor([[3, -2]], dtype=torch.int8), torch.tensor([[1, 1]], dtype=torch.int8),
    ...             superblock=64)
    >>> [t.tolist() for t in f.scales()]
    [[[1.5, -1.0]], [[-4.0, -4.0]]]
    """

    d: torch.Tensor
    dm: torch.Tensor
    sc: torch.Tensor
    mi: torch.Tensor
    superblock: int

    def __post_init__(self):
        if self.d.dtype != torch.float16 or self.dm.dtype != torch.float16:
            raise TypeError("d and dm must be float16")
        if self.sc.dtype != torch.int8 or self.mi.dtype != torch.int8:
            raise TypeError("sc and mi must be int8")
        if self.d.shape != self.dm.shape or self.sc.shape != self.mi.shape:
            raise ValueError("d and dm, sc and mi must have one shape")
        blocks, groups = self.d.shape[1], self.sc.shape[1]  # rows [N, *] or tiled [N/16, *, 16]
        other = self.d.shape[:1] + self.d.shape[2:] != self.sc.shape[:1] + self.sc.shape[2:]
        if other or not blocks or groups % blocks:
            raise ValueError(f"factors {tuple(self.d.shape)}, {tuple(self.sc.shape)} do not fit")

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, z)`` float32 ``[N, K/group]`` (row layout): the products, exact."""
        per = self.sc.shape[1] // self.d.shape[1]  # groups per super-block
        d = self.d.float().repeat_interleave(per, dim=1)
        dm = self.dm.float().repeat_interleave(per, dim=1)
        return d * self.sc.float(), dm * self.mi.float()


@dataclass(frozen=True)
class BlockScales:
    """One float16 scale ``d`` per group (``[N, K/group]``; tiled ``[N/16, K/group, 16]``) and a
    code offset: ``s = d``, ``z = -offset * d``, both float32 and exact.

    >>> b = BlockScales(torch.tensor([[0.5, -2.0]]).half(), offset=16)
    >>> [t.tolist() for t in b.scales()]
    [[[0.5, -2.0]], [[-8.0, 32.0]]]
    """

    d: torch.Tensor
    offset: int

    def __post_init__(self):
        if self.d.dtype != torch.float16:
            raise TypeError("d must be float16")
        if not 0 <= self.offset < 256:
            raise ValueError(f"offset {self.offset} is not in 0..255")

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, z)`` float32 ``[N, K/group]`` (row layout)."""
        s = self.d.float()
        return s, s * float(-self.offset)


@dataclass(frozen=True)
class RowWeight:
    """``w = s * u + z`` per group, row-major: ``u [N, K]`` uint8, ``s``/``z`` ``[N, K/group]``;
    optionally the same ``s`` and ``z`` as :class:`Factors` or :class:`BlockScales`
    (``factors.scales() == (s, z)``)."""

    u: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    bits: int  # 4: every code < 16 (two per byte tiled); 5: < 32 (8 in 5 bytes); 6: < 64; 8: < 256
    factors: Factors | BlockScales | None = None

    def __post_init__(self):
        n, k = self.u.shape
        if self.u.dtype != torch.uint8 or self.s.dtype != torch.float32:
            raise TypeError("codes must be uint8 and scales float32")
        if self.s.shape != self.z.shape or self.s.shape[0] != n or k % self.s.shape[1]:
            raise ValueError(f"scales {tuple(self.s.shape)} do not fit codes {(n, k)}")
        if self.bits not in (4, 5, 6, 8):
            raise ValueError(f"bits must be 4, 5, 6 or 8, not {self.bits}")
        if self.bits == 5 and k // self.s.shape[1] != 32:
            raise ValueError("5-bit codes come in groups of 32")
        f = self.factors
        if isinstance(f, BlockScales):
            if f.d.shape != self.s.shape:
                raise ValueError(f"block scales {tuple(f.d.shape)} do not fit {(n, k)}")
        elif f is not None and (f.sc.shape != self.s.shape or f.superblock * f.d.shape[1] != k):
            raise ValueError(f"factors of super-block {f.superblock} do not fit {(n, k)}")

    @property
    def n(self) -> int:
        return self.u.shape[0]

    @property
    def k(self) -> int:
        return self.u.shape[1]

    @property
    def group(self) -> int:
        return self.k // self.s.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The weights as float32 ``[N, K]`` (for tests and small tensors only)."""
        g = self.group
        s = self.s.repeat_interleave(g, dim=1)
        z = self.z.repeat_interleave(g, dim=1)
        return s * self.u.float() + z


@dataclass(frozen=True)
class TiledWeight:
    """The kernel's layout of a :class:`RowWeight` (see the module docstring)."""

    codes: torch.Tensor
    s: torch.Tensor | None  # None when factored
    z: torch.Tensor | None
    n: int
    k: int
    group: int
    bits: int
    # tiled: d, dm [N/16, K/S, 16], sc, mi [N/16, K/group, 16]; block scales' d [N/16, K/group, 16]
    factors: Factors | BlockScales | None = None

    def nbytes(self) -> int:
        f = self.factors
        if f is None:
            parts = (self.codes, self.s, self.z)
        elif isinstance(f, BlockScales):
            parts = (self.codes, f.d)
        else:
            parts = (self.codes, f.d, f.dm, f.sc, f.mi)
        return sum(t.numel() * t.element_size() for t in parts)


def check_shape(n: int, k: int, group: int) -> None:
    """What the kernel needs: whole tiles of output columns and whole groups of 16 or 32.

    >>> check_shape(48, 64, 32)
    >>> check_shape(40, 64, 32)
    Traceback (most recent call last):
    ...
    ValueError: 40 output features: the quantized runner needs a multiple of 16
    """
    if n % LANES:
        raise ValueError(f"{n} output features: the quantized runner needs a multiple of {LANES}")
    if group not in (16, 32) or k % group:
        raise ValueError(f"{k} input features in groups of {group}: need groups of 16 or 32")


def tile(row: RowWeight) -> TiledWeight:
    """Lay ``row`` out for the kernel (new tensors; ``row`` is not kept)."""
    n, k, group = row.n, row.k, row.group
    check_shape(n, k, group)
    u = row.u.view(n // LANES, LANES, k)
    if row.bits == 8:
        codes = u.view(n // LANES, LANES, k // 4, 4).permute(0, 2, 1, 3)
    elif row.bits == 4:
        codes = _nibble_loads(u)
    elif row.bits == 5:
        low = _nibble_loads(u & 0x0F).reshape(n // LANES, k // 32, 4, LANES, 4)
        fifth = (u >> 4).view(n // LANES, LANES, k // 32, 8, 4)  # [t, j, h, p, b]
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8, 1)
        high = (fifth << shifts).sum(dim=3, dtype=torch.uint8)  # distinct bits: sum = or
        codes = torch.cat((low, high.permute(0, 2, 1, 3)[:, :, None]), dim=2)
        codes = codes.view(n // LANES, 5 * k // 32, LANES, 4)
    else:
        low = _nibble_loads(u & 0x0F).view(n // LANES, k // 16, 2, LANES, 4)
        quads = (u >> 4).view(n // LANES, LANES, k // 16, 4, 4)  # [t, j, h, i, b]
        high = (
            quads[..., 0, :] | quads[..., 1, :] << 2 | quads[..., 2, :] << 4 | quads[..., 3, :] << 6
        )
        codes = torch.cat((low, high.permute(0, 2, 1, 3)[:, :, None]), dim=2)
        codes = codes.view(n // LANES, 3 * k // 16, LANES, 4)

    def lanes(a: torch.Tensor) -> torch.Tensor:
        return a.view(n // LANES, LANES, a.shape[1]).permute(0, 2, 1).contiguous()

    codes = codes.contiguous()
    f = row.factors
    if f is None:
        return TiledWeight(codes, lanes(row.s), lanes(row.z), n, k, group, row.bits)
    if isinstance(f, BlockScales):
        return TiledWeight(
            codes, None, None, n, k, group, row.bits, BlockScales(lanes(f.d), f.offset)
        )
    tiled = Factors(lanes(f.d), lanes(f.dm), lanes(f.sc), lanes(f.mi), f.superblock)
    return TiledWeight(codes, None, None, n, k, group, row.bits, tiled)


def _nibble_loads(u: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``u [N/16, 16, K]`` in the 4-bit layout ``[N/16, K/8, 16, 4]`` (not contiguous)."""
    tiles, _, k = u.shape
    octets = u.view(tiles, LANES, k // 8, 2, 4)  # [t, j, o, half, b]
    packed = octets[..., 0, :] | (octets[..., 1, :] << 4)
    return packed.permute(0, 2, 1, 3)


def _nibble_codes(c: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_nibble_loads`: ``[N/16, K/8, 16, 4]`` -> ``[N, K]``."""
    tiles, octets = c.shape[:2]
    c = c.permute(0, 2, 1, 3)  # [t, j, o, b]
    return torch.stack((c & 0xF, c >> 4), dim=3).reshape(tiles * LANES, octets * 8)


def untile(t: TiledWeight) -> RowWeight:
    """The inverse of :func:`tile`."""
    tiles = t.n // LANES
    if t.bits == 8:
        u = t.codes.permute(0, 2, 1, 3).reshape(t.n, t.k)
    elif t.bits == 4:
        u = _nibble_codes(t.codes)
    elif t.bits == 5:
        c = t.codes.view(tiles, t.k // 32, 5, LANES, 4)
        low = _nibble_codes(c[:, :, :4].reshape(tiles, t.k // 8, LANES, 4))
        hi = c[:, :, 4].permute(0, 2, 1, 3)  # [t, j, h, b]
        fifth = torch.stack([(hi >> p) & 1 for p in range(8)], dim=3)  # [t, j, h, p, b]
        u = low | (fifth.reshape(t.n, t.k) << 4)
    else:
        c = t.codes.view(tiles, t.k // 16, 3, LANES, 4)
        low = _nibble_codes(c[:, :, :2].reshape(tiles, t.k // 8, LANES, 4))
        hi = c[:, :, 2].permute(0, 2, 1, 3)  # [t, j, h, b]
        quads = torch.stack([(hi >> (2 * i)) & 3 for i in range(4)], dim=3)  # [t, j, h, i, b]
        u = low | (quads.reshape(t.n, t.k) << 4)

    def rows(a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 2, 1).reshape(tiles * LANES, a.shape[1]).contiguous()

    f = t.factors
    if f is None:
        return RowWeight(u.contiguous(), rows(t.s), rows(t.z), t.bits)
    if isinstance(f, BlockScales):
        block = BlockScales(rows(f.d), f.offset)
        return RowWeight(u.contiguous(), *block.scales(), t.bits, block)
    factors = Factors(rows(f.d), rows(f.dm), rows(f.sc), rows(f.mi), f.superblock)
    return RowWeight(u.contiguous(), *factors.scales(), t.bits, factors)


def first_rows(w: RowWeight, n: int) -> RowWeight:
    """Output features ``0 .. n - 1`` of ``w`` (new tensors): each computed as in ``w``.

    >>> w = RowWeight(torch.arange(64, dtype=torch.uint8).view(32, 2), torch.ones(32, 1),
    ...               torch.zeros(32, 1), bits=8)
    >>> first_rows(w, 16).u.shape, int(first_rows(w, 16).u[15, 1])
    (torch.Size([16, 2]), 31)
    """
    if not 0 < n <= w.n:
        raise ValueError(f"{n} rows of a {w.n}-row weight")

    def head(t: torch.Tensor) -> torch.Tensor:
        return t[:n].contiguous()

    f = w.factors
    if isinstance(f, BlockScales):
        f = BlockScales(head(f.d), f.offset)
    elif f is not None:
        f = Factors(head(f.d), head(f.dm), head(f.sc), head(f.mi), f.superblock)
    return RowWeight(head(w.u), head(w.s), head(w.z), w.bits, f)


def concat(weights: list[RowWeight]) -> RowWeight:
    """Stack weights along the output features (q, k and v; gate and up): one call instead of
    several, with every column computed as it would be alone."""
    first = weights[0]
    if any((w.k, w.group, w.bits) != (first.k, first.group, first.bits) for w in weights):
        raise ValueError("only weights of one input size, group and code width concatenate")
    factors = None  # kept where every weight has them, of one kind (one super-block, one offset)
    fs = [w.factors for w in weights]
    if all(isinstance(f, BlockScales) for f in fs) and len({f.offset for f in fs}) == 1:
        factors = BlockScales(torch.cat([f.d for f in fs]), fs[0].offset)
    elif all(isinstance(f, Factors) for f in fs) and len({f.superblock for f in fs}) == 1:
        factors = Factors(
            *(torch.cat([getattr(f, a) for f in fs]) for a in ("d", "dm", "sc", "mi")),
            fs[0].superblock,
        )
    return RowWeight(
        torch.cat([w.u for w in weights]),
        torch.cat([w.s for w in weights]),
        torch.cat([w.z for w in weights]),
        first.bits,
        factors,
    )
