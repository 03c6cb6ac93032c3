"""The launcher supervises like Kubernetes: ``python -m deploy.launch`` (the command users run)
on k=3 survives ``kill -9`` of each kind of child in turn (drafter, verifier, target, gateway):
the supervisor restarts it, says so with its restart count, /health shows the count, and the
next completion is the target's greedy output. SIGTERM then stops everything cleanly."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import GreedyOracle
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow
MAX_TOKENS = 16
PROMPT = "w11 w12 w13 w11 w12"


def config_toml(target: str, verifier: str) -> str:
    return f"""
[gateway]
tokenizer = "{target}"
num_levels = 3
http_port = 0
registry_port = 0
client_port = 0
heartbeat_timeout_s = 1.0
resend_after_s = 1.0

[[stages]]
level = 0
backend = "ngram"

[[stages]]
level = 1
backend = "hf"
model = "{verifier}"
threads = 1

[[stages]]
level = 2
backend = "hf"
model = "{target}"
threads = 1
"""


class Launcher:
    """``python -m deploy.launch CONFIG`` with its output collected line by line."""

    def __init__(self, config: Path, log_dir: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.launch", str(config), "--log-dir", str(log_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"launcher exited: {self.seen[-20:]}"
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s: {self.seen[-20:]}")


def child_pid(launcher: int, name: str) -> int:
    """The pid of the launcher's child ``name`` (gateway, stage0, …), from its environment."""
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if name == "gateway" and b"services.gateway" in cmd:
            return pid
        if f"PIPESPEC_STAGE_LEVEL={name[-1]}".encode() in env and b"services.stage" in cmd:
            return pid
    raise AssertionError(f"no child {name} of {launcher}")


def healthy(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy within {timeout_s} s")


def test_launcher_restarts_each_kind_of_child_after_kill_9(tmp_path):
    target = str(tiny_llama(tmp_path / "target"))
    verifier = str(tiny_llama(tmp_path / "verifier", seed=4))
    config = tmp_path / "k3.toml"
    config.write_text(config_toml(target, verifier))
    want = GreedyOracle(target)
    want_text = want.text(want.ids(PROMPT, MAX_TOKENS))
    launcher = Launcher(config, tmp_path / "logs")
    pids: list[int] = []
    try:
        url = launcher.wait_for(r"PipeSpec is up: (http://\S+)/v1/completions", 180).group(1)
        launcher.wait_for(r"^status: ", 10)
        for name in ("stage0", "stage1", "stage2", "gateway"):  # drafter, verifier, target
            pid = child_pid(launcher.proc.pid, name)
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            launcher.wait_for(rf"supervisor: {name} exited with code -9", 10)
            status = launcher.wait_for(rf"supervisor: restarted {name};.*", 20).group(0)
            assert re.search(rf"{name} \(up, pid \d+, restarts 1\)", status), status
            health = healthy(url, 120)
            if name == "gateway":
                assert health["restarts"] == 1
            else:
                level = int(name[-1])
                # the killed replica expires; the restarted one registers with its count
                deadline = time.monotonic() + 30
                while [r["restarts"] for r in health["levels"][level]] != [1]:
                    assert time.monotonic() < deadline, health["levels"][level]
                    time.sleep(0.3)
                    health = healthy(url, 30)
            body = {"model": "pipespec", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == want_text, name
        children = [child_pid(launcher.proc.pid, n) for n in ("gateway", "stage0", "stage2")]
        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.proc.wait(timeout=30) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"child {pid} still runs"
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            launcher.proc.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
