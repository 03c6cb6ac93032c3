"""Run a whole PipeSpec system on this machine, from one TOML file.

    python -m deploy.launch deploy/configs/qwen-k3.toml                             # until Ctrl-C
    python -m deploy.launch deploy/configs/qwen-k3.toml --demo "def quicksort(arr):"

The gateway and every stage run as child processes on loopback. By default the gateway serves
HTTP on http://127.0.0.1:8000 (OpenAI API: POST /v1/completions) and the ZMQ client API on
tcp://127.0.0.1:5551; ``[gateway] http_port / client_port`` change that, and a port of 0 means
"pick a free one". Children's logs go to one file each in ``--log-dir`` (default: a new
temporary directory, printed at start).

Config file::

    [gateway]                  # GatewaySettings fields (PIPESPEC_GATEWAY_*)
    tokenizer = "@smollm2-135m"
    num_levels = 2

    [[stages]]                 # StageSettings fields (PIPESPEC_STAGE_*), one table per level
    level = 0
    backend = "ngram"

    [[stages]]
    level = 1
    model = "@smollm2-135m"    # "@name": common.model_catalog.model_dir(name)
    replicas = 2               # start this many identical replicas (default 1)

Each child gets its settings as PIPESPEC_* environment variables on top of this process's
environment; every stage's ``gateway`` is set to the gateway's registry endpoint.

Keys: every run generates a fresh CURVE key set (``common.security``) in a private temporary
directory, gives each child only its own role's secret key, and removes the set when it stops.
``[gateway] insecure = true`` runs everything on plain TCP instead (warned at start-up).

Supervision, as Kubernetes does it: once the system is up, a child that exits is restarted after
an exponential back-off (1 s, 2 s, 4 s … at most 30 s; back to 1 s after a minute of running),
with its restart count in the status line and in its settings (``restarts``: on the gateway's
/health). The others keep serving. Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import security
from common.settings import GatewaySettings, StageSettings
from common.sockets import WILDCARD_HOSTS

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.5
SUPERVISE_S = 0.2  # how often the supervisor looks for exited children
BACKOFF_S = (1.0, 30.0)  # first and longest delay before a restart
BACKOFF_RESET_S = 60.0  # a child that ran this long starts again from the first delay
LOG_TAIL_LINES = 30
PORT_FIELDS = ("http_port", "registry_port", "client_port")
MODEL_FIELDS = ("model", "tokenizer")


class LaunchError(Exception):
    """The config is wrong, a model is missing, or a child failed; the message says what to do."""


@dataclass
class ChildSpec:
    name: str  # "gateway", "stage0", "stage1.2" (level 1, replica 2)
    module: str  # run as ``python -m module``
    env: dict[str, str]  # PIPESPEC_* variables
    role: str = ""  # CURVE role: "gateway" or "level<N>"


@dataclass
class Plan:
    gateway: GatewaySettings
    children: list[ChildSpec]
    keys_dir: Path | None = None  # the run's key set, once System.start made it
    target: StageSettings | None = None  # the top level's settings (its first replica's)

    @property
    def secure(self) -> bool:
        return not self.gateway.insecure

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.gateway.http_host)}:{self.gateway.http_port}"

    @property
    def client_endpoint(self) -> str:
        return f"tcp://{connect_host(self.gateway.bind_host)}:{self.gateway.client_port}"


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


_HANDED_OUT: set[int] = set()  # every port free_port has returned in this process


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 is bound to now, and one this process has not handed out
    before: the OS may give a port it just closed again at once, and a plan asks for several
    before any child binds them (two endpoints of one gateway once got the same port in CI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


MODEL_BACKENDS = ("quantized", "hf", "early-exit")  # the backends that compute (use cores)


def resolve_model(value: Any, *, key: str = "model", backend: str | None = None) -> Any:
    """``"@name"`` -> what a service reads for catalog model ``name`` (common.model_catalog):
    the name itself for a quantized stage's ``model`` (its GGUF and tokenizer, located by the
    backend), the saved tokenizer (or HF) directory for a ``tokenizer``, else the fp32 HF
    directory (``prepare --hf``)."""
    if not (isinstance(value, str) and value.startswith("@")):
        return value
    from common import model_catalog  # lazily: only configs that name stored models need it

    name = value[1:]
    if name not in model_catalog.MODELS:
        raise LaunchError(f"unknown model {name!r}; known: {', '.join(model_catalog.MODELS)}")
    try:
        if key == "tokenizer":
            return model_catalog.locate_tokenizer(name)[0]
        if backend == "quantized":
            model_catalog.locate_gguf(name)
            return name
        return model_catalog.locate(name)[0]
    except FileNotFoundError as exc:
        raise LaunchError(str(exc)) from None


def share_cores(stages: list[dict[str, Any]], cores: int) -> list[dict[str, Any]]:
    """The cores rule for quantized stages that share this machine and set no ``threads``: the
    model stages split the cores evenly (one replica each counts), and the target level, when
    model stages below it share them, gets every core for the passes in which its draft policy
    idles them (``threads_alone``), which it does whenever it serves more than one request
    (``max_drafting_load``: measured on two cores, ``draft_policy.drafting_allowed``). The
    quantized kernels give the same bits at any thread count, so the rule changes speed only.
    Stages that set ``threads`` keep theirs; one that sets ``max_drafting_load`` keeps it.

    >>> stages = [{"level": 0, "backend": "ngram"},
    ...           {"level": 1, "backend": "quantized", "model": "m"},
    ...           {"level": 2, "backend": "quantized", "model": "t"}]
    >>> [(s.get("threads"), s.get("threads_alone"), s.get("max_drafting_load"))
    ...  for s in share_cores(stages, 2)]
    [(None, None, None), (1, None, None), (1, 2, 1)]
    >>> [(s.get("threads"), s.get("threads_alone")) for s in share_cores(stages[::2], 2)]
    [(None, None), (2, None)]
    """
    auto = [s for s in stages if s.get("backend") == "quantized" and "threads" not in s]
    if not auto:
        return stages
    models = sum(s.get("replicas", 1) for s in stages if s.get("backend") in MODEL_BACKENDS)
    share = max(1, cores // max(1, models))
    top = max(s["level"] for s in stages if isinstance(s.get("level"), int))
    out = []
    for s in stages:
        if s in auto:
            s = {"threads": share} | s
            if s["level"] == top and share < cores:
                s.setdefault("threads_alone", cores)
                s.setdefault("max_drafting_load", 1)
        out.append(s)
    return out


def env_value(value: Any) -> str:
    """A settings value as pydantic-settings parses it back from the environment."""
    return value if isinstance(value, str) else json.dumps(value)


def settings_env(prefix: str, table: dict[str, Any]) -> dict[str, str]:
    return {
        f"{prefix}{key.upper()}": env_value(value)
        for key, value in table.items()
        if value is not None
    }


def plan_from_config(config: dict[str, Any]) -> Plan:
    """Validate a parsed config and turn it into the processes to start."""
    unknown = set(config) - {"gateway", "stages"}
    if unknown:
        raise LaunchError(
            f"unknown top-level key(s) {sorted(unknown)}; expected [gateway] and [[stages]]"
        )
    gateway_table = {
        key: resolve_model(value, key=key) for key, value in config.get("gateway", {}).items()
    }
    for port in PORT_FIELDS:
        if gateway_table.get(port, GatewaySettings.model_fields[port].default) == 0:
            gateway_table[port] = free_port()
    try:
        gateway = GatewaySettings(**gateway_table)
    except ValueError as exc:
        raise LaunchError(f"[gateway]: {exc}") from None
    registry = (
        f"tcp://{connect_host(gateway.advertise_host or gateway.bind_host)}:{gateway.registry_port}"
    )
    children = [
        ChildSpec(
            "gateway",
            "services.gateway",
            settings_env("PIPESPEC_GATEWAY_", gateway_table),
            security.GATEWAY,
        )
    ]
    stages, levels = config.get("stages", []), set()
    target: StageSettings | None = None
    if not stages or not all(isinstance(entry, dict) for entry in stages):
        raise LaunchError("the config needs one or more [[stages]] tables")
    stages = share_cores(stages, os.cpu_count() or 1)
    for i, entry in enumerate(stages):
        backend = entry.get("backend", StageSettings.model_fields["backend"].default)
        table = {
            key: resolve_model(value, key=key, backend=backend)
            for key, value in entry.items()
            if key != "replicas"
        }
        table.setdefault("gateway", registry)
        if gateway.insecure:
            table.setdefault("insecure", True)  # one transport for the whole system
        replicas = entry.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 1:
            raise LaunchError(
                f"[[stages]] #{i + 1}: replicas must be a positive integer, got {replicas!r}"
            )
        try:
            stage = StageSettings(**table)
        except ValueError as exc:
            raise LaunchError(f"[[stages]] #{i + 1}: {exc}") from None
        levels.add(stage.level)
        if stage.level == gateway.num_levels - 1 and stage.draft_vocab is not None:
            raise LaunchError(
                f"[[stages]] #{i + 1}: draft_vocab is for drafters; the target (level "
                f"{stage.level}) scores the whole vocabulary"
            )
        if stage.level == gateway.num_levels - 1 and target is None:
            target = stage
        for r in range(replicas):
            name = f"stage{stage.level}" + (f".{r}" if replicas > 1 else "")
            children.append(
                ChildSpec(
                    name,
                    "services.stage",
                    settings_env("PIPESPEC_STAGE_", table),
                    security.level_role(stage.level),
                )
            )
    if sorted(levels) != list(range(gateway.num_levels)):
        raise LaunchError(
            f"stages cover levels {sorted(levels)}, but the gateway needs 0..{gateway.num_levels - 1}"
        )
    return Plan(gateway, children, target=target)


def read_config(path: Path) -> dict[str, Any]:
    """A launcher config file (TOML), parsed; LaunchError if it cannot be read."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LaunchError(f"cannot read {path}: {exc}") from None


