"""What sampling adds per verified position, against a one-token forward pass of the model.

python -m benchmarks.sampling_costs --model smollm2-135m
"""

from __future__ import annotations

import argparse
import time

import torch

from common.backends.hf import HFBackend
from common.sampling import SamplingParams, choose


def per_call_ms(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    backend = HFBackend(args.model)
    context = list(range(100, 164))
    session = backend.new_session(context)
    kept: list[torch.Tensor] = []
    session.forward([7], lambda logits: kept.append(logits) or [None])
    row = kept[0][-1:]

    def step() -> None:
        session.forward([7])
        session.crop(len(context))

    forward = per_call_ms(step, args.repeats)
    print(f"{args.model}: vocabulary {row.shape[-1]}, one-token forward {forward:.2f} ms")
    for name, p in [
        ("greedy (argmax)", SamplingParams()),
        ("T=1.0, no mask (noise for every token)", SamplingParams(1.0, seed=1)),
        ("T=0.7, top_p=0.9", SamplingParams(0.7, seed=1, top_p=0.9)),
        ("T=0.7, top_k=50", SamplingParams(0.7, seed=1, top_k=50)),
    ]:
        ms = per_call_ms(lambda p=p: choose(row, p, [5]), args.repeats * 5)
        print(f"  {name:40s} {ms:7.3f} ms per position ({100 * ms / forward:5.1f} % of a pass)")


if __name__ == "__main__":
    main()
