"""Is the quantized runner the model in the GGUF file? Perplexity and greedy agreement against
llama.cpp on the same file.

    python -m benchmarks.quality --models smollm2 --out /tmp/quality-smollm2.json
    python -m benchmarks.quality --models qwen          # the 1.5B target
    python -m benchmarks.quality --models qwen --part perplexity --out ppl.json   # one part,
    python -m benchmarks.quality --models qwen --part greedy --out greedy.json    # the other,
    python -m benchmarks.quality --render ppl.json greedy.json                    # both tables

One run, for the target model of the group (qwen -> qwen2.5-coder-1.5b, smollm2 ->
smollm2-135m):

1. **Perplexity** of ``benchmarks/data/quality_text.txt`` (prose and Python written for this
   benchmark, CC0) computed as ``llama-perplexity`` does by default (its ``perplexity()`` in
   ``tools/perplexity/perplexity.cpp``): the text tokenized once (BOS first only if the GGUF's
   ``tokenizer.ggml.add_bos_token`` says so), cut into ``len // ctx`` non-overlapping chunks of
   ``ctx`` tokens (the tail dropped), each chunk evaluated from an empty cache with its first token
   replaced by BOS when BOS is added, and scored on the second half only: the logits at positions
   ``ctx/2 .. ctx-2`` against the tokens that follow them (``ctx/2 - 1`` tokens per chunk). PPL is
   ``exp(mean NLL)``, its error ``ppl * sqrt(var(NLL) / (count - 1))``. Then
   ``llama-perplexity -m FILE -f TEXT -c CTX -t 2`` on the same file; the bar is 3 %.
2. **Greedy agreement**: the 20 shortest HumanEval prompts (``benchmarks.prompts``), tokenized
   once by our tokenizer and sent as token ids to both; 64 greedy tokens from our runner
   (``greedy_decode``, stopping at the model's EOS ids) and from ``llama-server -np 1 -t 2``
   (``/completion``, temperature 0, top_k 1, ``cache_prompt`` false). Each continuation ends at
   its first end-of-generation token (ours, or the one llama.cpp stopped on); per prompt: identical
   or not, and the first position where they differ.

The pure parts (chunking, scoring, parsing, comparison) are functions tested on a fake backend in
``tests/benchmarks/test_quality.py``; nothing here is part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
TARGETS = {"qwen": "qwen2.5-coder-1.5b", "smollm2": "smollm2-135m"}
PPL_BAR = 0.03  # the bar: our perplexity within 3 % of llama.cpp's
THREADS = 2


# ---------------------------------------------------------------------------- perplexity
def chunks(tokens: Sequence[int], ctx: int, bos: int | None = None) -> list[list[int]]:
    """``len(tokens) // ctx`` non-overlapping chunks of ``ctx`` tokens (the tail dropped), each
    with its first token replaced by ``bos`` when given (llama-perplexity's BOS handling).

    >>> chunks(list(range(7)), 3), chunks(list(range(7)), 3, bos=99)
    ([[0, 1, 2], [3, 4, 5]], [[99, 1, 2], [99, 4, 5]])
    """
    out = [list(tokens[i : i + ctx]) for i in range(0, len(tokens) - ctx + 1, ctx)]
    return [[bos, *c[1:]] if bos is not None else c for c in out]


def scored_nll(logits, chunk: Sequence[int], first: int) -> list[float]:
    """Negative log-likelihoods of ``chunk[first + 1:]``, given ``logits`` (``[rows, vocab]``,
    any float tensor) whose row ``i`` is the prediction after position ``first + i``; rows past
    the last scored position are ignored. Log-softmax in float64."""
    import torch

    targets = torch.tensor(chunk[first + 1 :], dtype=torch.long)
    rows = torch.as_tensor(logits)[: len(targets)].double()
    logp = torch.log_softmax(rows, dim=-1)
    return (-logp.gather(1, targets[:, None])[:, 0]).tolist()


def ppl_stats(nlls: Sequence[float]) -> tuple[float, float]:
    """``(ppl, error)`` as llama-perplexity prints them: ``exp(mean)`` and
    ``ppl * sqrt((mean of squares - mean**2) / (count - 1))``.

    >>> ppl, err = ppl_stats([1.0, 3.0])
    >>> round(ppl, 4), round(err, 4)
    (7.3891, 7.3891)
    """
    n = len(nlls)
    mean = sum(nlls) / n
    var = sum(v * v for v in nlls) / n - mean * mean
    return math.exp(mean), math.exp(mean) * math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else 0.0


def perplexity(backend, tokens: Sequence[int], ctx: int, bos: int | None = None) -> dict:
    """llama-perplexity's default computation on a :class:`BatchedBackend`: each chunk of
    :func:`chunks` fed as one fresh request in one pass, scored on its second half.
    ``{"ppl", "error", "chunks", "scored_tokens", "chunk_ppl"}`` (``chunk_ppl``: the running
    estimate after each chunk, as llama-perplexity prints ``[i]x``)."""
    from common.backends.batched import Run

    first = ctx // 2
    nlls: list[float] = []
    running = []
    for i, chunk in enumerate(chunks(tokens, ctx, bos)):
        name = ("ppl", i)
        backend.open(name, ctx)
        try:
            out = backend.step([Run(name, chunk, rows=ctx - first)])[name]
        finally:
            backend.close(name)
        assert out.positions[0] == first, out.positions[:1]
        nlls += scored_nll(out.logits, chunk, first)
        running.append(round(ppl_stats(nlls)[0], 4))
    if not nlls:
        raise ValueError(f"{len(tokens)} tokens make no chunk of {ctx}")
    ppl, err = ppl_stats(nlls)
    return {
        "ppl": ppl,
        "error": err,
        "chunks": len(running),
        "scored_tokens": len(nlls),
        "chunk_ppl": running,
    }


PPL_LINE = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")
CHUNK_PPL = re.compile(r"\[(\d+)\]([\d.]+),")


def parse_llama_perplexity(text: str) -> dict:
    """llama-perplexity's final ``PPL = x +/- y`` and its running per-chunk estimates.

    >>> parse_llama_perplexity("[1]32.97,[2]26.28,\\nI Final estimate: PPL = 26.2824 +/- 0.89573")
    {'ppl': 26.2824, 'error': 0.89573, 'chunks': 2, 'chunk_ppl': [32.97, 26.28]}
    """
    found = PPL_LINE.findall(text)
    if not found:
        raise ValueError("no 'Final estimate: PPL = x +/- y' line in llama-perplexity's output")
    ppl, err = found[-1]
    running = [float(v) for _, v in CHUNK_PPL.findall(text)]
    return {"ppl": float(ppl), "error": float(err), "chunks": len(running), "chunk_ppl": running}


def perplexity_command(bin_dir: Path, model: Path, text: Path, ctx: int) -> list[str]:
    """llama-perplexity with its default scoring on ``text`` at context ``ctx``.

    >>> perplexity_command(Path("/b"), Path("/m.gguf"), Path("/t.txt"), 512)[1:]
    ['-m', '/m.gguf', '-f', '/t.txt', '-c', '512', '-t', '2']
    """
    return [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text)] + [
        *("-c", str(ctx), "-t", str(THREADS))
    ]


def relative_difference(ours: float, reference: float) -> float:
    """``(ours - reference) / reference``.

    >>> relative_difference(10.3, 10.0)
    0.03
    """
    return round((ours - reference) / reference, 12)


# ---------------------------------------------------------------------------- greedy agreement
def until_end(tokens: Sequence[int], ends: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first of ``ends``.

    >>> until_end([5, 6, 2, 7], [2]), until_end([5, 6], [2])
    ([5, 6, 2], [5, 6])
    """
    for i, t in enumerate(tokens):
        if t in ends:
            return list(tokens[: i + 1])
    return list(tokens)


def first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """The first position where the two differ (a missing token counts as a difference); None
    when they are identical.

    >>> first_difference([1, 2, 3], [1, 2, 3]), first_difference([1, 2, 3], [1, 9, 3])
    (None, 1)
    >>> first_difference([1, 2], [1, 2, 3])
    2
    """
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def compare(ours: Sequence[int], theirs: Sequence[int], ends: Sequence[int]) -> dict:
    """One prompt's continuations, each cut at its first end token (``ends``: ours, plus the
    token llama.cpp stopped on): identical or not, where they first differ, and their lengths.

    >>> compare([4, 5, 2, 8], [4, 5, 2], ends=[2])
    {'identical': True, 'first_difference': None, 'ours_len': 3, 'llama_len': 3}
    """
    a, b = until_end(ours, ends), until_end(theirs, ends)
    diff = first_difference(a, b)
    return {
        "identical": diff is None,
        "first_difference": diff,
        "ours_len": len(a),
        "llama_len": len(b),
    }


def agreement_summary(rows: Sequence[dict]) -> dict:
    """Share identical, and the median / min first-difference position over the prompts that
    differ (None when none differs).

    >>> agreement_summary([{"identical": True, "first_difference": None},
    ...                    {"identical": False, "first_difference": 10},
    ...                    {"identical": False, "first_difference": 30}])
    {'prompts': 3, 'identical': 1, 'share_identical': 0.3333, 'median_first_difference': 20.0, \
'min_first_difference': 10}
    """
    diffs = [r["first_difference"] for r in rows if not r["identical"]]
    same = sum(r["identical"] for r in rows)
    return {
        "prompts": len(rows),
        "identical": same,
        "share_identical": round(same / len(rows), 4) if rows else None,
        "median_first_difference": float(statistics.median(diffs)) if diffs else None,
        "min_first_difference": min(diffs) if diffs else None,
    }


def completion_body(prompt: Sequence[int], n: int) -> dict:
    """The ``/completion`` body: the prompt as token ids, greedy, no prompt cache, tokens back.

    >>> completion_body([1, 2], 4)  # doctest: +NORMALIZE_WHITESPACE
    {'prompt': [1, 2], 'n_predict': 4, 'temperature': 0, 'top_k': 1, 'cache_prompt': False,
     'return_tokens': True}
    """
    return {
        "prompt": list(prompt),
        "n_predict": n,
        "temperature": 0,
        "top_k": 1,
        "cache_prompt": False,
        "return_tokens": True,
    }


# ---------------------------------------------------------------------------- the report
def markdown(result: dict) -> str:
    """The tables of one run (the parts it has)."""
    lines = [f"### {result['model']}", ""]
    if "perplexity" in result:
        p = result["perplexity"]
        status = "PASS" if abs(p["relative_difference"]) <= PPL_BAR else "FAIL"
        lines += [
            f"Perplexity of `{result['text']}` ({p['text_tokens']} tokens, ctx {p['ctx']}, "
            f"{p['ours']['chunks']} chunks, {p['ours']['scored_tokens']} tokens scored, "
            f"BOS {'added' if p['add_bos'] else 'not added'}; our tokenizer gives "
            f"{'the same ids' if p['tokens_identical'] else 'different ids'}):",
            "",
            "| runner | PPL | +/- |",
            "|---|---:|---:|",
            f"| quantized runner (ours) | {p['ours']['ppl']:.4f} | {p['ours']['error']:.4f} |",
            f"| llama-perplexity | {p['llama']['ppl']:.4f} | {p['llama']['error']:.4f} |",
            f"| relative difference | {p['relative_difference']:+.2%} | bar {PPL_BAR:.0%}: "
            f"{status} |",
            "",
        ]
    if "greedy" in result:
        g = result["greedy"]
        s = g["summary"]
        lines += [
            f"Greedy agreement, {s['prompts']} HumanEval prompts x {g['n']} tokens:",
            "",
            "| identical | share | median first difference | min first difference |",
            "|---:|---:|---:|---:|",
            f"| {s['identical']}/{s['prompts']} | {s['share_identical']:.0%} | "
            f"{s['median_first_difference']} | {s['min_first_difference']} |",
            "",
            "| prompt | identical | first difference | ours / llama tokens |",
            "|---|---|---:|---:|",
        ]
        for row in g["prompts"]:
            diff = "" if row["first_difference"] is None else row["first_difference"]
            lines.append(
                f"| {row['id']} | {'yes' if row['identical'] else 'no'} | {diff} | "
                f"{row['ours_len']} / {row['llama_len']} |"
            )
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- running it
def llama_tokenize(bin_dir: Path, model: Path, text: str, log_dir: Path) -> list[int]:
    """llama.cpp's token ids of ``text`` as llama-perplexity gets them (special tokens added):
    ``/tokenize`` of a one-slot llama-server."""
    import httpx

    from benchmarks import llama_cpp

    with llama_cpp.server(bin_dir, model, 1, log_dir) as srv:
        body = {"content": text, "add_special": True}
        return httpx.post(f"{srv.url}/tokenize", json=body, timeout=120).json()["tokens"]


def perplexity_part(runner, bin_dir: Path, model: Path, meta: dict, tokenizer, ctx, log_dir):
    """Both perplexities on the same token ids (llama.cpp's tokenization of the text; whether
    ours gives the same ids is reported)."""
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos = int(meta["tokenizer.ggml.bos_token_id"]) if add_bos else None
    text = TEXT.read_text()
    ours_ids = ([bos] if add_bos else []) + tokenizer.encode(text, add_special_tokens=False)
    ids = llama_tokenize(bin_dir, model, text, log_dir)
    command = perplexity_command(bin_dir, model, TEXT, ctx)
    print(f"  {' '.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    (log_dir / "llama-perplexity.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-2000:]}")
    llama = parse_llama_perplexity(done.stdout + done.stderr)
    llama["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  llama-perplexity: {llama}", flush=True)
    started = time.perf_counter()
    ours = perplexity(runner, ids, ctx, bos)
    ours["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  ours: {ours}", flush=True)
    return {
        "ctx": ctx,
        "add_bos": add_bos,
        "text_tokens": len(ids),
        "tokens_identical": ours_ids == ids,
        "first_token_difference": first_difference(ours_ids, ids),
        "ours": ours,
        "llama": llama,
        "relative_difference": relative_difference(ours["ppl"], llama["ppl"]),
        "bar": PPL_BAR,
        "commands": {"llama_perplexity": " ".join(command)},
    }


