"""Run a PipeSpec system from a launcher config for as long as a block runs: the one way the
tests, the benchmarks and the GPU check start a system, wait until it is healthy, use it and
stop it (``python -m deploy.launch`` is the command-line launcher; both use its ``System``).

    config = loopback_config("/models/t", [{"level": 0, "backend": "ngram"},
                                           {"level": 1, "model": "/models/t"}], threads=1)
    with launched(config, log_dir) as system:
        body = complete(system.plan, "def fibonacci(n):", max_tokens=16)
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from deploy.launch import (
    MODEL_BACKENDS,
    PORT_FIELDS,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    LaunchError,
    Plan,
    System,
    free_port,
    plan_from_config,
)

LOOPBACK_HOSTS = ("http_host", "bind_host")  # the gateway's listening hosts
STAGE_PORT_FIELDS = ("inbox_port", "notices_port")  # a stage's listening ports (0: ephemeral)


def loopback_config(
    tokenizer: str, stages: list[dict[str, Any]], *, threads: int | None = None, **gateway: Any
) -> dict[str, Any]:
    """A launcher config whose gateway listens on free ports; ``num_levels`` from the stages.
    With ``threads``, each stage that runs a transformers model and sets no ``threads`` of its
    own gets that many torch threads.

    >>> cfg = loopback_config("t", [{"level": 0, "backend": "ngram"}, {"level": 1}], threads=1)
    >>> cfg["gateway"]["num_levels"], cfg["gateway"]["http_port"], cfg["stages"]
    (2, 0, [{'level': 0, 'backend': 'ngram'}, {'threads': 1, 'level': 1}])
    """
    table = {"tokenizer": tokenizer, "num_levels": 1 + max(s["level"] for s in stages)}
    table |= dict.fromkeys(PORT_FIELDS, 0) | gateway
    if threads:
        stages = [
            {"threads": threads} | s if s.get("backend", "hf") in MODEL_BACKENDS else s
            for s in stages
        ]
    return {"gateway": table, "stages": stages}


def on_loopback(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a launcher config (a shipped TOML, say) whose gateway and stages listen on
    127.0.0.1 and free ports, so it runs beside anything already on its fixed ports; stages
    find the gateway's registry from the plan (``plan_from_config``), and serve no /metrics.

    >>> cfg = {"gateway": {"http_port": 8000, "bind_host": "0.0.0.0", "tokenizer": "t"},
    ...        "stages": [{"level": 0, "inbox_port": 6000, "metrics_port": 9100}]}
    >>> out = on_loopback(cfg)
    >>> out["gateway"]["http_port"], out["gateway"]["client_port"], out["gateway"]["bind_host"]
    (0, 0, '127.0.0.1')
    >>> out["stages"][0], cfg["stages"][0]["inbox_port"]
    ({'level': 0, 'inbox_port': 0, 'notices_port': 0, 'bind_host': '127.0.0.1'}, 6000)
    """
    config = copy.deepcopy(config)
    gateway = config.setdefault("gateway", {})
    gateway |= dict.fromkeys(PORT_FIELDS, 0) | dict.fromkeys(LOOPBACK_HOSTS, "127.0.0.1")
    gateway.pop("advertise_host", None)
    for stage in config.get("stages", []):
        for key in ("metrics_port", "advertise_host", "gateway"):  # the registry's is new too
            stage.pop(key, None)
        stage |= dict.fromkeys(STAGE_PORT_FIELDS, 0) | {"bind_host": "127.0.0.1"}
    return config


def with_metrics_ports(config: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """A copy of a launcher config, stages in level order, each serving /metrics on a free port;
    and those ports."""
    config = copy.deepcopy(config)
    config["stages"] = sorted(config["stages"], key=lambda s: s["level"])
    ports = []
    for stage in config["stages"]:
        stage["metrics_port"] = free_port()
        ports.append(stage["metrics_port"])
    return config, ports


@contextlib.contextmanager
def running(
    system: System,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    require_clean_exit: bool = False,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    supervise: bool = False,
) -> Iterator[System]:
    """Start ``system``, wait until its /health is 200 and every replica it started has
    registered, yield it; stop it however the block ends (SIGTERM, then SIGKILL after
    ``stop_timeout_s``). ``require_clean_exit``: then raise LaunchError unless every process
    exited with status 0. ``supervise``: restart children that die, as the launcher's command
    does."""
    system.start()
    try:
        system.wait_healthy(timeout_s=startup_timeout_s)
        wait_all_registered(system, timeout_s=startup_timeout_s)
        if supervise:
            system.start_supervisor()
        yield system
    finally:
        system.stop(timeout_s=stop_timeout_s)
        if require_clean_exit:
            codes = exit_codes(system)
            if any(code != 0 for code in codes.values()):
                tails = "\n".join(f"--- {c.spec.name}\n{c.tail()}" for c in system.children)
                raise LaunchError(f"exit codes {codes}\n{tails}")


def wait_all_registered(system: System, timeout_s: float) -> None:
    """Until /health lists every stage replica the plan started (healthy needs only one per
    level; a system of several replicas wants them all). LaunchError after ``timeout_s``."""
    want: dict[int, int] = {}
    for spec in system.plan.children:
        if spec.role.startswith("level"):
            level = int(spec.role[len("level") :])
            want[level] = want.get(level, 0) + 1
    deadline = time.monotonic() + timeout_s
    while True:
        levels = httpx.get(f"{system.plan.http_url}/health", timeout=5).json()["levels"]
        if all(len(levels[level]) >= n for level, n in want.items()):
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"not every replica registered within {timeout_s:g} s: {levels}")
        time.sleep(0.2)


def launched(
    config: dict[str, Any] | Plan, log_dir: Path, **options: Any
) -> contextlib.AbstractContextManager[System]:
    """``running`` for the system of a launcher config (or a plan); logs go to ``log_dir``."""
    plan = config if isinstance(config, Plan) else plan_from_config(config)
    return running(System(plan, log_dir), **options)


def status_kb(pid: int, field: str) -> int | None:
    """One ``kB`` field of a live process's ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...); None
    when the process is gone or there is no ``/proc``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def exit_codes(system: System) -> dict[str, int | None]:
    return {c.spec.name: c.process.returncode for c in system.children}


def complete(
    plan: Plan,
    prompt: str,
    max_tokens: int,
    timeout_s: float = 300,
    http: httpx.Client | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One non-streaming completion over the system's HTTP API; the response body. ``fields``:
    more of the request body (``temperature``, ``seed``, ...). RuntimeError with the gateway's
    answer on any status but 200."""
    body = {"model": plan.gateway.served_model_name, "prompt": prompt, "max_tokens": max_tokens}
    body |= fields
    url = f"{plan.http_url}/v1/completions"
    if http is None:
        resp = httpx.post(url, json=body, timeout=timeout_s)
    else:
        resp = http.post(url, json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json()
