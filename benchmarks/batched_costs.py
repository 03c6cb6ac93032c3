"""What does a pass cost, batched or not, by requests and tokens? The numbers behind
docs/batched-runner.md and the CPU notes of benchmarks/results/README.md.

    python -m benchmarks.batched_costs padding            # lone 1-token step, row padding on/off
    python -m benchmarks.batched_costs curve              # pass cost vs requests x tokens
    python -m benchmarks.batched_costs curve --model qwen2.5-coder-1.5b --requests 1 \
        --tokens 1,2,3,4,6,8,12,16                         # one request: what a window of k costs
    python -m benchmarks.batched_costs cb                 # transformers' continuous batching
    python -m benchmarks.batched_costs agree --model qwen2.5-coder-0.5b   # vs generate

``padding``: min and median ms (runs interleaved) of one 1-token step of one request (64-token
context) through the batched runner with ``min_rows`` as probed on this machine, 4 and 1, and
through the transformers model with a ``DynamicCache``.

``curve``: min and median ms of one runner pass in which R requests (64-token contexts) each feed
T tokens, for R in ``--requests`` (1, 2, 4, 8, 16) and T in ``--tokens`` (1, 4), against R separate
transformers passes of T tokens each (a per-request engine's cost; at R = 1, what a verifier pays
for a window of T - 1 drafts).

``agree``: greedy decoding of a few prompts through the runner (all in one batch) against
transformers ``generate``: prompts fully equal, the top-2 margin at any first divergence, and the
max |logit difference| from the transformers model over one prompt and its continuation.

``cb``: 8 prompts x 16 greedy tokens through ``generate_batch`` (``transformers.generation.
continuous_batching``), through the runner (one prefill pass, then one pass per token) and through
``generate`` on one left-padded batch (the issue's baseline (a)).

All at one intra-op thread, fp32. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common.backends.batched import Run, greedy_decode, one_at_a_time
from common.backends.batched_hf import HFBatchedBackend

CONTEXT = 64


def timed_ms(fns: dict, repeats: int) -> dict:
    """{name: (min ms, median ms)} of each function, the functions interleaved so that the
    machine's other load falls on all of them alike (min: the least disturbed run)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {n: (round(min(t), 1), round(statistics.median(t), 1)) for n, t in times.items()}


def _runner_pass(runner: HFBatchedBackend, requests: int, tokens: int):
    names = [f"r{i}" for i in range(requests)]
    for name in names:
        runner.open(name, CONTEXT + tokens)
        runner.step([Run(name, list(range(100, 100 + CONTEXT)), rows=0)])

    def once():
        runner.step([Run(name, list(range(7, 7 + tokens))) for name in names])
        for name in names:
            runner.crop(name, CONTEXT)

    return once, lambda: [runner.close(n) for n in names]


def _hf_passes(lm, requests: int, tokens: int):
    from transformers import DynamicCache

    caches = []
    for _ in range(requests):
        cache = DynamicCache(config=lm.config)
        lm(input_ids=torch.arange(100, 100 + CONTEXT)[None], cache=cache, use_cache=True)
        caches.append(cache)
    ids = torch.arange(7, 7 + tokens)[None]

    def once():
        for cache in caches:
            lm(input_ids=ids, cache=cache, use_cache=True)
            cache.crop(CONTEXT - cache.get_seq_length())

    return once


def padding(model: str, repeats: int, weight_layout: str = "auto") -> None:
    runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=2048, weight_layout=weight_layout)
    probed = runner.min_rows  # what this machine needs for batch-invariant products
    once, close = _runner_pass(runner, 1, 1)

    def rows(n):
        def run():
            runner.min_rows = n
            once()

        return run

    with torch.inference_mode():
        got = timed_ms(
            {
                f"min_rows={probed} (probed)": rows(probed),
                "min_rows=4": rows(4),
                "min_rows=1": rows(1),
                "transformers": _hf_passes(runner.lm, 1, 1),
            },
            repeats,
        )
    close()
    print(json.dumps({"what": "lone 1-token step, ms (min, median)"} | got))


