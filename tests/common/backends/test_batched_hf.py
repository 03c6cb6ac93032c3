"""The batched runner on tiny random Llama and Qwen2 models, loaded through ``load_causal_lm``.

The oracle is the runner itself decoding one request alone, one token at a time (padded the same
way): every row a mixed ragged batch returns must equal it bit for bit, rollbacks included. Against
transformers the logits are close and greedy decoding equals ``generate``.
"""

import random

import pytest
import torch

from common.backends import batched_hf
from common.backends.batched import PoolExhausted, Run, greedy_decode, one_at_a_time
from common.backends.batched_hf import BatchedRunner, HFBatchedBackend
from common.backends.segment_graphs import graph_buckets
from tests.common.backends.batched_fixtures import BUILDERS
from tests.tiny_models import VOCAB_SIZE


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def backend(model_dir):
    return HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=1024)


def oracle(runner: BatchedRunner, seq: list[int]) -> torch.Tensor:
    """Logits after each token of ``seq``, fed alone one token at a time."""
    return torch.stack(one_at_a_time(runner, seq))


def test_mixed_ragged_batches_with_rollbacks_equal_the_oracle_bit_for_bit(backend):
    """Five requests of different lengths (two of one span: their attention ops are shared when
    their windows match) share passes: prefills, windows of 1-17 tokens, wrong drafts cropped off
    and re-fed; every row for a true position equals the oracle exactly."""
    mixed_batches_equal_the_oracle(backend)


def test_a_second_runner_of_the_same_shapes_reuses_the_probe_and_other_threads_probe_again(
    model_dir, monkeypatch
):
    """The probe's answer depends on shapes, strides, type, device and threads, not on values:
    a second runner over the same model takes it from the process's record; one at another
    thread count probes (and, given rows no product agrees on, pads nothing)."""
    monkeypatch.setattr(batched_hf, "_PROBED", {})  # a record of its own, empty
    first = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64)
    monkeypatch.setattr(batched_hf, "fewest_rows", lambda *a, **k: pytest.fail("probed again"))
    again = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64)
    assert (again.min_rows, again.weight_layout) == (first.min_rows, first.weight_layout)
    monkeypatch.setattr(batched_hf, "fewest_rows", lambda *a, **k: None)
    torch.set_num_threads(2)
    other = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64)
    assert other.min_rows == 1


@pytest.mark.parametrize("layout", ["row", "column"])
def test_either_weight_layout_is_exact_with_the_rows_it_probes(model_dir, layout):
    """``auto`` picks whichever layout needs fewer rows on this machine; each is exact with its
    own probed rows, and ``column`` really re-stores the weights (its transpose contiguous)."""
    runner = HFBatchedBackend(
        str(model_dir), threads=None, kv_pool_tokens=1024, weight_layout=layout
    )
    assert runner.weight_layout == layout
    weight = runner.lm.model.layers[0].mlp.down_proj.weight
    assert (weight.t() if layout == "column" else weight).is_contiguous()
    mixed_batches_equal_the_oracle(runner)


def test_auto_layout_keeps_row_major_unless_column_needs_fewer_rows(model_dir):
    auto = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64)
    rows = {
        layout: HFBatchedBackend(
            str(model_dir), threads=None, kv_pool_tokens=64, weight_layout=layout
        ).min_rows
        for layout in ("row", "column")
    }
    expected = "column" if rows["column"] < rows["row"] else "row"
    assert (auto.weight_layout, auto.min_rows) == (expected, rows[expected])
    explicit = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64, min_rows=3)
    assert (explicit.weight_layout, explicit.min_rows, explicit.query_rows) == ("row", 3, 3)
    with pytest.raises(ValueError, match="weight_layout"):
        HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64, weight_layout="diag")


def mixed_batches_equal_the_oracle(backend: BatchedRunner) -> None:
    rng = random.Random(0)
    seqs = {
        f"r{i}": [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]
        for i, n in enumerate((40, 23, 57, 31, 40))
    }
    # reservations longer than the oracle's (room for wrong drafts): spans differ too
    expected = {r: oracle(backend, s) for r, s in seqs.items()}
    for r, s in seqs.items():
        backend.open(r, len(s) + 8)
    checked = 0
    try:
        while any(backend.length(r) < len(s) for r, s in seqs.items()):
            runs, fed = [], {}
            for r, s in seqs.items():
                done = backend.length(r)
                if done == len(s) or rng.random() < 0.3:
                    continue
                n = rng.choice((1, 1, 2, 3, 4, 6, 17)) if done else rng.randrange(1, 20)
                good = s[done : done + n]
                bad = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.choice((0, 0, 1, 3)))]
                fed[r] = (done, len(good))
                runs.append(Run(r, good + bad))
            out = backend.step(runs)
            for r, (done, n_good) in fed.items():
                got = out[r]
                assert got.positions == list(range(done, done + len(got.positions)))
                assert torch.equal(got.logits[:n_good], expected[r][done : done + n_good])
                assert got.greedy[:n_good] == expected[r][done : done + n_good].argmax(-1).tolist()
                checked += n_good
                backend.crop(r, done + n_good)  # drop the wrong drafts; re-fed correctly later
    finally:
        for r in seqs:
            backend.close(r)
    assert checked == sum(map(len, seqs.values()))
    assert backend.usage().used_tokens == 0


