"""How often does a drafter's coupled sample equal the target's, against rejection's 1 - TV?
Offline, teacher-forced on the target's own seeded text.

For each prompt the target samples its text with the reference decoder
(``common.simnet.reference_decode``); then, at every position of that text, on the same prefix:

* coupled agreement: the drafter's Gumbel-max pick (same seed, position, processors) equals the
  target's token: what a PipeSpec verifier accepts;
* 1 - TV(p, q) of the two processed distributions: what rejection sampling would accept;
* (1 - TV) / (1 + TV): the coupling's guaranteed lower bound (Daliri et al. 2024).

    python -m benchmarks.coupling --drafter qwen2.5-coder-0.5b --target qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from common.backends.hf import HFBackend, load_causal_lm
from common.sampling import SamplingParams, choose, process
from common.simnet import reference_decode


@dataclass
class Agreement:
    positions: int = 0
    coupled: float = 0.0  # sums over positions
    one_minus_tv: float = 0.0
    bound: float = 0.0

    def add(self, other: Agreement) -> None:
        self.positions += other.positions
        self.coupled += other.coupled
        self.one_minus_tv += other.one_minus_tv
        self.bound += other.bound

    def rates(self) -> dict:
        n = max(self.positions, 1)
        return {
            "positions": self.positions,
            "coupled_agreement": round(self.coupled / n, 4),
            "one_minus_tv": round(self.one_minus_tv / n, 4),
            "coupling_bound": round(self.bound / n, 4),
        }


def agreement(drafter, target, prompt_ids: list[int], text: list[int], p: SamplingParams):
    """Per-position agreement of ``drafter`` with ``target`` on the target's ``text``."""
    ids = torch.tensor([prompt_ids + text])
    rows = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(text))
    with torch.inference_mode():
        q_logits, p_logits = drafter(ids).logits[0, rows], target(ids).logits[0, rows]
    width = min(q_logits.shape[-1], p_logits.shape[-1])  # embedding tables may be padded
    q_logits, p_logits = q_logits[:, :width], p_logits[:, :width]
    picks = choose(q_logits, p, range(len(text)))
    q = torch.softmax(process(q_logits, p).double(), -1)
    pp = torch.softmax(process(p_logits, p).double(), -1)
    tv = 0.5 * (q - pp).abs().sum(-1)
    return Agreement(
        positions=len(text),
        coupled=float(sum(a == b for a, b in zip(picks, text))),
        one_minus_tv=float((1 - tv).sum()),
        bound=float(((1 - tv) / (1 + tv)).sum()),
    )


def measure(
    drafter_name: str,
    target_name: str,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    drafter_layers: int | None = None,
) -> dict:
    drafter = load_causal_lm(drafter_name, layers=drafter_layers)
    target_backend = HFBackend(target_name)
    target = target_backend.model
    total = Agreement()
    for i, prompt_ids in enumerate(prompts):
        p = SamplingParams(temperature, seed=1000 + i, top_p=top_p)
        text = reference_decode(target_backend, prompt_ids, max_tokens, eos=(), sampling=p)
        total.add(agreement(drafter, target, prompt_ids, text, p))
    return {"temperature": temperature, "top_p": top_p} | total.rates()


def main() -> None:
    from benchmarks.prompts import load
    from common.tokenization import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--drafter-layers", type=int, default=None)
    ap.add_argument("--prompt-set", default="both", help="humaneval, prose or both")
    ap.add_argument("--prompts", type=int, default=4, help="per set")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperatures", default="0.3,0.7,1.0")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(args.target)
    prompts = [tokenizer.encode(p.text) for p in load(args.prompt_set, args.prompts)]
    for t in (float(x) for x in args.temperatures.split(",")):
        row = measure(
            args.drafter,
            args.target,
            prompts,
            args.max_tokens,
            t,
            args.top_p,
            args.drafter_layers,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
