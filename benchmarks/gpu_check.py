"""Are PipeSpec systems on one CUDA device exact and fast against the target's ``generate``?

    python -m benchmarks.gpu_check                 # ~1B-parameter random Llama, every stage on cuda:0
    python -m benchmarks.gpu_check --small         # tiny models on the CPU: checks the script itself
    python -m benchmarks.gpu_check --out DIR       # also writes DIR/gpu_check.json and the stage logs

Nothing is downloaded. Random Llama models are built on the spot and saved (safetensors) under
``--work`` (default /tmp/pipespec-gpu-check), so every stage loads them through the real path:

* target T: ~1B parameters (hidden 2048, 20 layers, vocab 32000, word-level tokenizer
  "w3" ... "w31999"). Random models are chaotic, so the layers after the first ``early`` have
  their output projections (o_proj, down_proj) scaled by ``ALPHA``: later layers refine rather
  than rewrite the residual stream, as in trained models, and an early exit can agree with T.
* drafter N: T plus Gaussian noise of ``NOISE`` x each tensor's std (as big as T; agrees often).
* early-exit E: the first ``early`` layers of N plus its final norm and head (backend
  ``early-exit``, no extra file).

Tuned on the CPU at full size (3 prompts x 32 tokens, teacher-forced on T's greedy output): N
predicts T's next token 83 % of the time, E 57 %; without ALPHA an early exit agrees ~never.

Phases, in order (a failing phase is reported and the next one still runs):

1. ``ar``: the target alone, ``generate(do_sample=False)`` in this process, fp32, one prompt at a
   time: tokens/s per request, and the reference output every system must equal.
2. ``k2`` = [N, T] and ``k3`` = [E, N, T] (``--systems``; also ``k2-ee`` = [E, T]): systems
   started by ``deploy.launch`` (gateway + one process per stage, every stage on ``--device`` in
   float32), the same prompts sent one at a time over HTTP; exact-match count against (1),
   tokens/s per request, ``spec_decode_stats``, and where each stage process sits (nvidia-smi's
   compute processes, matched by pid, and the device's memory in use before and while running).
3. ``k2-bf16`` (unless ``--no-bf16`` or out of ``--budget-s``): [N, T] in bfloat16; its output
   depends on the verification window, so agreement is reported as a rate: the share of tokens
   before the first difference, against the fp32 reference and against T's own bf16 ``generate``.

Prints a table last; ``--out`` (default $OUT when set) gets gpu_check.json and logs.tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from benchmarks.tiny_models import random_llama, save_tokenizer  # noqa: E402
from common.backends.batched import Run  # noqa: E402
from common.backends.batched_hf import BatchedRunner  # noqa: E402
from deploy.harness import complete, exit_codes, loopback_config, running  # noqa: E402
from deploy.launch import System, plan_from_config  # noqa: E402

NOISE, ALPHA = 0.004, 0.1
FULL = dict(vocab=32000, hidden=2048, intermediate=5632, layers=20, heads=32, kv_heads=4, early=5)
SMALL = dict(vocab=512, hidden=64, intermediate=176, layers=6, heads=4, kv_heads=2, early=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- models


def build_models(
    size: dict, work: Path, device: torch.device, seed: int
) -> tuple[LlamaForCausalLM, Path, Path]:
    """T (kept in memory, fp32, on ``device``) and the directories of T and N."""
    shape = {k: v for k, v in size.items() if k != "early"}
    target = random_llama(**shape, init=0.05, max_positions=2048, seed=seed, device=device)
    with torch.no_grad():
        for layer in target.model.layers[size["early"] :]:
            layer.self_attn.o_proj.weight.mul_(ALPHA)
            layer.mlp.down_proj.weight.mul_(ALPHA)
    t_dir, n_dir = work / "target", work / "drafter"
    target.save_pretrained(t_dir)
    save_tokenizer(t_dir, size["vocab"])
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():  # N = T + noise, built in T's place and saved, then T restored
        saved = [p.detach().clone() for p in target.parameters()]
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=device) * NOISE * p.std())
        target.save_pretrained(n_dir)
        for p, s in zip(target.parameters(), saved):
            p.copy_(s)
        del saved
    save_tokenizer(n_dir, size["vocab"])
    params = sum(p.numel() for p in target.parameters())
    log(f"built T and N: {params / 1e6:.0f} M parameters each, saved under {work}")
    return target, t_dir, n_dir


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 32))] for _ in range(n)]


def text_of(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM, prompt: list[int], max_tokens: int, device: torch.device
) -> tuple[list[int], float]:
    ids = torch.tensor([prompt], device=device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
    )
    sync(device)
    return out[0, len(prompt) :].tolist(), time.perf_counter() - start


def run_ar(model, prompts, max_tokens, device) -> dict:
    generate(model, prompts[0], 32, device)  # warm-up: kernels, handles, allocator
    outs, rates = [], []
    for p in prompts:
        ids, secs = generate(model, p, max_tokens, device)
        outs.append(ids)
        rates.append(len(ids) / secs)
    return {"outputs": outs, "tokens_per_s": rates, "tokens": sum(map(len, outs))}


# ---------------------------------------------------------------- the target's passes

STEP_SHAPES = {"b1x1": (1, 1), "b8x1": (8, 1), "b8x4": (8, 4)}  # requests x tokens per request


@torch.inference_mode()
def time_passes(
    lm: LlamaForCausalLM, prompts, device: torch.device, graph_rows: int, iters: int
) -> tuple[dict, dict]:
    """Median ms of one :class:`BatchedRunner` pass of T for each shape in ``STEP_SHAPES`` (8
    requests prefilled with the prompts, cropped back after every timed pass), with piecewise
    CUDA graphs for passes up to ``graph_rows`` rows (0: eager); and each shape's logits."""
    runner = BatchedRunner(lm, kv_pool_tokens=8 * 256, weight_layout="row", graph_rows=graph_rows)
    requests = [f"r{i}" for i in range(8)]
    for r, p in zip(requests, (prompts * 8)[:8]):
        runner.open(r, 256)
        runner.step([Run(r, p, rows=1)])
    timings, logits = {"min_rows": runner.min_rows}, {}
    for name, (batch, tokens) in STEP_SHAPES.items():
        times = []
        for i in range(iters + 3):  # 3 warm-ups
            lengths = {r: runner.length(r) for r in requests[:batch]}
            runs = [Run(r, [5 + j for j in range(tokens)]) for r in lengths]
            sync(device)
            start = time.perf_counter()
            out = runner.step(runs)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
            for r, n in lengths.items():
                runner.crop(r, n)
        times.sort()
        timings[name] = round(1000 * times[len(times) // 2], 3)
        logits[name] = torch.cat([out[r].logits for r in requests[:batch]]).float().cpu()
    for r in requests:
        runner.close(r)
    return timings, logits


def run_passes(lm, prompts, device, graph_rows: int, iters: int) -> dict:
    """The target's pass time, eager against piecewise CUDA graphs, and how far their logits
    differ (on a GPU cuBLAS may pick other kernels for a bucket's padded rows)."""
    eager, eager_logits = time_passes(lm, prompts, device, 0, iters)
    graphs, graph_logits = time_passes(lm, prompts, device, graph_rows, iters)
    result = {"eager_ms": eager, "graphs_ms": graphs, "graph_rows": graph_rows}
    for name in STEP_SHAPES:
        a, b = eager_logits[name], graph_logits[name]
        result[f"{name}_max_abs_logit_diff"] = (a - b).abs().max().item()
        result[f"{name}_argmax_equal"] = f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{len(a)}"
    return result


# ---------------------------------------------------------------- systems


def gpu_processes() -> dict[int, str]:
    """pid -> used GPU memory, from nvidia-smi (empty where it is absent)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    procs = {}
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            procs[int(parts[0])] = parts[1]
    return procs


def gpu_used_gib(device: str) -> float | None:
    """Memory in use on ``device``, by every process (None if it is no CUDA device)."""
    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return round((total - free) / 2**30, 2)


def run_system(
    name: str,
    stages: list[dict],
    t_dir: Path,
    prompts,
    max_tokens: int,
    log_root: Path,
    threads: int,
    request_timeout_s: float,
) -> dict:
    stage_tables = [{"level": i, **s} for i, s in enumerate(stages)]
    config = loopback_config(str(t_dir), stage_tables, threads=threads, served_model_name="check")
    system = System(plan_from_config(config), log_root / name)
    result: dict[str, Any] = {
        "stages": [
            {
                k: s[k]
                for k in ("backend", "model", "dtype", "device", "early_exit_layers")
                if k in s
            }
            for s in stages
        ]
    }
    result["gpu_used_gib_before"] = gpu_used_gib(stages[-1]["device"])
    start = time.perf_counter()
    try:
        with (
            running(system, startup_timeout_s=180),
            httpx.Client(timeout=request_timeout_s) as http,
        ):
            result["startup_s"] = round(time.perf_counter() - start, 1)
            log(f"{name}: healthy after {result['startup_s']} s")
            complete(system.plan, text_of(prompts[0]), 8, http=http)  # warm-up
            placement = gpu_processes()
            result["gpu_used_gib_running"] = gpu_used_gib(stages[-1]["device"])
            result["nvidia_smi_pids"] = placement
            result["placement"] = [
                {
                    "name": c.spec.name,
                    "pid": c.process.pid,
                    "configured_device": c.spec.env.get("PIPESPEC_STAGE_DEVICE", "-"),
                    "gpu_memory": placement.get(
                        c.process.pid, "not listed" if placement else "unknown"
                    ),
                }
                for c in system.children
            ]
            responses = []
            for p in prompts:
                t0 = time.perf_counter()
                body = complete(system.plan, text_of(p), max_tokens, http=http)
                body["client_wall_s"] = time.perf_counter() - t0
                responses.append(body)
            with ThreadPoolExecutor(len(prompts)) as pool:  # every prompt at once
                t0 = time.perf_counter()
                together = list(
                    pool.map(
                        lambda p: complete(system.plan, text_of(p), max_tokens, http=http), prompts
                    )
                )
                wall = time.perf_counter() - t0
            result["concurrent_texts"] = [r["choices"][0]["text"] for r in together]
            result["concurrent_tokens_per_s"] = (
                sum(r["spec_decode_stats"]["completion_tokens"] for r in together) / wall
            )
        result["texts"] = [r["choices"][0]["text"] for r in responses]
        result["stats"] = [r["spec_decode_stats"] for r in responses]
        result["client_tokens_per_s"] = [
            r["spec_decode_stats"]["completion_tokens"] / r["client_wall_s"] for r in responses
        ]
    except Exception as exc:  # noqa: BLE001 - reported, and the next phase still runs
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["log_tails"] = {c.spec.name: c.tail(15) for c in system.children}
        log(f"{name}: FAILED {result['error']}")
        for child, tail in result["log_tails"].items():
            print(f"--- {child}\n{tail}", flush=True)
    finally:
        result["exit_codes"] = exit_codes(system)
    return result


def prefix_share(got: list[str], ref: list[str]) -> float:
    """Share of the reference's tokens before the first difference."""
    n = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return n / max(len(ref), 1)


def compare(result: dict, reference: list[list[int]], name: str, tokenizer) -> dict:
    """Exact: same text and token count as ``reference`` (decoded as the gateway decodes)."""
    words = [t.split() for t in result["texts"]]
    refs = [tokenizer.decode(r, skip_special_tokens=True).split() for r in reference]
    counts = [s["completion_tokens"] for s in result["stats"]]
    exact = sum(w == r and c == len(ids) for w, r, c, ids in zip(words, refs, counts, reference))
    out = {
        f"exact_vs_{name}": exact,
        f"prefix_share_vs_{name}": sum(map(prefix_share, words, refs)) / len(refs),
    }
    if "concurrent_texts" in result:
        together = [t.split() for t in result["concurrent_texts"]]
        out[f"concurrent_exact_vs_{name}"] = sum(w == r for w, r in zip(together, refs))
    return out


# ---------------------------------------------------------------- main


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(report: dict) -> str:
    ar = report["ar"]
    ar_rate = mean(ar["tokens_per_s"])
    lines = [
        f"device {report['device_name']}  torch {report['torch']}  transformers {report['transformers']}  "
        f"model {report['params_m']} M params  {report['prompts']} prompts x {report['max_tokens']} tokens",
        f"{'run':<9} {'exact':>7} {'prefix':>7} {'tok/s':>8} {'min':>7} {'max':>7} {'speedup':>8} "
        f"{'tok/pass':>8} {'accept by level':<22} startup",
        f"{'ar fp32':<9} {'ref':>7} {'':>7} {ar_rate:8.1f} {min(ar['tokens_per_s']):7.1f} "
        f"{max(ar['tokens_per_s']):7.1f} {1.0:8.2f}",
    ]
    if "ar_bf16" in report:
        b = report["ar_bf16"]["tokens_per_s"]
        lines.append(
            f"{'ar bf16':<9} {'':>7} {'':>7} {mean(b):8.1f} {min(b):7.1f} {max(b):7.1f} {mean(b) / ar_rate:8.2f}"
        )
    for name, res in report["systems"].items():
        if "error" in res:
            lines.append(f"{name:<9} FAILED: {res['error'][:150]}")
            continue
        rates = [s["tokens_per_s"] for s in res["stats"]]
        tpp = mean([s["tokens_per_target_pass"] for s in res["stats"]])
        acc = []
        for level in range(1, len(res["stages"])):
            d = sum(
                a["draft_tokens"]
                for s in res["stats"]
                for a in s["acceptance"]
                if a["level"] == level
            )
            k = sum(
                a["accepted_tokens"]
                for s in res["stats"]
                for a in s["acceptance"]
                if a["level"] == level
            )
            acc.append(f"L{level} {k / d:.0%}" if d else f"L{level} -")
        exact = res.get("exact_vs_ar_fp32", "-")
        prefix = res.get("prefix_share_vs_ar_fp32", float("nan"))
        lines.append(
            f"{name:<9} {exact:>3}/{report['prompts']:<3} {prefix:7.3f} {mean(rates):8.1f} {min(rates):7.1f} "
            f"{max(rates):7.1f} {mean(rates) / ar_rate:8.2f} {tpp:8.2f} {' '.join(acc):<22} "
            f"{res['startup_s']} s"
        )
        if "exact_vs_ar_bf16" in res:
            lines.append(
                f"{'':<9} vs bf16 generate: exact {res['exact_vs_ar_bf16']}/{report['prompts']}, "
                f"prefix share {res['prefix_share_vs_ar_bf16']:.3f}, speed-up "
                f"{mean(rates) / mean(report['ar_bf16']['tokens_per_s']):.2f}"
            )
    passes = report.get("passes", {})
    if "error" in passes:
        lines.append(f"target passes: FAILED {passes['error'][:150]}")
    elif passes:
        lines.append(
            f"target passes (BatchedRunner, median ms; graphs for up to {passes['graph_rows']} rows; "
            f"min_rows {passes['eager_ms']['min_rows']}):"
        )
        for shape in STEP_SHAPES:
            e, g = passes["eager_ms"][shape], passes["graphs_ms"][shape]
            lines.append(
                f"  {shape:<5} eager {e:8.2f}  graphs {g:8.2f}  {e / g:5.2f}x  "
                f"max|dlogit| {passes[f'{shape}_max_abs_logit_diff']:.2e}  "
                f"argmax equal {passes[f'{shape}_argmax_equal']}"
            )
    k1 = report["systems"].get("k1", {}).get("concurrent_tokens_per_s")
    lines.append(f"all {report['prompts']} prompts at once (aggregate tokens/s, exact vs ar fp32):")
    for name, res in report["systems"].items():
        rate = res.get("concurrent_tokens_per_s")
        if rate is not None:
            ratio = f"{rate / k1:5.2f}x k1" if k1 else ""
            lines.append(
                f"  {name:<9} {rate:8.1f}  exact {res.get('concurrent_exact_vs_ar_fp32', '-')}"
                f"/{report['prompts']}  {ratio}"
            )
    lines.append(
        "placement: configured device / GPU memory per process (nvidia-smi); device memory in use "
        "before start -> while running"
    )
    for name, res in report["systems"].items():
        where = ", ".join(
            f"{p['name']}={p['configured_device']}/{p['gpu_memory']}"
            for p in res.get("placement", [])
        )
        lines.append(
            f"  {name}: {where or '-'}; {res.get('gpu_used_gib_before')} -> "
            f"{res.get('gpu_used_gib_running')} GiB"
        )
    lines.append(
        f"exit codes all 0: {all(c == 0 for r in report['systems'].values() for c in r['exit_codes'].values())}"
        f"; total {report['elapsed_s']:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--small", action="store_true", help="tiny models, 3 prompts x 16 tokens (CPU check)"
    )
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, help="default 8 (3 with --small)")
    parser.add_argument("--max-tokens", type=int, help="default 128 (16 with --small)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage")
    parser.add_argument(
        "--systems",
        default="k1,k1-eager,k2,k3",
        help="fp32 systems, of k1=[T], k2=[N,T], k3=[E,N,T], k2-ee=[E,T]; -eager: no CUDA graphs",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 phase")
    parser.add_argument(
        "--graph-rows", type=int, default=128, help="passes phase: largest pass in CUDA graphs"
    )
    parser.add_argument("--pass-iters", type=int, default=50, help="timed passes per shape")
    parser.add_argument(
        "--budget-s", type=float, default=220, help="skip bf16 if this many s have passed"
    )
    parser.add_argument("--request-timeout-s", type=float, default=120, help="per HTTP request")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipespec-gpu-check"))
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    size = SMALL if args.small else FULL
    n_prompts = args.prompts or (3 if args.small else 8)
    max_tokens = args.max_tokens or (16 if args.small else 128)
    threads = 1 if args.small else args.threads
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    report: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": size,
        "noise": NOISE,
        "alpha": ALPHA,
        "prompts": n_prompts,
        "max_tokens": max_tokens,
        "systems": {},
    }
    log(f"{report['device_name']}, torch {report['torch']}, transformers {report['transformers']}")
    target, t_dir, n_dir = build_models(size, args.work, device, args.seed)
    report["params_m"] = round(sum(p.numel() for p in target.parameters()) / 1e6)
    prompts = make_prompts(n_prompts, size["vocab"], args.seed + 7)
    tokenizer = transformers.AutoTokenizer.from_pretrained(t_dir)

    def save() -> None:  # after every phase, so a run cut short still leaves its numbers
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            report["elapsed_s"] = time.perf_counter() - began
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    report["ar"] = run_ar(target, prompts, max_tokens, device)
    log(
        f"ar fp32: {mean(report['ar']['tokens_per_s']):.1f} tokens/s, {report['ar']['tokens']} tokens"
    )
    save()
    if device.type == "cuda":
        report["ar_gpu_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    try:
        report["passes"] = run_passes(target, prompts, device, args.graph_rows, args.pass_iters)
        log(f"passes: {report['passes']}")
    except Exception as exc:  # noqa: BLE001 - reported, and the next phase still runs
        report["passes"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"passes: FAILED {report['passes']['error']}")
    save()

    fp32 = {"dtype": "float32", "device": str(device)}
    N = {"backend": "hf", "model": str(n_dir), **fp32}
    E = {"backend": "early-exit", "model": str(n_dir), "early_exit_layers": size["early"], **fp32}
    T = {"backend": "hf", "model": str(t_dir), **fp32}
    logs = args.work / "logs"
    eager = {"cuda_graph_max_tokens": 0}
    hierarchies = {
        "k1": [T],
        "k1-eager": [T | eager],
        "k2": [N, T],
        "k3": [E, N, T],
        "k3-eager": [E | eager, N | eager, T | eager],
        "k2-ee": [E, T],
    }
    for name in args.systems.split(","):
        stages = hierarchies[name]
        res = run_system(
            name, stages, t_dir, prompts, max_tokens, logs, threads, args.request_timeout_s
        )
        if "texts" in res:
            res |= compare(res, report["ar"]["outputs"], "ar_fp32", tokenizer)
            log(
                f"{name}: exact {res['exact_vs_ar_fp32']}/{n_prompts}, "
                f"{mean([s['tokens_per_s'] for s in res['stats']]):.1f} tokens/s"
            )
        report["systems"][name] = res
        save()

    if not args.no_bf16 and time.perf_counter() - began < args.budget_s:
        try:
            target = target.to(torch.bfloat16)
            report["ar_bf16"] = run_ar(target, prompts, max_tokens, device)
            log(f"ar bf16: {mean(report['ar_bf16']['tokens_per_s']):.1f} tokens/s")
        except Exception as exc:  # noqa: BLE001
            report["ar_bf16_error"] = f"{type(exc).__name__}: {exc}"
        del target
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bf16 = {"dtype": "bfloat16"}
        res = run_system(
            "k2-bf16",
            [N | bf16, T | bf16],
            t_dir,
            prompts,
            max_tokens,
            logs,
            threads,
            args.request_timeout_s,
        )
        if "texts" in res:
            res |= compare(res, report["ar"]["outputs"], "ar_fp32", tokenizer)
            if "ar_bf16" in report:
                res |= compare(res, report["ar_bf16"]["outputs"], "ar_bf16", tokenizer)
        report["systems"]["k2-bf16"] = res
    elif not args.no_bf16:
        log("bf16 phase skipped: past --budget-s")

    report["elapsed_s"] = time.perf_counter() - began
    table = summarize(report)
    report["table"] = table
    save()
    if args.out is not None:
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
    print("\n" + table, flush=True)
    fp32_ok = all(
        r.get("exact_vs_ar_fp32") == n_prompts
        for k, r in report["systems"].items()
        if "bf16" not in k
    )
    return 0 if fp32_ok else 1


if __name__ == "__main__":
    sys.exit(main())