def test_bucketed_static_buffers_change_no_bit(backend):
    """The CUDA-graph path without the capture (``segment_graphs``): passes of up to 64 rows run
    layer segments in place on the static buffers of a power-of-two bucket, rows past the pass's
    zeroed; longer ones (prefills) run the plain path. Mixed ragged batches equal the oracle, and
    that oracle equals the plain runner's bit for bit."""
    graphed = BatchedRunner(
        backend.lm,
        kv_pool_tokens=1024,
        min_rows=backend.min_rows,
        weight_layout=backend.weight_layout,
        graph_rows=64,
        capture_graphs=False,
    )
    assert graphed.graphs.buckets == graph_buckets(64, backend.min_rows)
    seen: list[int | None] = []
    for_rows = graphed.graphs.for_rows
    graphed.graphs.for_rows = lambda rows: seen.append(b := for_rows(rows)) or b
    mixed_batches_equal_the_oracle(graphed)
    assert len({b.rows for b in seen if b}) >= 2, seen
    seq = [1, 5, 17, 33, 60, 8, 9, 10, 11, 40, 41, 42, 77, 3, 94, 50] * 5
    assert torch.equal(oracle(graphed, seq[:16]), oracle(backend, seq[:16]))
    seen.clear()
    prefills = []
    for runner in (graphed, backend):  # 80 rows: more than the largest bucket, the plain path
        runner.open("long", 96)
        prefills.append(runner.step([Run("long", seq)])["long"].logits)
        runner.close("long")
    assert seen == [None] and torch.equal(*prefills)


def test_crop_and_refeed_gives_identical_logits(backend):
    seq = [1, 5, 17, 33, 60, 8, 9, 10, 11, 40, 41, 42]
    backend.open("a", 32)
    try:
        first = backend.step([Run("a", seq)])["a"].logits
        backend.crop("a", 5)
        again = backend.step([Run("a", seq[5:])])["a"].logits
        assert torch.equal(first[5:], again)
    finally:
        backend.close("a")


def test_logits_are_close_to_the_transformers_model(backend):
    seq = [1, 5, 17, 33, 60, 8, 9, 10, 11, 40, 41, 42, 77, 3, 94, 50]
    reference = backend.lm(torch.tensor([seq])).logits[0].detach()
    delta = (oracle(backend, seq) - reference).abs().max().item()
    assert delta < 1e-4, delta


def generate(lm, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = lm.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_decoding_equals_transformers_generate(backend):
    prompts = [[1, 5, 17, 33, 60, 8], [1, 70], [1, 9, 9, 9, 12, 44, 45, 46, 3, 3, 80]]
    got = greedy_decode(backend, prompts, 30)
    assert got == [generate(backend.lm, p, 30) for p in prompts]


def test_sixteen_requests_of_different_lengths_decode_together_like_generate(backend):
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in range(0, 48, 3)]
    assert len(prompts) == 16
    got = greedy_decode(backend, prompts, 12)
    assert got == [generate(backend.lm, p, 12) for p in prompts]


def test_the_pool_is_bounded_and_its_usage_readable(model_dir):
    runner = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=64, block_size=16)
    assert runner.usage().capacity_tokens == 64
    runner.open("a", 40)  # 3 blocks
    assert (runner.usage().used_tokens, runner.usage().perc) == (48, 0.75)
    assert not runner.can_open(17)
    with pytest.raises(PoolExhausted, match="KV pool full"):
        runner.open("b", 17)
    runner.step([Run("a", [1, 2, 3])])
    assert runner.usage().held_tokens == 3
    with pytest.raises(ValueError, match="exceed its capacity of 48"):
        runner.step([Run("a", [4] * 46)])
    assert runner.length("a") == 3  # a rejected pass changes nothing
    runner.close("a")
    runner.open("b", 64)
    assert runner.usage().perc == 1.0


def test_bad_passes_get_clear_errors_and_change_nothing(backend):
    backend.open("a", 16)
    try:
        with pytest.raises(KeyError, match="not open"):
            backend.step([Run("a", [1]), Run("zz", [1])])
        with pytest.raises(ValueError, match="twice"):
            backend.step([Run("a", [1]), Run("a", [2])])
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
            backend.step([Run("a", [1, VOCAB_SIZE])])
        with pytest.raises(ValueError, match="already open"):
            backend.open("a", 16)
        with pytest.raises(ValueError, match="crop"):
            backend.crop("a", 1)
        assert backend.length("a") == 0
        assert backend.step([Run("a", [])])["a"].logits.shape == (0, VOCAB_SIZE)
        assert backend.step([Run("a", [1, 2], rows=0)])["a"].positions == []
        assert backend.length("a") == 2
    finally:
        backend.close("a")


def test_unsupported_architectures_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB_SIZE)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supports llama, qwen2 models, not 'gpt2'"):
        HFBatchedBackend(str(tmp_path), threads=None)


def test_an_early_exit_view_decodes_like_its_transformers_model(model_dir):
    runner = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=256, early_exit_layers=2)
    assert len(runner.lm.model.layers) == 2 and runner.name.endswith("(first 2 layers)")
    prompts = [[1, 5, 17], [1, 9, 9, 9, 40]]
    assert greedy_decode(runner, prompts, 12) == [generate(runner.lm, p, 12) for p in prompts]


def test_a_reservation_beyond_the_model_or_the_pool_is_refused(model_dir):
    runner = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=1024)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        runner.open("a", 513)
    small = HFBatchedBackend(str(model_dir), threads=None, kv_pool_tokens=128)
    assert not small.can_open(129)
    with pytest.raises(ValueError, match="exceeds the pool's 128 positions"):
        small.open("a", 129)
