"""The quantized runner: the model it serves is the GGUF file's, and a request's logits are the
same bits whatever shares its pass, however many tokens it feeds, at any thread count.

Tiny random Llama and Qwen2 models written as GGUF files (``tests.tiny_models.to_gguf``, every
32-element block type gguf writes) serve the fast checks; the real SmolLM2-135M file
(``models``) the same checks at its size.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from common import kernels, model_catalog
from common.backends.batched import Run, greedy_decode, one_at_a_time
from common.backends.quantized import QuantizedRunner
from tests.common.backends.batched_fixtures import BUILDERS
from tests.tiny_models import VOCAB_SIZE, to_gguf


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"tiny-gguf-{request.param}")
    BUILDERS[request.param](root / "hf", hidden=64)
    return to_gguf(root / "hf", root / "model.gguf")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_it_serves_the_model_in_the_file(tmp_path, monkeypatch):
    """With the matrix products made exact (the file's weights dequantized, float32), the runner's
    logits are transformers' for the same GGUF file: names, rope order, biases, GQA, norms and
    the head are read right. (The quantized products then differ from these by the int8
    rounding of activations, as llama.cpp's do.)"""
    from transformers import AutoModelForCausalLM

    from common.kernels.packing import TiledWeight, untile

    def exact(x, w):
        row = untile(w) if isinstance(w, TiledWeight) else w
        return x @ row.dequantize().T

    for arch, build in sorted(BUILDERS.items()):
        build(tmp_path / arch, hidden=64)
        to_gguf(tmp_path / arch, tmp_path / f"{arch}.gguf", types=("Q8_0", "Q4_1"))
        monkeypatch.setattr(kernels, "qmatmul", exact)
        runner = QuantizedRunner(str(tmp_path / f"{arch}.gguf"), kv_pool_tokens=64)
        monkeypatch.undo()
        ids = [5, 17, 33, 9, 60, 61, 2, 44]
        runner.open("a", 16)
        monkeypatch.setattr(kernels, "qmatmul", exact)
        got = runner.step([Run("a", ids)])["a"].logits
        monkeypatch.undo()
        lm = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{arch}.gguf")
        with torch.inference_mode():
            expected = lm(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def mixed_passes(runner, seq: list[int], rng: random.Random) -> torch.Tensor:
    """``seq`` fed in random chunks (a prefill, drafts, a rollback and re-feed), each pass shared
    with other requests of random lengths: the logits of every position of ``seq``."""
    runner.open("x", len(seq) + 8)
    others = [f"o{i}" for i in range(3)]
    for o in others:
        runner.open(o, 128)
    rows: list[torch.Tensor] = []
    try:
        fed = 0
        while fed < len(seq):
            n = min(len(seq) - fed, rng.choice([1, 1, 2, 3, 5, 8, 13]))
            wrong = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.choice([0, 0, 2]))]
            neighbours = [
                Run(o, [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 9))])
                for o in others
                if rng.random() < 0.7 and runner.length(o) < 100
            ]
            out = runner.step([Run("x", seq[fed : fed + n] + wrong), *neighbours])["x"]
            rows.append(out.logits[:n])
            runner.crop("x", fed + n)  # the wrong drafts roll back
            fed += n
    finally:
        for name in ("x", *others):
            runner.close(name)
    return torch.cat(rows)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_mixed_ragged_passes_equal_one_token_at_a_time_bit_for_bit(tiny, threads, n_threads):
    threads(1)
    runner = QuantizedRunner(str(tiny), kv_pool_tokens=1024)
    rng = random.Random(7)
    seq = [rng.randrange(3, VOCAB_SIZE) for _ in range(40)]
    alone = torch.stack(one_at_a_time(runner, seq))
    threads(n_threads)
    assert torch.equal(mixed_passes(runner, seq, rng), alone)


def prefills_equal_one_token_at_a_time(runner, seq: list[int], sizes, threads) -> None:
    """A prefill of each size among another request, at 2 threads, against the same request fed
    one token per pass at 1 thread."""
    threads(1)
    alone = torch.stack(one_at_a_time(runner, seq))
    threads(2)
    for size in sizes:
        runner.open("p", size)
        runner.open("q", 16)
        try:
            got = runner.step([Run("q", seq[:5]), Run("p", seq[:size])])["p"].logits
        finally:
            runner.close("p")
            runner.close("q")
        assert torch.equal(got, alone[:size]), size


