"""Does the pipeline accept exactly the drafts the drafter picks offline, verdict by verdict?

A k=2 system runs the prompts with its target logging every verification (the stage's
``drafts_verified`` debug event: output position of the first draft, drafts, accepted). Each pass
checks drafts in order until the first mismatch, so it gives a verdict for every checked position:
accepted, or the one rejection of the pass. Offline, the drafter runs teacher-forced on the
target's text and picks its token at each position with the same seed, processors and noise
(``common.sampling.choose``: argmax when greedy). A level's drafts are exactly those picks, so the
two verdicts must agree at every checked position, whatever the timing; only true near-ties (the
two best scores closer than ``NEAR_TIE``) may order differently in windows of another size.

It prints, per temperature: the pipeline's acceptance over the positions it checked, the offline
agreement over every position of the same text (what a verifier would accept if it checked every
position), verdicts that differ, tokens per target pass, and whether every output equals the
reference decoder's.

    python -m benchmarks.acceptance_replay                          # Qwen 0.5B -> 1.5B, T 0 and 0.7
    python -m benchmarks.acceptance_replay --models smollm2 --temperatures 0,1.0

``tests/e2e/test_lossless_smollm2.py`` replays SmolLM2's greedy run with the same functions.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.sampling import GREEDY, SamplingParams, choose, gumbel, process

NEAR_TIE = 1e-3  # scores this close may order differently in windows of another size
FIELD = re.compile(r"(\w+)=(\S+)")
HIERARCHIES = {  # drafter stage, target stage, tokenizer
    "qwen": (
        {"backend": "hf", "model": "qwen2.5-coder-0.5b"},
        {"backend": "hf", "model": "qwen2.5-coder-1.5b"},
    ),
    "smollm2": (
        {"backend": "early-exit", "model": "smollm2-135m", "early_exit_layers": 25},
        {"backend": "hf", "model": "smollm2-135m"},
    ),
}


def verifications(log_text: str) -> list[dict[str, str]]:
    """The ``drafts_verified`` events of a stage's key=value log.

    >>> verifications("level=debug event=drafts_verified request_id=a position=3 drafts=2 "
    ...               "accepted=1 service=stage\\nlevel=info event=other")[0]["position"]
    '3'
    """
    return [
        dict(FIELD.findall(line)) for line in log_text.splitlines() if "drafts_verified" in line
    ]


def drafter_picks(
    logits: torch.Tensor, p: SamplingParams = GREEDY
) -> tuple[list[int], list[float]]:
    """The drafter's token at each generated position 0..n-1 (``logits`` [n, V], teacher-forced)
    and its margin there: best minus second-best score (the logit when greedy, processed logit
    plus the position's Gumbel noise when sampled)."""
    picks = choose(logits, p, range(logits.shape[0]))
    if p.greedy:
        scores = logits.double()
    else:
        vocab = torch.arange(logits.shape[-1])
        scores = torch.stack(
            [
                process(row[None], p)[0].double() + gumbel(p.seed, t, vocab)
                for t, row in enumerate(logits)
            ]
        )
    top2 = scores.topk(2, dim=-1).values
    return picks, (top2[:, 0] - top2[:, 1]).tolist()


@dataclass
class Replay:
    checked: int = 0  # positions the pipeline checked
    accepted: int = 0  # of those, accepted by the pipeline
    offline_hits: int = 0  # of those, where the drafter's offline pick equals the text
    differ: list[tuple] = field(default_factory=list)  # (request, position, pipeline verdict)
    near_ties: int = 0  # verdicts that differ at a near-tie (allowed)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.checked if self.checked else 0.0


def replay(
    events: list[dict[str, str]],
    texts: dict[str, list[int]],
    picks: dict[str, tuple[list[int], list[float]]],
) -> Replay:
    """Compare every verdict in ``events`` with the drafter's offline pick. ``texts`` and
    ``picks`` are keyed by request id; events of other requests are ignored.

    >>> r = replay([{"request_id": "a", "position": "0", "drafts": "3", "accepted": "1"}],
    ...            {"a": [5, 6, 7]}, {"a": ([5, 9, 7], [1.0, 1.0, 1.0])})
    >>> r.checked, r.accepted, r.offline_hits, r.differ
    (2, 1, 1, [])
    """
    out = Replay()
    for event in events:
        rid = event["request_id"]
        if rid not in texts:
            continue
        text, (pick, margin) = texts[rid], picks[rid]
        position, drafts, m = (int(event[k]) for k in ("position", "drafts", "accepted"))
        for pos in range(position, min(position + min(m + 1, drafts), len(text))):
            verdict = pos < position + m  # accepted, or the one rejection of the pass
            offline = pick[pos] == text[pos]
            out.checked += 1
            out.accepted += verdict
            out.offline_hits += offline
            if offline != verdict:
                if margin[pos] < NEAR_TIE:
                    out.near_ties += 1
                else:
                    out.differ.append((rid, pos, verdict))
    return out


def teacher_forced_logits(model, prompt_ids: list[int], text: list[int]) -> torch.Tensor:
    """``model``'s logits for generated positions 0..len(text)-1, on prompt + text."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + text])).logits[0]
    return logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(text)].float()


def measure(models: str, temperature: float, top_p: float, n: int, max_tokens: int) -> dict:
    from benchmarks.prompts import load
    from common import model_catalog
    from common.backends.hf import HFBackend, load_causal_lm
    from common.simnet import reference_decode
    from common.tokenization import eos_token_ids, load_tokenizer
    from deploy.harness import complete, launched, loopback_config

    drafter_stage, target_stage = HIERARCHIES[models]
    target_name = target_stage["model"]
    prompts = [p.text for p in load("both", n)]
    stages = [{"level": 0, **drafter_stage}, {"level": 1, **target_stage, "log_level": "debug"}]
    config = loopback_config(target_name, stages, threads=1)
    results = []
    with tempfile.TemporaryDirectory() as logs:
        with launched(config, Path(logs)) as system:
            for i, prompt in enumerate(prompts):
                fields = {"temperature": temperature, "top_p": top_p, "seed": 1000 + i}
                results.append(complete(system.plan, prompt, max_tokens, timeout_s=900, **fields))
            target_log = next(c.log_path for c in system.children if c.spec.role == "level1")
            events = verifications(target_log.read_text())
    torch.set_num_threads(2)
    target = HFBackend(target_name)
    tokenizer = load_tokenizer(target_name)
    eos = eos_token_ids(tokenizer, str(model_catalog.model_dir(target_name)))
    texts, params = {}, {}
    exact = 0
    for i, (prompt, res) in enumerate(zip(prompts, results)):
        p = SamplingParams(temperature, seed=1000 + i, top_p=top_p) if temperature else GREEDY
        prompt_ids = tokenizer.encode(prompt)
        text = reference_decode(target, prompt_ids, max_tokens, eos=eos, sampling=p)
        exact += tokenizer.decode(text, skip_special_tokens=True) == res["choices"][0]["text"]
        texts[res["id"]], params[res["id"]] = (prompt_ids, text), p
    del target
    drafter = load_causal_lm(drafter_stage["model"], layers=drafter_stage.get("early_exit_layers"))
    picks = {
        rid: drafter_picks(teacher_forced_logits(drafter, ids, text), params[rid])
        for rid, (ids, text) in texts.items()
    }
    r = replay(events, {rid: text for rid, (_, text) in texts.items()}, picks)
    every = sum(len(text) for _, text in texts.values())
    every_hits = sum(
        a == b for rid, (_, text) in texts.items() for a, b in zip(picks[rid][0], text)
    )
    tokens = sum(res["usage"]["completion_tokens"] for res in results)
    passes = sum(res["spec_decode_stats"]["target_forward_passes"] for res in results)
    return {
        "models": models,
        "temperature": temperature,
        "top_p": top_p,
        "requests": len(results),
        "exact_vs_reference": f"{exact}/{len(results)}",
        "pipeline_acceptance": round(r.acceptance, 4),
        "checked_positions": r.checked,
        "offline_agreement_same_positions": round(r.offline_hits / max(r.checked, 1), 4),
        "offline_agreement_every_position": round(every_hits / max(every, 1), 4),
        "positions": every,
        "verdicts_differing": len(r.differ),
        "near_ties": r.near_ties,
        "tokens_per_target_pass": round(tokens / passes, 3) if passes else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", choices=sorted(HIERARCHIES), default="qwen")
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=2, help="prompts per set (code and prose)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    for t in (float(x) for x in args.temperatures.split(",")):
        row = measure(args.models, t, args.top_p, args.n, args.max_tokens)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
