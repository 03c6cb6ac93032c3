"""The serving benchmark's pure parts (percentiles, per-token gaps, medians over repeats, the
ratios, the table) on tiny arrays, and one end-to-end round on the simulated backend: the
target alone, k=2 and k=3 served, clients 1 and 2, 4 tokens per request. No timing assertions:
speed claims live only in the benchmark's output."""

import json

import pytest

from benchmarks import serving
from benchmarks.load_test import save_simulation_tokenizer, simulated_config
from benchmarks.report import percentile, to_jsonable
from benchmarks.serving import Request, Round, cells, markdown, ratios, round_summary


def test_percentile_interpolates_between_ranks():
    values = [0.4, 0.1, 0.3, 0.2]
    assert percentile(values, 50) == pytest.approx(0.25)
    assert percentile(values, 99) == pytest.approx(0.397)
    assert percentile([], 50) is None


def test_token_gaps_spread_each_chunk_over_its_tokens():
    tokens = serving.chunk_tokens(str.split, ["w3", " w4 w5", " w6", "", " w7"])
    assert tokens == [1, 2, 1, 0, 1]
    times = [0.10, 0.30, 0.40, 0.45, 0.60]
    gaps = serving.token_gaps(list(zip(times, tokens)))
    assert gaps == pytest.approx([0.1, 0.1, 0.1, 0.2])  # 4 tokens after the first
    assert sum(gaps) == pytest.approx(times[-1] - times[0])


def rnd(system, clients, repeat, wall, ttft, itl, equal=True, per_pass=None):
    requests = [Request(i, f"p{i}", 4, ttft, wall, [itl] * 3, equal=equal) for i in range(clients)]
    return Round(system, clients, repeat, wall, requests, per_pass)


def test_cells_take_the_median_of_repeats_and_sum_equality():
    rounds = [
        rnd("target", 2, 0, wall=1.0, ttft=0.1, itl=0.05, per_pass=1.5),
        rnd("target", 2, 1, wall=2.0, ttft=0.3, itl=0.07, equal=False, per_pass=None),
        rnd("target", 2, 2, wall=4.0, ttft=0.2, itl=0.06, per_pass=2.5),
    ]
    assert round_summary(rounds[0])["tokens_per_s"] == 8.0
    cell = cells(rounds)["target"][2]
    assert cell["tokens_per_s"] == 4.0  # 8, 4, 2 tokens/s
    assert cell["ttft_p50_s"] == pytest.approx(0.2) and cell["itl_p50_s"] == pytest.approx(0.06)
    assert cell["req_per_pass"] == 2.0  # the repeat without the counters is left out
    assert (cell["equal"], cell["checked"], cell["errors"], cell["repeats"]) == (4, 6, 0, 3)


def test_ratios_and_table():
    rounds = [
        rnd("generate", 1, 0, wall=1.0, ttft=0.1, itl=0.05),
        rnd("target", 1, 0, wall=2.0, ttft=0.2, itl=0.1),
        rnd("pipespec-k3", 1, 0, wall=1.6, ttft=0.25, itl=0.08),
        rnd("target", 4, 0, wall=2.0, ttft=0.2, itl=0.1),
    ]
    table = cells(rounds)
    assert ratios(table) == {1: {"k3_over_target": 1.25, "k3_over_generate": 0.625}}
    text = markdown(table, ["generate", "target", "pipespec-k3"])
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, clients 1 and 4
    assert (
        lines[2]
        == "| 1 | 4.0 | 2.0 | 2.5 | 1.25x | 0.62x | 100 / 200 / 250 | 50.0 / 100.0 / 80.0 |"
    )
    assert lines[3] == "| 4 | - | 8.0 | - | - | - | - / 200 / - | - / 100.0 / - |"


def test_round_with_a_failed_request_counts_it_and_not_its_tokens():
    r = rnd("target", 2, 0, wall=1.0, ttft=0.1, itl=0.05)
    r.requests[1].error = "HTTP 500"
    s = round_summary(r)
    assert (s["tokens"], s["errors"], s["checked"]) == (4, 1, 1)


