"""Real multi-process systems for the gateway's end-to-end tests, started with the launcher's own
code (``deploy.launch.plan_from_config`` + ``System``), plus what those tests share: the greedy
reference, SSE parsing, stage metrics scraping and free ports."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from deploy.launch import Plan, System, plan_from_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tokenizer: str, stages: list[dict], **gateway) -> dict:
    """A launcher config on ephemeral ports; model stages get one torch thread each."""
    table = {
        "tokenizer": tokenizer,
        "num_levels": 1 + max(s["level"] for s in stages),
        "http_port": 0,
        "registry_port": 0,
        "client_port": 0,
        "served_model_name": "tiny",
    }
    stages = [s | {"threads": 1} if s.get("backend", "hf") == "hf" else s for s in stages]
    return {"gateway": table | gateway, "stages": stages}


@contextlib.contextmanager
def launched(cfg: dict, log_dir: Path, startup_timeout_s: float = 120) -> Iterator[Plan]:
    """Start the system and wait for /health; on exit stop it and require every process to have
    exited with status 0."""
    system = System(plan_from_config(cfg), log_dir)
    system.start()
    try:
        system.wait_healthy(timeout_s=startup_timeout_s)
        yield system.plan
    finally:
        system.stop()
        codes = {c.spec.name: c.process.returncode for c in system.children}
        assert set(codes.values()) == {0}, f"exit codes {codes}\n" + "\n".join(
            c.tail() for c in system.children
        )


def greedy_ids(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The target's own ``generate(do_sample=False)``: what every completion must equal."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


def sse_chunks(raw: str) -> list[dict]:
    """The JSON chunks of an SSE body that ends with ``data: [DONE]``."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    return [json.loads(frame[len("data: ") :]) for frame in raw.split("\n\n")[:-2]]


def stage_gauge(port: int, name: str = "pipespec:stage_active_requests") -> float:
    """A gauge's value on a stage's /metrics (one series: a stage labels it with its level)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the stage's metrics"
    return float(match.group(1))
