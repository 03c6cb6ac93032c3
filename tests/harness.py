"""What the multi-process tests share on top of ``deploy.harness`` (which starts and stops the
systems, the launcher's own path): their config, the oracle every output is checked against
(the target decoding the request alone on the runner the stages serve with), SSE parsing, stage
metrics and leftover-process checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from common.backends import load_backend
from common.backends.batched import greedy_decode
from common.settings import StageSettings
from common.simnet import reference_decode
from deploy import harness
from deploy.launch import Plan, System

SERVED_MODEL = "test"  # the gateway's served_model_name in every test system
STARTUP_TIMEOUT_S = 180
# A clean exit after SIGTERM took 13-16 s on the 2-core test machine at load 12 (the tree before
# the harness merge too), past the launcher's 10 s: wait longer before calling it a hang.
STOP_TIMEOUT_S = 60


def config(tokenizer: str, stages: list[dict], **gateway) -> dict:
    """A launcher config on free loopback ports; every stage that runs a transformers model gets
    one torch thread (the test machine has 2 cores)."""
    return harness.loopback_config(
        tokenizer, stages, threads=1, **{"served_model_name": SERVED_MODEL} | gateway
    )


def launched(
    cfg: dict,
    log_dir: Path,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    supervise: bool = False,
) -> AbstractContextManager[System]:
    """Start the system of ``cfg``, wait for /health, yield it; on exit stop it and require every
    process to have exited with status 0 (within STOP_TIMEOUT_S of SIGTERM)."""
    return harness.launched(
        cfg,
        log_dir,
        startup_timeout_s=startup_timeout_s,
        require_clean_exit=True,
        stop_timeout_s=STOP_TIMEOUT_S,
        supervise=supervise,
    )


def complete_all(plan: Plan, prompts: list[str], max_tokens: int, concurrency: int) -> list[dict]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: harness.complete(plan, p, max_tokens), prompts))


class GreedyOracle:
    """The target decoding each request alone, greedily, one token per pass, on the batched
    runner the stages serve with (built from the same stage settings: ``backend``, ``model``,
    ``tokenizer``; one thread): the output every run must equal, bit for bit, whatever batches
    served it. (How often that equals transformers' ``generate``, and why it may not at a
    near-tie: ``tests/common/backends``' SmolLM2 test.)"""

    def __init__(
        self,
        model: str | Path,
        threads: int | None = None,
        *,
        backend: str = "hf",
        tokenizer: str | Path | None = None,
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        settings = StageSettings(
            level=0,
            backend=backend,
            model=str(model),
            tokenizer=str(tokenizer) if tokenizer else None,
            threads=threads or 1,
        )
        self.backend = load_backend(settings)
        self._done: dict[tuple, list[int]] = {}

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_tokens)
        if key not in self._done:
            self._done[key] = reference_decode(
                self.backend, list(prompt_ids), max_tokens, self.backend.eos_token_ids
            )
        return self._done[key]

    def ids(self, prompt: str, max_tokens: int) -> list[int]:
        return self.generate(self.tokenizer.encode(prompt), max_tokens)

    def ids_many(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        """``ids`` of every prompt, decoded in shared passes (equal by the runner's batch
        invariance; ``greedy_decode``) and remembered like ``generate``'s."""
        encoded = [tuple(self.tokenizer.encode(p)) for p in prompts]
        todo = sorted({e for e in encoded if (e, max_tokens) not in self._done})
        if todo:
            eos = self.backend.eos_token_ids
            done = greedy_decode(self.backend, [list(e) for e in todo], max_tokens, eos)
            self._done |= {(e, max_tokens): ids for e, ids in zip(todo, done)}
        return [self._done[(e, max_tokens)] for e in encoded]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def assert_same_as_oracle(
    oracle: GreedyOracle, prompts: list[str], results: list[dict], max_tokens: int
) -> None:
    wrong = []
    for prompt, res, ids in zip(prompts, results, oracle.ids_many(prompts, max_tokens)):
        got = res["choices"][0]["text"], res["usage"]["completion_tokens"]
        if got != (oracle.text(ids), len(ids)):
            wrong.append((prompt, got, (oracle.text(ids), len(ids))))
    assert not wrong, (
        f"{len(wrong)}/{len(prompts)} differ from the target's greedy output: {wrong[:2]}"
    )


def sse_chunks(raw: str) -> list[dict]:
    """The JSON chunks of an SSE body that ends with ``data: [DONE]``."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    return [json.loads(frame[len("data: ") :]) for frame in raw.split("\n\n")[:-2]]


def stage_gauge(port: int, name: str = "pipespec:stage_active_requests") -> float:
    """A gauge's value on a stage's /metrics (one series: a stage labels it with its level)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the stage's metrics"
    return float(match.group(1))


def leftover_service_processes() -> list[str]:
    """Service processes started by this test process (its children) that are still running."""
    out = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-af", r"services\.(stage|gateway)"],
        capture_output=True,
        text=True,
    )
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]