def greedy_part(runner, bin_dir: Path, model: Path, tokenizer, n_prompts: int, n: int, log_dir):
    """Each HumanEval prompt's greedy continuation from both, compared: ours for all prompts in
    one batch, then llama-server's prompt by prompt (each row printed, and the rows so far kept
    in ``log_dir/greedy-rows.json``, as it comes)."""
    import httpx

    from benchmarks import llama_cpp, prompts
    from common.backends.batched import greedy_decode

    chosen = prompts.humaneval(n_prompts)
    ids = [tokenizer.encode(p.text, add_special_tokens=False) for p in chosen]
    started = time.perf_counter()
    ours = greedy_decode(runner, ids, n, eos=runner.eos_token_ids)
    seconds = round(time.perf_counter() - started, 1)
    print(f"  ours: {len(ours)} continuations in {seconds} s", flush=True)
    rows: list[dict] = []
    with llama_cpp.server(bin_dir, model, 1, log_dir) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        server_command = llama_cpp.server_command(bin_dir, model, 1, port)
        for p, prompt, mine in zip(chosen, ids, ours):
            body = completion_body(prompt, n)
            got = httpx.post(f"{srv.url}/completion", json=body, timeout=1800).json()
            ends = set(runner.eos_token_ids)
            if got["stop_type"] == "eos" and got["tokens"]:
                ends.add(got["tokens"][-1])  # the end-of-generation token llama.cpp stopped on
            row = {"id": p.id, "prompt_tokens": len(prompt)}
            row |= compare(mine, got["tokens"], sorted(ends))
            print(f"  {len(rows) + 1}/{len(chosen)} {row}", flush=True)
            rows.append(
                row | {"ours": mine, "llama": got["tokens"], "llama_stop": got["stop_type"]}
            )
            (log_dir / "greedy-rows.json").write_text(json.dumps(rows))
    return {
        "n": n,
        "eos_token_ids": list(runner.eos_token_ids),
        "ours_seconds": seconds,
        "summary": agreement_summary(rows),
        "prompts": rows,
        "commands": {
            "llama_server": " ".join(server_command),
            "completion_body": {**completion_body([], n), "prompt": "[prompt token ids]"},
        },
    }


