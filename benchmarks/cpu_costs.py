"""What a verification pass costs on this CPU, and what int8 would change: a microbenchmark
behind the benchmark's profiling notes.

    python -m benchmarks.cpu_costs curve --model qwen2.5-coder-1.5b --threads 1 --dtype float32
    python -m benchmarks.cpu_costs curve --model qwen2.5-coder-1.5b --threads 1 --dtype int8
    python -m benchmarks.cpu_costs int8 --n 2 --max-tokens 32     # agreement and speed, in process

``curve``: median ms of one forward pass over k new tokens after a 48-token cache (what a
verifier pays for a window of k - 1 drafts), for each k.

``alpha``: teacher-forced agreement of the middle model with the target on the benchmark's
prompts (the target's own greedy continuation, one forward pass each): the i.i.d. α of Eq. 1.

``whatif``: the ideal schedule (``common.simnet``, zero overhead) with levels whose pass cost is a
measured cost curve (``TableCostBackend``, interpolated) and agreement α: autoregressive, sync
speculative decoding (lookahead 8) and PipeSpec k=2 for fp32 / bf16 / int8 curves, and PipeSpec
with a *minimum window* (a verifier ignores fewer than ``m`` drafts and makes its 1-token step
instead: the engine change this CPU's cost curve asks for; emulated here by a subclass of the
engine, in the simulation only).

``int8``: ``torch.ao.quantization.quantize_dynamic`` applied to every level (target and
assistant alike), then on the benchmark's prompts: the int8 target's greedy output against the
fp32 target's (agreement, a rate: int8-dynamic logits depend on the window, so it can never be
exact), and int8 autoregressive vs int8 assisted generation (speed, and whether assisted output
equals int8 autoregressive output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def load(model: str, dtype: str, layers: int | None = None):
    import torch

    from common.backends.hf import load_causal_lm
    from common.model_catalog import model_dir

    lm = load_causal_lm(str(model_dir(model)), "float32" if dtype == "int8" else dtype, layers)
    if dtype == "int8":
        lm = torch.ao.quantization.quantize_dynamic(lm, {torch.nn.Linear}, dtype=torch.qint8)
    return lm


def neighbour(model: str, dtype: str) -> None:
    """Decode forever, one token per pass (a drafter stage that never waits): ``curve
    --neighbour`` runs this in a second process to measure what two stages on two cores cost
    each other (shared memory bandwidth and L3)."""
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(1)
    lm = load(model, dtype)
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        lm(input_ids=torch.arange(1000, 1048).unsqueeze(0), cache=cache, use_cache=True)
        print("decoding", flush=True)
        while True:
            lm(input_ids=torch.tensor([[2000]]), cache=cache, use_cache=True)
            cache.crop(-1)


def curve(
    model: str,
    threads: int,
    dtype: str,
    ks: list[int],
    repeats: int = 3,
    neighbour_model: str | None = None,
) -> dict[int, float]:
    import subprocess

    import torch

    torch.set_num_threads(threads)
    lm = load(model, dtype)
    other = None
    if neighbour_model:
        other = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.cpu_costs",
                "neighbour",
                "--model",
                neighbour_model,
                "--dtype",
                dtype,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        while "decoding" not in (other.stdout.readline() or "decoding"):  # loaded, first pass done
            pass
    try:
        return _curve(lm, ks, repeats)
    finally:
        if other is not None:
            other.terminate()
            other.wait()


def _curve(lm, ks: list[int], repeats: int) -> dict[int, float]:
    import torch
    from transformers import DynamicCache

    ctx = torch.arange(1000, 1048).unsqueeze(0)
    out: dict[int, float] = {}
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        lm(input_ids=ctx, cache=cache, use_cache=True)
        for k in [1, 1] + ks:  # two warm-up passes
            times = []
            for _ in range(repeats):
                ids = torch.arange(2000, 2000 + k).unsqueeze(0)
                t0 = time.perf_counter()
                lm(input_ids=ids, cache=cache, use_cache=True)
                times.append(1000 * (time.perf_counter() - t0))
                cache.crop(-k)
            out[k] = round(statistics.median(times), 1)
    return out


def int8_study(args) -> dict[str, Any]:
    import torch

    from benchmarks import prompts as prompt_sets
    from benchmarks.hf_methods import InProcess
    from benchmarks.report import common_prefix
    from benchmarks.run import MODEL_SETS
    from common.model_catalog import model_dir
    from common.tokenization import eos_token_ids, load_tokenizer

    models = MODEL_SETS[args.models]
    target_dir = str(model_dir(models["target"]))
    tok = load_tokenizer(target_dir)
    eos = eos_token_ids(tok, target_dir)
    prompts = prompt_sets.load(args.prompts, args.n)
    ids = [(p.id, tok.encode(p.text)) for p in prompts]
    runner = InProcess(
        target_dir,
        str(model_dir(models["mid"])),
        assistant_layers=models["mid_layers"],
        threads=args.threads,
        eos_ids=eos,
    )
    warm = tok.encode("def add(a, b):")
    runner.generate(warm, 4, "autoregressive")
    fp32 = {pid: runner.generate(x, args.max_tokens, "autoregressive") for pid, x in ids}
    t0 = time.perf_counter()
    runner.log.remove()
    runner.assistant_log.remove()
    runner.model = torch.ao.quantization.quantize_dynamic(
        runner.model, {torch.nn.Linear}, dtype=torch.qint8
    )
    runner.assistant = torch.ao.quantization.quantize_dynamic(
        runner.assistant, {torch.nn.Linear}, dtype=torch.qint8
    )
    from benchmarks.hf_methods import CallLog

    runner.log, runner.assistant_log = CallLog(runner.model), CallLog(runner.assistant)
    quantize_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "quantize_s": round(quantize_s, 1),
        "threads": runner.threads,
        "methods": {},
    }
    results = {}
    for method in ("autoregressive", "assisted", "prompt-lookup"):
        runner.generate(warm, 4, method)
        results[method] = {pid: runner.generate(x, args.max_tokens, method) for pid, x in ids}
    for name, runs in (
        ("fp32 autoregressive", fp32),
        *((f"int8 {m}", r) for m, r in results.items()),
    ):
        tokens = sum(len(r.tokens) for r in runs.values())
        wall = sum(r.wall_s for r in runs.values())
        vs_fp32 = [
            common_prefix(r.tokens, fp32[pid].tokens) / max(1, len(fp32[pid].tokens))
            for pid, r in runs.items()
        ]
        int8_ar = results["autoregressive"]
        vs_int8 = [r.tokens == int8_ar[pid].tokens for pid, r in runs.items()]
        out["methods"][name] = {
            "ms_per_token": round(1000 * wall / tokens, 1),
            "tokens": tokens,
            "tokens_per_pass": round(tokens / sum(r.target_passes for r in runs.values()), 2),
            "agreement_with_fp32_greedy": round(sum(vs_fp32) / len(vs_fp32), 3),
            "equal_to_int8_autoregressive": f"{sum(vs_int8)}/{len(vs_int8)}",
        }
    return out


# Cost curves measured here (``curve``, 1 thread, ms for k = 1, 2, 3, 4, 5, 6, 8, 9, 12, 16 tokens
# after a 48-token cache). Keys: (model, dtype).
CURVE_KS = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16)
# Measured on this machine (load average 1.5-2.5; others' tests come and go, so +-10-30 %):
#   python -m benchmarks.cpu_costs curve --model M --dtype D [--neighbour OTHER]
# "target"/"mid": alone; "..._busy": while the other model decodes in a second process (what an
# asynchronous stage pays; the synchronous schedule alternates, so it pays the alone cost).
# int8 was measured alone only (the stages cannot load int8 models).
WHATIF_CURVES: dict[str, dict[str, tuple[float, ...]]] = {
    "float32": {
        "target": (298.3, 635.2, 916.2, 552.6, 598.2, 609.1, 640.9, 713.1, 753.7, 885.4),
        "target_busy": (310.4, 649.4, 933.1, 579.8, 780.5, 730.3, 771.8, 849.8, 925.1, 1163.4),
        "mid": (112.2, 230.1, 313.8, 199.4, 224.2, 226.4, 232.7, 261.3, 269.2, 305.1),
        "mid_busy": (125.5, 272.0, 341.2, 217.0, 259.9, 237.1, 258.6, 291.9, 308.0, 333.7),
    },
    "bfloat16": {
        "target": (193.1, 191.0, 188.2, 192.6, 204.5, 208.6, 215.8, 227.7, 247.1, 293.3),
        "target_busy": (200.6, 197.2, 197.8, 199.4, 207.8, 219.4, 229.1, 232.7, 262.4, 279.9),
        "mid": (72.3, 74.7, 75.5, 75.7, 77.2, 80.9, 89.7, 90.1, 96.5, 103.7),
        "mid_busy": (84.8, 87.0, 91.2, 91.8, 93.5, 96.2, 99.5, 107.0, 111.1, 123.7),
    },
    "int8": {
        "target": (49.5, 55.0, 58.1, 59.1, 62.2, 65.8, 72.7, 94.1, 100.3, 115.0),
        "mid": (24.4, 28.0, 32.5, 35.8, 38.1, 40.2, 41.4, 49.3, 53.7, 60.6),
    },
}
# Teacher-forced agreement 0.5B -> 1.5B (``alpha --n 4 --max-tokens 48``: 8 prompts, 384 positions).
WHATIF_ALPHAS = {"float32": 0.7839, "bfloat16": 0.7708, "int8": 0.737}


class TableCostBackend:
    """A SimulatedBackend whose pass over n tokens costs ``curve(n)`` ms (linear between the
    measured points, extrapolated from the last two)."""

    @staticmethod
    def make(
        agreement: float, ks: tuple[int, ...], ms: tuple[float, ...], seed: int, vocab: int, sleep
    ):
        from common.backends.simulated import SimulatedBackend

        class _Backend(SimulatedBackend):
            def pass_seconds(self, n_tokens: int) -> float:
                return interpolate(ks, ms, max(1, n_tokens)) / 1000.0

        return _Backend(agreement=agreement, seed=seed, vocab=vocab, cost_ms=ms[0], sleep=sleep)


def interpolate(ks: tuple[int, ...], ms: tuple[float, ...], n: int) -> float:
    """Linear between the points, extrapolated from the last two.

    >>> interpolate((1, 2, 4), (10.0, 20.0, 24.0), 3), interpolate((1, 2, 4), (10.0, 20.0, 24.0), 6)
    (22.0, 28.0)
    """
    for (k0, m0), (k1, m1) in zip(zip(ks, ms), zip(ks[1:], ms[1:])):
        if n <= k1:
            return m0 + (m1 - m0) * (n - k0) / (k1 - k0)
    (k0, m0), (k1, m1) = (ks[-2], ms[-2]), (ks[-1], ms[-1])
    return m1 + (m1 - m0) * (n - k1) / (k1 - k0)


def whatif_run(
    curves: list[tuple[tuple[int, ...], tuple[float, ...]]],
    agreements: list[float],
    stage: dict[str, Any],
    prompts: list[list[int]],
    max_tokens: int,
    min_drafts: int = 0,
) -> dict[str, Any]:
    """Ideal schedule for levels with cost curves; ``min_drafts``: verifiers ignore fewer drafts."""
    from dataclasses import replace

    from benchmarks.sim_profile import SIM_SEED, SIM_VOCAB
    from common.settings import StageSettings
    from common.simnet import build, run_request

    config = StageSettings(
        level=0, backend="simulated", request_ttl_s=1e6, done_retention_s=1e6, **stage
    ).engine_config()
    config = replace(config, min_drafts=min_drafts)
    backends = [
        lambda sleep, ks=ks, ms=ms, a=a: TableCostBackend.make(
            a, ks, ms, SIM_SEED, SIM_VOCAB, sleep
        )
        for (ks, ms), a in zip(curves, agreements)
    ]
    tokens = wall = passes = 0.0
    for i, prompt in enumerate(prompts):
        h = build(backends, config=config, resend_after=4e5, tick_every=0.05)
        req = run_request(h, prompt, max_tokens, request_id=f"w{i}", max_time=1e5)
        assert req is not None
        tokens += len(req.tokens)
        wall += h.net.now
        passes += req.stats[-1].forward_passes
    return {
        "ms_per_token": round(1000 * wall / tokens, 1),
        "tokens_per_pass": round(tokens / passes, 2),
    }


def padded(
    curve: tuple[tuple[int, ...], tuple[float, ...]],
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The curve of a backend that pads a 2- or 3-token pass to 4 tokens when that is cheaper
    (fp32 MKL: 2 and 3 rows cost more than 4), and drops the extra predictions."""
    ks, ms = curve
    four = interpolate(ks, ms, 4)
    return ks, tuple(min(m, four) if k in (2, 3) else m for k, m in zip(ks, ms))


