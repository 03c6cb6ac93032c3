"""Multi-process loopback systems for end-to-end tests, started by the launcher's own code
(the path users take), and the oracle they are checked against: the target's ``generate``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.launch import Plan, System, plan_from_config


def system_config(tokenizer: str, stages: list[dict], **gateway) -> dict:
    """A launcher config on ephemeral ports; each stage gets one thread (2-core machine)."""
    return {
        "gateway": {
            "tokenizer": tokenizer,
            "num_levels": 1 + max(s["level"] for s in stages),
            "http_port": 0,
            "registry_port": 0,
            "client_port": 0,
            "served_model_name": "test",
            **gateway,
        },
        "stages": [{"threads": 1, **s} if s.get("backend") != "ngram" else s for s in stages],
    }


@contextlib.contextmanager
def running(
    config: dict, log_dir: Path, startup_timeout_s: float = 180, supervise: bool = False
) -> Iterator[System]:
    """Start the system, wait for /health, yield it; stop it and require every process to have
    exited with status 0 (none left running). ``supervise``: restart children that die, as the
    launcher's command does."""
    plan = plan_from_config(config)
    system = System(plan, log_dir)
    system.start()
    try:
        system.wait_healthy(timeout_s=startup_timeout_s)
        wait_all_registered(system, timeout_s=startup_timeout_s)
        if supervise:
            system.start_supervisor()
        yield system
    finally:
        system.stop(timeout_s=30)  # torch processes exiting together on a loaded 2-core machine
        codes = {c.spec.name: c.process.returncode for c in system.children}
        assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n" + "\n".join(
            c.tail() for c in system.children
        )


def wait_all_registered(system: System, timeout_s: float) -> None:
    """Until /health lists every stage replica the plan started (healthy needs only one per
    level; a test of several replicas wants them all)."""
    want: dict[int, int] = {}
    for spec in system.plan.children:
        if spec.role.startswith("level"):
            level = int(spec.role[len("level") :])
            want[level] = want.get(level, 0) + 1
    deadline = time.monotonic() + timeout_s
    while True:
        levels = httpx.get(f"{system.plan.http_url}/health", timeout=5).json()["levels"]
        if all(len(levels[level]) >= n for level, n in want.items()):
            return
        assert time.monotonic() < deadline, f"not every replica registered: {levels}"
        time.sleep(0.2)


def complete(plan: Plan, prompt: str, max_tokens: int, timeout_s: float = 300) -> dict:
    """One non-streaming completion over HTTP; returns the response body."""
    body = {"model": "test", "prompt": prompt, "max_tokens": max_tokens}
    resp = httpx.post(f"{plan.http_url}/v1/completions", json=body, timeout=timeout_s)
    assert resp.status_code == 200, resp.text
    return resp.json()


def complete_all(plan: Plan, prompts: list[str], max_tokens: int, concurrency: int) -> list[dict]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: complete(plan, p, max_tokens), prompts))


class GreedyOracle:
    """The target model's own ``generate(do_sample=False)``: the output every run must equal."""

    def __init__(self, model_dir: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ids(self, prompt: str, max_tokens: int) -> list[int]:
        prompt_ids = self.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
            )
        return out[0, len(prompt_ids) :].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def assert_same_as_oracle(
    oracle: GreedyOracle, prompts: list[str], results: list[dict], max_tokens: int
) -> None:
    wrong = []
    for prompt, res in zip(prompts, results):
        ids = oracle.ids(prompt, max_tokens)
        got = res["choices"][0]["text"], res["usage"]["completion_tokens"]
        if got != (oracle.text(ids), len(ids)):
            wrong.append((prompt, got, (oracle.text(ids), len(ids))))
    assert not wrong, (
        f"{len(wrong)}/{len(prompts)} differ from the target's greedy output: {wrong[:2]}"
    )


def leftover_service_processes() -> list[str]:
    """Service processes started by this test process (its children) that are still running."""
    out = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-af", r"services\.(stage|gateway)"],
        capture_output=True,
        text=True,
    )
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]
