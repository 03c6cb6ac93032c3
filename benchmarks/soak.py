"""Soak: a long run at half capacity, watching every process's memory and file descriptors.

    python -m benchmarks.soak                       # 30 minutes (outside the test suite)
    python -m benchmarks.soak --minutes 2 --sample-s 10 --out soak.json

Launches (``deploy.launch``, CURVE keys, supervised) a gateway and k=3 simulated stages
(``benchmarks.load_test.simulated_config``), measures capacity as the requests/s that
``--slots`` closed-loop streaming clients complete in ``--probe-s`` seconds, then sends streamed
requests as a Poisson process at half that rate for ``--minutes``. Every ``--sample-s`` it
records each process's RSS (``/proc/PID/status`` VmRSS) and open descriptors (``/proc/PID/fd``)
and the requests done and failed so far. Prints the table and, per process, the change from the
first sample after warm-up to the last; exits 1 if a request failed or a process restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.load_test import save_simulation_tokenizer, simulated_config
from deploy.launch import System, plan_from_config

MAX_TOKENS = 64
PROMPT = "w5 w6 w7 w8 w9 w10"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stream_one(http: httpx.Client, url: str) -> int:
    """One streamed completion; its token count, or an exception."""
    body = {"model": "sim", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {response.read()[:200]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if tokens != MAX_TOKENS:
        raise RuntimeError(f"truncated: {tokens} of {MAX_TOKENS} tokens")
    return tokens


class Load:
    def __init__(self, url: str):
        self.url, self.done, self.failed, self.errors = url, 0, 0, []
        self.local = threading.local()
        self.lock = threading.Lock()

    def one(self) -> None:
        http = getattr(self.local, "http", None)
        if http is None:
            http = self.local.http = httpx.Client(timeout=httpx.Timeout(10.0, read=120.0))
        try:
            stream_one(http, self.url)
            with self.lock:
                self.done += 1
        except Exception as exc:  # counted and reported
            with self.lock:
                self.failed += 1
                self.errors.append(str(exc)[:200])


def capacity(load: Load, slots: int, seconds: float) -> float:
    """Requests/s that ``slots`` closed-loop clients complete."""
    stop = time.monotonic() + seconds
    start_done = load.done

    def client() -> None:
        while time.monotonic() < stop:
            load.one()

    threads = [threading.Thread(target=client) for _ in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (load.done - start_done) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=120.0, help="before the baseline sample")
    parser.add_argument("--slots", type=int, default=16, help="max_requests_in_flight")
    parser.add_argument("--probe-s", type=float, default=30.0)
    parser.add_argument("--target-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="write the samples as JSON")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pipespec-soak-"))
    tokenizer = save_simulation_tokenizer(work / "tokenizer")
    config = simulated_config(
        tokenizer, 3, args.target_ms, max_requests_in_flight=args.slots, log_level="warning"
    )
    system = System(plan_from_config(config), work / "logs")
    print(f"logs in {work / 'logs'}", flush=True)
    samples: list[dict] = []
    system.start()
    try:
        system.wait_healthy(180)
        system.start_supervisor()
        url = system.plan.http_url
        load = Load(url)
        full = capacity(load, args.slots, args.probe_s)
        rate = full / 2
        print(f"capacity {full:.2f} requests/s with {args.slots} slots; soak at {rate:.2f}/s")
        pool = ThreadPoolExecutor(max_workers=4 * args.slots)
        rng = random.Random(1)
        start = time.monotonic()
        end = start + args.minutes * 60
        next_sample = start
        next_arrival = start
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_arrival:
                pool.submit(load.one)
                next_arrival += rng.expovariate(rate)
            if now >= next_sample:
                sample = {"t_s": round(now - start, 1), "done": load.done, "failed": load.failed}
                for child in system.children:
                    pid = child.process.pid
                    sample[child.spec.name] = {
                        "rss_mb": round(rss_mb(pid), 1),
                        "fds": open_fds(pid),
                        "restarts": child.restarts,
                    }
                samples.append(sample)
                print(
                    f"t={sample['t_s']:7.1f}s done={load.done} failed={load.failed} "
                    + " ".join(
                        f"{c.spec.name}={sample[c.spec.name]['rss_mb']:.0f}MB/"
                        f"{sample[c.spec.name]['fds']}fd"
                        for c in system.children
                    ),
                    flush=True,
                )
                next_sample += args.sample_s
            time.sleep(max(0.0, min(next_arrival, next_sample) - time.monotonic()))
        pool.shutdown(wait=True)
    finally:
        system.stop(timeout_s=30)
    names = [c.spec.name for c in system.children]
    base = next((s for s in samples if s["t_s"] >= args.warmup_s), samples[0])
    last = samples[-1]
    print(f"\n{load.done} requests done, {load.failed} failed; change from t={base['t_s']} s:")
    for name in names:
        b, e = base[name], last[name]
        peak = max(s[name]["rss_mb"] for s in samples)
        print(
            f"  {name:10} RSS {b['rss_mb']:.1f} -> {e['rss_mb']:.1f} MB (peak {peak:.1f}), "
            f"fds {b['fds']} -> {e['fds']}, restarts {e['restarts']}"
        )
    if args.out:
        args.out.write_text(json.dumps({"rate": rate, "capacity": full, "samples": samples}))
    if load.errors:
        print(f"errors (first 3): {load.errors[:3]}")
    return 1 if load.failed or any(last[n]["restarts"] for n in names) else 0


if __name__ == "__main__":
    sys.exit(main())
