"""GGUF quantized blocks -> :class:`~common.kernels.packing.RowWeight`, with no fp32 copy.

:func:`decode` turns a tensor's raw blocks (``GGUFReader``'s ``tensor.data``: uint8, one row of
blocks per output feature) into unsigned codes ``u`` and float32 per-group ``s``, ``z`` such that
float32 ``s * u + z`` equals ``gguf.quants.dequantize`` bit for bit:

======  ===================================  ========  ================  =====  ====
type    the file's weight (ggml-common.h)    u         s, z              group  bits
======  ===================================  ========  ================  =====  ====
Q4_0    d * (q - 8),        q 0..15          q         d, -8 d           32     4
Q4_1    d * q + m,          q 0..15          q         d, m              32     4
Q4_K    d sc * q - dmin m,  q 0..15          q         d sc, -dmin m     32     4
Q5_0    d * (q - 16),       q 0..31          q         d, -16 d          32     5
Q6_K    d sc * (q - 32),    q 0..63          q         d sc, -32 d sc    16     8
Q8_0    d * q,              q -128..127      q + 128   d, -128 d         32     8
======  ===================================  ========  ================  =====  ====

The same ``s`` and ``z`` also come factored (:class:`~common.kernels.packing.Factors`, what the
kernel streams): ``s = d * sc``, ``z = dm * mi`` with ``d``, ``dm`` float16 per block (the
super-block S: 256 for the K types, 32 for the others) and ``sc``, ``mi`` int8 per group:

======  ======  ==========  ===========  ======
type    d       sc          dm           mi
======  ======  ==========  ===========  ======
Q4_0    d       1           -8 d         1
Q4_1    d       1           m            1
Q4_K    d       sc (6 bit)  -dmin        m
Q5_0    d       1           -16 d        1
Q6_K    d       sc (int8)   -32 d        sc
Q8_0    d       1           -128 d       1
======  ======  ==========  ===========  ======

Q4_0, Q5_0 and Q8_0 keep ``d`` alone (:class:`~common.kernels.packing.BlockScales`:
``s = d``, ``z = -offset * d`` with offset 8, 16, 128), the rows above show what it stands for.
For Q6_K, ``dm`` is a float16 unless ``-32 d`` overflows it (a ``|d|`` above 2047; no real file):
then the tensor has no factors and the kernel reads its float32 ``s`` and ``z``. The products are exact in float32 (11 significant bits times at most 8)
and equal the float32 ``s`` and ``z`` below to the bit (the tests check every type).

Why exact: ``d`` is fp16 (11 significant bits) and ``sc`` at most 8 bits, so ``s`` is exact in
float32 and so is ``s * u`` (at most 24 bits, Q6_K's worst case); where the file's weight is one
product (Q4_0, Q5_0, Q6_K, Q8_0) the sum ``s * u + z = s * (u - offset)`` is then a representable
number and comes out exact; where it is a product and a sum (Q4_1, Q4_K) ``s * u + z`` is the same
two float32 operations that gguf and ggml do.

Decoding is vectorized numpy over chunks of rows written straight into the outputs: a
151936 x 1536 Q6_K table holds its codes once plus a few MB of temporaries.
:func:`decode_rows` dequantizes only some rows of a table (token embedding lookups).
:func:`read_index` lists a file's tensors and metadata in a tenth of a second
(``gguf.GGUFReader`` takes ~10 s on Qwen's header, most of it on the tokenizer's string arrays).

>>> import gguf
>>> qtype = gguf.GGMLQuantizationType.Q8_0
>>> blocks = np.zeros((16, 34), dtype=np.uint8)
>>> blocks[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
>>> blocks[:, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
>>> w = decode(blocks, qtype, 16, 32)
>>> (w.bits, w.group, int(w.u[0, 0]), float(w.s[0, 0]), float(w.z[0, 0]))
(8, 32, 112, 0.5, -64.0)
>>> bool((w.dequantize().numpy() == gguf.quants.dequantize(blocks, qtype)).all())
True
>>> decode(blocks, gguf.GGMLQuantizationType.IQ2_XS, 16, 32)
Traceback (most recent call last):
...
ValueError: GGUF tensor type IQ2_XS is not supported by the quantized runner (supported: \
Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0); use the `hf` backend for this model
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from common.kernels.packing import BlockScales, Factors, RowWeight

T = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 21  # codes decoded per step: temporaries stay a few MB

# decoder(blocks [r, nb, type_size] uint8, u [r, nb, block], d [r, nb], dm [r, nb],
#         sc [r, nb, groups], mi [r, nb, groups]): fills the codes and the factors of
#         s = d * sc, z = dm * mi (d, dm float32, each exactly a float16 but for overflow; sc, mi
#         small integers, int16)
_Decoder = Callable[..., None]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as float32 ``[r, nb]``."""
    raw = np.ascontiguousarray(blocks[..., at : at + 2])
    return raw.view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    np.bitwise_and(qs, 0x0F, out=low)
    np.right_shift(qs, 4, out=high)