def test_long_prefills_equal_one_token_at_a_time(tiny, threads):
    runner = QuantizedRunner(str(tiny), kv_pool_tokens=2048)
    rng = random.Random(3)
    seq = [rng.randrange(3, VOCAB_SIZE) for _ in range(512)]  # the tiny models' context
    prefills_equal_one_token_at_a_time(runner, seq, (128, 256, 257, 511, 512), threads)


def test_greedy_decoding_together_equals_alone(tiny):
    runner = QuantizedRunner(str(tiny), kv_pool_tokens=1024)
    prompts = [[5, 6, 7], [40, 41], [9] * 12, [77, 3, 3, 70]]
    together = greedy_decode(runner, prompts, 10)
    assert together == [greedy_decode(runner, [p], 10)[0] for p in prompts]


def test_bad_input_is_refused_before_any_cache_changes(tiny):
    runner = QuantizedRunner(str(tiny), kv_pool_tokens=64)
    runner.open("a", 8)
    with pytest.raises(ValueError, match="token ids"):
        runner.step([Run("a", [VOCAB_SIZE])])
    with pytest.raises(ValueError, match="capacity"):
        runner.step([Run("a", list(range(3, 20)))])  # past its block of 16
    assert runner.length("a") == 0
    with pytest.raises(ValueError, match="exceeds"):
        runner.open("b", 10_000)


def test_an_unsupported_tensor_type_is_a_clear_error(tmp_path):
    from tests.common.backends.batched_fixtures import tiny_qwen2

    tiny_qwen2(tmp_path / "hf", hidden=64)
    to_gguf(tmp_path / "hf", tmp_path / "m.gguf", types=("Q5_1",))
    with pytest.raises(ValueError, match="Q5_1.*not supported"):
        QuantizedRunner(str(tmp_path / "m.gguf"))


# -- real SmolLM2 weights ---------------------------------------------------------------------

SMOLLM2 = "smollm2-135m"
ROW_COUNTS = (*range(1, 71), 128, 256, 257, 511, 512, 513)
real = pytest.mark.skipif(
    not model_catalog.gguf_path(SMOLLM2).is_file(), reason=f"{SMOLLM2} is not prepared"
)


@pytest.fixture(scope="module")
def smollm2():
    return QuantizedRunner(str(model_catalog.gguf_path(SMOLLM2)), kv_pool_tokens=2048)


def rows_invariant(op, big: torch.Tensor, n_threads: int, name: str = "") -> None:
    """``op`` on M rows gives each row what it gives that row alone at one thread, for M in
    ``ROW_COUNTS``, at ``n_threads``."""
    torch.set_num_threads(1)
    probe = (0, 1, 6, 69, 127, 255, 256, 510, 511, 512)
    alone = {i: op(big[i : i + 1])[0] for i in probe}
    torch.set_num_threads(n_threads)
    for m in ROW_COUNTS:
        together = op(big[:m])
        for i in (p for p in probe if p < m):
            assert torch.equal(together[i], alone[i]), (name, m, i)


@pytest.mark.models
@real
@pytest.mark.parametrize("n_threads", [1, 2])
def test_every_operation_is_row_invariant_on_smollm2_weights(smollm2, threads, n_threads):
    g = torch.Generator().manual_seed(n_threads)
    shape = smollm2.shape
    layer = smollm2.layers[0]
    x = torch.randn(max(ROW_COUNTS), shape.hidden, generator=g)
    ops = {
        "attn_norm": lambda h: kernels.rmsnorm(h, layer.attn_norm, shape.eps),
        "qkv": lambda h: torch.cat(layer.qkv(h), dim=1),
        "out": lambda h: layer.out(h)[0],
        "gate_up": layer.gate_up.joined,
        "head": lambda h: smollm2.head(h)[0],
    }
    for name, op in ops.items():
        rows_invariant(op, x, n_threads, name)
    gate_up = torch.randn(max(ROW_COUNTS), 2 * shape.ffn, generator=g)
    rows_invariant(kernels.silu_mul, gate_up, n_threads)
    rows_invariant(lambda h: layer.down(h)[0], gate_up[:, : shape.ffn].contiguous(), n_threads)