def whatif(
    curves: dict[str, dict[str, tuple[float, ...]]],
    alphas: dict[str, float],
    max_tokens: int = 128,
    n_prompts: int = 8,
) -> list[dict[str, Any]]:
    """For each dtype: AR, sync-k2 (lookahead 8 and 4), PipeSpec k=2 (with and without the
    measured slow-down of running beside the other stage; window caps) and PipeSpec with a
    minimum window of 2 and 3 drafts; drafter = "mid", target = "target"."""
    prompts = [[3 + i, 5 + 2 * i, 7 + i] for i in range(n_prompts)]
    rows = []
    for dtype, c in curves.items():
        mid, target = (CURVE_KS, c["mid"]), (CURVE_KS, c["target"])
        mid_b, target_b = (
            (CURVE_KS, c.get("mid_busy", c["mid"])),
            (CURVE_KS, c.get("target_busy", c["target"])),
        )
        a = alphas[dtype]
        ar = whatif_run([target], [1.0], {}, prompts, max_tokens)
        variants = [
            ("autoregressive", [target], [1.0], {}, 0),
            (
                "sync-k2 (lookahead 8)",
                [mid, target],
                [a, 1.0],
                {"schedule": "sync", "lookahead": 8},
                0,
            ),
            (
                "sync-k2 (lookahead 4)",
                [mid, target],
                [a, 1.0],
                {"schedule": "sync", "lookahead": 4},
                0,
            ),
            ("pipespec-k2 (no contention)", [mid, target], [a, 1.0], {}, 0),
            ("pipespec-k2", [mid_b, target_b], [a, 1.0], {}, 0),
            ("pipespec-k2 max_verify 3", [mid_b, target_b], [a, 1.0], {"max_verify_tokens": 3}, 0),
            ("pipespec-k2 max_lead 4", [mid_b, target_b], [a, 1.0], {"max_lead": 4}, 0),
            ("pipespec-k2 min window 2", [mid_b, target_b], [a, 1.0], {}, 2),
            ("pipespec-k2 min window 3", [mid_b, target_b], [a, 1.0], {}, 3),
            ("pipespec-k2 pad 2-3 to 4", [padded(mid_b), padded(target_b)], [a, 1.0], {}, 0),
            (
                "sync-k2 (lookahead 8) pad",
                [padded(mid), padded(target)],
                [a, 1.0],
                {"schedule": "sync", "lookahead": 8},
                0,
            ),
        ]
        for name, cs, al, stage, m in variants:
            res = (
                ar
                if name == "autoregressive"
                else whatif_run(cs, al, stage, prompts, max_tokens, m)
            )
            rows.append(
                {
                    "dtype": dtype,
                    "alpha": a,
                    "method": name,
                    **res,
                    "speedup": round(ar["ms_per_token"] / res["ms_per_token"], 3),
                }
            )
    return rows


