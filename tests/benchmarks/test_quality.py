"""The quality benchmark's pure parts: chunking and second-half scoring on a fake backend whose
logits are known, llama-perplexity's output parsing, and the greedy comparison. No binaries, no
real models."""

import math

import pytest
import torch

from benchmarks import quality
from common.backends.batched import BatchedBackend, RunResult

VOCAB = 5

LLAMA_OUTPUT = """\
0.00.449.396 I perplexity: tokenizing the input ..
0.00.456.929 I perplexity: calculating perplexity over 7 chunks, n_ctx=512, batch_size=2048, n_seq=4
[1]32.9766,[2]26.2824,[3]22.9039,[4]23.2588,[5]16.4272,[6]14.3080,[7]13.8320,
1.14.940.823 I Final estimate: PPL = 13.8320 +/- 0.89573
"""


class FakeBackend(BatchedBackend):
    """Logits after token ``t``: ``log p`` with p(t + 1 mod VOCAB) = 1/2, the rest equal shares;
    records every run it was given."""

    def __init__(self):
        self.lengths: dict = {}
        self.runs: list = []

    def open(self, request, capacity):
        self.lengths[request] = 0

    def length(self, request):
        return self.lengths[request]

    def crop(self, request, length):
        self.lengths[request] = length

    def close(self, request):
        self.lengths.pop(request, None)

    def step(self, runs):
        out = {}
        for run in runs:
            self.runs.append((run.request, list(run.tokens), run.rows))
            start = self.lengths[run.request]
            positions = run.row_positions(start)
            rows = torch.stack([fake_logits(run.tokens[p - start]) for p in positions])
            self.lengths[run.request] = start + len(run.tokens)
            out[run.request] = RunResult(positions, rows.argmax(-1).tolist(), rows)
        return out


def fake_logits(token: int) -> torch.Tensor:
    p = torch.full((VOCAB,), 0.5 / (VOCAB - 1))
    p[(token + 1) % VOCAB] = 0.5
    return p.log()


def nll(prev: int, nxt: int) -> float:
    return -math.log(0.5 if nxt == (prev + 1) % VOCAB else 0.5 / (VOCAB - 1))


def test_chunks_drop_the_tail_and_put_bos_first():
    assert quality.chunks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert quality.chunks(list(range(10)), 4, bos=9) == [[9, 1, 2, 3], [9, 5, 6, 7]]
    assert quality.chunks(list(range(3)), 4) == []


def test_perplexity_scores_the_second_half_of_each_chunk():
    tokens = [0, 1, 2, 3, 4, 0, 2, 4, 1, 3, 0, 0, 0]  # ctx 6: two chunks, the tail dropped
    backend = FakeBackend()
    got = quality.perplexity(backend, tokens, ctx=6)
    # each chunk: fed whole from an empty cache, rows for positions 3..5; scored 3->4, 4->5
    assert [r[1:] for r in backend.runs] == [(tokens[0:6], 3), (tokens[6:12], 3)]
    assert backend.lengths == {}  # every chunk closed
    expected = [nll(3, 4), nll(4, 0), nll(4, 1), nll(1, 3)]
    mean = sum(expected) / 4
    assert got["scored_tokens"] == 4 and got["chunks"] == 2
    assert got["ppl"] == pytest.approx(math.exp(mean))
    sd = math.sqrt(sum(v * v for v in expected) / 4 - mean * mean)
    assert got["error"] == pytest.approx(math.exp(mean) * sd / math.sqrt(3))
    assert got["chunk_ppl"][0] == pytest.approx(math.exp((nll(3, 4) + nll(4, 0)) / 2), abs=1e-4)


def test_perplexity_with_bos_replaces_each_chunks_first_token():
    backend = FakeBackend()
    quality.perplexity(backend, [0, 1, 2, 3, 4, 0, 1, 2], ctx=4, bos=3)
    assert [r[1] for r in backend.runs] == [[3, 1, 2, 3], [3, 0, 1, 2]]


def test_perplexity_of_too_short_a_text_is_an_error():
    with pytest.raises(ValueError, match="no chunk"):
        quality.perplexity(FakeBackend(), [1, 2, 3], ctx=4)


def test_scored_nll_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    got = quality.scored_nll(logits, [7, 7, 1, 0], first=1)
    assert got == pytest.approx([math.log(2.0), -math.log(0.75)])


def test_parse_llama_perplexity():
    got = quality.parse_llama_perplexity(LLAMA_OUTPUT)
    assert got["ppl"] == 13.832 and got["error"] == 0.89573
    assert got["chunks"] == 7 and got["chunk_ppl"][0] == 32.9766
    with pytest.raises(ValueError, match="Final estimate"):
        quality.parse_llama_perplexity("perplexity: tokenizing the input ..")


def test_compare_cuts_each_side_at_its_end_token():
    # llama.cpp stopped on 7 (an end token of its own); we went on past it
    assert quality.compare([1, 2, 7, 9, 9], [1, 2, 7], ends=[0, 7])["identical"]
    row = quality.compare([1, 2, 3, 4], [1, 2, 5, 4], ends=[0])
    assert row == {"identical": False, "first_difference": 2, "ours_len": 4, "llama_len": 4}
    # one stopped early: differs where the other went on
    assert quality.compare([1, 0], [1, 2, 3], ends=[0])["first_difference"] == 1


def test_agreement_summary_all_identical():
    rows = [{"identical": True, "first_difference": None}] * 4
    got = quality.agreement_summary(rows)
    assert got["share_identical"] == 1.0 and got["median_first_difference"] is None


def test_markdown_has_both_tables():
    result = {
        "model": "m",
        "text": "benchmarks/data/quality_text.txt",
        "perplexity": {
            "ctx": 512,
            "add_bos": False,
            "text_tokens": 3000,
            "tokens_identical": True,
            "ours": {"ppl": 10.1, "error": 0.5, "chunks": 5, "scored_tokens": 1275},
            "llama": {"ppl": 10.0, "error": 0.5},
            "relative_difference": 0.01,
        },
        "greedy": {
            "n": 64,
            "summary": quality.agreement_summary([{"identical": True, "first_difference": None}]),
            "prompts": [
                {"id": "HumanEval/1", "identical": True, "first_difference": None}
                | {"ours_len": 64, "llama_len": 64}
            ],
        },
    }
    text = quality.markdown(result)
    assert "| relative difference | +1.00% | bar 3%: PASS |" in text
    assert "| HumanEval/1 | yes |  | 64 / 64 |" in text
