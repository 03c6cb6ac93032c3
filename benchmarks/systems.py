"""Methods that run through our own services: a whole system (gateway + one stage per level)
started by the launcher on loopback, driven over the gateway's ZeroMQ client API, one request at
a time.

Per request: the token ids the client received (compared exactly with the target's greedy
output), the client's wall time and time to the first token, the gateway's ``spec_decode_stats``
(target passes, acceptance and rollbacks per verifier level), and each stage's busy time and
forward passes. The gateway's statistics do not carry the per-level ``busy_s`` the target
forwards, so those come from each stage's Prometheus ``/metrics`` (``metrics_port``), read
before and after each request: ``pipespec:stage_pass_seconds_sum`` and
``pipespec:stage_forward_passes_total``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.report import LevelCount, MethodResult, PromptRun
from deploy.harness import launched, loopback_config, with_metrics_ports
from deploy.launch import plan_from_config
from services.gateway.zmq_client import PipeSpecClient

BUSY_METRIC = "pipespec:stage_pass_seconds_sum"
PASSES_METRIC = "pipespec:stage_forward_passes_total"


def scrape(text: str, name: str, missing: float | None = 0.0) -> float | None:
    """Sum of the samples of ``name`` in a Prometheus text exposition; ``missing`` when it has
    none (a metric this build of the stage does not export).

    >>> scrape('x_sum{level="1"} 2.5\\nx_sum_other 9\\nx_sum{level="2"} 1.0\\n', "x_sum")
    3.5
    >>> scrape("y 1\\n", "x_sum", missing=None) is None
    True
    """
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else missing


class StageProbe:
    """Reads busy seconds and forward passes from each stage's /metrics (level order)."""

    def __init__(self, ports: Sequence[int]):
        self.ports = list(ports)
        self.http = httpx.Client(timeout=5.0)

    def read(self) -> tuple[list[float], list[float]]:
        busy, passes = [], []
        for port in self.ports:
            text = self.http.get(f"http://127.0.0.1:{port}/metrics").text
            busy.append(scrape(text, BUSY_METRIC))
            passes.append(scrape(text, PASSES_METRIC))
        return busy, passes

    def close(self) -> None:
        self.http.close()


def complete(
    client: PipeSpecClient, prompt: str, max_tokens: int, **sampling: Any
) -> dict[str, Any]:
    """One request over the ZMQ client API: the token ids received and when they arrived.
    ``sampling``: ``temperature``, ``top_p``, ``seed`` ... (greedy without them)."""
    t0 = time.perf_counter()
    ids: list[int] = []
    first: float | None = None
    for event in client.events(prompt, max_tokens, **sampling):
        if event.type == "token":
            if event.token_ids and first is None:
                first = time.perf_counter()
            ids += event.token_ids or []
            continue
        return {
            "ids": ids,
            "wall_s": time.perf_counter() - t0,
            "ttft_s": None if first is None else first - t0,
            "finish_reason": event.finish_reason,
            "stats": event.stats or {},
        }
    raise RuntimeError("the reply ended without a done event")


def bench_config(tokenizer: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """A launcher config for ``stages`` on free loopback ports, quiet, with a long timeout."""
    return loopback_config(
        tokenizer,
        stages,
        served_model_name="bench",
        log_level="warning",
        request_timeout_s=1800.0,
    )


def run_system(
    suite: str,
    name: str,
    level_names: list[str],
    config: dict[str, Any],
    prompts: Sequence[tuple[str, str]],
    max_tokens: int,
    log_dir: Path,
    warmup: str | None = None,
    warmup_tokens: int = 4,
    startup_timeout_s: float = 300.0,
    request_timeout_s: float = 900.0,
    profile: bool = False,
    sampling: dict[str, dict[str, Any]] | None = None,
) -> MethodResult:
    """Start the system of ``config``, run ``prompts`` (id, text) one after another, stop it.
    ``profile``: run every stage under cProfile (``benchmarks.stage_profile``) and add each
    stage's main-loop breakdown to the result's config. ``sampling``: per prompt id, the
    sampling fields of its request (greedy without)."""
    from benchmarks import stage_profile

    config, ports = with_metrics_ports(config)
    result = MethodResult(
        suite=suite,
        name=name,
        levels=level_names,
        config={"stages": config["stages"], "where": "services (launcher, ZMQ client API)"},
    )
    logs = log_dir / f"{suite}-{name}"
    plan = plan_from_config(config)
    profiles: dict[int, Path] = {}
    if profile:
        logs.mkdir(parents=True, exist_ok=True)
        for child in plan.children:
            if child.module == "services.stage":
                level = int(child.env["PIPESPEC_STAGE_LEVEL"])
                profiles[level] = (logs / f"stage{level}.prof").resolve()
                child.module = "benchmarks.stage_profile"
                child.env[stage_profile.ENV] = str(profiles[level])
    t_start = time.perf_counter()
    try:
        with (
            launched(plan, logs, startup_timeout_s=startup_timeout_s),
            PipeSpecClient(
                plan.client_endpoint, request_timeout_s, linger_ms=0, keys_dir=plan.keys_dir
            ) as client,
        ):
            result.config["startup_s"] = round(time.perf_counter() - t_start, 2)
            run_prompts(
                client,
                StageProbe(ports),
                result,
                prompts,
                max_tokens,
                warmup,
                warmup_tokens,
                sampling,
            )
    except Exception as exc:  # one method failing must not lose the others
        result.error = f"{type(exc).__name__}: {exc}"
    if profiles:
        result.config["profile"] = {
            str(level): stage_profile.breakdown(str(path))
            for level, path in sorted(profiles.items())
            if path.exists()
        }
    return result


def run_prompts(
    client: PipeSpecClient,
    probe: StageProbe,
    result: MethodResult,
    prompts: Sequence[tuple[str, str]],
    max_tokens: int,
    warmup: str | None,
    warmup_tokens: int,
    sampling: dict[str, dict[str, Any]] | None = None,
) -> None:
    """``prompts`` one after another; each one's reply and stage counters go to ``result``.
    ``sampling``: per prompt id, the sampling fields of its request (greedy without)."""
    try:
        if warmup:
            complete(client, warmup, warmup_tokens)
        for pid, text in prompts:
            busy0, passes0 = probe.read()
            reply = complete(client, text, max_tokens, **(sampling or {}).get(pid, {}))
            busy1, passes1 = probe.read()
            stats = reply["stats"]
            result.runs.append(
                PromptRun(
                    prompt_id=pid,
                    tokens=reply["ids"],
                    wall_s=reply["wall_s"],
                    ttft_s=reply["ttft_s"],
                    target_passes=stats.get("target_forward_passes", 0),
                    levels=[
                        LevelCount(
                            a["level"],
                            a["drafts"],
                            a["draft_tokens"],
                            a["accepted_tokens"],
                            a["rollbacks"],
                        )
                        for a in stats.get("acceptance", [])
                    ],
                    busy_s=[b1 - b0 for b0, b1 in zip(busy0, busy1)],
                    passes=[int(p1 - p0) for p0, p1 in zip(passes0, passes1)],
                    extra={
                        "finish_reason": reply["finish_reason"],
                        "gateway_wall_s": stats.get("wall_time_s"),
                        "gateway_ttft_s": stats.get("time_to_first_token_s"),
                        "resyncs": stats.get("resyncs"),
                    },
                )
            )
    finally:
        probe.close()