def invariance(args) -> dict[str, Any]:
    """Batch invariance of the target: generate greedily one token at a time, then recompute the
    same positions in windows of ``--window`` tokens (a verification pass) and count the positions
    whose argmax differs. 0 means verification reproduces sequential greedy decoding exactly."""
    import torch
    from transformers import DynamicCache

    from benchmarks import prompts as prompt_sets
    from benchmarks.run import MODEL_SETS
    from common.model_catalog import model_dir
    from common.tokenization import load_tokenizer

    torch.set_num_threads(args.threads)
    models = MODEL_SETS[args.models]
    tok = load_tokenizer(str(model_dir(models["target"])))
    lm = load(models["target"], args.dtype)
    differ = total = 0
    with torch.inference_mode():
        for p in prompt_sets.load(args.prompts, args.n):
            ids = tok.encode(p.text)
            cache = DynamicCache(config=lm.config)
            lm(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
            seq, last = list(ids), ids[-1]
            for _ in range(args.max_tokens):  # sequential greedy: one token per pass
                last = int(
                    lm(input_ids=torch.tensor([[last]]), cache=cache, use_cache=True)
                    .logits[0, -1]
                    .argmax()
                )
                seq.append(last)
            cache.crop(len(ids) - 1 - cache.get_seq_length())
            for start in range(
                len(ids) - 1, len(seq) - 1, args.window
            ):  # the same tokens, in windows
                window = seq[start : start + args.window]
                preds = (
                    lm(input_ids=torch.tensor([window]), cache=cache, use_cache=True)
                    .logits[0]
                    .argmax(-1)
                    .tolist()
                )
                want = seq[start + 1 : start + 1 + len(window)]
                differ += sum(a != b for a, b in zip(preds, want))
                total += len(want)
    return {
        "dtype": args.dtype,
        "window": args.window,
        "positions": total,
        "argmax_differs": differ,
    }


def alpha(args) -> dict[str, Any]:
    """Teacher-forced agreement of the middle model with the target, per dtype."""
    import torch

    from benchmarks import prompts as prompt_sets
    from benchmarks.run import MODEL_SETS
    from common.model_catalog import model_dir
    from common.tokenization import load_tokenizer

    torch.set_num_threads(args.threads)
    models = MODEL_SETS[args.models]
    tok = load_tokenizer(str(model_dir(models["target"])))
    prompts = prompt_sets.load(args.prompts, args.n)
    target, mid = (
        load(models["target"], args.dtype),
        load(models["mid"], args.dtype, models["mid_layers"]),
    )
    agree = total = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok.encode(p.text)])
            out = target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                do_sample=False,
            )
            n = out.shape[1] - ids.shape[1]
            preds = mid(input_ids=out).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
            agree += int((preds == out[0, ids.shape[1] :]).sum())
            total += n
    return {
        "models": args.models,
        "dtype": args.dtype,
        "alpha": round(agree / total, 4),
        "positions": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_costs", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--model", default="qwen2.5-coder-1.5b")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "int8"), default="float32")
    c.add_argument("--ks", default="1,2,3,4,5,6,8,9,12,16")
    c.add_argument("--neighbour", help="a model decoding in a second process meanwhile")
    nb = sub.add_parser("neighbour")
    nb.add_argument("--model", required=True)
    nb.add_argument("--dtype", default="float32")
    a = sub.add_parser("alpha")
    a.add_argument("--models", default="qwen")
    a.add_argument("--prompts", default="both")
    a.add_argument("--n", type=int, default=2)
    a.add_argument("--max-tokens", type=int, default=32)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32")
    v = sub.add_parser("invariance")
    v.add_argument("--models", default="qwen")
    v.add_argument("--prompts", default="both")
    v.add_argument("--n", type=int, default=2)
    v.add_argument("--max-tokens", type=int, default=32)
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--window", type=int, default=4)
    v.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="bfloat16")
    w = sub.add_parser("whatif")
    w.add_argument("--max-tokens", type=int, default=128)
    i = sub.add_parser("int8")
    i.add_argument("--models", default="qwen")
    i.add_argument("--prompts", default="both")
    i.add_argument("--n", type=int, default=2)
    i.add_argument("--max-tokens", type=int, default=32)
    i.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from common.logs import configure

    configure("warning")
    if args.cmd == "curve":
        ks = [int(k) for k in args.ks.split(",")]
        res = curve(args.model, args.threads, args.dtype, ks, neighbour_model=args.neighbour)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "threads": args.threads,
                    "dtype": args.dtype,
                    "neighbour": args.neighbour,
                    "ms": res,
                }
            )
        )
    elif args.cmd == "neighbour":
        neighbour(args.model, args.dtype)
    elif args.cmd == "alpha":
        print(json.dumps(alpha(args)))
    elif args.cmd == "invariance":
        print(json.dumps(invariance(args)))
    elif args.cmd == "whatif":
        for row in whatif(WHATIF_CURVES, WHATIF_ALPHAS, args.max_tokens):
            print(
                f"{row['dtype']:<9} α={row['alpha']:.2f}  {row['method']:<26} {row['ms_per_token']:>7.1f} ms/tok"
                f"  {row['tokens_per_pass']:>5.2f} tok/pass  {row['speedup']:.2f}x"
            )
    else:
        print(json.dumps(int8_study(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
