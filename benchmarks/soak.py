"""Does any process's memory or descriptor count grow over a long run under load?

    python -m benchmarks.soak                       # 30 minutes (outside the test suite)
    python -m benchmarks.soak --minutes 2 --sample-s 10 --out soak.json
    python -m benchmarks.soak --config deploy/configs/smollm2-k3.toml --clients 32 --minutes 5 \\
        --warmup-s 60 --sample-s 15                 # the memory check: RSS within 10 %

System (launched supervised, with CURVE keys, by ``deploy.harness.launched``): without
``--config``, a gateway and k=3 simulated stages (``benchmarks.load_test.simulated_config``),
``--max-tokens`` 64 by default, and every request must run all of them (the simulated EOS never
comes). With ``--config``, that launcher config (TOML) on 127.0.0.1 and free ports
(``deploy.harness.on_loopback``), ``--max-tokens`` 32 by default; a request may end at EOS.

Load: by default, capacity is the requests/s that ``--slots`` closed-loop streaming clients
complete in ``--probe-s`` seconds, then streamed requests arrive as a Poisson process at half that
rate for ``--minutes``. With ``--clients N``: N closed-loop streaming clients
(``benchmarks.load_test.run_load``), each sending one request after another for ``--minutes``.

Every ``--sample-s`` from the start of the load, and once when it has drained, it records each
process's RSS (``/proc/PID/status`` VmRSS) and open descriptors (``/proc/PID/fd``) and the
requests done and failed so far. Verdict, per process: the RSS of the first sample at or after ``--warmup-s`` (the
baseline) against every later sample; the largest relative change must stay within
``--rss-tolerance`` (0.10). Prints the table and the verdicts; exits 1 if a process's RSS
left the tolerance (or no sample followed its baseline), a request failed or a process restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.load_test import (
    Report,
    Result,
    one_request,
    run_load,
    save_simulation_tokenizer,
    simulated_config,
)
from deploy.harness import launched, on_loopback, status_kb
from deploy.launch import LaunchError, System, read_config

SIM_MAX_TOKENS = 64
SIM_PROMPT = "w5 w6 w7 w8 w9 w10"
REAL_MAX_TOKENS = 32
REAL_PROMPT = "def fibonacci(n):"


@dataclass(frozen=True)
class RssCheck:
    baseline_t_s: float | None  # the first sample at or after the warm-up; None: none was
    baseline_mb: float | None
    max_change: float | None  # the later sample furthest from the baseline, relative (signed)
    ok: bool


def rss_verdict(
    times_s: Sequence[float], rss_mb: Sequence[float], warmup_s: float, tolerance: float
) -> RssCheck:
    """One process's samples: is every sample after the baseline (the first at or after
    ``warmup_s``) within ``tolerance`` of it, relatively? Not ok without a sample after the
    baseline, or with a baseline of 0 MB (the process was gone).

    >>> rss_verdict([0, 10, 20, 30], [50, 100, 104, 95], warmup_s=10, tolerance=0.10)
    RssCheck(baseline_t_s=10, baseline_mb=100, max_change=-0.05, ok=True)
    >>> rss_verdict([0, 10, 20, 30], [50, 100, 104, 112], warmup_s=10, tolerance=0.10).ok
    False
    >>> rss_verdict([0, 10], [50, 100], warmup_s=10, tolerance=0.10)
    RssCheck(baseline_t_s=10, baseline_mb=100, max_change=None, ok=False)
    """
    first = next((i for i, t in enumerate(times_s) if t >= warmup_s), None)
    if first is None:
        return RssCheck(None, None, None, False)
    base = rss_mb[first]
    later = rss_mb[first + 1 :]
    if not later or base <= 0:
        return RssCheck(times_s[first], base, None, False)
    change = max(((v - base) / base for v in later), key=abs)
    return RssCheck(times_s[first], base, change, abs(change) <= tolerance)


def request_errors(results: Sequence[Result], exact_tokens: int | None) -> list[str]:
    """Each failed request's error; with ``exact_tokens``, a request that streamed another number
    of tokens failed too (truncated)."""
    errors = []
    for r in results:
        if r.error is not None:
            errors.append(r.error)
        elif exact_tokens is not None and r.tokens != exact_tokens:
            errors.append(f"truncated: {r.tokens} of {exact_tokens} tokens")
    return errors


def rss_mb(pid: int) -> float:
    """VmRSS in MB; 0 for a process that is gone (exited, between restarts)."""
    return (status_kb(pid, "VmRSS") or 0) / 1024


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def take_sample(system: System, t_s: float, done: int, failed: int) -> dict:
    sample: dict = {"t_s": round(t_s, 1), "done": done, "failed": failed}
    for child in system.children:
        pid = child.process.pid
        sample[child.spec.name] = {
            "rss_mb": round(rss_mb(pid), 1),
            "fds": open_fds(pid),
            "restarts": child.restarts,
        }
    names = [c.spec.name for c in system.children]
    print(
        f"t={sample['t_s']:7.1f}s done={done} failed={failed} "
        + " ".join(f"{n}={sample[n]['rss_mb']:.0f}MB/{sample[n]['fds']}fd" for n in names),
        flush=True,
    )
    return sample


async def sample_every(
    system: System,
    period_s: float,
    stop: asyncio.Event,
    tally: Callable[[], tuple[int, int]],
    samples: list[dict],
) -> None:
    """A sample every ``period_s`` (t from now), and a last one once ``stop`` is set."""
    start = time.monotonic()
    while True:
        samples.append(take_sample(system, time.monotonic() - start, *tally()))
        if stop.is_set():
            return
        due = start + len(samples) * period_s
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
        except TimeoutError:
            pass


async def poisson(
    url: str, rate: float, duration_s: float, body: dict, results: list[Result], max_conn: int
) -> None:
    """Streamed requests (``load_test.one_request``) arriving at ``rate``/s for ``duration_s``."""
    rng = random.Random(1)
    timeout = httpx.Timeout(10.0, read=300.0)
    limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn)
    tasks: set[asyncio.Task] = set()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        next_at = time.monotonic()
        deadline = next_at + duration_s
        while next_at < deadline:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(one_request(http, body))
            task.add_done_callback(lambda t: results.append(t.result()))
            tasks.add(task)
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)


async def drive(
    system: System, args: argparse.Namespace, prompt: str, max_tokens: int, exact: int | None
) -> tuple[list[dict], list[Result], dict]:
    """The load and the samples taken while it runs; the samples, every request's result and
    what the load was."""
    url, model = system.plan.http_url, system.plan.gateway.served_model_name
    results: list[Result] = []
    samples: list[dict] = []
    stop = asyncio.Event()

    def tally() -> tuple[int, int]:
        failed = len(request_errors(results, exact))
        return len(results) - failed, failed

    if args.clients:
        load = {"mode": "closed-loop", "clients": args.clients}
        report = Report(args.clients, results)
        sampler = asyncio.create_task(sample_every(system, args.sample_s, stop, tally, samples))
        await run_load(url, args.clients, args.minutes * 60, max_tokens, model, prompt, report)
    else:
        probe = await run_load(url, args.slots, args.probe_s, max_tokens, model, prompt)
        results += probe.results
        full = (len(probe.results) - len(probe.errors)) / probe.wall_s
        load = {"mode": "poisson", "capacity": full, "rate": full / 2}
        print(f"capacity {full:.2f} requests/s with {args.slots} slots; soak at {full / 2:.2f}/s")
        if full <= 0:
            raise RuntimeError(f"no request completed in the probe: {probe.errors[:3]}")
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        body["stream_options"] = {"include_usage": True}
        sampler = asyncio.create_task(sample_every(system, args.sample_s, stop, tally, samples))
        await poisson(url, full / 2, args.minutes * 60, body, results, 4 * args.slots)
    stop.set()
    await sampler
    return samples, results, load


def verdicts(samples: list[dict], names: list[str], warmup_s: float, tol: float) -> dict:
    times = [s["t_s"] for s in samples]
    return {n: rss_verdict(times, [s[n]["rss_mb"] for s in samples], warmup_s, tol) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="a launcher config (TOML); default simulated")
    parser.add_argument("--clients", type=int, help="closed-loop clients; default Poisson load")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=120.0, help="before the baseline sample")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="relative to baseline")
    parser.add_argument("--prompt", help=f"default {SIM_PROMPT!r}, with --config {REAL_PROMPT!r}")
    parser.add_argument(
        "--max-tokens", type=int, help=f"default {SIM_MAX_TOKENS}, with --config {REAL_MAX_TOKENS}"
    )
    parser.add_argument("--slots", type=int, default=16, help="simulated: max_requests_in_flight")
    parser.add_argument("--probe-s", type=float, default=30.0, help="Poisson: capacity probe")
    parser.add_argument("--target-ms", type=float, default=10.0, help="simulated target pass")
    parser.add_argument("--out", type=Path, help="write the samples as JSON")
    args = parser.parse_args(argv)
    if args.clients is not None and args.clients < 1:
        parser.error("--clients must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="pipespec-soak-"))
    if args.config:
        try:
            config = on_loopback(read_config(args.config))
        except LaunchError as exc:
            parser.error(str(exc))
        prompt, max_tokens = args.prompt or REAL_PROMPT, args.max_tokens or REAL_MAX_TOKENS
        exact = None  # a real model may end a request at EOS
    else:
        tokenizer = save_simulation_tokenizer(work / "tokenizer")
        config = simulated_config(
            tokenizer, 3, args.target_ms, max_requests_in_flight=args.slots, log_level="warning"
        )
        prompt, max_tokens = args.prompt or SIM_PROMPT, args.max_tokens or SIM_MAX_TOKENS
        exact = max_tokens
    print(f"logs in {work / 'logs'}", flush=True)
    with launched(config, work / "logs", startup_timeout_s=300, supervise=True) as system:
        samples, results, load = asyncio.run(drive(system, args, prompt, max_tokens, exact))
    names = [c.spec.name for c in system.children]
    errors = request_errors(results, exact)
    checks = verdicts(samples, names, args.warmup_s, args.rss_tolerance)
    last = samples[-1]
    print(f"\n{len(results) - len(errors)} requests done, {len(errors)} failed")
    print(f"RSS per process, baseline = first sample at t >= {args.warmup_s:g} s:")
    for name in names:
        check, end = checks[name], last[name]
        peak = max(s[name]["rss_mb"] for s in samples)
        change = "n/a" if check.max_change is None else f"{check.max_change:+.1%}"
        print(
            f"  {name:10} RSS {check.baseline_mb} MB at t={check.baseline_t_s} s -> "
            f"{end['rss_mb']:.1f} MB (peak {peak:.1f}), max change {change}: "
            f"{'PASS' if check.ok else 'FAIL'}; fds {samples[0][name]['fds']} -> {end['fds']}, "
            f"restarts {end['restarts']}"
        )
    rss_ok = all(c.ok for c in checks.values())
    print(f"RSS within {args.rss_tolerance:.0%}: {'PASS' if rss_ok else 'FAIL'}")
    if args.out:
        out = {"load": load, "samples": samples, "rss": {n: asdict(c) for n, c in checks.items()}}
        args.out.write_text(json.dumps(out | {"errors": errors[:20]}))
    if errors:
        print(f"errors (first 3): {errors[:3]}")
    restarted = any(last[n]["restarts"] for n in names)
    return 1 if errors or restarted or not rss_ok else 0


if __name__ == "__main__":
    sys.exit(main())
