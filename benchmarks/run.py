"""The benchmark: PipeSpec against autoregressive decoding, transformers' assisted generation and
prompt-lookup decoding, and synchronous speculative decoding, on the same prompts, in one run.

    python -m benchmarks.run                                  # everything, sized for ~15 min on 2 cores
    python -m benchmarks.run --suite simulated                # the paper's A100 profile only (~3 min)
    python -m benchmarks.run --suite real --models smollm2    # the fast real-model set
    python -m benchmarks.run --suite real --n 1 --max-tokens 16 --methods autoregressive,pipespec-k3

Suites
------
real (``--models qwen``, default): target Qwen2.5-Coder-1.5B, fp32, on this CPU.
    autoregressive   ``generate`` greedy with KV cache, in this process
    assisted         ``generate(assistant_model=Qwen2.5-Coder-0.5B)``, HF's defaults, in this process
    prompt-lookup    ``generate(prompt_lookup_num_tokens=--pld-tokens)``, in this process
    sync-k2/k3       our services, ``schedule = "sync"``, ``lookahead = 8`` on every stage: the
                     paper's "Speculative" baseline (draft a fixed lookahead, then verify, in lockstep)
    pipespec-k2/k3   our services, ``schedule = "async"``
    k=2: 0.5B -> 1.5B; k=3: n-gram -> 0.5B -> 1.5B. Every model stage has ``threads = 1`` (its
    own core); the in-process methods use ``--hf-threads``. ``--models smollm2``: SmolLM2-135M as
    the target, its first 25 layers (early exit) as the middle level / assistant.
simulated: the paper's LLaMA 1B / 8B / 70B on A100 (``benchmarks.sim_profile`` derives the
    costs), autoregressive / sync-k2 / sync-k3 / pipespec-k2 / pipespec-k3, each through the real
    services (the simulated backend sleeps for its cost) and on the ideal schedule (``common.simnet``,
    zero overhead, same costs, same agreement, same prompts); reports measured / ideal throughput
    and the speedups beside the paper's.

Sampling (``--temperatures 0.7,1.0``, default; ``--top-p``): the pipespec methods run again with
each temperature, one seed per prompt, and are compared token for token with the reference
decoder (``common.simnet.reference_decode``: the target alone, one token per step, same
processors and noise), whose row ``reference T=..`` is the target's own sampled decoding; their
speedup is against greedy autoregressive.

Under load (concurrent streaming clients, batched ``generate`` against the served target alone
and PipeSpec k=2/k=3): ``python -m benchmarks.serving``.

Autoregressive always runs (every speedup is against it). Every output is compared token for
token with the target's greedy output (autoregressive ``generate`` for the real suite, the simulated target's own greedy decoding for the simulated one). Results go to
``--out`` (default ``results/<date-time>``): ``results.json``, ``benchmark.png``, ``table.txt``
and the services' logs. Report vocabulary: ``benchmarks.report``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import prompts as prompt_sets
from benchmarks.load_test import save_simulation_tokenizer
from benchmarks.report import (
    MethodResult,
    PromptRun,
    compare,
    document,
    measured_vs_ideal,
    plot,
    summarize,
    table,
    write_json,
)
from common.tokenization import eos_token_ids

REAL_METHODS = [
    "autoregressive",
    "assisted",
    "prompt-lookup",
    "sync-k2",
    "sync-k3",
    "pipespec-k2",
    "pipespec-k3",
]
SIM_METHODS = ["autoregressive", "sync-k2", "sync-k3", "pipespec-k2", "pipespec-k3"]
IN_PROCESS = ("autoregressive", "assisted", "prompt-lookup")
LOOKAHEAD = 8  # the paper's SD lookahead (§4.4)
NGRAM_SYNC_WAIT_S = 0.05  # sync: a level verifying the n-gram stops waiting for drafts after this
WARMUP_TEXT = "def add(a, b):"

MODEL_SETS = {
    "qwen": {
        "target": "qwen2.5-coder-1.5b",
        "mid": "qwen2.5-coder-0.5b",
        "mid_layers": None,
        "drafter_cost": 0.0,
        "mid_draft_vocab": 65536,  # the quantized 0.5B's, as deploy/configs/qwen-k3.toml
        "names": ("n-gram", "Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-1.5B"),
    },
    "smollm2": {
        "target": "smollm2-135m",
        "mid": "smollm2-135m",
        "mid_layers": 25,
        "drafter_cost": 0.45,
        "names": ("n-gram", "SmolLM2-135M (25/30 layers)", "SmolLM2-135M"),
    },
}


# ---------------------------------------------------------------------------- configs
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_verify_tokens=8", "dtype=bfloat16"]`` -> {"max_verify_tokens": 8, "dtype": "bfloat16"}.

    >>> parse_overrides(["max_lead=4", "dtype=float32", "sync_wait_s=0.5"])
    {'max_lead': 4, 'dtype': 'float32', 'sync_wait_s': 0.5}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def real_stages(
    models: dict[str, Any], method: str, overrides: dict[str, Any], backend: str = "hf"
) -> list[dict[str, Any]]:
    """Launcher ``[[stages]]`` for a real-model method (``sync-k2`` ... ``pipespec-k3``;
    ``pipespec-k1`` is the target alone, served). ``backend``: ``hf`` (fp32 transformers, one
    thread per model stage) or ``quantized`` (the GGUF files on the quantized runner, cores by
    the launcher's rule; the middle level is the 0.5B file, so Qwen only)."""
    from common.model_catalog import model_dir

    schedule, k = method.split("-k")
    if backend == "quantized":
        if models["mid_layers"] and k != "1":
            raise SystemExit("the quantized runner has no early-exit drafter: use --models qwen")
        target = {"backend": "quantized", "model": f"@{models['target']}"}
        mid = {"backend": "quantized", "model": f"@{models['mid']}"}
        if models.get("mid_draft_vocab"):
            mid["draft_vocab"] = models["mid_draft_vocab"]
        overrides = {k_: v for k_, v in overrides.items() if k_ != "dtype"}
    else:
        target = {"backend": "hf", "model": str(model_dir(models["target"])), "threads": 1}
        # a drafter's logits need not be batch-invariant (only the target's decide the output):
        # its lone one-token passes skip the padding the probe would pick (docs/batched-runner.md)
        mid = {"backend": "hf", "model": str(model_dir(models["mid"])), "threads": 1}
        mid["min_rows"] = 1
        if models["mid_layers"]:
            mid |= {"backend": "early-exit", "early_exit_layers": models["mid_layers"]}
    if k != "1" and schedule == "pipespec":
        # the model drafter below the target shares this machine's cores: what its drafts cost
        # the target (StageSettings.drafter_cost; the draft policy weighs it)
        target = target | {"drafter_cost": models["drafter_cost"]}
    levels = {"1": [target], "2": [mid, target], "3": [{"backend": "ngram"}, mid, target]}[k]
    shared = (
        {"schedule": "sync", "lookahead": LOOKAHEAD}
        if schedule == "sync"
        else {"schedule": "async"}
    )
    stages = []
    for level, table_ in enumerate(levels):
        stage = {"level": level, **table_, **shared}
        if schedule == "sync" and level > 0 and levels[level - 1]["backend"] == "ngram":
            stage["sync_wait_s"] = NGRAM_SYNC_WAIT_S  # the n-gram stalls where it has no match
        if table_["backend"] != "ngram":
            stage |= overrides
        else:
            stage |= {k_: v for k_, v in overrides.items() if k_ not in ("threads", "dtype")}
        stages.append(stage)
    return stages


def level_names(models: dict[str, Any], method: str) -> list[str]:
    ngram, mid, target = models["names"]
    if method in ("autoregressive", "pipespec-k1"):
        return [target]
    if method == "assisted":
        return [mid, target]
    if method == "prompt-lookup":
        return ["prompt lookup", target]
    return [mid, target] if method.endswith("k2") else [ngram, mid, target]


# ---------------------------------------------------------------------------- suites
def run_real(args, prompts: list[prompt_sets.Prompt], out: Path, log) -> list[MethodResult]:
    from benchmarks.hf_methods import InProcess, run_in_process
    from benchmarks.systems import bench_config, run_system
    from common.model_catalog import model_dir
    from common.tokenization import load_tokenizer

    models = MODEL_SETS[args.models]
    suite = args.models
    methods = [m for m in args.methods if m in REAL_METHODS]
    target_dir = str(model_dir(models["target"]))
    tokenizer = load_tokenizer(target_dir)
    eos = eos_token_ids(tokenizer, target_dir)
    ids = [(p.id, tokenizer.encode(p.text)) for p in prompts]
    warm_ids = tokenizer.encode(WARMUP_TEXT)
    results: list[MethodResult] = []

    in_process = [m for m in methods if m in IN_PROCESS]
    if "autoregressive" not in in_process:
        in_process.insert(0, "autoregressive")  # the reference every output is compared with
    runner = InProcess(
        target_dir,
        str(model_dir(models["mid"])) if "assisted" in in_process else None,
        assistant_layers=models["mid_layers"],
        threads=args.hf_threads,
        eos_ids=eos,
        dtype=args.dtype,
    )
    for method in in_process:
        log(f"[{suite}] {method} (in process, {runner.threads} threads) ...")
        t0 = time.perf_counter()
        r = run_in_process(
            runner,
            suite,
            method,
            level_names(models, method),
            ids,
            args.real_max_tokens,
            pld_tokens=args.pld_tokens,
            warmup=warm_ids,
        )
        results.append(r)
        log(
            f"[{suite}] {method}: {time.perf_counter() - t0:.0f} s"
            + (f" FAILED {r.error}" if r.error else "")
        )
    runner.close()
    del runner

    for method in methods:
        if method in IN_PROCESS:
            continue
        stages = real_stages(models, method, {"dtype": args.dtype, **args.stage_overrides})
        config = bench_config(target_dir, stages)
        log(f"[{suite}] {method} (services, {len(stages)} levels) ...")
        t0 = time.perf_counter()
        r = run_system(
            suite,
            method,
            level_names(models, method),
            config,
            [(p.id, p.text) for p in prompts],
            args.real_max_tokens,
            out / "logs",
            warmup=WARMUP_TEXT,
            profile=args.profile_stages,
        )
        results.append(r)
        log(
            f"[{suite}] {method}: {time.perf_counter() - t0:.0f} s"
            + (f" FAILED {r.error}" if r.error else "")
        )

    reference = (
        {r.prompt_id: r.tokens for r in results[0].runs} if results and results[0].runs else {}
    )
    for r in results:
        compare(r, reference)
    for temperature in args.temperatures:
        results += run_sampled(args, models, methods, prompts, ids, temperature, out, log)
    order = {m: i for i, m in enumerate(REAL_METHODS)}
    return sorted(results, key=lambda r: _sort_key(r.name, order))


def _sort_key(name: str, order: dict[str, int]) -> tuple:
    base, _, temperature = name.partition(" T=")
    return (float(temperature or 0), order.get(base, -1))


def sampling_for(temperature: float, top_p: float, index: int) -> dict[str, Any]:
    """The sampling fields of prompt ``index`` at ``temperature`` (a fixed seed per prompt)."""
    return {"temperature": temperature, "top_p": top_p, "seed": 1000 + index}


def run_sampled(args, models, methods, prompts, ids, temperature: float, out: Path, log):
    """The reference decoder and every pipespec method at one temperature; outputs compared
    with the reference decoder's."""
    from benchmarks.systems import bench_config, run_system
    from common.backends.hf import HFBackend
    from common.model_store import model_dir
    from common.sampling import SamplingParams
    from common.simnet import reference_decode
    from common.tokenization import eos_token_ids, load_tokenizer

    suite, target_dir = args.models, str(model_dir(models["target"]))
    eos = eos_token_ids(load_tokenizer(target_dir), target_dir)
    fields = {p.id: sampling_for(temperature, args.top_p, i) for i, p in enumerate(prompts)}
    import torch

    torch.set_num_threads(args.hf_threads)
    backend = HFBackend(target_dir, dtype=args.dtype)
    ref = MethodResult(
        suite=suite,
        name=f"reference T={temperature:g}",
        levels=[models["names"][2]],
        config={"where": "in process (reference decoder)", "top_p": args.top_p},
    )
    log(f"[{suite}] reference decoder T={temperature:g} ...")
    for pid, prompt_ids in ids:
        t0 = time.perf_counter()
        tokens = reference_decode(
            backend, prompt_ids, args.real_max_tokens, eos, SamplingParams(**fields[pid])
        )
        wall = time.perf_counter() - t0
        ref.runs.append(PromptRun(pid, tokens, wall, None, target_passes=len(tokens)))
    del backend
    results = [ref]
    for method in methods:
        if not method.startswith("pipespec"):
            continue
        stages = real_stages(models, method, {"dtype": args.dtype, **args.stage_overrides})
        config = bench_config(target_dir, stages)
        log(f"[{suite}] {method} T={temperature:g} (services) ...")
        results.append(
            run_system(
                suite,
                f"{method} T={temperature:g}",
                level_names(models, method),
                config,
                [(p.id, p.text) for p in prompts],
                args.real_max_tokens,
                out / "logs",
                warmup=WARMUP_TEXT,
                sampling=fields,
            )
        )
    reference = {r.prompt_id: r.tokens for r in ref.runs}
    for r in results:
        compare(r, reference)
    return results


def run_simulated(args, prompts: list[prompt_sets.Prompt], out: Path, log) -> list[MethodResult]:
    from benchmarks import sim_profile as sp
    from benchmarks.systems import bench_config, run_system

    levels = sp.derive_levels()
    tok_dir = save_simulation_tokenizer(out / "sim-tokenizer")
    ids = [(p.id, sp.sim_prompt(p.text)) for p in prompts]
    reference = {pid: sp.reference(x, args.sim_max_tokens) for pid, x in ids}
    methods = [m for m in args.methods if m in SIM_METHODS]
    if "autoregressive" not in methods:
        methods.insert(0, "autoregressive")  # every speedup is against it
    overrides = {k: v for k, v in args.stage_overrides.items() if k not in ("threads", "dtype")}
    results: list[MethodResult] = []
    for method in methods:
        names, _ = sp.hierarchies()[method]
        tables = sp.stage_tables(method, levels, tok_dir, overrides)
        config = bench_config(str(tok_dir), tables)
        log(f"[simulated] {method} (services, {len(tables)} levels) ...")
        t0 = time.perf_counter()
        r = run_system(
            "simulated",
            method,
            [levels[n].name for n in names],
            config,
            [(pid, sp.sim_text(x)) for pid, x in ids],
            args.sim_max_tokens,
            out / "logs",
            warmup=sp.sim_text(ids[0][1][:4]),
            profile=args.profile_stages,
        )
        results.append(r)
        log(
            f"[simulated] {method}: {time.perf_counter() - t0:.0f} s"
            + (f" FAILED {r.error}" if r.error else "")
        )
        results.append(sp.ideal_method(method, levels, ids, args.sim_max_tokens, overrides))
    for r in results:
        compare(r, reference)
    return results


# ---------------------------------------------------------------------------- summaries
def summaries(results: Sequence[MethodResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        base = next(
            (
                b
                for b in results
                if b.suite == r.suite and b.kind == r.kind and b.name == "autoregressive"
            ),
            None,
        )
        rows.append(summarize(r, base))
    return rows


def simulated_comparison(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Speedups of the simulated suite beside the paper's, and measured / ideal throughput."""
    from benchmarks.sim_profile import PAPER_MS_PER_TOKEN, PAPER_SPEEDUPS

    measured = {
        r["method"]: r
        for r in rows
        if r["suite"] == "simulated" and r["kind"] == "measured" and "error" not in r
    }
    ideal = {
        r["method"]: r
        for r in rows
        if r["suite"] == "simulated" and r["kind"] == "ideal" and "error" not in r
    }
    out: dict[str, Any] = {
        "methods": {},
        "note": (
            "speedups are over autoregressive decoding of the same (simulated) 70B; 'decode' excludes "
            "the time to the first token. The paper's Table 1/2 (HumanEval, LLaMA 1B/8B/70B, 4x A100): "
            "sync-k3 1.37x and pipespec-k3 2.54x over AR, so pipespec-k3 over sync-k3 = 2.54/1.37 = 1.85x."
        ),
    }
    for m, row in measured.items():
        i = ideal.get(m, {})
        out["methods"][m] = {
            "paper_speedup": PAPER_SPEEDUPS.get(m, 1.0 if m == "autoregressive" else None),
            "paper_ms_per_token": PAPER_MS_PER_TOKEN.get(m),
            "measured_speedup": row.get("speedup"),
            "measured_decode_speedup": row.get("decode_speedup"),
            "ideal_speedup": i.get("speedup"),
            "ideal_decode_speedup": i.get("decode_speedup"),
            "measured_ms_per_token": row.get("ms_per_token"),
            "ideal_ms_per_token": i.get("ms_per_token"),
            **({"vs_ideal": measured_vs_ideal(row, i)} if i else {}),
        }

    def over(a: dict, b: dict, key: str) -> float | None:
        return round(b[key] / a[key], 3) if a.get(key) and b.get(key) else None

    for kind, src in (("measured", measured), ("ideal", ideal)):
        if "pipespec-k3" in src and "sync-k3" in src:
            out[f"pipespec_k3_over_sync_k3_{kind}"] = over(
                src["pipespec-k3"], src["sync-k3"], "ms_per_token"
            )
            out[f"pipespec_k3_over_sync_k3_{kind}_decode"] = over(
                src["pipespec-k3"], src["sync-k3"], "decode_ms_per_token"
            )
    out["pipespec_k3_over_sync_k3_paper"] = round(2.54 / 1.37, 3)
    return out


def format_simulated(comp: dict[str, Any]) -> str:
    lines = [
        "Simulated paper profile (LLaMA 1B/8B/70B on A100), end to end, speedup over autoregressive:",
        f"{'method':<16}{'paper':>8}{'measured':>10}{'ideal':>8}{'measured/ideal tok/s':>22}",
    ]
    f = lambda v, s="": "-" if v is None else f"{v:.2f}{s}"  # noqa: E731
    for m, c in comp["methods"].items():
        share = c.get("vs_ideal", {}).get("share")
        lines.append(
            f"{m:<16}{f(c['paper_speedup'], 'x'):>8}{f(c['measured_speedup'], 'x'):>10}"
            f"{f(c['ideal_speedup'], 'x'):>8}{'-' if share is None else f'{100 * share:.1f}%':>22}"
        )
    lines.append(
        f"pipespec-k3 over sync-k3: paper {comp['pipespec_k3_over_sync_k3_paper']:.2f}x "
        f"(2.54x / 1.37x), measured {f(comp.get('pipespec_k3_over_sync_k3_measured'), 'x')}, "
        f"ideal {f(comp.get('pipespec_k3_over_sync_k3_ideal'), 'x')}"
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        )
        info["cpu_flags_avx512"] = "avx512f" in cpuinfo
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    try:
        import torch
        import transformers

        info |= {"torch": torch.__version__, "transformers": transformers.__version__}
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        info["git_dirty"] = bool(
            subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout
        )
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=("real", "simulated", "all"), default="all")
    parser.add_argument(
        "--models", choices=tuple(MODEL_SETS), default="qwen", help="real suite (default qwen)"
    )
    parser.add_argument("--prompts", choices=("humaneval", "prose", "both"), default="both")
    parser.add_argument("--n", type=int, default=2, help="prompts per set (default 2)")
    parser.add_argument(
        "--max-tokens", type=int, help="tokens per request (default: 32 real, 64 simulated)"
    )
    parser.add_argument(
        "--sim-max-tokens", type=int, help="simulated suite only (overrides --max-tokens)"
    )
    parser.add_argument("--methods", default=",".join(REAL_METHODS), help="comma-separated subset")
    parser.add_argument(
        "--temperatures",
        default="0.7,1.0",
        help="real suite: sampled pipespec rows at these temperatures ('' for none)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="sampled rows' top_p")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="real suite: every model, in process and in the stages (bfloat16 is lossy: "
        "outputs are compared with bfloat16 generate, as a rate)",
    )
    parser.add_argument(
        "--hf-threads", type=int, default=1, help="torch threads of the in-process methods"
    )
    parser.add_argument(
        "--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens (default 10)"
    )
    parser.add_argument(
        "--stage-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra StageSettings for every model stage, e.g. max_verify_tokens=8",
    )
    parser.add_argument(
        "--profile-stages",
        action="store_true",
        help="run every stage under cProfile and print where its main loop's time went",
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/<date-time>)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(REAL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {REAL_METHODS}")
    args.stage_overrides = parse_overrides(args.stage_set)
    args.temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    args.real_max_tokens = args.max_tokens or 32
    args.sim_max_tokens = args.sim_max_tokens or args.max_tokens or 64
    out = args.out or Path("results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    from common.logs import configure

    configure("warning", service="benchmark")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    meta = {
        "command": " ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    prompts = prompt_sets.load(args.prompts, args.n)
    meta["prompts"] = [{"id": p.id, "set": p.set, "text": p.text} for p in prompts]
    log(f"{len(prompts)} prompts ({args.prompts}), results in {out}")
    results: list[MethodResult] = []
    if args.suite in ("simulated", "all"):
        results += run_simulated(args, prompts, out, log)
    if args.suite in ("real", "all"):
        results += run_real(args, prompts, out, log)

    rows = summaries(results)
    comparisons: dict[str, Any] = {}
    text = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        suite_rows = [r for r in rows if r["suite"] == suite]
        text.append(
            table(
                suite_rows,
                title=f"== {suite} ({len(prompts)} prompts x "
                f"{args.sim_max_tokens if suite == 'simulated' else args.real_max_tokens} tokens) ==",
            )
        )
    profiled = [r for r in results if r.config.get("profile")]
    if profiled:
        from benchmarks.stage_profile import format_breakdown

        text.append(
            "Stage main loops under cProfile (profiling slows Python code, not the model calls):\n"
            + "\n".join(
                format_breakdown(f"{r.key} L{lv}", b)
                for r in profiled
                for lv, b in r.config["profile"].items()
            )
        )
    if any(r["suite"] == "simulated" for r in rows):
        comparisons["simulated"] = simulated_comparison(rows)
        text.append(format_simulated(comparisons["simulated"]))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = os.getloadavg()
    text.append(
        f"total wall time {meta['wall_s']:.0f} s; load average at start {meta['load_average_start'][0]:.2f}, "
        f"at end {meta['load_average_end'][0]:.2f}; {meta['machine'].get('cpu', '?')}, "
        f"{meta['machine'].get('cpus')} CPUs"
    )
    report = "\n\n".join(text)
    print("\n" + report)
    (out / "table.txt").write_text(report + "\n")
    write_json(out / "results.json", document(meta, results, rows, comparisons))
    try:
        from benchmarks.sim_profile import PAPER_SPEEDUPS

        plot(out / "benchmark.png", rows, paper={"autoregressive": 1.0, **PAPER_SPEEDUPS})
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'benchmark.png'}")
    failed = [r.key for r in results if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
