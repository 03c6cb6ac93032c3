"""The serving benchmark: aggregate throughput and latency under concurrent streaming clients,
transformers ``generate`` with static batches against our services, on the same prompts, in one
run.

    python -m benchmarks.serving                           # smollm2, clients 1,2,4,8,16, 3 repeats
    python -m benchmarks.serving --models qwen
    python -m benchmarks.serving --clients 1,2 --max-tokens 8 --repeats 1 --out /tmp/serving.json

Systems (``--systems``, greedy, ``--max-tokens`` per request, every model fp32 on the CPU):
    generate     (a) transformers ``generate`` in this process, ``--hf-threads`` (2) torch
                 threads; a round's requests start together as static batches of ``clients``
                 rows, left-padded: batch j holds every client's j-th request
    target       (b) our services with the target alone (k=1, one stage)
    pipespec-k2  (c) our services, the hierarchies of ``benchmarks.run`` (``--models``)
    pipespec-k3
    llama-server      llama.cpp's ``llama-server`` on the target's GGUF (``--models``: smollm2 ->
                      smollm2-135m.gguf, qwen -> qwen2.5-coder-1.5b.gguf; a quantized file, so its
                      output may differ from ours), ``-np`` the largest of ``--clients``, ``-t 2
                      -tb 2``; the same client code, requests with ``cache_prompt: false`` (every
                      request prefills, as ours do) and EOS as ours (they stop at it)
    llama-server-np1  the same with ``-np 1``: llama.cpp's one-stream autoregressive baseline
    The llama systems run only where llama.cpp is built (``make llama-cpp``,
    ``benchmarks.llama_cpp``); elsewhere they are skipped with a message.
Every served system is launched once, all of them together; then for each concurrency in
``--clients`` and each of ``--repeats``, one round of every system, interleaved (their order
rotated by the repeat), so a drift of the machine's speed shifts every system alike (memory:
every system's models at once; for large models pass a subset to ``--systems``). A round:
``clients`` concurrent clients, each streaming ``--requests-per-client`` completions
(``/v1/completions``, ``stream``, temperature 0) one after another. Client i's j-th request is the
round's (j * clients + i)-th, prompts taken in turn, so every system gets the same prompts.

Measures, per round; a cell (system, clients) reports the median over its repeats:
    tok/s   completion tokens of the round / its wall time (first request sent to last done)
    TTFT    sending a request to its first chunk with text. generate: the call to the first
            step's tokens (a streamer notes every step: prefill and first token), the same for
            every row of the batch
    ITL     per token after the first: the gap between the chunk that carried it and the chunk
            before, spread over the chunk's tokens (tokens per chunk by re-encoding the text
            received so far; tokens that came with the first one count 0), so a request's mean
            is (last - first arrival) / (tokens - 1); generate: the gaps between its steps
    equal   outputs equal to the reference: ``generate`` on each prompt alone (batch 1), token
            ids for generate, text for the services
    req/pass  mean requests per target forward pass, from the target stage's ``/metrics``
            counters (``BATCHED_PASSES`` / ``BATCHED_REQUESTS``); None where it has none
    CPU s   (JSON ``cpu_s``) CPU seconds each process used in the round: gateway, stages, clients
    stages  (JSON) per stage: passes, requests and tokens fed, drafts checked and accepted
Writes ``--out`` (JSON: every request of every round, the medians, the ratios) and ``--png``
(throughput against clients, one line per system), and prints the table as markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import llama_cpp
from benchmarks.load_test import one_request
from benchmarks.report import figure, percentile, ratio, to_jsonable, write_json
from benchmarks.systems import scrape
from deploy.harness import complete, launched, status_kb, with_metrics_ports

SYSTEMS = ("generate", "target", "pipespec-k2", "pipespec-k3", "llama-server", "llama-server-np1")
SERVED = {"target": "pipespec-k1", "pipespec-k2": "pipespec-k2", "pipespec-k3": "pipespec-k3"}
LLAMA = {"llama-server": None, "llama-server-np1": 1}  # llama.cpp: slots (None: max clients)
# k3's throughput over each system in the table (the llama columns only where those ran)
RATIOS = {
    "k3_over_target": ("target", "k3/(b)"),
    "k3_over_generate": ("generate", "k3/(a)"),
    "k3_over_llama_server": ("llama-server", "k3/llama"),
    "k3_over_llama_server_np1": ("llama-server-np1", "k3/llama-np1"),
}
BATCHED_PASSES = "pipespec:stage_batched_passes_total"
BATCHED_REQUESTS = "pipespec:stage_batched_pass_requests_total"
STATS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "req_per_pass")


@dataclass
class Request:
    client: int
    prompt_id: str
    tokens: int
    ttft_s: float | None
    latency_s: float
    itl_s: list[float] = field(default_factory=list)  # one per token after the first
    text: str = ""
    equal: bool | None = None
    error: str | None = None


@dataclass
class Round:
    system: str
    clients: int
    repeat: int
    wall_s: float
    requests: list[Request]
    req_per_pass: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process this round
    stages: dict[str, dict] = field(default_factory=dict)  # per stage: round_counters


# ---------------------------------------------------------------------------- pure parts
def assignment(clients: int, per_client: int, n_prompts: int) -> list[list[int]]:
    """The prompt index of each client's requests, in order: client i's j-th request is the
    round's (j * clients + i)-th, prompts taken in turn (generate's batch j is column j).

    >>> assignment(2, 2, 3)
    [[0, 2], [1, 0]]
    """
    return [[(j * clients + i) % n_prompts for j in range(per_client)] for i in range(clients)]


def chunk_tokens(encode: Callable[[str], list[int]], texts: Sequence[str]) -> list[int]:
    """Tokens each streamed chunk carried: the growth of the token count of the text received
    so far (never below 0: a chunk that completes no new token carries 0).

    >>> chunk_tokens(str.split, ["a b", " c", "", " d e"])
    [2, 1, 0, 2]
    """
    counts, before, text = [], 0, ""
    for piece in texts:
        text += piece
        now = len(encode(text))
        counts.append(max(0, now - before))
        before = max(before, now)
    return counts


def token_gaps(chunks: Sequence[tuple[float, int]]) -> list[float]:
    """Per-token inter-token latencies of one reply from its chunks (arrival time, tokens),
    one for every token after the first: the first chunk's other tokens came with it (gap 0),
    each later chunk spreads the gap since the chunk before over its tokens, and a chunk with
    no token passes its gap on to the next. Their mean is (last - first) / (tokens - 1).

    >>> [round(g, 6) for g in token_gaps([(0.5, 2), (0.7, 2), (0.8, 0), (1.0, 1)])]
    [0.0, 0.1, 0.1, 0.3]
    """
    if not chunks:
        return []
    gaps: list[float] = [0.0] * max(0, chunks[0][1] - 1)
    last = chunks[0][0]
    for at, n in chunks[1:]:
        if n > 0:
            gaps += [(at - last) / n] * n
            last = at
    return gaps


def per_pass(
    before: tuple[float | None, float | None], after: tuple[float | None, float | None]
) -> float | None:
    """Mean requests per target pass between two readings of (passes, requests); None when
    a counter is missing or no pass ran.

    >>> per_pass((10, 25), (14, 41)), per_pass((None, None), (None, None)), per_pass((3, 5), (3, 5))
    (4.0, None, None)
    """
    if None in before or None in after or after[0] - before[0] <= 0:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def round_summary(r: Round) -> dict[str, Any]:
    """One round's throughput, latency percentiles and equality count.

    >>> reqs = [Request(0, "p", 4, 0.2, 1.0, [0.1, 0.2, 0.3], equal=True),
    ...         Request(1, "q", 4, 0.4, 1.0, [0.1, 0.1, 0.1], equal=False)]
    >>> s = round_summary(Round("x", 2, 0, 2.0, reqs))
    >>> s["tokens_per_s"], s["ttft_p50_s"], s["itl_p50_s"], s["equal"], s["checked"]
    (4.0, 0.3, 0.1, 1, 2)
    """
    ok = [q for q in r.requests if q.error is None]
    tokens = sum(q.tokens for q in ok)
    ttfts = [q.ttft_s for q in ok if q.ttft_s is not None]
    itls = [g for q in ok for g in q.itl_s]
    checked = [q for q in ok if q.equal is not None]
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / r.wall_s if r.wall_s > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "req_per_pass": r.req_per_pass,
        "equal": sum(q.equal for q in checked),
        "checked": len(checked),
        "errors": len(r.requests) - len(ok),
    }


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values present; None for none.

    >>> median_or_none([3.0, None, 1.0, 2.0]), median_or_none([None])
    (2.0, None)
    """
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def cells(rounds: Sequence[Round]) -> dict[str, dict[int, dict[str, Any]]]:
    """system -> clients -> the median over repeats of each of ``STATS``; equality and errors
    summed over the repeats."""
    grouped: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rounds:
        grouped.setdefault(r.system, {}).setdefault(r.clients, []).append(round_summary(r))
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for system, by_clients in grouped.items():
        for clients, sums in by_clients.items():
            cell = {k: median_or_none([s[k] for s in sums]) for k in STATS}
            cell |= {k: sum(s[k] for s in sums) for k in ("equal", "checked", "errors")}
            out.setdefault(system, {})[clients] = cell | {"repeats": len(sums)}
    return out


