"""Scaling emulated on loopback: one target replica serves while requests flow, a second joins,
then the first gets SIGTERM (draining briefly, then exiting with requests still in flight, which
the gateway moves). Every request must finish with the target's greedy output."""

import os
import random
import re
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
            "heartbeat_interval_s": 0.05,  # its gauges, sampled each beat, stay fresh
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
        old = (first.process, metrics_port, tmp_path / "logs" / "stage1.log")
        joined: list[tuple[subprocess.Popen, int]] = []  # (process, metrics port)
        moved_at = None
        try:
            deadline = time.monotonic() + 120
            # The gauge lags a pass behind, so a SIGTERM can still find the replica idle; then the
            # replica that joined is the next one stopped, until one drains with requests held.
            for attempt in range(1, 4):
                joined.append(start_replica(first.spec.env, tmp_path / f"replica{attempt}.log"))
                while len(served_by(results)) < attempt + 1 and time.monotonic() < deadline:
                    time.sleep(0.2)
                while stage_gauge(old[1]) < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)  # SIGTERM while it holds a request, so one must move
                done_at_sigterm = len(results)
                old[0].send_signal(signal.SIGTERM)
                old[0].wait(timeout=30)
                if unfinished_at_drain(old[2]) > 0:
                    moved_at = done_at_sigterm
                    break
                old = (*joined[-1], tmp_path / f"replica{attempt}.log")
            time.sleep(4)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=180)
            for proc, _ in joined:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)

    assert not errors, errors[:3]
    served = served_by(results)
    assert len(served) == len(joined) + 1, served
    assert moved_at is not None, "every replica stopped was idle at its SIGTERM"
    assert len(results) > moved_at + 3, "requests must keep completing after the SIGTERM"
    assert any(r["spec_decode_stats"]["resyncs"] for _, r in results), "no request was moved"
    oracle = GreedyOracle(target)
    want = {p: oracle.text(oracle.ids(p, MAX_TOKENS)) for p in prompts}
    wrong = [p for p, r in results if r["choices"][0]["text"] != want[p]]
    assert not wrong, f"{len(wrong)} of {len(results)} differ from the target's greedy output"
    assert first.process.returncode == 0 and all(p.returncode == 0 for p, _ in joined)


def start_replica(env: dict[str, str], log_path) -> tuple[subprocess.Popen, int]:
    """One more target replica with the first one's settings and its own metrics port: the
    process and that port."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.stage"],
            env=os.environ | env | {"PIPESPEC_STAGE_METRICS_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, port


def unfinished_at_drain(log_path) -> int:
    """How many requests a stage still owned when its drain ended (from its ``stage_drained`` log)."""
    match = re.search(r"stage_drained.*?unfinished\W+(\d+)", log_path.read_text())
    assert match, f"no stage_drained line in {log_path}"
    return int(match.group(1))


def served_by(results) -> set[str]:
    return {r["spec_decode_stats"]["replicas"][1] for _, r in list(results)}
