"""The paper's LLaMA 1B / 8B / 70B on A100 as simulated levels, and the *ideal schedule*: the same
engines on ``common.simnet``'s virtual clock, with no communication or scheduling overhead.

Cost derivation (a simulated pass over n tokens costs ``cost_ms + (n - 1) * per_token_ms``)
----------------------------------------------------------------------------------------
From ``docs/pipespec.md`` (§3.2 and §3.3; HumanEval, the paper's own runs):

* 70B: autoregressive 123.69 ms/token (§3.2) -> ``cost_ms`` = 123.69, a 1-token pass.
  In PipeSpec {1B,8B,70B} its mean step took 437 ms while committing 10.75 tokens per verify
  step (§3.3); taking tokens committed as the tokens fed, n = 10.75:
  ``per_token_ms`` = (437 - 123.69) / (10.75 - 1) = 32.13.
* 8B: autoregressive 22.46 ms/token (§3.3, the AR row of the lookahead sweep) -> ``cost_ms``.
  Its verify steps in {1B,8B,70B} took 28.08 ms committing 4.28 tokens (§3.3):
  ``per_token_ms`` = (28.08 - 22.46) / (4.28 - 1) = 1.71.
* 1B: only drafts in PipeSpec; its mean step took 12.45 ms (§3.3) -> ``cost_ms``. No verify
  step to fit, so ``per_token_ms`` keeps the 8B's ratio to its base: 12.45 * 1.71 / 22.46 = 0.95
  (it matters only when a drafter feeds several adopted tokens after a rollback).
* Agreement with the 70B (α, §3.3, inverted from the SD runs' mean window): 8B 0.94, 1B 0.92.
  The simulated backend draws each level's agreement with the *target* independently, so the
  1B's drafts match the 8B's tokens at about 0.92 * 0.94 ≈ 0.865 (plus a 1-in-89 chance that two wrong tokens agree),
  below the paper's ≈ 0.92 for that pair (the backend has no way to correlate levels' errors).

Known bias of the linear model: a 70B pass over SD's window of 8 comes out at 123.69 + 7 * 32.13
= 349 ms where the paper's SD runs took about 420 ms per 70B step, so our synchronous baseline
is faster than the paper's (its speedup over AR higher) and PipeSpec's advantage over it smaller.

Prompts: the simulated target looks only at its last 4 tokens and the position, so each prompt
is its text's last ``SIM_PROMPT_WORDS`` words hashed into the simulated vocabulary; the prefill
cost of a 150-token prompt under the linear model (4.9 s for the 70B, where an A100 takes well
under one) would otherwise dominate short runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import LevelCount, MethodResult, PromptRun

SIM_VOCAB = 90  # simulated ids 0..89; the word tokenizer has 96 words, EOS "w95" lies outside
SIM_SEED = 7
SIM_PROMPT_WORDS = 6

# The paper's numbers (docs/pipespec.md), all ms.
PAPER = {
    "ar_70b_ms": 123.69,  # §3.2 (Table 2), HumanEval, AR LLaMA3.1-70B
    "ar_8b_ms": 22.46,  # §3.3, AR 8B in the lookahead sweep
    "step_1b_ms": 12.45,  # §3.3, PS {1B,8B,70B} mean step per stage
    "step_8b_ms": 28.08,
    "step_70b_ms": 437.0,
    "window_8b": 4.28,  # §3.3, mean tokens committed per verify step
    "window_70b": 10.75,
    "alpha_8b": 0.94,  # §3.3, implied by the SD runs
    "alpha_1b": 0.92,
}
# Table 1/2, HumanEval, speedup over AR LLaMA3.1-70B (123.69 ms/token).
PAPER_SPEEDUPS = {"sync-k2": 1.32, "sync-k3": 1.37, "pipespec-k2": 2.27, "pipespec-k3": 2.54}
PAPER_MS_PER_TOKEN = {
    "autoregressive": 123.69,
    "sync-k2": 93.42,
    "sync-k3": 90.14,
    "pipespec-k2": 54.52,
    "pipespec-k3": 48.76,
}


@dataclass(frozen=True)
class SimLevel:
    name: str
    cost_ms: float
    per_token_ms: float
    agreement: float  # with the target; 1.0 for the target


def derive_levels(p: dict[str, float] = PAPER) -> dict[str, SimLevel]:
    """The three simulated models, from the paper's numbers (see the module docstring)."""
    per_8b = (p["step_8b_ms"] - p["ar_8b_ms"]) / (p["window_8b"] - 1)
    per_70b = (p["step_70b_ms"] - p["ar_70b_ms"]) / (p["window_70b"] - 1)
    per_1b = p["step_1b_ms"] * per_8b / p["ar_8b_ms"]
    return {
        "1B": SimLevel("LLaMA-3.2-1B (sim)", p["step_1b_ms"], round(per_1b, 3), p["alpha_1b"]),
        "8B": SimLevel("LLaMA-3.1-8B (sim)", p["ar_8b_ms"], round(per_8b, 3), p["alpha_8b"]),
        "70B": SimLevel("LLaMA-3.1-70B (sim)", p["ar_70b_ms"], round(per_70b, 3), 1.0),
    }