def ratio_keys(table: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The ratios of ``RATIOS`` to report: always over (b) and (a), over the llama systems where
    they ran."""
    return [k for k, (s, _) in RATIOS.items() if s not in LLAMA or s in table]


def ratios(table: dict[str, dict[int, dict[str, Any]]]) -> dict[int, dict[str, float | None]]:
    """Per concurrency, PipeSpec k=3's throughput over (b) the target alone, over (a) generate
    and over the llama systems that ran.

    >>> t = {"pipespec-k3": {1: {"tokens_per_s": 30.0}}, "target": {1: {"tokens_per_s": 20.0}}}
    >>> ratios(t)
    {1: {'k3_over_target': 1.5, 'k3_over_generate': None}}
    """

    def tps(system: str, clients: int) -> float | None:
        return table.get(system, {}).get(clients, {}).get("tokens_per_s")

    return {
        c: {k: ratio(tps("pipespec-k3", c), tps(RATIOS[k][0], c)) for k in ratio_keys(table)}
        for c in sorted(table.get("pipespec-k3", {}))
    }


def _f(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown(table: dict[str, dict[int, dict[str, Any]]], systems: Sequence[str]) -> str:
    """One row per concurrency: each system's tok/s, k3's ratios, then p50 TTFT and p50 ITL in
    ms, one value per system in the order of the header.

    >>> t = {"target": {1: {"tokens_per_s": 20.0, "ttft_p50_s": 0.1, "itl_p50_s": 0.05}},
    ...      "pipespec-k3": {1: {"tokens_per_s": 30.0, "ttft_p50_s": 0.12, "itl_p50_s": 0.03}}}
    >>> print(markdown(t, ["target", "pipespec-k3"]))
    | clients | target tok/s | pipespec-k3 tok/s | k3/(b) | k3/(a) | p50 TTFT ms target / pipespec-k3 | p50 ITL ms target / pipespec-k3 |
    |---|---|---|---|---|---|---|
    | 1 | 20.0 | 30.0 | 1.50x | - | 100 / 120 | 50.0 / 30.0 |
    """
    names = " / ".join(systems)
    keys = ratio_keys(table)
    header = [f"{s} tok/s" for s in systems] + [RATIOS[k][1] for k in keys]
    header += [f"p50 TTFT ms {names}", f"p50 ITL ms {names}"]
    lines = ["| clients | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    clients = sorted({c for by in table.values() for c in by})
    rs = ratios(table)
    for c in clients:
        cell = [table.get(s, {}).get(c, {}) for s in systems]
        row = [_f(x.get("tokens_per_s")) for x in cell]
        row += [
            _f(rs.get(c, {}).get(k), spec=".2f") + ("x" if rs.get(c, {}).get(k) else "")
            for k in keys
        ]
        row.append(" / ".join(_f(x.get("ttft_p50_s"), 1000, ".0f") for x in cell))
        row.append(" / ".join(_f(x.get("itl_p50_s"), 1000) for x in cell))
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_throughput(path: Path, table: dict[str, dict[int, dict[str, Any]]], title: str) -> None:
    """Aggregate tokens/s against concurrent clients, one line per system."""
    with figure(path, panel_size=(6.5, 4.5)) as (ax,):
        for system, by_clients in table.items():
            xs = sorted(c for c in by_clients if by_clients[c].get("tokens_per_s") is not None)
            ax.plot(xs, [by_clients[c]["tokens_per_s"] for c in xs], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s (median of repeats)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------- measuring
def run_generate(
    runner,
    prompts: Sequence[tuple[str, list[int]]],
    clients: int,
    per_client: int,
    max_tokens: int,
    repeat: int,
    reference: dict[str, list[int]],
    decode: Callable[[list[int]], str],
) -> Round:
    """(a): ``per_client`` static batches of ``clients`` rows, one after another."""
    from benchmarks.hf_methods import generate_batch

    order = assignment(clients, per_client, len(prompts))
    requests, wall = [], 0.0
    for j in range(per_client):
        batch = [prompts[order[i][j]] for i in range(clients)]
        rows, steps, batch_wall = generate_batch(runner, [ids for _, ids in batch], max_tokens)
        for i, ((pid, _), row) in enumerate(zip(batch, rows)):
            n = min(len(row), len(steps))
            requests.append(
                Request(
                    client=i,
                    prompt_id=pid,
                    tokens=len(row),
                    ttft_s=steps[0] if steps else None,
                    latency_s=steps[n - 1] if n else batch_wall,
                    itl_s=token_gaps([(t, 1) for t in steps[:n]]),
                    text=decode(row),
                    equal=row == reference[pid] if pid in reference else None,
                )
            )
        wall += batch_wall
    return Round("generate", clients, repeat, wall, requests)


async def run_clients(
    url: str,
    model: str,
    prompts: Sequence[tuple[str, str]],
    clients: int,
    per_client: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[float, list[tuple[int, str, Any]]]:
    """``clients`` concurrent streaming clients; the round's wall time and, per request,
    (client, prompt id, ``load_test.Result``). ``extra``: more fields of every request body."""
    order = assignment(clients, per_client, len(prompts))
    timeout = httpx.Timeout(10.0, read=900.0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    done: list[tuple[int, str, Any]] = []

    async def client(i: int) -> None:
        for index in order[i]:
            pid, text = prompts[index]
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": True}
            body |= {"temperature": 0, "stream_options": {"include_usage": True}} | (extra or {})
            done.append((i, pid, await one_request(http, body)))

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.monotonic() - started, done


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, from ``/proc`` (Linux); a
    process that cannot be read is left out. ``"clients"`` is this process (the HTTP clients).

    >>> sorted(cpu_seconds({"me": os.getpid(), "gone": -1}))
    ['clients', 'me']
    """
    tick = os.sysconf("SC_CLK_TCK")
    out = {"clients": sum(os.times()[:2])}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


# what each stage did in a round, from its /metrics (differences): passes, requests summed over
# them, tokens fed, draft tokens checked and accepted (the level below's drafts)
STAGE_COUNTERS = {
    "passes": BATCHED_PASSES,
    "requests": BATCHED_REQUESTS,
    "tokens": "pipespec:stage_batched_pass_tokens_total",
    "draft_tokens": "pipespec:spec_decode_num_draft_tokens_total",
    "accepted": "pipespec:spec_decode_num_accepted_tokens_total",
}


def stage_counters(port: int) -> dict[str, float | None]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    return {key: scrape(text, name, None) for key, name in STAGE_COUNTERS.items()}


def round_counters(before: dict[str, float | None], after: dict[str, float | None]) -> dict:
    """What a stage did between two readings; a counter it lacks is left out.

    >>> round_counters({"passes": 3, "tokens": None}, {"passes": 7, "tokens": None})
    {'passes': 4}
    """
    return {k: v - before[k] for k, v in after.items() if v is not None and before[k] is not None}


@dataclass
class Served:
    """A launched system of the benchmark: its plan, each stage's /metrics port (level order) and
    every process's pid."""

    plan: Any
    ports: list[int]
    pids: dict[str, int]


def serve_round(
    system: str,
    served: Served,
    prompts: Sequence[tuple[str, str]],
    clients: int,
    repeat: int,
    per_client: int,
    max_tokens: int,
    encode: Callable[[str], list[int]],
    reference: dict[str, str] | None = None,
) -> Round:
    """One round of ``clients`` streaming clients against ``served``, with what each process and
    stage did meanwhile (``cpu_seconds``, ``round_counters``)."""
    model = served.plan.gateway.served_model_name
    before = [stage_counters(port) for port in served.ports]
    wall, done, cpu = timed_clients(
        served.plan.http_url, model, prompts, clients, per_client, max_tokens, served.pids
    )
    after = [stage_counters(port) for port in served.ports]
    target = [(c["passes"], c["requests"]) for c in (before[-1], after[-1])]
    return Round(
        system,
        clients,
        repeat,
        wall,
        [served_request(i, pid, res, encode, reference) for i, pid, res in done],
        per_pass(*target),
        cpu,
        {f"stage{i}": round_counters(b, a) for i, (b, a) in enumerate(zip(before, after))},
    )


def timed_clients(url, model, prompts, clients, per_client, max_tokens, pids, extra=None):
    """``run_clients`` and the CPU seconds each process of ``pids`` spent meanwhile:
    ``(wall_s, done, cpu_s)``."""
    cpu_before = cpu_seconds(pids)
    wall, done = asyncio.run(
        run_clients(url, model, prompts, clients, per_client, max_tokens, extra)
    )
    cpu = cpu_seconds(pids)
    return wall, done, {k: round(v - cpu_before[k], 2) for k, v in cpu.items() if k in cpu_before}


def llama_round(
    system: str,
    srv: llama_cpp.Server,
    prompts: Sequence[tuple[str, str]],
    clients: int,
    repeat: int,
    per_client: int,
    max_tokens: int,
    encode,
    reference: dict[str, str] | None = None,
):
    """One round against a llama-server ``srv``: as ``serve_round``, the same clients, the bodies
    with ``llama_cpp.completion_extras()``; no stage counters."""
    pids = {"llama-server": srv.pid}
    extra = llama_cpp.completion_extras()
    wall, done, cpu = timed_clients(
        srv.url, system, prompts, clients, per_client, max_tokens, pids, extra
    )
    requests = [served_request(i, pid, res, encode, reference) for i, pid, res in done]
    return Round(system, clients, repeat, wall, requests, cpu_s=cpu)


def serve_interleaved(
    configs: dict[str, dict[str, Any]],
    prompts: Sequence[tuple[str, str]],
    clients_list: Sequence[int],
    per_client: int,
    max_tokens: int,
    repeats: int,
    log_dir: Path,
    encode: Callable[[str], list[int]],
    reference: dict[str, str] | None = None,
    warmup: str | None = None,
    log: Callable[[str], None] = print,
    in_process: dict[str, Callable[[int, int], Round]] | None = None,
) -> tuple[list[Round], dict[str, str]]:
    """Launch every system of ``configs`` (launcher configs by name) at once, then run the rounds
    interleaved: for each concurrency and repeat, one round of every system (``in_process``
    ones too: ``(clients, repeat) -> Round``), their order rotated by the repeat. A slow drift of
    the machine then shifts every system alike instead of whichever ran last. The rounds, and
    per system the error that ended its rounds (the others go on)."""
    rounds: list[Round] = []
    errors: dict[str, str] = {}
    runners: dict[str, Callable[[int, int], Round]] = dict(in_process or {})
    served_systems: dict[str, Served] = {}
    with contextlib.ExitStack() as stack:
        for system, config in configs.items():
            config, ports = with_metrics_ports(config)
            try:
                running = stack.enter_context(
                    launched(config, log_dir / system, startup_timeout_s=300)
                )
                if warmup:
                    complete(running.plan, warmup, 4)
            except Exception as exc:
                errors[system] = f"{type(exc).__name__}: {exc}"
                log(f"{system} FAILED to start: {errors[system]}")
                continue
            served = Served(
                running.plan, ports, {c.spec.name: c.process.pid for c in running.children}
            )
            served_systems[system] = served
            runners[system] = lambda clients, repeat, system=system, served=served: serve_round(
                system, served, prompts, clients, repeat, per_client, max_tokens, encode, reference
            )
            log(f"{system}: running, logs in {log_dir / system}")
        for clients in clients_list:
            for repeat in range(repeats):
                names = list(runners)
                shift = repeat % len(names) if names else 0
                for system in names[shift:] + names[:shift]:
                    if system in errors:
                        continue
                    try:
                        rounds.append(runners[system](clients, repeat))
                    except Exception as exc:
                        errors[system] = f"{type(exc).__name__}: {exc}"
                        log(f"{system} FAILED: {errors[system]}")
                        continue
                    log(f"{system} clients={clients} repeat={repeat}: {summary_line(rounds[-1])}")
        for system, served in served_systems.items():
            peaks = {name: status_kb(pid, "VmHWM") for name, pid in served.pids.items()}
            log(
                f"{system} peak RSS (VmHWM), GB: "
                + ", ".join(f"{name} {kb * 1024 / 1e9:.2f}" for name, kb in peaks.items() if kb)
            )
    return rounds, errors


def served_request(client, pid, res, encode, reference: dict[str, str] | None) -> Request:
    text = "".join(t for _, t in res.chunks)
    counts = chunk_tokens(encode, [t for _, t in res.chunks])
    return Request(
        client=client,
        prompt_id=pid,
        tokens=res.tokens,
        ttft_s=res.ttft_s,
        latency_s=res.latency_s,
        itl_s=token_gaps([(at, n) for (at, _), n in zip(res.chunks, counts)]),
        text=text,
        equal=(text == reference[pid]) if reference and pid in reference else None,
        error=res.error,
    )


def summary_line(r: Round) -> str:
    s = round_summary(r)
    return (
        f"{_f(s['tokens_per_s'])} tok/s, TTFT p50 {_f(s['ttft_p50_s'], 1000, '.0f')} ms, "
        f"ITL p50 {_f(s['itl_p50_s'], 1000)} ms, equal {s['equal']}/{s['checked']}, "
        f"req/pass {_f(s['req_per_pass'], spec='.2f')}, errors {s['errors']}"
        + (", CPU s " + " ".join(f"{k} {v:.1f}" for k, v in r.cpu_s.items()) if r.cpu_s else "")
        + "".join(
            f", {name} {c.get('passes', 0):.0f} passes {c.get('tokens', 0):.0f} tokens"
            + (
                f" {c['accepted']:.0f}/{c['draft_tokens']:.0f} drafts"
                if c.get("draft_tokens")
                else ""
            )
            for name, c in r.stages.items()
        )
    )


# ---------------------------------------------------------------------------- the command
def quantized_reference(model: str, ids, max_tokens: int) -> dict[str, list[int]]:
    """Each prompt decoded alone, greedily, one token per pass, by the quantized runner our
    stages serve with (every core: its logits do not depend on the thread count)."""
    from common.backends import load_backend
    from common.settings import StageSettings
    from common.simnet import reference_decode

    backend = load_backend(StageSettings(level=0, backend="quantized", model=model))
    eos = backend.eos_token_ids
    return {pid: reference_decode(backend, list(t), max_tokens, eos) for pid, t in ids}


def main(argv: list[str] | None = None) -> int:
    from benchmarks import prompts as prompt_sets
    from benchmarks import run

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", choices=tuple(run.MODEL_SETS), default="smollm2")
    parser.add_argument("--clients", default="1,2,4,8,16", help="concurrencies, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per cell (median)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--prompts", choices=("humaneval", "prose", "both"), default="both")
    parser.add_argument("--n", type=int, default=4, help="prompts per set (default 4)")
    parser.add_argument("--hf-threads", type=int, default=2, help="torch threads of generate")
    parser.add_argument(
        "--backend",
        choices=("quantized", "hf"),
        default="quantized",
        help="what our stages serve with: the GGUF files on the quantized runner (the reference is "
        "then that runner decoding each prompt alone), or fp32 transformers (reference: generate)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON (default benchmarks/results/serving-<models>.json)"
    )
    parser.add_argument("--png", type=Path, help="plot (default: --out with .png)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        parser.error(
            f"unknown systems {sorted(set(systems) - set(SYSTEMS))}; choose from {SYSTEMS}"
        )
    clients_list = [int(c) for c in args.clients.split(",") if c.strip()]
    out = args.out or Path("benchmarks/results") / f"serving-{args.models}.json"
    png = args.png or out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)

    from benchmarks.hf_methods import InProcess, run_in_process
    from benchmarks.systems import bench_config
    from common.logs import configure
    from common.model_catalog import model_dir
    from common.tokenization import eos_token_ids, load_tokenizer

    configure("warning", service="benchmark")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    models = run.MODEL_SETS[args.models]
    quantized = args.backend == "quantized"
    target_dir = f"@{models['target']}" if quantized else str(model_dir(models["target"]))
    tokenizer = load_tokenizer(models["target"] if quantized else target_dir)
    eos = [] if quantized else eos_token_ids(tokenizer, target_dir)
    prompts = prompt_sets.load(args.prompts, args.n)
    texts = [(p.id, p.text) for p in prompts]
    ids = [(p.id, tokenizer.encode(p.text)) for p in prompts]

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    if quantized:
        log(f"{len(prompts)} prompts, reference: the quantized target on each alone")
        reference = quantized_reference(models["target"], ids, args.max_tokens)
        if "generate" in systems:
            runner = InProcess(str(model_dir(models["target"])), threads=args.hf_threads)
    else:
        log(
            f"{len(prompts)} prompts, reference: generate on each alone ({args.hf_threads} threads)"
        )
        runner = InProcess(target_dir, threads=args.hf_threads, eos_ids=eos)
        warm = tokenizer.encode(run.WARMUP_TEXT)
        ref = run_in_process(
            runner, args.models, "autoregressive", [], ids, args.max_tokens, warmup=warm
        )
        if ref.error:
            raise SystemExit(f"the reference failed: {ref.error}")
        reference = {r.prompt_id: r.tokens for r in ref.runs}
    log_dir = Path(tempfile.mkdtemp(prefix="pipespec-serving-"))
    reference_text = {pid: decode(t) for pid, t in reference.items()}
    configs = {}
    for system in [s for s in systems if s in SERVED]:
        stages = run.real_stages(models, SERVED[system], {"dtype": "float32"}, args.backend)
        configs[system] = bench_config(target_dir, stages)

    def generate(clients: int, repeat: int) -> Round:
        return run_generate(
            runner,
            ids,
            clients,
            args.requests_per_client,
            args.max_tokens,
            repeat,
            reference,
            decode,
        )

    if "generate" not in systems and not quantized:
        runner.close()  # its memory: every served system is loaded at once
    in_process: dict[str, Callable[[int, int], Round]] = {}
    if "generate" in systems:
        in_process["generate"] = generate
    slots = {s: LLAMA[s] or max(clients_list) for s in systems if s in LLAMA}
    gguf = llama_cpp.gguf_file(models["target"])
    with contextlib.ExitStack() as llama_stack:
        llama, llama_errors = llama_cpp.launch_servers(
            llama_stack, slots, gguf, log_dir, args.max_tokens, run.WARMUP_TEXT, log
        )
        for system, srv in llama.items():
            in_process[system] = lambda clients, repeat, system=system, srv=srv: llama_round(
                system,
                srv,
                texts,
                clients,
                repeat,
                args.requests_per_client,
                args.max_tokens,
                encode,
                reference_text,
            )
        log(f"launching {', '.join(configs)}; logs in {log_dir}")
        rounds, errors = serve_interleaved(
            configs,
            texts,
            clients_list,
            args.requests_per_client,
            args.max_tokens,
            args.repeats,
            log_dir,
            encode,
            reference_text,
            run.WARMUP_TEXT,
            log,
            in_process=in_process,
        )
    errors = llama_errors | errors
    if "generate" in systems:
        runner.close()
    for system, error in errors.items():
        log(f"{system} FAILED: {error}")

    table = cells(rounds)
    order = [s for s in systems if s in table]
    text = markdown(table, order)
    meta = {
        "command": " ".join(
            ["python -m benchmarks.serving", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_end": os.getloadavg(),
        "machine": run.machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "levels": {s: run.level_names(models, SERVED.get(s, "autoregressive")) for s in systems},
        "llama_cpp": {
            "version": llama_cpp.VERSION,
            "gguf": str(gguf),
            "slots": slots,
            "request_fields": llama_cpp.completion_extras(),
            "skipped": sorted(set(slots) - set(llama) - set(llama_errors)),
        },
        "prompts": [{"id": p.id, "set": p.set, "text": p.text} for p in prompts],
    }
    doc = {
        "meta": meta,
        "reference": {
            pid: {"tokens": t, "text": reference_text[pid]} for pid, t in reference.items()
        },
        "cells": table,
        "ratios": ratios(table),
        "errors": errors,
        "rounds": rounds,
    }
    write_json(out, to_jsonable(doc))
    print(
        f"\n{args.models}, {args.max_tokens} tokens per request, {args.requests_per_client} per client, median of {args.repeats}:\n"
    )
    print(text)
    try:
        plot_throughput(png, table, f"{args.models}: {args.max_tokens} tokens per request")
    except ImportError:
        png = None
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print(
        f"\nwrote {out}"
        + (f" and {png}" if png else "")
        + f"; total {meta['wall_s']:.0f} s, load {meta['load_average_end'][0]:.2f}"
    )
    return 1 if errors or any(s["errors"] for by in table.values() for s in by.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
