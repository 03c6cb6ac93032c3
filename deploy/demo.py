"""``python -m deploy.launch CONFIG --demo PROMPT``: stream one completion through the running
system, print its statistics, then decode the same prompt with the target alone (its own backend,
settings and threads, one token per step, in this process) and print both speeds side by side
and whether the texts are equal.

The target-alone run is the reference decoder the tests use (``common.simnet.reference_decode``),
so "same text: yes" is the lossless claim checked live. On a machine whose cores the stages
share, the comparison runs while the stages sit idle. Both sides are warmed up first, untimed:
the system with one completion of another prompt (as a server that has served before: its levels
have scored their drafts), the target alone with a few tokens.

It takes what it needs of the launcher's plan as plain values (the HTTP URL, the target's stage
settings, the tokenizer): the launcher imports this module for ``--demo``, never the reverse.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.settings import StageSettings


@dataclass
class Streamed:
    text: str
    stats: dict | None


WARMUP_PROMPT = "def fibonacci(n):"  # decoded, untimed, by both sides before the timed run
WARMUP_TOKENS = 4  # the target alone's warm-up: first touches of the weights, nothing to learn


def warm_up(url: str, max_tokens: int) -> None:
    """One completion of another prompt through the system, untimed, as a server that has served
    before: the weights are touched and the levels have scored their drafts
    (``common.lead_advice.DraftRecord``), so the timed completion shows the steady state."""
    body = {"prompt": WARMUP_PROMPT, "max_tokens": max_tokens}
    with httpx.Client(timeout=httpx.Timeout(10.0, read=300.0)) as http:
        http.post(f"{url}/v1/completions", json=body).raise_for_status()


def stream_completion(url: str, prompt: str, max_tokens: int) -> Streamed | None:
    """Stream one completion to stdout; what came back, or None after printing the error."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    stats, text = None, []
    print(f"\n{prompt}", end="", flush=True)
    with httpx.Client(timeout=httpx.Timeout(10.0, read=300.0)) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                print(
                    f"\nerror {response.status_code}: {response.read().decode()}", file=sys.stderr
                )
                return None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return None
                text.append(chunk["choices"][0]["text"])
                print(text[-1], end="", flush=True)
                stats = chunk.get("spec_decode_stats", stats)
    print("\n")
    return Streamed("".join(text), stats)


def format_stats(s: dict) -> str:
    """The final chunk's ``spec_decode_stats`` for people."""
    first = s["time_to_first_token_s"]
    lines = [
        f"--- {s['request_id']}",
        f"{s['completion_tokens']} tokens in {s['wall_time_s']:.2f} s ({s['tokens_per_s']:.1f} tokens/s)"
        + ("" if first is None else f", first token after {first:.2f} s"),
        f"target forward passes: {s['target_forward_passes']} "
        f"({s['tokens_per_target_pass']:.2f} tokens per pass)",
    ]
    for a in s["acceptance"]:
        lines.append(
            f"level {a['level']} accepted {a['accepted_tokens']}/{a['draft_tokens']} draft tokens "
            f"({a['acceptance_rate']:.1%}) in {a['drafts']} verifications, {a['rollbacks']} rollbacks"
        )
    return "\n".join(lines)


def side_by_side(
    pipespec_tokens: int,
    pipespec_s: float,
    alone_tokens: int,
    alone_s: float,
    same_text: bool,
    target: str,
) -> str:
    """The demo's last line.

    >>> side_by_side(64, 4.0, 64, 6.0, True, "smollm2-135m")
    'PipeSpec 16.0 tokens/s | target alone (smollm2-135m) 10.7 tokens/s | 1.50x | same text: yes'
    """
    ours, alone = pipespec_tokens / pipespec_s, alone_tokens / alone_s
    return (
        f"PipeSpec {ours:.1f} tokens/s | target alone ({target}) {alone:.1f} tokens/s | "
        f"{ours / alone:.2f}x | same text: {'yes' if same_text else 'NO'}"
    )


def target_alone(
    target: StageSettings, tokenizer: str, prompt: str, max_tokens: int
) -> tuple[str, int, float]:
    """The target's own greedy decoding of ``prompt`` on the runner its stage serves with, given
    every core of the machine (the quantized runner's logits do not depend on the thread count;
    the transformers runner keeps its stage's threads): text, tokens, seconds (prefill
    included, as in the pipeline's wall time; after a warm-up, as the pipeline's)."""
    import os

    from common.backends import load_backend
    from common.simnet import reference_decode
    from common.tokenization import load_tokenizer

    tok = load_tokenizer(tokenizer)
    settings = target
    if settings.backend == "quantized":
        settings = settings.model_copy(update={"threads": os.cpu_count()})
    backend = load_backend(settings)
    prompt_ids = tok.encode(prompt)
    eos = backend.eos_token_ids or [tok.eos_token_id]
    reference_decode(backend, tok.encode(WARMUP_PROMPT), WARMUP_TOKENS, eos)  # as warm_up
    started = time.perf_counter()
    tokens = reference_decode(backend, prompt_ids, max_tokens, eos)
    seconds = time.perf_counter() - started
    return tok.decode(tokens, skip_special_tokens=True), len(tokens), seconds


def run_demo(
    url: str, target: StageSettings | None, tokenizer: str, prompt: str, max_tokens: int
) -> bool:
    """Stream one completion from the gateway at ``url``, print its statistics and the
    side-by-side line against ``target`` (the top level's stage settings) decoding alone with
    ``tokenizer`` (the gateway's). False on an error."""
    print("warming up: one untimed completion of another prompt ...", flush=True)
    warm_up(url, max_tokens)
    got = stream_completion(url, prompt, max_tokens)
    if got is None:
        return False
    if got.stats is None:
        return True
    print(format_stats(got.stats))
    if target is None or target.backend not in ("quantized", "hf", "early-exit"):
        return True
    print("\ndecoding the same prompt with the target alone ...", flush=True)
    text, tokens, seconds = target_alone(target, tokenizer, prompt, max_tokens)
    print(
        side_by_side(
            got.stats["completion_tokens"],
            got.stats["wall_time_s"],
            tokens,
            seconds,
            text == got.text,
            Path(target.model or target.backend).name,
        ),
        flush=True,
    )
    return True