def _q4_0(b, u, d, dm, sc, mi):  # d | qs[16]: element j low nibble of qs[j], 16+j high nibble
    _nibbles(b[..., 2:18], u[..., :16], u[..., 16:])
    d[...] = _f16(b, 0)
    np.multiply(d, np.float32(-8), out=dm)
    sc[...], mi[...] = 1, 1


def _q4_1(b, u, d, dm, sc, mi):  # d | m | qs[16]
    _nibbles(b[..., 4:20], u[..., :16], u[..., 16:])
    d[...], dm[...] = _f16(b, 0), _f16(b, 2)
    sc[...], mi[...] = 1, 1


def _q5_0(b, u, d, dm, sc, mi):  # d | qh (uint32 LE, bit j = 5th bit of element j) | qs[16]
    _nibbles(b[..., 6:22], u[..., :16], u[..., 16:])
    high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little")
    np.left_shift(high, 4, out=high)
    np.bitwise_or(u, high, out=u)
    d[...] = _f16(b, 0)
    np.multiply(d, np.float32(-16), out=dm)
    sc[...], mi[...] = 1, 1


def _q8_0(b, u, d, dm, sc, mi):  # d | qs[32] int8
    np.bitwise_xor(b[..., 2:34], 0x80, out=u)  # int8 q -> q + 128 as uint8
    d[...] = _f16(b, 0)
    np.multiply(d, np.float32(-128), out=dm)
    sc[...], mi[...] = 1, 1


def _q4_k(b, u, d, dm, sc, mi):  # d | dmin | scales[12] (6-bit sc, m x 8) | qs[128]
    r, nb = b.shape[:2]
    d[...] = _f16(b, 0)
    np.negative(_f16(b, 2), out=dm)  # z = (-dmin) * m = -(dmin * m)
    packed = b[..., 4:16].reshape(r, nb, 3, 4)  # as gguf.quants.Q4_K.get_scale_min
    lo, hi, mixed = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc[..., :4], sc[..., 4:] = lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)
    mi[..., :4], mi[..., 4:] = hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)
    # 4 runs of 32 bytes: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1
    qs = b[..., 16:144].reshape(r, nb, 4, 32)
    pairs = u.reshape(r, nb, 4, 2, 32)
    _nibbles(qs, pairs[..., 0, :], pairs[..., 1, :])


def _q6_k(b, u, d, dm, sc, mi):  # ql[128] | qh[64] | scales[16] int8 | d
    r, nb = b.shape[:2]
    d[...] = _f16(b, 208)
    np.multiply(d, np.float32(-32), out=dm)  # z = (-32 d) * sc = -32 (d * sc), both exact
    sc[...] = mi[...] = b[..., 192:208].view(np.int8)
    # element 128 h + 64 n + i: nibble n of ql[64 h + i]; element 128 h + 32 t + j: bits 2t, 2t+1
    # of qh[32 h + j] are its bits 4 and 5
    halves = u.reshape(r, nb, 2, 2, 64)
    _nibbles(b[..., :128].reshape(r, nb, 2, 64), halves[..., 0, :], halves[..., 1, :])
    qh = b[..., 128:192].reshape(r, nb, 2, 32)
    quarters = u.reshape(r, nb, 2, 4, 32)
    bits = np.empty_like(qh)
    for t in range(4):
        np.right_shift(qh, 2 * t, out=bits)
        np.bitwise_and(bits, 0x03, out=bits)
        np.left_shift(bits, 4, out=bits)
        np.bitwise_or(quarters[..., t, :], bits, out=quarters[..., t, :])


