"""Scaling emulated on loopback: one target replica serves while requests flow, a second joins,
then the first gets SIGTERM (draining briefly, then exiting with requests still in flight, which
the gateway moves). Every request must finish with the target's greedy output."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from deploy.harness import complete
from deploy.launch import free_port
from tests.harness import GreedyOracle, config, launched, stage_gauge
from tests.tiny_models import VOCAB_SIZE, tiny_llama

pytestmark = pytest.mark.slow
MAX_TOKENS = 400


def test_add_replica_then_sigterm_the_first(tmp_path):
    # big enough that a request (400 tokens) outlasts the 0.05 s drain, so some are in flight at the SIGTERM
    target = str(tiny_llama(tmp_path / "target", hidden=192, layers=6))
    metrics_port = free_port()
    stages = [
        {"level": 0, "backend": "ngram"},
        {
            "level": 1,
            "backend": "hf",
            "model": target,
            "drain_timeout_s": 0.05,
            "metrics_port": metrics_port,
        },
    ]
    cfg = config(target, stages, heartbeat_timeout_s=1.0, resend_after_s=2.0)
    rng = random.Random(5)
    prompts = [" ".join(f"w{rng.randrange(3, VOCAB_SIZE)}" for _ in range(6)) for _ in range(6)]
    results: list[tuple[str, dict]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            prompt = prompts[(i * 2 + n) % len(prompts)]
            n += 1
            try:
                results.append((prompt, complete(plan, prompt, MAX_TOKENS, timeout_s=120)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    with launched(cfg, tmp_path / "logs") as system:
        plan = system.plan
        first = next(c for c in system.children if c.spec.name == "stage1")
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(3)
        with open(tmp_path / "second.log", "wb") as log:
            env = os.environ | first.spec.env | {"PIPESPEC_STAGE_METRICS_PORT": str(free_port())}
            second = subprocess.Popen(
                [sys.executable, "-m", "services.stage"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 60
            while len(served_by(results)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            first_replica = results[0][1]["spec_decode_stats"]["replicas"][1]
            while stage_gauge(metrics_port) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # SIGTERM while it holds a request, so one must move
            done_at_sigterm = len(results)
            first.process.send_signal(signal.SIGTERM)
            first.process.wait(timeout=30)
            time.sleep(4)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=180)
            second.send_signal(signal.SIGINT)
            second.wait(timeout=30)

    assert not errors, errors[:3]
    served = served_by(results)
    assert len(served) == 2 and first_replica in served, served
    assert len(results) > done_at_sigterm + 3, "requests must keep completing after the SIGTERM"
    assert any(r["spec_decode_stats"]["resyncs"] for _, r in results), "no request was moved"
    oracle = GreedyOracle(target)
    want = {p: oracle.text(oracle.ids(p, MAX_TOKENS)) for p in prompts}
    wrong = [p for p, r in results if r["choices"][0]["text"] != want[p]]
    assert not wrong, f"{len(wrong)} of {len(results)} differ from the target's greedy output"
    assert first.process.returncode == 0 and second.returncode == 0


def served_by(results) -> set[str]:
    return {r["spec_decode_stats"]["replicas"][1] for _, r in list(results)}
