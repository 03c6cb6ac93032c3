"""Piecewise CUDA graphs for the batched runner: every layer's work between attention ops,
captured once per bucket of flat batch rows, replayed by each pass (vLLM's piecewise graphs).

A pass of :class:`~common.backends.batched_hf.BatchedRunner` over L layers is L + 1 *segments*
separated by attention (which stays eager: its shapes follow each request's window and span):

    segment 0:      layer 0 before attention (norm, q/k/v, rotary)
    segment i:      layer i-1 after attention (o_proj, residual, norm, MLP, residual),
                    then layer i before attention           (0 < i < L)
    segment L:      layer L-1 after attention

Their shapes depend only on the number of flat rows, so a pass of ``n`` rows runs on the static
buffers of the smallest bucket ``>= n`` (the rows past ``n`` zeroed, and dropped: every op is
row-wise) and replays that bucket's L + 1 graphs: a few launches per layer instead of dozens of
small kernels, which is what an eager small-batch pass on a GPU waits on. Passes of more rows than
the largest bucket (long prefills) run eager.

Where the logits do not depend on the row count (one CPU thread, ``min_rows`` padding:
``row_invariance``), the padding to a bucket changes no real row's bits; on a GPU it is the same
trade every graph-capturing server makes (cuBLAS picks kernels by shape), measured by
``benchmarks.gpu_check`` as agreement.

``capture=False`` keeps the buckets and static buffers but runs each segment eagerly on them: what
the CPU tests check (same outputs as the plain path), and the fallback a CPU stage never needs.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

# segment(i, x, attention_out, cos, sin) -> (q, k, v) for layer i, or None after the last layer;
# updates x in place
Segment = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]


def graph_buckets(max_rows: int, min_rows: int = 1) -> list[int]:
    """Row counts to capture: powers of two from ``min_rows`` up to ``max_rows`` (and
    ``max_rows`` itself); none when ``max_rows`` is 0 (graphs off).

    >>> graph_buckets(128, 4)
    [4, 8, 16, 32, 64, 128]
    >>> graph_buckets(48, 1)
    [1, 2, 4, 8, 16, 32, 48]
    >>> graph_buckets(0, 4)
    []
    """
    if max_rows <= 0:
        return []
    low = max(min_rows, 1)
    sizes = {low, max_rows} | {2**p for p in range(max_rows.bit_length()) if low <= 2**p}
    return sorted(s for s in sizes if s <= max_rows)


class BucketGraphs:
    """One bucket: static ``x`` ``[rows, hidden]``, ``attention_out`` ``[rows, heads * d]``,
    ``cos``/``sin`` ``[rows, d]``, and the ``layers + 1`` segments over them, each a captured CUDA
    graph (``capture``) or an eager call."""

    def __init__(
        self,
        segment: Segment,
        *,
        rows: int,
        layers: int,
        hidden: int,
        attention_width: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        pool=None,
    ):
        self.rows, self.layers, self._segment = rows, layers, segment
        zeros = lambda width: torch.zeros((rows, width), device=device, dtype=dtype)  # noqa: E731
        self.x, self.attention_out = zeros(hidden), zeros(attention_width)
        self.cos, self.sin = zeros(head_dim), zeros(head_dim)
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._outputs: list = []
        if capture:
            self._capture(device, pool)

    def _eager(self, i: int):
        return self._segment(i, self.x, self.attention_out, self.cos, self.sin)

    def _capture(self, device: torch.device, pool) -> None:
        # warm-up on a side stream (cuBLAS handles and workspaces, the allocator), then capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                for i in range(self.layers + 1):
                    self._eager(i)
        torch.cuda.current_stream(device).wait_stream(side)
        for i in range(self.layers + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._eager(i)
            self._graphs.append(graph)
            self._outputs.append(out)  # static: the next replay overwrites it in place
        for buffer in (self.x, self.attention_out, self.cos, self.sin):
            buffer.zero_()

    def load(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """A pass's first ``n`` rows into the static buffers; rows past them zeroed."""
        n = len(x)
        for buffer, value in ((self.x, x), (self.cos, cos), (self.sin, sin)):
            buffer[:n].copy_(value)
            buffer[n:].zero_()

    def run(self, i: int):
        """Segment ``i`` on the static buffers: (q, k, v) of layer ``i`` (None for ``i == layers``)."""
        if self._graphs:
            self._graphs[i].replay()
            return self._outputs[i]
        return self._eager(i)


class SegmentGraphs:
    """Every bucket's :class:`BucketGraphs`, captured largest first into one memory pool (the
    buckets never run at once, so their intermediates share it)."""

    def __init__(self, buckets: Sequence[int], *, capture: bool, **bucket_args):
        self.buckets = sorted(set(buckets))
        pool = torch.cuda.graph_pool_handle() if capture else None
        self._by_rows = {
            rows: BucketGraphs(rows=rows, capture=capture, pool=pool, **bucket_args)
            for rows in reversed(self.buckets)
        }

    def for_rows(self, rows: int) -> BucketGraphs | None:
        """The smallest bucket of at least ``rows`` rows (None: more than the largest).

        >>> g = SegmentGraphs([4, 8], capture=False, segment=None, layers=1, hidden=2,
        ...                   attention_width=2, head_dim=2, device=torch.device("cpu"),
        ...                   dtype=torch.float32)
        >>> g.for_rows(1).rows, g.for_rows(5).rows, g.for_rows(9)
        (4, 8, None)
        """
        at = bisect.bisect_left(self.buckets, rows)
        return self._by_rows[self.buckets[at]] if at < len(self.buckets) else None