# type -> (decoder, group, bits); block sizes come from gguf.GGML_QUANT_SIZES
_FORMATS: dict[gguf.GGMLQuantizationType, tuple[_Decoder, int, int]] = {
    T.Q4_0: (_q4_0, 32, 4),
    T.Q4_1: (_q4_1, 32, 4),
    T.Q4_K: (_q4_k, 32, 4),
    T.Q5_0: (_q5_0, 32, 5),
    T.Q6_K: (_q6_k, 16, 6),
    T.Q8_0: (_q8_0, 32, 8),
}
SUPPORTED: frozenset[gguf.GGMLQuantizationType] = frozenset(_FORMATS)
# the types whose weight is d * (q - offset), one d per group: their scales are BlockScales
_OFFSETS: dict[gguf.GGMLQuantizationType, int] = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 128}
# decode_rows also reads plain floating-point tables
_ROW_TYPES = SUPPORTED | {T.F32, T.F16, T.BF16}


def _unsupported(qtype, name: str | None) -> ValueError:
    where = f"{name}: " if name else ""
    kind = getattr(qtype, "name", str(qtype))
    names = ", ".join(sorted(t.name for t in SUPPORTED))
    return ValueError(
        f"{where}GGUF tensor type {kind} is not supported by the quantized runner "
        f"(supported: {names}); use the `hf` backend for this model"
    )