def curve(
    model: str,
    repeats: int,
    weight_layout: str = "auto",
    requests_list: tuple[int, ...] = (1, 2, 4, 8, 16),
    tokens_list: tuple[int, ...] = (1, 4),
) -> None:
    per_request = -(-(CONTEXT + max(tokens_list)) // 16) * 16  # the pool's blocks: 16 positions
    pool = max(requests_list) * per_request
    runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=pool, weight_layout=weight_layout)
    for tokens in tokens_list:
        for requests in requests_list:
            once, close = _runner_pass(runner, requests, tokens)
            fns = {
                "runner": once,
                "transformers_per_request": _hf_passes(runner.lm, requests, tokens),
            }
            with torch.inference_mode():
                got = timed_ms(fns, repeats)
            close()
            print(json.dumps({"requests": requests, "tokens": tokens} | got))


def continuous_batching(model: str, new_tokens: int = 16) -> None:
    from transformers import GenerationConfig

    runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=4096)
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + 20 + 3 * i)) for i in range(8)]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    start = time.perf_counter()
    with torch.inference_mode():
        out = runner.lm.generate_batch(prompts, generation_config=config, progress_bar=False)
    cb_s = time.perf_counter() - start
    cb = [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]

    start = time.perf_counter()
    with torch.inference_mode():
        ours = greedy_decode(runner, prompts, new_tokens)
    ours_s = time.perf_counter() - start
    width = max(map(len, prompts))  # transformers generate, one left-padded static batch
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        runner.lm.generate(ids, attention_mask=mask, generation_config=config, pad_token_id=0)
    padded_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(ours, cb))
    print(
        json.dumps(
            {
                "what": f"8 prompts x {new_tokens} tokens",
                "generate_batch_s": round(cb_s, 2),
                "runner_s": round(ours_s, 2),
                "generate_padded_batch_s": round(padded_s, 2),
                "outputs_equal": f"{same}/8",
            }
        )
    )


AGREE_PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\ndef softmax(x):",
]


def _generate(lm, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = lm.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def agree(model: str, new_tokens: int = 16) -> None:
    from transformers import AutoTokenizer

    from common.model_catalog import locate

    runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=1024)
    source, gguf = locate(model)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    prompts = [tokenizer(p)["input_ids"] for p in AGREE_PROMPTS]
    with torch.inference_mode():
        ours = greedy_decode(runner, prompts, new_tokens)
        report = {"model": model, "equal": 0, "divergences": []}
        for prompt, got in zip(prompts, ours):
            reference = _generate(runner.lm, prompt, new_tokens)
            if got == reference:
                report["equal"] += 1
                continue
            first = next(i for i, (a, b) in enumerate(zip(got, reference)) if a != b)
            top = one_at_a_time(runner, prompt + got[:first])[-1].topk(2).values
            report["divergences"].append({"at": first, "top2_margin": (top[0] - top[1]).item()})
        seq = prompts[0] + ours[0]
        alone = torch.stack(one_at_a_time(runner, seq))
        delta = (alone - runner.lm(torch.tensor([seq])).logits[0]).abs().max()
    print(json.dumps(report | {"of": len(prompts), "max_abs_logit_delta": delta.item()}))


def counts(text: str) -> tuple[int, ...]:
    """``--requests`` / ``--tokens``: comma-separated positive counts.

    >>> counts("1, 2,16")
    (1, 2, 16)
    """
    return tuple(int(c) for c in text.split(",") if c.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("padding", "curve", "cb", "agree"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--weight-layout",
        choices=("auto", "row", "column"),
        default="auto",
        help="padding, curve: how the runner stores its weights (auto: probe both)",
    )
    parser.add_argument("--requests", type=counts, default=(1, 2, 4, 8, 16), help="curve: R")
    parser.add_argument("--tokens", type=counts, default=(1, 4), help="curve: T per request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "padding":
        padding(args.model, args.repeats, args.weight_layout)
    elif args.what == "curve":
        curve(args.model, args.repeats, args.weight_layout, args.requests, args.tokens)
    elif args.what == "agree":
        agree(args.model)
    else:
        continuous_batching(args.model)


if __name__ == "__main__":
    main()
