"""What a batched pass costs: the numbers behind docs/batched-runner.md.

    python -m benchmarks.batched_costs padding            # lone 1-token step, 4-row padding on/off
    python -m benchmarks.batched_costs curve              # pass cost vs requests x tokens
    python -m benchmarks.batched_costs cb                 # transformers' continuous batching

``padding``: median ms of one 1-token step of one request (64-token context) through the batched
runner with ``min_rows`` 4 and 1, and through the transformers model with a ``DynamicCache``.

``curve``: median ms of one runner pass in which R requests (64-token contexts) each feed T tokens,
for R in 1, 2, 4, 8, 16 and T in 1, 4, against R separate transformers passes of T tokens each
(what the per-request engine pays today).

``cb``: 8 prompts x 16 greedy tokens through ``generate_batch`` (``transformers.generation.
continuous_batching``) and through the runner (one prefill pass, then one pass per token).

All at one intra-op thread, fp32. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common.backends.batched import Run
from common.backends.batched_hf import HFBatchedBackend

CONTEXT = 64


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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


def padding(model: str, repeats: int) -> None:
    for min_rows in (4, 1):
        runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=2048, min_rows=min_rows)
        once, close = _runner_pass(runner, 1, 1)
        with torch.inference_mode():
            ms = median_ms(once, repeats)
        close()
        print(json.dumps({"what": "runner 1x1", "min_rows": min_rows, "ms": round(ms, 2)}))
    with torch.inference_mode():
        ms = median_ms(_hf_passes(runner.lm, 1, 1), repeats)
    print(json.dumps({"what": "transformers 1x1", "ms": round(ms, 2)}))


def curve(model: str, repeats: int) -> None:
    runner = HFBatchedBackend(model, threads=1, kv_pool_tokens=16 * (CONTEXT + 16))
    for tokens in (1, 4):
        for requests in (1, 2, 4, 8, 16):
            once, close = _runner_pass(runner, requests, tokens)
            with torch.inference_mode():
                ms = median_ms(once, repeats)
                hf = median_ms(_hf_passes(runner.lm, requests, tokens), max(1, repeats // 2))
            close()
            row = {"requests": requests, "tokens": tokens, "runner_ms": round(ms, 1)}
            print(json.dumps(row | {"transformers_per_request_ms": round(hf, 1)}))


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

    from tests.common.backends.test_batched_hf import greedy_batched

    start = time.perf_counter()
    with torch.inference_mode():
        ours = greedy_batched(runner, prompts, new_tokens)
    ours_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(ours, cb))
    print(
        json.dumps(
            {
                "what": f"8 prompts x {new_tokens} tokens",
                "generate_batch_s": round(cb_s, 2),
                "runner_s": round(ours_s, 2),
                "outputs_equal": f"{same}/8",
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("padding", "curve", "cb"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "padding":
        padding(args.model, args.repeats)
    elif args.what == "curve":
        curve(args.model, args.repeats)
    else:
        continuous_batching(args.model)


if __name__ == "__main__":
    main()