def row_bytes(qtype: gguf.GGMLQuantizationType, k: int) -> int:
    """Bytes of one row of ``k`` weights of type ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if k % block:
        raise ValueError(f"{k} weights per row is not a whole number of {qtype.name} blocks")
    return k // block * size


def decode(
    data: np.ndarray, qtype: gguf.GGMLQuantizationType, n: int, k: int, *, name: str | None = None
) -> RowWeight:
    """The ``[n, k]`` weight in ``data`` (raw blocks, row-major) as a :class:`RowWeight`.

    ``name`` (the tensor's) only makes error messages clearer.
    """
    if qtype not in _FORMATS:
        raise _unsupported(qtype, name)
    decoder, group, bits = _FORMATS[qtype]
    n, k = int(n), int(k)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    per_row = row_bytes(qtype, k)
    if data.dtype != np.uint8 or data.size != n * per_row:
        raise ValueError(
            f"{name or 'tensor'}: {data.size} {data.dtype} values are not {n} rows of {k} "
            f"{qtype.name} weights ({n * per_row} bytes)"
        )
    nb = k // block
    blocks = data.reshape(n, nb, size)
    u = np.empty((n, k), dtype=np.uint8)
    d = np.empty((n, nb), dtype=np.float32)
    dm = np.empty_like(d)
    sc = np.empty((n, k // group), dtype=np.int8)
    mi = np.empty_like(sc)
    s = np.empty((n, k // group), dtype=np.float32)
    z = np.empty_like(s)
    step = max(1, CHUNK_ELEMENTS // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = (r1 - r0, nb, -1)
        sc_r, mi_r = sc[r0:r1].reshape(rows), mi[r0:r1].reshape(rows)
        decoder(blocks[r0:r1], u[r0:r1].reshape(rows), d[r0:r1], dm[r0:r1], sc_r, mi_r)
        np.multiply(d[r0:r1, :, None], sc_r, out=s[r0:r1].reshape(rows))
        np.multiply(dm[r0:r1, :, None], mi_r, out=z[r0:r1].reshape(rows))
    offset = _OFFSETS.get(qtype)
    if offset is not None:  # one scale per group: d alone (block scales), never overflowing
        factors = BlockScales(torch.from_numpy(d.astype(np.float16)), offset)
    else:
        factors = _factors(d, dm, sc, mi, block)
    return RowWeight(torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(z), bits, factors)


def _factors(d, dm, sc, mi, superblock: int) -> Factors | None:
    """The factors with ``d``, ``dm`` as float16, or None where one of them is not a float16
    (``-32 d`` and the like overflow it for ``|d|`` near 65504; never in a sane file)."""
    with np.errstate(over="ignore", invalid="ignore"):
        d16, dm16 = d.astype(np.float16), dm.astype(np.float16)
        exact = np.array_equal(d16.astype(np.float32), d) and np.array_equal(
            dm16.astype(np.float32), dm
        )
    if not exact:  # an infinity or a NaN fails too
        return None
    tensors = (torch.from_numpy(a) for a in (d16, dm16, sc, mi))
    return Factors(*tensors, superblock=superblock)


def decode_rows(
    data: np.ndarray,
    qtype: gguf.GGMLQuantizationType,
    k: int,
    rows: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Rows ``rows`` of the table in ``data`` (``[N, k]`` weights), dequantized: float32
    ``[len(rows), k]``, equal to the same rows of ``gguf.quants.dequantize``. The rest of the
    table is not touched. Also reads F32, F16 and BF16 tables."""
    if qtype not in _ROW_TYPES:
        raise _unsupported(qtype, name)
    k = int(k)
    index = np.asarray(rows, dtype=np.int64).reshape(-1)
    if data.dtype == np.uint8:
        table = data.reshape(-1, row_bytes(qtype, k))
    else:  # GGUFReader gives F32 / F16 tables as float arrays
        table = data.reshape(-1, k)
    if index.size and (index.min() < -table.shape[0] or index.max() >= table.shape[0]):
        raise IndexError(f"row index out of range for a table of {table.shape[0]} rows")
    if not index.size:
        return torch.zeros(0, k)
    picked = gguf.quants.dequantize(np.ascontiguousarray(table[index]), qtype)
    out = np.ascontiguousarray(picked, dtype=np.float32).reshape(index.size, k)
    return torch.from_numpy(out)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``shape`` in GGUF order (``(k, n)`` for a matrix)."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's tensors and metadata, read from its header only.

    ``metadata`` holds scalars and strings as Python values and numeric arrays as numpy arrays;
    arrays of strings (the tokenizer's vocabulary and merges) are skipped, not kept.
    """

    path: Path
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]

    def data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes (uint8, memory-mapped, read-only)."""
        info = self.tensors[name]
        return np.memmap(self.path, np.uint8, "r", offset=info.offset, shape=(info.n_bytes,))


_V = gguf.GGUFValueType
_SCALARS = {
    _V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I",
    _V.INT32: "<i", _V.FLOAT32: "<f", _V.BOOL: "<?", _V.UINT64: "<Q", _V.INT64: "<q",
    _V.FLOAT64: "<d",
}  # fmt: skip


def read_index(path: str | Path) -> GGUFIndex:
    """The tensors and metadata of the GGUF (v2 or v3) at ``path``, without reading tensor data."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = f.read(1 << 20)
        at = 0

        def need(size: int) -> None:
            nonlocal buf
            while at + size > len(buf):
                more = f.read(max(size, 1 << 20))
                if not more:
                    raise ValueError(f"{path}: truncated GGUF header")
                buf += more

        def unpack(fmt: str):
            nonlocal at
            size = struct.calcsize(fmt)
            need(size)
            value = struct.unpack_from(fmt, buf, at)[0]
            at += size
            return value

        def string() -> str:
            nonlocal at
            size = unpack("<Q")
            need(size)
            at += size
            return bytes(buf[at - size : at]).decode("utf-8", errors="replace")

        def value(vtype: int):
            nonlocal at
            if vtype == _V.STRING:
                return string()
            if vtype != _V.ARRAY:
                return unpack(_SCALARS[_V(vtype)])
            itype, count = unpack("<I"), unpack("<Q")
            if itype == _V.STRING:
                for _ in range(count):
                    need(8)
                    at += 8 + struct.unpack_from("<Q", buf, at)[0]
                return None
            if itype == _V.ARRAY:
                return [value(_V.ARRAY) for _ in range(count)]
            fmt = _SCALARS[_V(itype)]
            size = struct.calcsize(fmt) * count
            need(size)
            at += size
            return np.frombuffer(buf, np.dtype(fmt), count, at - size).copy()

        if unpack("<I") != gguf.GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        if (version := unpack("<I")) not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            item = value(unpack("<I"))
            if item is not None:
                metadata[key] = item
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(unpack("<Q") for _ in range(unpack("<I")))
            infos.append((name, gguf.GGMLQuantizationType(unpack("<I")), shape, unpack("<Q")))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = -(-at // alignment) * alignment
    tensors = {}
    for name, qtype, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        count = int(np.prod(shape, dtype=np.int64))
        tensors[name] = TensorInfo(name, qtype, shape, start + offset, count // block * size)
    return GGUFIndex(path, metadata, tensors)
