"""The C++ kernels against the torch reference: ``qmatmul`` and ``rmsnorm`` bit for bit (on every
code path this CPU has: generic, avx2, avx512-vnni), every op batch invariant (a row among M rows equals the row
alone) at 1 and 2 threads, with the same results at both thread counts."""

from __future__ import annotations

import pytest
import torch

from common.kernels import native, reference
from common.kernels.packing import BlockScales, tile
from tests.common.kernels.test_reference import (
    FACTORED_KINDS,
    MAX_ROWS,
    ROW_COUNTS,
    Attention,
    assert_rows_invariant,
    attention_op,
    random_block_weight,
    random_factored_weight,
    random_weight,
)

WEIGHT_KINDS = [(4, 32), (8, 16), (8, 32), (4, 16), (5, 32), (6, 16), (6, 32)]


@pytest.fixture(scope="module")
def ext():
    module = native.load()
    if module is None:
        pytest.skip("the C++ kernels could not be built here (see the logged warning)")
    return module


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def paths(ext) -> list[str]:
    """The code paths this CPU runs: generic, and avx2 and avx512-vnni where it has them."""
    return ext.cpu_paths()


def native_qmatmul(ext, x, t, path=""):
    x = x.contiguous()
    f = t.factors
    if f is None:
        return ext.qmatmul(x, t.codes, t.s, t.z, t.n, t.k, t.group, t.bits, path)
    if isinstance(f, BlockScales):
        return ext.qmatmul_block(x, t.codes, f.d, f.offset, t.n, t.k, t.group, t.bits, path)
    args = (t.n, t.k, t.group, f.superblock, t.bits, path)
    return ext.qmatmul_factored(x, t.codes, f.d, f.dm, f.sc, f.mi, *args)


FACTORED_ROW_COUNTS = [*range(1, 18), 33, 64, 513]


@pytest.mark.parametrize(("bits", "group", "superblock"), FACTORED_KINDS)
def test_qmatmul_factored_bit_identical(ext, bits, group, superblock):
    """The kernel rebuilds s and z from the factors: the reference's bits on every path."""
    w = random_factored_weight(48, 512, group, bits, superblock, seed=bits + group + superblock)
    t = tile(w)
    assert t.s is None and t.factors is not None
    x = torch.randn(max(FACTORED_ROW_COUNTS), 512, generator=torch.Generator().manual_seed(6))
    x[3, :32] = 0.0  # a group whose amax is 0
    for m in FACTORED_ROW_COUNTS:
        expected = reference.qmatmul(x[:m], w)
        for path in paths(ext):
            assert torch.equal(native_qmatmul(ext, x[:m], t, path), expected), (m, path)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_qmatmul_block_scales_bit_identical(ext, bits):
    """The kernel reads d alone (Q4_0, Q5_0, Q8_0) and makes z = -offset * d: the reference's
    bits on every path."""
    w = random_block_weight(48, 512, bits, seed=bits)
    t = tile(w)
    assert isinstance(t.factors, BlockScales) and t.s is None
    x = torch.randn(max(FACTORED_ROW_COUNTS), 512, generator=torch.Generator().manual_seed(6))
    x[3, :32] = 0.0
    for m in FACTORED_ROW_COUNTS:
        expected = reference.qmatmul(x[:m], w)
        for path in paths(ext):
            assert torch.equal(native_qmatmul(ext, x[:m], t, path), expected), (m, path)


def test_qmatmul_block_scales_checks(ext):
    t = tile(random_block_weight(16, 256, 5))
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="offset"):
        ext.qmatmul_block(x, t.codes, t.factors.d, 16.5, 16, 256, 32, 5)
    with pytest.raises(RuntimeError, match="d must be"):
        ext.qmatmul_block(x, t.codes, t.factors.d.float(), 16, 16, 256, 32, 5)


def test_qmatmul_factored_checks_shapes(ext):
    t = tile(random_factored_weight(16, 256, 32, 4, 256))
    f = t.factors
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="super-block"):
        ext.qmatmul_factored(x, t.codes, f.d, f.dm, f.sc, f.mi, 16, 256, 32, 48, 4)
    with pytest.raises(RuntimeError, match="dm must be"):
        ext.qmatmul_factored(x, t.codes, f.d, f.dm.float(), f.sc, f.mi, 16, 256, 32, 256, 4)
    with pytest.raises(RuntimeError, match="sc does not fit"):
        ext.qmatmul_factored(x, t.codes, f.d, f.dm, f.sc[:, :4], f.mi, 16, 256, 32, 256, 4)


@pytest.mark.parametrize(("bits", "group"), WEIGHT_KINDS)
def test_qmatmul_bit_identical_small(ext, bits, group):
    w = random_weight(48, 64, group, bits, seed=bits + group)
    t = tile(w)
    x = torch.randn(MAX_ROWS, 64, generator=torch.Generator().manual_seed(5))
    x[3, :32] = 0.0  # a group whose amax is 0
    for path in paths(ext):
        for m in ROW_COUNTS:
            expected = reference.qmatmul(x[:m], w)
            assert torch.equal(native_qmatmul(ext, x[:m], t, path), expected), (m, path)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 16), (5, 32), (6, 16)])
def test_qmatmul_bit_identical_realistic(ext, bits, group):
    w = random_weight(1536, 576, group, bits, seed=7)
    t = tile(w)
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(8)) * 3
    for m in (1, 4, 8, 9, 17):
        expected = reference.qmatmul(x[:m], w)
        for path in paths(ext):
            assert torch.equal(native_qmatmul(ext, x[:m], t, path), expected), (m, path)


