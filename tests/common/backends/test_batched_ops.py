"""Row invariance of each operation the batched runner uses, bit for bit, at one thread.

A row computed among M rows must equal the same row computed alone, padded to the rows this
machine needs (probed), for every M tried up to 513, called the way the runner calls it (weights
row- or column-major, whichever the runner's probe picks, so both; ``rowwise`` slices of at most
``MAX_ROWS``): linear layers (with and without bias, SmolLM2's and Qwen's shapes), RMSNorm, the
head, and attention over ragged requests.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common.backends.batched import Run
from common.backends.row_invariance import (
    invariant_min_rows,
    pad_rows,
    rowwise,
    store_column_major,
)

ROW_COUNTS = (*range(1, 71), 100, 200, 256, 257, 300, 511, 512, 513)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_are_invariant(op, width: int, generator: torch.Generator) -> None:
    """``op`` on M rows (through ``rowwise``, as the runner calls it) gives each row exactly what it
    gives that row padded to the rows the runner would pad to on this machine
    (``invariant_min_rows``, probed on fewer row counts), for every M from 1 to 70 and some far
    beyond ``MAX_ROWS``."""
    rows = invariant_min_rows([(op, width)])
    big = torch.randn(max(ROW_COUNTS), width, generator=generator)
    for m in ROW_COUNTS:
        together = rowwise(op, big[:m], rows)
        for i in (0, m // 2, m - 1):
            alone = op(pad_rows(big[i : i + 1], rows))[0]
            assert torch.equal(together[i], alone), (rows, m, i)


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize(
    "d_in, d_out, bias",
    [
        (576, 1536, False),
        (1536, 576, False),
        (576, 192, False),
        (896, 128, True),
        (32, 96, False),
        # Qwen2.5-1.5B's down_proj: a third kernel regime from 192 rows on MKL
        pytest.param(8960, 1536, False, marks=pytest.mark.slow),
    ],
)
def test_linear_rows_are_invariant(d_in, d_out, bias, layout):
    g = torch.Generator().manual_seed(d_in + d_out)
    linear = torch.nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(d_out, generator=g))
    if layout == "column":
        store_column_major([linear])
    assert (linear.weight.t() if layout == "column" else linear.weight).is_contiguous()
    with torch.inference_mode():
        rows_are_invariant(linear, d_in, g)


def test_rmsnorm_rows_are_invariant():
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    with torch.inference_mode():
        rows_are_invariant(norm, 576, torch.Generator().manual_seed(1))


def test_attention_rows_are_invariant_across_windows_and_groups(tmp_path):
    """A request's query rows attend the same whether fed 1-5 or 9 at a time, alone or in one
    group of attention ops with another request of the same span."""
    from common.backends.batched_hf import HFBatchedBackend, _Group
    from tests.common.backends.batched_fixtures import tiny_llama

    runner = HFBatchedBackend(str(tiny_llama(tmp_path / "m", hidden=64)), threads=None)
    for k, name in enumerate("ab"):
        runner.open(name, 48)
        runner.step([Run(name, list(range(3 + k, 30 + k)))])  # 27 key positions, every layer
    g = torch.Generator().manual_seed(2)
    q = {name: torch.randn(9, runner.n_heads, runner.head_dim, generator=g) for name in "ab"}

    def attend(names: str, first: int, t: int) -> list[torch.Tensor]:
        flat = torch.cat([q[name][first - 18 : first - 18 + t] for name in names])
        rows = [runner._slots[name].rows for name in names]
        members = [(i * t, t, first, r) for i, r in enumerate(rows)]
        out = runner._attend(0, flat, _Group(max(t, runner.query_rows), members, runner.dtype))
        return list(out.split(t))

    with torch.inference_mode():
        window = {name: attend(name, 18, 9)[0] for name in "ab"}
        for t in (1, 2, 3, 4, 5):
            for first in range(18, 27 - t + 1, t):
                expected = [window[name][first - 18 : first - 18 + t] for name in "ab"]
                assert torch.equal(attend("a", first, t)[0], expected[0]), t
                together = attend("ab", first, t)
                assert torch.equal(together[0], expected[0]) and torch.equal(
                    together[1], expected[1]
                )


@pytest.mark.parametrize("layout", ["row", "column"])
def test_head_rows_are_invariant(layout):
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(576, 4096, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4096, 576, generator=g) * 0.05)
    if layout == "column":
        store_column_major([head])
    with torch.inference_mode():
        rows_are_invariant(head, 576, g)


def test_column_major_storage_keeps_values_and_tied_weights():
    embed, head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False)
    head.weight = embed.weight  # tied, as SmolLM2 and Qwen2.5 ship
    before = embed.weight.detach().clone()
    store_column_major([head, embed])
    assert head.weight is embed.weight and head.weight.t().is_contiguous()
    assert torch.equal(head.weight, before)
    with torch.inference_mode():
        ids = torch.tensor([3, 49, 0])
        assert torch.equal(embed(ids), before[ids])