def test_throughput_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    table = {"target": {1: {"tokens_per_s": 20.0}, 2: {"tokens_per_s": None}}}
    serving.plot_throughput(tmp_path / "t.png", table, "title")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_rounds_are_left_padded_static_batches(tmp_path):
    """(a) on a tiny model: every row of a round's batch equals its prompt decoded alone
    (the reference), and its latencies come from the streamer's step times."""
    from benchmarks.hf_methods import InProcess
    from tests.tiny_models import EOS, tiny_llama

    runner = InProcess(str(tiny_llama(tmp_path / "t")), threads=1, eos_ids=[EOS])
    prompts = [("a", [1, 5, 6, 7, 8, 9]), ("b", [1, 10, 11]), ("c", [1, 40, 41, 42, 43])]
    reference = {pid: runner.generate(ids, 5, "autoregressive").tokens for pid, ids in prompts}
    r = serving.run_generate(runner, prompts, 3, 2, 5, 0, reference, lambda t: str(t))
    assert [q.prompt_id for q in r.requests] == ["a", "b", "c", "a", "b", "c"]
    assert all(q.equal for q in r.requests)
    for q in r.requests:
        assert len(q.itl_s) == q.tokens - 1 and all(g > 0 for g in q.itl_s)
        assert 0 < q.ttft_s <= q.latency_s <= r.wall_s
    assert round_summary(r)["tokens"] == sum(len(reference[p]) for p in "abc") * 2


@pytest.mark.slow
def test_end_to_end_on_the_simulated_backend(tmp_path):
    """Every served system the benchmark compares, on the simulated backend, launched together and
    run interleaved: every request completes, every round has its numbers (CPU seconds of every
    process, each stage's counters), the JSON holds them."""
    tok = save_simulation_tokenizer(tmp_path / "tok")
    from common.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(tok))
    prompts = [(f"p{i}", " ".join(f"w{3 + (i * 7 + j) % 80}" for j in range(8))) for i in range(3)]
    configs = {
        system: simulated_config(tok, levels=levels, target_ms=5.0)
        for system, levels in (("target", 1), ("pipespec-k2", 2), ("pipespec-k3", 3))
    }
    seen: list[tuple[str, int, int]] = []

    def in_process(clients: int, repeat: int) -> Round:  # stands for generate: order only
        seen.append(("generate", clients, repeat))
        return Round("generate", clients, repeat, 1.0, [])

    rounds, errors = serving.serve_interleaved(
        configs,
        prompts,
        [1, 2],
        per_client=2,
        max_tokens=4,
        repeats=2,
        log_dir=tmp_path / "logs",
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        warmup="w3 w4",
        log=lambda _: None,
        in_process={"generate": in_process},
    )
    assert errors == {}
    # interleaved: each (clients, repeat) runs every system, in an order rotated by the repeat
    order = [(r.system, r.clients, r.repeat) for r in rounds]
    names = ["generate", "target", "pipespec-k2", "pipespec-k3"]
    assert order == [
        (name, clients, repeat)
        for clients in (1, 2)
        for repeat in (0, 1)
        for name in names[repeat:] + names[:repeat]
    ]
    assert seen == [o for o in order if o[0] == "generate"]
    rounds = [r for r in rounds if r.system != "generate"]
    table = cells(rounds)
    for system in ("target", "pipespec-k2", "pipespec-k3"):
        for clients in (1, 2):
            cell = table[system][clients]
            assert cell["errors"] == 0 and cell["tokens_per_s"] > 0
            assert cell["ttft_p50_s"] > 0 and cell["itl_p50_s"] > 0
    for r in rounds:
        assert len(r.requests) == 2 * r.clients
        assert all(q.tokens == 4 and len(q.itl_s) == 3 for q in r.requests)
        assert set(r.cpu_s) == {"clients", "gateway", *(f"stage{i}" for i in range(len(r.stages)))}
        assert r.stages["stage0"]["passes"] > 0
        assert r.req_per_pass is None or r.req_per_pass >= 1  # None until stages export it
    assert set(ratios(table)) == {1, 2}
    json.dumps(to_jsonable({"cells": table, "rounds": rounds}))