def load_plan(path: Path) -> Plan:
    return plan_from_config(read_config(path))


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    log_path: Path
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # when an exited child is due to start again
    backoff_s: float = BACKOFF_S[0]

    def status(self) -> str:
        code = self.process.poll()
        state = f"up, pid {self.process.pid}" if code is None else f"exited {code}"
        return f"{self.spec.name} ({state}, restarts {self.restarts})"

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class System:
    """The running children of a Plan."""

    plan: Plan
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    say: Any = print  # where supervision status lines go
    _supervisor: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.plan.secure:
            self._make_keys()
        for spec in self.plan.children:
            log_path = self.log_dir / f"{spec.name}.log"
            self.children.append(Child(spec, self._spawn(spec, log_path, "wb"), log_path))

    def _make_keys(self) -> None:
        """A fresh key set for this run; each child's env names only its own secret key."""
        keys = Path(tempfile.mkdtemp(prefix="pipespec-keys-"))
        security.generate(keys, self.plan.gateway.num_levels)
        self.plan.keys_dir = keys
        for spec in self.plan.children:
            prefix = "PIPESPEC_GATEWAY_" if spec.role == security.GATEWAY else "PIPESPEC_STAGE_"
            spec.env.setdefault(f"{prefix}PUBLIC_KEYS", str(keys / "public"))
            spec.env.setdefault(f"{prefix}SECRET_KEY", str(security.secret_file(keys, spec.role)))

    @staticmethod
    def _spawn(spec: ChildSpec, log_path: Path, mode: str, restarts: int = 0) -> subprocess.Popen:
        prefix = "PIPESPEC_GATEWAY_" if spec.role == security.GATEWAY else "PIPESPEC_STAGE_"
        env = os.environ | spec.env | ({f"{prefix}RESTARTS": str(restarts)} if restarts else {})
        with open(log_path, mode) as log_file:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, "-m", spec.module],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    # -- supervision ---------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart children that exited, each after its back-off. Call it every so often (or
        ``start_supervisor`` does it from a thread)."""
        now = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return
            for child in self.children:
                code = child.process.poll()
                if code is None:
                    continue
                if child.restart_at is None:
                    ran = now - child.started_at
                    if ran >= BACKOFF_RESET_S:
                        child.backoff_s = BACKOFF_S[0]
                    child.restart_at = now + child.backoff_s
                    self.say(
                        f"supervisor: {child.spec.name} exited with code {code} after {ran:.1f} s; "
                        f"restarting in {child.backoff_s:g} s; log {child.log_path}",
                        flush=True,
                    )
                    child.backoff_s = min(child.backoff_s * 2, BACKOFF_S[1])
                elif now >= child.restart_at:
                    child.restarts += 1
                    child.process = self._spawn(child.spec, child.log_path, "ab", child.restarts)
                    child.started_at, child.restart_at = now, None
                    self.say(
                        f"supervisor: restarted {child.spec.name}; {self.status()}", flush=True
                    )

    def status(self) -> str:
        return "status: " + ", ".join(child.status() for child in self.children)

    def start_supervisor(self) -> None:
        def loop() -> None:
            while not self._stopping.wait(SUPERVISE_S):
                self.supervise()

        self._supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._supervisor.start()

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def wait_healthy(self, timeout_s: float) -> None:
        """Until GET /health is 200; LaunchError if a child exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                dead = self.exited() if self._supervisor is None else None  # else restarted
                if dead is not None:
                    raise LaunchError(
                        f"{dead.spec.name} exited with code {dead.process.returncode} during "
                        f"start-up; its last log lines ({dead.log_path}):\n{dead.tail()}"
                    )
                try:
                    response = http.get(f"{self.plan.http_url}/health")
                    if response.status_code == 200:
                        return
                    last = response.json().get("reason") or response.text
                except (httpx.HTTPError, ValueError) as exc:  # not up yet, or not our server
                    last = str(exc) or type(exc).__name__
                time.sleep(POLL_S)
        raise LaunchError(f"not healthy after {timeout_s:g} s: {last}; logs in {self.log_dir}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every child, SIGKILL those still running after ``timeout_s``; then remove
        the run's keys."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            self._stop_children(timeout_s)
        if self.plan.keys_dir is not None:
            shutil.rmtree(self.plan.keys_dir, ignore_errors=True)

    def _stop_children(self, timeout_s: float) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                print(
                    f"{child.spec.name} did not stop in {timeout_s:g} s; killing it",
                    file=sys.stderr,
                )
                child.process.kill()
                child.process.wait(timeout=timeout_s)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", type=Path, help="TOML file with [gateway] and [[stages]]")
    parser.add_argument(
        "--demo", metavar="PROMPT", help="stream one completion of PROMPT, then stop"
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="for --demo (default 128)")
    parser.add_argument(
        "--log-dir", type=Path, help="where children's logs go (default: a new temp dir)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds (default 300)"
    )
    args = parser.parse_args(argv)

    try:
        plan = load_plan(args.config)
    except LaunchError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    system = System(plan, args.log_dir or Path(tempfile.mkdtemp(prefix="pipespec-")))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"starting {len(plan.children)} processes; logs in {system.log_dir}", flush=True)
        system.start()
        system.wait_healthy(args.startup_timeout)
        print(
            f"PipeSpec is up: {plan.http_url}/v1/completions (OpenAI API), ZMQ client API at "
            f"{plan.client_endpoint}",
            flush=True,
        )
        if args.demo is not None:
            from deploy.demo import run_demo  # torch and transformers, for --demo only

            ok = run_demo(
                plan.http_url, plan.target, plan.gateway.tokenizer, args.demo, args.max_tokens
            )
            return 0 if ok else 1
        if not plan.secure:
            print("WARNING: insecure = true: plain TCP between the services", flush=True)
        else:
            print(f"ZMQ client keys: {plan.keys_dir} (public/, client/)", flush=True)
        print(system.status(), flush=True)
        print("Ctrl-C to stop", flush=True)
        while True:
            system.supervise()
            time.sleep(SUPERVISE_S)
    except LaunchError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    finally:
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # a second Ctrl-C must not leave children behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        system.stop()


if __name__ == "__main__":
    sys.exit(main())
