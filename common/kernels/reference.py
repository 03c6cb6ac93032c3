"""The quantized runner's operations in plain torch: their definition, and the fallback where the
C++ kernels (``common.kernels.native``) cannot be built or the CPU lacks their instructions.

Each operation computes every row in one fixed order that depends on nothing but that row (and,
for attention, the keys and values it reads): not on how many rows share the call, their values,
or the thread count. ``qmatmul`` and ``rmsnorm`` define the native kernels' arithmetic to the bit
(``tests/common/kernels`` compares them); ``silu_mul`` and ``attention`` use an exponential the
native code does not share, so there the two agree closely, and each is invariant on its own.

The matrix product, for ``x [M, K]`` float32 and a :class:`~common.kernels.packing.RowWeight`
``w = s * u + z`` in groups of G along K (llama.cpp's ``vec_dot`` for Q4_K x Q8_K has the same
shape, with one activation scale per 256):

1. each row is quantized per group to int8: ``d = amax / 127``, ``xq = round(x * (127 / amax))``
   (half to even; 0 where amax is 0), and ``xs = sum(xq)`` over the group;
2. per group, the integer dot product ``i = sum(xq * u)`` is exact (any order gives it);
3. ``acc = 0``; for g = 0, 1, ...: ``acc = acc + d * (i * s + z * xs)``, each product and sum
   rounded to float32 as written (no fused multiply-add).

>>> from common.kernels.packing import RowWeight
>>> u = torch.tensor([[0, 1, 2, 3], [3, 3, 3, 3]], dtype=torch.uint8)
>>> w = RowWeight(u, s=torch.tensor([[0.5], [1.0]]), z=torch.tensor([[-1.0], [0.0]]), bits=4)
>>> w.dequantize().tolist()
[[-1.0, -0.5, 0.0, 0.5], [3.0, 3.0, 3.0, 3.0]]
>>> x = torch.tensor([[127.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
>>> qmatmul(x, w).tolist()
[[-127.0, 381.0], [0.0, 6.0]]
>>> quantize_rows(torch.tensor([[1.0, -0.5, 0.25, 0.0]]), group=4)[0].tolist()
[[127.0, -64.0, 32.0, 0.0]]
"""

from __future__ import annotations

import torch

from common.kernels.packing import LANES, RowWeight


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq [M, K] int8-valued float32, d [M, K/group], xs [M, K/group])`` (step 1 above)."""
    m, k = x.shape
    xg = x.view(m, k // group, group)
    amax = xg.abs().amax(dim=2)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])
    return xq.view(m, k), d, xq.sum(dim=2)


def qmatmul(x: torch.Tensor, w: RowWeight) -> torch.Tensor:
    """``x [M, K] @ w.T`` the quantized way (module docstring): ``[M, N]`` float32."""
    group = w.group
    xq, d, xs = quantize_rows(x.float().contiguous(), group)
    u = w.u.to(torch.float64)
    xq = xq.to(torch.float64)  # integer products and sums below 2**53 are exact in float64
    acc = torch.zeros((x.shape[0], w.n), dtype=torch.float32)
    for g in range(w.k // group):
        cols = slice(g * group, (g + 1) * group)
        i = (xq[:, cols] @ u[:, cols].T).to(torch.float32)
        t = i * w.s[:, g] + w.z[:, g] * xs[:, g : g + 1]
        acc = acc + d[:, g : g + 1] * t
    return acc


def lane_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum of each row of ``x [M, K]`` (K a multiple of 16) in the kernels' order: 16 lanes, lane
    l accumulating ``x[16 i + l]`` for i = 0, 1, ...; then the lanes added 0, 1, ..., 15.

    >>> lane_sums(torch.ones(2, 32)).tolist()
    [32.0, 32.0]
    """
    m, k = x.shape
    chunks = x.view(m, k // LANES, LANES)
    lanes = chunks[:, 0]
    for i in range(1, k // LANES):
        lanes = lanes + chunks[:, i]
    total = lanes[:, 0]
    for lane in range(1, LANES):
        total = total + lanes[:, lane]
    return total


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x * r) * weight`` with ``r = rsqrt(lane_sums(x * x) / K + eps)`` per row, float32.

    >>> rmsnorm(torch.full((1, 16), 2.0), torch.ones(16), 0.0)[0, :2].tolist()
    [1.0, 1.0]
    """
    x = x.float()
    mean = lane_sums(x * x) / x.shape[1]
    r = torch.rsqrt(mean + eps)  # correctly rounded here, unlike torch.sqrt on float32
    return (x * r[:, None]) * weight


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[M, 2F]``; one row per call, so that
    torch's vectorized and scalar tails fall the same way for every row whatever M is."""
    f = gate_up.shape[1] // 2
    out = torch.empty((gate_up.shape[0], f), dtype=torch.float32)
    for r in range(gate_up.shape[0]):
        g, u = gate_up[r, :f], gate_up[r, f:]
        out[r] = g / (1.0 + torch.exp(-g)) * u
    return out


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_rows: torch.Tensor,
    row_start: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each query row over its own request's keys, one row at a time.

    ``q [N, H, D]``; ``k_cache``/``v_cache`` ``[P, KVH, D]`` (a layer's pool); query row n reads
    the keys ``key_rows[row_start[n] : row_start[n] + counts[n]]`` (its request's pool rows, in
    position order, up to and including its own position). Head h reads KV head
    ``h // (H / KVH)``. Per row and head: scores, softmax with the maximum subtracted, values
    summed over keys. Sums are sequential scans (``cumsum``: one accumulator, in float64, in
    position order), each row in its own calls: nothing depends on the other rows or threads.
    Returns ``[N, H, D]``.
    """
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    rep = heads // kv_heads
    out = torch.empty_like(q)
    for r in range(n):
        start, count = int(row_start[r]), int(counts[r])
        rows = key_rows[start : start + count]
        k = k_cache[rows].repeat_interleave(rep, dim=1).double()  # [count, H, D]
        v = v_cache[rows].repeat_interleave(rep, dim=1).double()
        scores = (q[r].double()[None] * k).cumsum(dim=2)[..., -1].float() * scale  # [count, H]
        e = torch.exp(scores - scores.amax(dim=0)).double()
        acc = (e[..., None] * v).cumsum(dim=0)[-1]  # [H, D]
        out[r] = (acc / e.cumsum(dim=0)[-1][:, None]).float()
    return out
