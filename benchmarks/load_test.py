"""What throughput and latency do concurrent streaming clients get from a PipeSpec system?

    python -m benchmarks.load_test                                 # 32 clients, 60 s, k=3 simulated
    python -m benchmarks.load_test --clients 8 --duration 10
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --model pipespec   # a running system

Without ``--url`` it launches (``deploy.launch``) a gateway and k stages on the simulated backend
(``--target-ms`` per target pass; the levels below are cheaper and agree less), with a word-level
tokenizer over the simulated vocabulary whose EOS lies outside it, so every request runs its full
``--max-tokens``. Each client streams one completion after another (``stream_options.include_usage``)
until the time is up; the run ends when the last one finishes. Prints p50/p99 time to first token
and end-to-end latency, total throughput and the errors; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.report import percentile
from deploy.harness import launched, loopback_config

ERROR_PAUSE_S = 0.1  # a client whose request failed waits this long before the next one
SIM_VOCAB = 90  # simulated ids 0..89; the tokenizer has 96 words and EOS is "w95"


def save_simulation_tokenizer(path: Path) -> Path:
    """The word-level tokenizer (``benchmarks.tiny_models``) with "w95" as its EOS, so a
    simulated backend with ``sim_vocab = SIM_VOCAB`` never ends a request early."""
    from benchmarks.tiny_models import VOCAB_SIZE, save_tokenizer

    return save_tokenizer(path, eos_token=f"w{VOCAB_SIZE - 1}")


def simulated_config(tokenizer: Path, levels: int = 3, target_ms: float = 10.0, **gateway) -> dict:
    """A launcher config: ``levels`` simulated stages, each level 2.5x cheaper and 10 points less
    in agreement with the target than the one above it."""
    stages = []
    for level in range(levels):
        below = levels - 1 - level  # 0 for the target
        stages.append(
            {
                "level": level,
                "backend": "simulated",
                "tokenizer": str(tokenizer),
                "sim_vocab": SIM_VOCAB,
                "sim_seed": 7,
                "sim_agreement": round(1.0 - 0.1 * below, 2),
                "sim_cost_ms": target_ms / 2.5**below,
                "sim_cost_per_token_ms": target_ms / 50 if below == 0 else 0.0,
            }
        )
    quiet = {"served_model_name": "sim", "log_level": "warning"}
    return loopback_config(str(tokenizer), stages, **quiet | gateway)


@dataclass
class Result:
    ttft_s: float | None = None  # first chunk with text
    latency_s: float = 0.0
    tokens: int = 0
    error: str | None = None
    chunks: list[tuple[float, str]] = field(default_factory=list)  # (s since sent, text) per chunk


@dataclass
class Report:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error is not None]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.error is None)

    def summary(self) -> str:
        ok = [r for r in self.results if r.error is None]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        lines = [
            f"clients {self.clients}, wall {self.wall_s:.1f} s: "
            f"{len(ok)} requests ok, {len(self.errors)} errors",
            f"throughput {self.tokens / self.wall_s:.1f} tokens/s ({self.tokens} tokens), "
            f"{len(ok) / self.wall_s:.2f} requests/s",
        ]
        if ttfts:
            lines.append(
                f"time to first token p50 {percentile(ttfts, 50) * 1000:.0f} ms, "
                f"p99 {percentile(ttfts, 99) * 1000:.0f} ms"
            )
            latencies = [r.latency_s for r in ok]
            lines.append(
                f"end-to-end latency p50 {percentile(latencies, 50):.2f} s, "
                f"p99 {percentile(latencies, 99):.2f} s"
            )
        lines += [f"error: {e}" for e in sorted(set(self.errors))[:5]]
        return "\n".join(lines)


async def one_request(http: httpx.AsyncClient, body: dict) -> Result:
    result, started = Result(), time.monotonic()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    result.chunks.append((time.monotonic() - started, chunk["choices"][0]["text"]))
                    if result.ttft_s is None:
                        result.ttft_s = result.chunks[-1][0]
                elif chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
            if not done and result.error is None:
                result.error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = time.monotonic() - started
    return result


async def run_load(
    url: str,
    clients: int,
    duration_s: float,
    max_tokens: int,
    model: str | None,
    prompt: str | None = None,
    report: Report | None = None,
) -> Report:
    """``clients`` loops, each streaming requests back to back until ``duration_s`` has passed.
    ``prompt``: every request's (default: 16 random simulated words). ``report``: the one to fill,
    for a caller that watches the results arrive."""
    report = Report(clients) if report is None else report
    started = time.monotonic()
    deadline = started + duration_s
    timeout = httpx.Timeout(10.0, read=300.0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            text = prompt or " ".join(f"w{rng.randrange(3, SIM_VOCAB)}" for _ in range(16))
            body = {"prompt": text, "max_tokens": max_tokens, "stream": True}
            body |= {"stream_options": {"include_usage": True}} | (
                {"model": model} if model else {}
            )
            result = await one_request(http, body)
            report.results.append(result)
            if result.error is not None:
                await asyncio.sleep(ERROR_PAUSE_S)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(i) for i in range(clients)))
    report.wall_s = time.monotonic() - started
    return report


def run_simulated(
    clients: int, duration_s: float, max_tokens: int, levels: int, target_ms: float, log_dir: Path
) -> Report:
    """Launch a simulated system in ``log_dir``, load it, stop it."""
    tokenizer = save_simulation_tokenizer(log_dir / "tokenizer")
    config = simulated_config(tokenizer, levels, target_ms)
    with launched(config, log_dir / "logs", startup_timeout_s=120) as system:
        return asyncio.run(run_load(system.plan.http_url, clients, duration_s, max_tokens, "sim"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of new requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", help="a running gateway; default: launch a simulated system")
    parser.add_argument("--model", help="with --url: the model name to send")
    parser.add_argument("--levels", type=int, default=3, help="simulated system: k")
    parser.add_argument(
        "--target-ms", type=float, default=10.0, help="simulated target: ms per pass"
    )
    args = parser.parse_args(argv)
    if args.url:
        report = asyncio.run(
            run_load(args.url, args.clients, args.duration, args.max_tokens, args.model)
        )
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="pipespec-load-"))
        print(f"simulated k={args.levels} system; logs in {log_dir}", flush=True)
        report = run_simulated(
            args.clients, args.duration, args.max_tokens, args.levels, args.target_ms, log_dir
        )
    print(report.summary())
    return 1 if report.errors or not report.results else 0


if __name__ == "__main__":
    sys.exit(main())