def run(group: str, part: str, ctx: int, n_prompts: int, n: int, log_dir: Path) -> dict:
    """``part``: "perplexity", "greedy" or "both"; the result of :func:`markdown`'s shape."""
    from benchmarks import llama_cpp
    from common.backends.quantized import QuantizedRunner
    from common.kernels.gguf_blocks import read_index
    from common.model_catalog import tokenizer_dir
    from common.tokenization import load_tokenizer

    name = TARGETS[group]
    model = llama_cpp.gguf_file(name)
    bin_dir = llama_cpp.find_binaries(("llama-server", "llama-perplexity"))
    if bin_dir is None:
        raise SystemExit("llama.cpp is not built: python -m benchmarks.llama_cpp build")
    log_dir = log_dir / name / part
    log_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(tokenizer_dir(name)))
    pool = max(ctx, n_prompts * (256 + n))  # the shortest HumanEval prompts: < 240 tokens
    runner = QuantizedRunner(str(model), kv_pool_tokens=pool, threads=THREADS, name=name)
    result: dict[str, Any] = {
        "model": name,
        "gguf": str(model),
        "text": str(TEXT.relative_to(Path(__file__).parent.parent)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": THREADS,
        "command": " ".join(["python", "-m", "benchmarks.quality", *sys.argv[1:]]),
    }
    if part in ("perplexity", "both"):
        print(f"{name}: perplexity at ctx {ctx}", flush=True)
        meta = read_index(str(model)).metadata
        result["perplexity"] = perplexity_part(
            runner, bin_dir, model, meta, tokenizer, ctx, log_dir
        )
    if part in ("greedy", "both"):
        print(f"{name}: greedy, {n_prompts} prompts x {n} tokens", flush=True)
        result["greedy"] = greedy_part(runner, bin_dir, model, tokenizer, n_prompts, n, log_dir)
    return result


def merge(results) -> dict:
    """Runs of one model's parts as one result (later runs' parts win).

    >>> merge([{"model": "m", "perplexity": 1}, {"model": "m", "greedy": 2}])
    {'model': 'm', 'perplexity': 1, 'greedy': 2}
    """
    out: dict = {}
    for result in results:
        if out and result["model"] != out["model"]:
            raise ValueError(f"results of {out['model']} and {result['model']} cannot be joined")
        out |= result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--models", choices=sorted(TARGETS))
    parser.add_argument("--part", choices=("both", "perplexity", "greedy"), default="both")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=20, help="HumanEval prompts (shortest)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--out", type=Path, help="write every number here (JSON)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/pipespec-quality"))
    parser.add_argument(
        "--render", type=Path, nargs="+", help="only print the tables of these --out files"
    )
    args = parser.parse_args(argv)
    if args.render:  # e.g. a --part perplexity and a --part greedy run of one model, joined
        print(markdown(merge(json.loads(f.read_text()) for f in args.render)), end="")
        return 0
    if not args.models:
        parser.error("--models is required")
    result = run(args.models, args.part, args.ctx, args.prompts, args.tokens, args.log_dir)
    print(markdown(result), end="")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
