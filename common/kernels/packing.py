"""The one weight format of the quantized runner: unsigned codes, a scale and an offset per group.

Every GGUF block format the runner serves decodes to the same shape of number,

    w[n, k] = s[n, g] * u[n, k] + z[n, g]        g = k // group,  u an unsigned integer code,

with ``u`` in 0..15 (Q4_0, Q4_1, Q4_K: 4-bit codes) or 0..255 (Q5_0, Q6_K, Q8_0: 8-bit codes) and
``s``, ``z`` float32 per group of 32 (16 for Q6_K). ``common.kernels.gguf_blocks`` makes the three
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
  - ``s`` and ``z``: ``[N/16, K/group, 16]``.

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
class RowWeight:
    """``w = s * u + z`` per group, row-major: ``u [N, K]`` uint8, ``s``/``z`` ``[N, K/group]``."""

    u: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    bits: int  # 4: every code < 16 (stored two per byte when tiled); 8: codes < 256

    def __post_init__(self):
        n, k = self.u.shape
        if self.u.dtype != torch.uint8 or self.s.dtype != torch.float32:
            raise TypeError("codes must be uint8 and scales float32")
        if self.s.shape != self.z.shape or self.s.shape[0] != n or k % self.s.shape[1]:
            raise ValueError(f"scales {tuple(self.s.shape)} do not fit codes {(n, k)}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")

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
    s: torch.Tensor
    z: torch.Tensor
    n: int
    k: int
    group: int
    bits: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.s, self.z))


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
    else:
        octets = u.view(n // LANES, LANES, k // 8, 2, 4)  # [t, j, o, half, b]
        packed = octets[..., 0, :] | (octets[..., 1, :] << 4)
        codes = packed.permute(0, 2, 1, 3)
    groups = k // group

    def lanes(a: torch.Tensor) -> torch.Tensor:
        return a.view(n // LANES, LANES, groups).permute(0, 2, 1).contiguous()

    return TiledWeight(codes.contiguous(), lanes(row.s), lanes(row.z), n, k, group, row.bits)


def untile(t: TiledWeight) -> RowWeight:
    """The inverse of :func:`tile`."""
    tiles = t.n // LANES
    if t.bits == 8:
        u = t.codes.permute(0, 2, 1, 3).reshape(t.n, t.k)
    else:
        c = t.codes.permute(0, 2, 1, 3)  # [t, j, o, b]
        u = torch.stack((c & 0xF, c >> 4), dim=3).reshape(t.n, t.k)
    groups = t.k // t.group

    def rows(a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 2, 1).reshape(tiles * LANES, groups).contiguous()

    return RowWeight(u.contiguous(), rows(t.s), rows(t.z), t.bits)


def concat(weights: list[RowWeight]) -> RowWeight:
    """Stack weights along the output features (q, k and v; gate and up): one call instead of
    several, with every column computed as it would be alone."""
    first = weights[0]
    if any((w.k, w.group, w.bits) != (first.k, first.group, first.bits) for w in weights):
        raise ValueError("only weights of one input size, group and code width concatenate")
    return RowWeight(
        torch.cat([w.u for w in weights]),
        torch.cat([w.s for w in weights]),
        torch.cat([w.z for w in weights]),
        first.bits,
    )