@pytest.mark.models
@real
@pytest.mark.parametrize("n_threads", [1, 2])
def test_attention_rows_are_invariant_on_smollm2_shapes(threads, n_threads):
    """A query row's attention over its request's keys is the same bits whether it is computed
    alone or among M rows of several requests (ragged, each request its own keys)."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, dim = 9, 3, 64
    pool = 1200
    k = torch.randn(pool, kv_heads, dim, generator=g)
    v = torch.randn(pool, kv_heads, dim, generator=g)
    rows_a = torch.randperm(pool, generator=g)[:600]  # request a's pool rows
    rows_b = torch.randperm(pool, generator=g)[:600]
    q = torch.randn(600, heads, dim, generator=g)

    def attend(queries: list[int], positions: list[int], request: list[int]) -> torch.Tensor:
        key_rows = torch.cat([rows_a, rows_b])
        row_start = torch.tensor([0 if r == 0 else 600 for r in request])
        counts = torch.tensor(positions) + 1
        return kernels.attention(q[queries], k, v, key_rows, row_start, counts, 0.125)

    probes = (0, 5, 69, 300, 512)  # request a's positions whose rows are compared
    torch.set_num_threads(1)
    alone = [attend([j], [p], [0])[0] for j, p in enumerate(probes)]
    torch.set_num_threads(n_threads)
    for m in ROW_COUNTS:
        # m rows: the first are request a's probes, the rest request b's at other positions
        shown = min(m, len(probes))
        positions = list(probes[:shown]) + [(i * 7) % 599 for i in range(shown, m)]
        request = [0] * shown + [1] * (m - shown)
        got = attend(list(range(m)), positions, request)
        for j in range(shown):
            assert torch.equal(got[j], alone[j]), (m, j)


@pytest.mark.models
@real
@pytest.mark.parametrize("n_threads", [1, 2])
def test_smollm2_passes_equal_one_token_at_a_time(smollm2, threads, n_threads):
    rng = random.Random(n_threads)
    seq = [rng.randrange(100, 40000) for _ in range(24)]
    threads(1)
    alone = torch.stack(one_at_a_time(smollm2, seq))
    threads(n_threads)
    assert torch.equal(mixed_passes(smollm2, seq, rng), alone)


@pytest.mark.models
@real
def test_smollm2_prefills_equal_one_token_at_a_time(smollm2, threads):
    rng = random.Random(11)
    seq = [rng.randrange(100, 40000) for _ in range(513)]
    prefills_equal_one_token_at_a_time(smollm2, seq, (128, 256, 257, 511, 512, 513), threads)


def test_a_draft_vocabulary_scores_the_first_token_ids_as_the_whole_head_does(tiny):
    """``draft_vocab``: the logits of token ids below it, bit for bit the full runner's, and a
    runner that refuses to be the target (it may still draft, and verify the level below)."""
    from common.level_request import check_start
    from common.protocol import RouteHop, Start

    full = QuantizedRunner(str(tiny), kv_pool_tokens=256)
    part = QuantizedRunner(str(tiny), kv_pool_tokens=256, draft_vocab=48)
    seq = [5, 6, 7, 40, 41, 9, 9, 77]
    for runner in (full, part):
        runner.open("a", 16)
    want = full.step([Run("a", seq)])["a"]
    got = part.step([Run("a", seq)])["a"]
    assert got.logits.shape == (len(seq), 48) and full.can_target and not part.can_target
    assert torch.equal(got.logits, want.logits[:, :48])
    assert got.greedy == got.logits.argmax(dim=-1).tolist()

    hops = [
        RouteHop(level=i, replica=f"r{i}", inbox="tcp://x:1", notices="tcp://x:2") for i in (0, 1)
    ]
    start = Start(request_id="q", prompt=[5, 6], max_tokens=4, route=hops, reply_to="tcp://g:3")
    assert check_start(start, 0, "r0", part) is None  # a drafter
    assert "cannot be the target" in check_start(start, 1, "r1", part)
    assert check_start(start, 1, "r1", full) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        QuantizedRunner(str(tiny), kv_pool_tokens=256, draft_vocab=40)
