"""A real k=2 system (n-gram drafter -> tiny random Llama target) started by deploy.launch's
machinery as separate processes: the HTTP and ZMQ completions equal the target's own greedy
``generate``, and every process stops cleanly."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.launch import System, plan_from_config
from services.gateway.zmq_client import PipeSpecClient
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow

PROMPT = "w5 w6 w7 w5 w6 w7 w5"
MAX_TOKENS = 24


def greedy_reference(model_dir, prompt_ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_completions_through_real_stage_processes(tmp_path):
    target = tiny_llama(tmp_path / "target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    expected_ids = greedy_reference(target, tokenizer.encode(PROMPT))
    expected_text = tokenizer.decode(expected_ids, skip_special_tokens=True)

    plan = plan_from_config(
        {
            "gateway": {
                "tokenizer": str(target),
                "num_levels": 2,
                "http_port": 0,
                "registry_port": 0,
                "client_port": 0,
                "served_model_name": "tiny",
            },
            "stages": [
                {"level": 0, "backend": "ngram"},
                {"level": 1, "backend": "hf", "model": str(target), "threads": 1},
            ],
        }
    )
    system = System(plan, tmp_path / "logs")
    system.start()
    try:
        system.wait_healthy(timeout_s=120)
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
        with httpx.Client(timeout=60) as http:
            raw = http.post(f"{plan.http_url}/v1/completions", json=body).text
            chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text
            assert chunks[-1]["usage"]["completion_tokens"] == len(expected_ids)
            assert chunks[-1]["spec_decode_stats"]["target_forward_passes"] >= 1
            assert raw.endswith("data: [DONE]\n\n")
            assert http.get(f"{plan.http_url}/health").status_code == 200
        with PipeSpecClient(plan.client_endpoint, timeout_s=60) as client:
            text, stats = client.complete(PROMPT, max_tokens=MAX_TOKENS)
            assert text == expected_text and stats["completion_tokens"] == len(expected_ids)
    finally:
        system.stop()
    assert {c.spec.name: c.process.returncode for c in system.children} == {
        "gateway": 0,
        "stage0": 0,
        "stage1": 0,
    }, "\n".join(c.tail() for c in system.children)