def hierarchies() -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Method -> (levels, stage settings shared by every level)."""
    sync = {"schedule": "sync", "lookahead": 8}
    return {
        "autoregressive": (["70B"], {}),
        "sync-k2": (["8B", "70B"], sync),
        "sync-k3": (["1B", "8B", "70B"], sync),
        "pipespec-k2": (["8B", "70B"], {"schedule": "async"}),
        "pipespec-k3": (["1B", "8B", "70B"], {"schedule": "async"}),
    }


def word_id(word: str) -> int:
    return 3 + int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % (
        SIM_VOCAB - 3
    )


def sim_prompt(text: str) -> list[int]:
    """A prompt's last words as simulated ids (3..SIM_VOCAB-1; 0-2 are the tokenizer's specials).

    >>> len(sim_prompt("a b c")), sim_prompt("x y") == sim_prompt("x  y")
    (3, True)
    """
    return [word_id(w) for w in text.split()][-SIM_PROMPT_WORDS:]


def sim_text(ids: Sequence[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def stage_tables(
    method: str,
    levels: dict[str, SimLevel],
    tokenizer: Path | None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Launcher ``[[stages]]`` tables for one simulated method."""
    names, shared = hierarchies()[method]
    out = []
    for level, key in enumerate(names):
        lv = levels[key]
        table = {
            "level": level,
            "backend": "simulated",
            "sim_vocab": SIM_VOCAB,
            "sim_seed": SIM_SEED,
            "sim_agreement": lv.agreement,
            "sim_cost_ms": lv.cost_ms,
            "sim_cost_per_token_ms": lv.per_token_ms,
            **shared,
            **(overrides or {}),
        }
        if tokenizer is not None:
            table["tokenizer"] = str(tokenizer)
        out.append(table)
    return out


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """The simulated target's greedy output."""
    from common.backends.simulated import SimulatedBackend
    from common.simnet import greedy_reference

    target = SimulatedBackend(agreement=1.0, seed=SIM_SEED, vocab=SIM_VOCAB, sleep=lambda s: None)
    return greedy_reference(target, prompt, max_tokens, eos=())


# ---------------------------------------------------------------------------- ideal schedule
ENGINE_FIELDS = ("schedule", "lookahead", "sync_wait_s", "max_lead", "max_verify_tokens")


def ideal_run(
    tables: Sequence[dict[str, Any]],
    prompt: list[int],
    max_tokens: int,
    request_id: str = "r0",
    tick_s: float = 0.05,
) -> PromptRun:
    """One request on a fresh simnet hierarchy built from launcher stage tables: each pass lasts
    exactly the simulated backend's cost, messages take no time, nothing else costs anything.

    The engines get the same scheduling settings as the services (``ENGINE_FIELDS``) and the
    service's republish interval; ``tick_s`` is how often a node re-checks time-based conditions
    (the sync schedule's wait), like the service loop's poll.
    """
    from common.backends.simulated import SimulatedBackend
    from common.settings import StageSettings
    from common.simnet import Sleep, build, run_request

    def backend(t: dict[str, Any]):
        def make(sleep: Sleep) -> SimulatedBackend:
            return SimulatedBackend(
                agreement=t["sim_agreement"],
                seed=t["sim_seed"],
                vocab=t["sim_vocab"],
                cost_ms=t["sim_cost_ms"],
                cost_per_token_ms=t["sim_cost_per_token_ms"],
                sleep=sleep,
            )

        return make

    configs = [
        StageSettings(
            level=t["level"],
            backend="simulated",
            request_ttl_s=1e6,
            done_retention_s=1e6,
            **{k: t[k] for k in ENGINE_FIELDS if k in t},
        ).engine_config()
        for t in tables
    ]
    # resend_after: the gateway checks for silent requests every 1e5 virtual s, after the run
    h = build([backend(t) for t in tables], config=configs, resend_after=4e5, tick_every=tick_s)
    req = run_request(h, prompt, max_tokens, request_id=request_id, max_time=1e5)
    if req is None:
        raise RuntimeError(f"ideal schedule: request {request_id} did not finish")
    stats = req.stats
    return PromptRun(
        prompt_id=request_id,
        tokens=list(req.tokens),
        wall_s=h.net.now,
        ttft_s=h.gateway.first_output_at.get(request_id),
        target_passes=stats[-1].forward_passes,
        levels=[
            LevelCount(s.level, s.drafts, s.draft_tokens, s.accepted_tokens, s.rollbacks_issued)
            for s in stats
            if s.level >= 1
        ],
        busy_s=[n.busy_s for n in h.nodes],
        passes=[s.forward_passes for s in stats],
    )


def ideal_method(
    method: str,
    levels: dict[str, SimLevel],
    prompts: Sequence[tuple[str, list[int]]],
    max_tokens: int,
    overrides: dict[str, Any] | None = None,
) -> MethodResult:
    tables = stage_tables(method, levels, tokenizer=None, overrides=overrides)
    names, _ = hierarchies()[method]
    result = MethodResult(
        suite="simulated",
        name=method,
        kind="ideal",
        levels=[levels[n].name for n in names],
        config={"stages": tables},
    )
    for pid, ids in prompts:
        result.runs.append(ideal_run(tables, ids, max_tokens, request_id=pid))
    return result