def test_rmsnorm_bit_identical(ext):
    gen = torch.Generator().manual_seed(9)
    for k in (64, 1536):
        x = torch.randn(MAX_ROWS, k, generator=gen) * 2
        weight = torch.rand(k, generator=gen) + 0.5
        expected = reference.rmsnorm(x, weight, 1e-6)
        for path in paths(ext):
            for m in ROW_COUNTS:
                assert torch.equal(ext.rmsnorm(x[:m], weight, 1e-6, path), expected[:m])


def test_silu_mul_close(ext):
    x = torch.randn(40, 2 * 200, generator=torch.Generator().manual_seed(10)) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    for path in paths(ext):
        torch.testing.assert_close(
            ext.silu_mul(x, path), reference.silu_mul(x), rtol=1e-5, atol=1e-6
        )


def test_attention_close(ext):
    case = Attention(24)
    expected = case.run(reference.attention, slice(None))
    for path in paths(ext):
        got = case.run(lambda *a, p=path: ext.attention(*a, p), slice(None))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_path_gives_the_same_bits(ext):
    """silu_mul and attention on every path equal the best path (qmatmul and rmsnorm are checked
    against the reference on every path above)."""
    if len(paths(ext)) == 1:
        pytest.skip("this CPU has only the generic path")
    case = Attention(16)
    x = torch.randn(16, 2 * 128, generator=torch.Generator().manual_seed(11))
    best = case.run(ext.attention, slice(None))
    for path in paths(ext):
        assert torch.equal(case.run(lambda *a, p=path: ext.attention(*a, p), slice(None)), best)
        assert torch.equal(ext.silu_mul(x, path), ext.silu_mul(x))


def test_unknown_path_is_refused(ext):
    with pytest.raises(RuntimeError, match="code path"):
        ext.silu_mul(torch.zeros(1, 32), "sse9")


def invariant_at_threads(op, inputs, counts=ROW_COUNTS) -> torch.Tensor:
    """Check row invariance of ``op``; return its output on all rows (to compare thread counts)."""
    assert_rows_invariant(op, inputs, counts)
    return op(inputs)


@pytest.fixture(scope="module")
def across_threads():
    """Outputs of each invariance test by thread count: equal at 1 and 2 threads."""
    return {}


def check_across_threads(store, key, threads, out):
    store.setdefault(key, {})[threads] = out
    if len(store[key]) == 2:
        assert torch.equal(store[key][1], store[key][2]), f"{key}: 1 and 2 threads differ"


@pytest.mark.parametrize(
    ("bits", "group", "superblock"),
    [(4, 32, None), (8, 16, None), (4, 32, 256), (6, 16, 256), (5, 32, 32), (5, 32, "block")],
)
def test_qmatmul_invariant(ext, threads, across_threads, bits, group, superblock):
    if superblock is None:
        t = tile(random_weight(1536, 576, group, bits, seed=12))
    elif superblock == "block":  # one float16 scale per group
        t = tile(random_block_weight(1536, 768, bits, seed=12))
    else:  # factored scales
        t = tile(random_factored_weight(1536, 768, group, bits, superblock, seed=12))
    x = torch.randn(MAX_ROWS, t.k, generator=torch.Generator().manual_seed(13))
    out = invariant_at_threads(lambda a: native_qmatmul(ext, a, t), x)
    check_across_threads(across_threads, ("qmatmul", bits, group, superblock), threads, out)


def test_rmsnorm_invariant(ext, threads, across_threads):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(MAX_ROWS, 1536, generator=gen)
    weight = torch.rand(1536, generator=gen) + 0.5
    out = invariant_at_threads(lambda a: ext.rmsnorm(a, weight, 1e-6), x)
    check_across_threads(across_threads, "rmsnorm", threads, out)


def test_silu_mul_invariant(ext, threads, across_threads):
    x = torch.randn(MAX_ROWS, 2 * 8960 // 4, generator=torch.Generator().manual_seed(15)) * 4
    out = invariant_at_threads(ext.silu_mul, x)
    check_across_threads(across_threads, "silu_mul", threads, out)


def test_attention_invariant(ext, threads, across_threads):
    case = Attention(MAX_ROWS, heads=12, kv_heads=2, dim=128)
    op = attention_op(case, ext.attention)
    out = invariant_at_threads(op, case.indices())
    check_across_threads(across_threads, "attention", threads, out)


def test_dispatch_env(ext, monkeypatch):
    import common.kernels as kernels

    w = random_weight(32, 64, 32, 4)
    x = torch.randn(3, 64)
    monkeypatch.setenv("PIPESPEC_KERNELS", "reference")
    assert kernels.implementation() == "reference"
    assert kernels.prepare_weight(w) is w
    expected = kernels.qmatmul(x, w)
    monkeypatch.setenv("PIPESPEC_KERNELS", "generic")
    assert kernels.implementation() == "native-generic"
    assert torch.equal(kernels.qmatmul(x, kernels.prepare_weight(w)), expected)
    monkeypatch.delenv("PIPESPEC_KERNELS")
    assert kernels.implementation() == f"native-{ext.cpu_path()}"
    assert torch.equal(kernels.qmatmul(x.t().contiguous().t(), kernels.prepare_weight(w)), expected)
    f = random_factored_weight(32, 256, 32, 4, 256)
    x = torch.randn(3, 256)
    assert kernels.prepare_weight(f).factors is not None
    assert torch.equal(kernels.qmatmul(x, kernels.prepare_weight(f)), reference.qmatmul(x, f))
