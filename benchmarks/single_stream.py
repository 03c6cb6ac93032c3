"""How fast is one client served, against llama.cpp on the same GGUF files? Our target alone,
PipeSpec k=3 and llama.cpp (autoregressive, and its own speculative decoding at each draft
length), one client, greedy, the same HumanEval prompts, in one run; plus what verifying 1, 4 and
8 tokens costs our runner beside llama.cpp's per-token time.

    python -m benchmarks.single_stream                     # qwen, 10 prompts x 128 tokens, 5 repeats
    python -m benchmarks.single_stream --prompts 3 --repeats 1 --max-tokens 32

Systems, each behind an OpenAI ``/v1/completions`` endpoint and driven by the same streaming
client (``benchmarks.load_test.one_request``), one request at a time:
    target        our services, k=1: Qwen2.5-Coder-1.5B on the quantized runner, every core
    pipespec-k3   our services: n-gram -> 0.5B -> 1.5B, quantized, the launcher's cores rule,
                  as deploy/configs/qwen-k3.toml (``drafter_cost`` 0, the 0.5B's ``draft_vocab``
                  65536)
    llama-ar      ``llama-server -np 1 -t 2 -tb 2`` on the 1.5B file
    llama-spec-N  ``llama-server -md <0.5B> --spec-type draft-simple --spec-draft-n-max N -t 2
                  -tb 2 -td 2 --poll 0`` (N: --spec-n; no polling: its two thread pools take
                  turns on the same cores, and spinning ones slow each other)
Every system is launched first; then each repeat runs every system over every prompt, the
systems' order rotated by the repeat, so a drift of the machine's speed shifts all alike.
A system's tok/s in a repeat is its completion tokens over its summed request latencies (prefill
included); the table gives the median over repeats and the ratios of PipeSpec k=3 to each.
``equal`` counts outputs equal to ``target``'s (ours must all be; llama.cpp's differ where its
arithmetic does).

Verification cost (``--verify``, default on): the 1.5B runner in this process at 2 threads, one
request on a 128-token context fed 1, 4 and 8 tokens (median of 20), beside ``llama-bench -t 2``
tg32 at depth 128 (its per-token time) and pp4 / pp8 at depth 128 (its 4- and 8-token passes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import llama_cpp, prompts
from benchmarks.load_test import one_request
from deploy.harness import launched, loopback_config

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
OURS = {
    "target": [{"level": 0, "backend": "quantized", "model": f"@{TARGET}"}],
    "pipespec-k3": [
        {"level": 0, "backend": "ngram"},
        {"level": 1, "backend": "quantized", "model": f"@{DRAFT}", "draft_vocab": 65536},
        {"level": 2, "backend": "quantized", "model": f"@{TARGET}"},
    ],
}


def spec_server_command(bin_dir: Path, target: Path, draft: Path, n_max: int, port: int) -> list:
    """llama-server with its own speculative decoding (draft model, at most ``n_max`` drafts).

    >>> spec_server_command(Path("/b"), Path("/t.gguf"), Path("/d.gguf"), 4, 9)[1:7]
    ['-m', '/t.gguf', '-md', '/d.gguf', '--spec-draft-n-max', '4']
    """
    return [
        str(bin_dir / "llama-server"),
        *("-m", str(target), "-md", str(draft), "--spec-draft-n-max", str(n_max)),
        *("--spec-type", "draft-simple", "--poll", "0"),
        *("-np", "1", "-t", "2", "-tb", "2", "-td", "2", "-c", "2048"),
        *("--port", str(port), "--host", "127.0.0.1"),
    ]


def spec_server(bin_dir: Path, n_max: int, log_dir: Path):
    """llama-server with its own speculative decoding, running until the context exits."""
    from common.model_catalog import gguf_path

    target, draft = gguf_path(TARGET), gguf_path(DRAFT)
    return llama_cpp.running(
        lambda port: spec_server_command(bin_dir, target, draft, n_max, port), log_dir
    )


def one(url: str, prompt: str, max_tokens: int, extra: dict) -> dict[str, Any]:
    """One streamed greedy completion: its text, tokens and latency (seconds)."""

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as http:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            body |= {"stream_options": {"include_usage": True}} | extra
            return await one_request(http, body)

    r = asyncio.run(go())
    if r.error:
        raise RuntimeError(r.error)
    return {"text": "".join(t for _, t in r.chunks), "tokens": r.tokens, "s": r.latency_s}


def table(medians: dict[str, float], equal: dict[str, str]) -> str:
    """Markdown: tok/s per system and PipeSpec k=3's ratio to it.

    >>> print(table({"target": 10.0, "pipespec-k3": 15.0}, {"target": "3/3", "pipespec-k3": "3/3"}))
    | system | tok/s | pipespec-k3 / system | equal to target |
    |---|---|---|---|
    | target | 10.0 | 1.50x | 3/3 |
    | pipespec-k3 | 15.0 | 1.00x | 3/3 |
    """
    k3 = medians.get("pipespec-k3")
    rows = ["| system | tok/s | pipespec-k3 / system | equal to target |", "|---|---|---|---|"]
    for name, tps in medians.items():
        ratio = f"{k3 / tps:.2f}x" if k3 and tps else "-"
        rows.append(f"| {name} | {tps:.1f} | {ratio} | {equal.get(name, '-')} |")
    return "\n".join(rows)


def verification_cost(repeats: int = 20) -> dict[str, Any]:
    """Our 1.5B runner's pass on a 128-token context fed 1, 4, 8 tokens (median ms, 2 threads),
    and llama-bench's per-token and 4-/8-token pass times at depth 128 in the same run."""
    import torch

    from common.backends.batched import Run
    from common.backends.quantized import QuantizedRunner
    from common.model_catalog import gguf_path

    torch.set_num_threads(2)
    runner = QuantizedRunner(str(gguf_path(TARGET)), kv_pool_tokens=512, threads=2)
    runner.open("v", 256)
    runner.step([Run("v", list(range(1000, 1128)), rows=1)])
    ours = {}
    for n in (1, 4, 8):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runner.step([Run("v", list(range(2000, 2000 + n)))])
            times.append(time.perf_counter() - started)
            runner.crop("v", 128)
        ours[n] = 1000 * statistics.median(times)
    del runner
    out: dict[str, Any] = {"ours_ms": ours, "ours_ratio": {n: ours[n] / ours[1] for n in ours}}
    bin_dir = llama_cpp.find_binaries(("llama-bench",))
    if bin_dir is not None:
        command = llama_cpp.bench_command(
            bin_dir, gguf_path(TARGET), (0, 4, 8), (0, 32), (128,), repetitions=5
        )
        rows = {r["test"]: r for r in llama_cpp.run_bench(command)}
        per_token = rows["tg32 @ d128"]["ms_per_token"]
        out["llama_ms"] = {
            1: per_token,
            4: rows["pp4 @ d128"]["test_ms"],
            8: rows["pp8 @ d128"]["test_ms"],
        }
        out["ours_over_llama_per_token"] = ours[1] / per_token
        out["llama_command"] = " ".join(command)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spec-n", default="2,4,6,8", help="llama.cpp's draft lengths")
    parser.add_argument("--systems", default="target,pipespec-k3,llama-ar,llama-spec")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification cost")
    parser.add_argument("--out", type=Path, help="JSON of every request and the medians")
    args = parser.parse_args(argv)
    wanted = args.systems.split(",")
    texts = [p.text for p in prompts.humaneval(args.prompts)]
    results: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds")}
    if not args.no_verify:
        print("verification cost ...", flush=True)
        results["verification"] = cost = verification_cost()
        print(json.dumps(cost, indent=1), flush=True)
    logs = Path(tempfile.mkdtemp(prefix="single-stream-"))
    with contextlib.ExitStack() as stack:
        urls, extra = {}, {}
        for name, stages in OURS.items():
            if name in wanted:
                cfg = loopback_config(f"@{TARGET}", stages)
                urls[name] = stack.enter_context(launched(cfg, logs / name)).plan.http_url
        bin_dir = llama_cpp.find_binaries(("llama-server",))
        if bin_dir is None:
            print("llama.cpp is not built (make llama-cpp): its systems are skipped")
        else:
            if "llama-ar" in wanted:
                model = llama_cpp.gguf_file(TARGET)
                srv = llama_cpp.server(bin_dir, model, 1, logs / "llama-ar", ctx=2048)
                urls["llama-ar"] = stack.enter_context(srv).url
            if "llama-spec" in wanted:
                for n in (int(x) for x in args.spec_n.split(",")):
                    srv = spec_server(bin_dir, n, logs / f"llama-spec-{n}")
                    urls[f"llama-spec-{n}"] = stack.enter_context(srv).url
        for name in urls:
            extra[name] = llama_cpp.completion_extras() if name.startswith("llama") else {}
            one(urls[name], "def add(a, b):", 4, extra[name])  # warm up
        runs: dict[str, list[list[dict]]] = {name: [] for name in urls}
        names = list(urls)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                done = [one(urls[name], t, args.max_tokens, extra[name]) for t in texts]
                runs[name].append(done)
                tps = sum(d["tokens"] for d in done) / sum(d["s"] for d in done)
                print(f"repeat {repeat} {name}: {tps:.1f} tok/s", flush=True)
    medians = {
        name: statistics.median(
            sum(d["tokens"] for d in done) / sum(d["s"] for d in done) for done in rs
        )
        for name, rs in runs.items()
    }
    reference = [d["text"] for d in runs["target"][0]] if "target" in runs else None
    equal = {
        name: f"{sum(d['text'] == r for d, r in zip(rs[0], reference))}/{len(texts)}"
        for name, rs in runs.items()
        if reference
    }
    spec = {n: v for n, v in medians.items() if n.startswith("llama-spec")}
    results |= {"medians": medians, "equal": equal, "runs": runs, "args": vars(args) | {}}
    if spec:
        results["llama_spec_best"] = max(spec, key=spec.get)
    print(table(medians, equal))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["args"]["out"] = str(args.out)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
