"""The in-process baselines: transformers ``generate`` (greedy, KV cache) alone, with an
assistant model (assisted generation) and with prompt-lookup decoding.

Counters come from hooks on the target model, so every method is counted the same way:
each call of the target is a *pass*; its input is the real tokens the cache lacks (the whole
prompt in the first call, then one) plus the candidates under test. A call that starts at
cache position ``p`` and the next one at ``p'`` accepted ``p' - p - uncached`` candidates; the
last call's acceptance is what remains of the output. ``busy_s`` is the time spent inside the
target's and the assistant's forward calls.

>>> [c.__dict__ for c in level_counts([(0, 6, 6), (6, 4, 1), (9, 1, 1)], prompt_len=6, generated=5)]
[{'level': 1, 'drafts': 1, 'draft_tokens': 3, 'accepted_tokens': 2, 'rollbacks': 1}]
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import torch

from benchmarks.report import LevelCount, MethodResult, PromptRun


class CallLog:
    """Hooks on one model: (start position, input length) of each call and the time inside."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[tuple[int, int]] = []
        self.busy_s = 0.0
        self._t0 = 0.0
        self._hooks = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]

    def reset(self) -> None:
        self.calls, self.busy_s = [], 0.0

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        start = 0
        pos = kwargs.get("position_ids")
        if pos is not None:
            start = int(pos.reshape(-1)[0])
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None else 0
        self.calls.append((start, int(ids.shape[-1])))
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.busy_s += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def level_counts(
    calls: Sequence[tuple[int, int, int]], prompt_len: int, generated: int
) -> list[LevelCount]:
    """Verifier counters from the target's calls ``(start, n_input, n_uncached_real)``."""
    lc = LevelCount(level=1)
    produced = 0
    for i, (start, n_in, real) in enumerate(calls):
        drafts = n_in - real
        if i + 1 < len(calls):
            accepted = calls[i + 1][0] - start - real
        else:
            accepted = generated - produced - 1
        accepted = max(0, min(accepted, drafts))
        produced += accepted + 1
        if drafts > 0:
            lc.drafts += 1
            lc.draft_tokens += drafts
            lc.accepted_tokens += accepted
            lc.rollbacks += accepted < drafts
    return [lc]


class FirstToken:
    """A ``generate`` streamer that notes when each step's tokens arrive (the first ``put`` is
    the prompt): ``at`` is the first generated token (prefill + first step), ``steps`` every
    step's, one ``put`` per step for the whole batch."""

    def __init__(self):
        self.steps: list[float] = []
        self.puts = 0

    @property
    def at(self) -> float | None:
        return self.steps[0] if self.steps else None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.steps.append(time.perf_counter())

    def end(self) -> None:
        pass


def cut_after_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    """A batch row's generated ids up to and including its first EOS (``generate`` pads the
    rows that finished early).

    >>> cut_after_eos([5, 6, 2, 0, 0], [2]), cut_after_eos([5, 6], [2])
    ([5, 6, 2], [5, 6])
    """
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


class InProcess:
    """The target (and optionally an assistant) loaded in this process, fp32, on the CPU."""

    def __init__(
        self,
        target: str,
        assistant: str | None = None,
        assistant_layers: int | None = None,
        threads: int | None = None,
        eos_ids: Sequence[int] = (),
        dtype: str = "float32",
    ):
        from transformers.utils import logging as hf_logging

        from common.backends.hf import load_causal_lm

        hf_logging.set_verbosity_error()  # generate's deprecation notices, once per call
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.dtype = dtype
        self.model = load_causal_lm(target, dtype)
        self.assistant = (
            load_causal_lm(assistant, dtype, layers=assistant_layers) if assistant else None
        )
        self.eos_ids = list(eos_ids)
        self.log = CallLog(self.model)
        self.assistant_log = CallLog(self.assistant) if self.assistant is not None else None

    def close(self) -> None:
        self.log.remove()
        if self.assistant_log:
            self.assistant_log.remove()
        self.model = self.assistant = None
        gc.collect()

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_tokens: int, method: str, pld_tokens: int = 10
    ) -> PromptRun:
        """One greedy ``generate`` call; ``method``: autoregressive, assisted or prompt-lookup."""
        kwargs: dict = {}
        if method == "assisted":
            kwargs["assistant_model"] = self.assistant
        elif method == "prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = pld_tokens
        elif method != "autoregressive":
            raise ValueError(f"unknown in-process method {method!r}")
        x = torch.tensor([prompt_ids])
        self.log.reset()
        if self.assistant_log:
            self.assistant_log.reset()
        first = FirstToken()
        t0 = time.perf_counter()
        out = self.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=self.eos_ids or None,
            pad_token_id=(self.eos_ids or [0])[0],
            streamer=first,
            **kwargs,
        )
        wall = time.perf_counter() - t0
        tokens = out[0, len(prompt_ids) :].tolist()
        calls = [
            (s, n, len(prompt_ids) if i == 0 else 1) for i, (s, n) in enumerate(self.log.calls)
        ]
        busy = [self.log.busy_s]
        passes = [len(calls)]
        if method == "assisted" and self.assistant_log:
            busy, passes = (
                [self.assistant_log.busy_s] + busy,
                [len(self.assistant_log.calls)] + passes,
            )
        elif method == "prompt-lookup":
            busy, passes = [0.0] + busy, [0] + passes  # the lookup runs inside generate's loop
        levels = (
            level_counts(calls, len(prompt_ids), len(tokens)) if method != "autoregressive" else []
        )
        return PromptRun(
            prompt_id="",
            tokens=tokens,
            wall_s=wall,
            ttft_s=None if first.at is None else first.at - t0,
            target_passes=len(calls),
            levels=levels,
            busy_s=busy,
            passes=passes,
        )


@torch.inference_mode()
def generate_batch(
    runner: InProcess, prompts: Sequence[list[int]], max_tokens: int
) -> tuple[list[list[int]], list[float], float]:
    """One greedy ``generate`` over a static batch, left-padded, every row started together:
    each row's generated ids, the time from the call to each step's tokens (step 0 is the
    prefill and the first token, one time per step for the whole batch), and the wall time."""
    pad = (runner.eos_ids or [0])[0]
    width = max(len(p) for p in prompts)
    x = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runner.log.reset()
    streamer = FirstToken()
    t0 = time.perf_counter()
    out = runner.model.generate(
        x,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=0,
        do_sample=False,
        eos_token_id=runner.eos_ids or None,
        pad_token_id=pad,
        streamer=streamer,
    )
    wall = time.perf_counter() - t0
    rows = [cut_after_eos(row[width:].tolist(), runner.eos_ids) for row in out]
    return rows, [t - t0 for t in streamer.steps], wall


def run_in_process(
    runner: InProcess,
    suite: str,
    method: str,
    level_names: list[str],
    prompts: Sequence[tuple[str, list[int]]],
    max_tokens: int,
    pld_tokens: int = 10,
    warmup: list[int] | None = None,
) -> MethodResult:
    result = MethodResult(
        suite=suite,
        name=method,
        levels=level_names,
        config={
            "threads": runner.threads,
            "dtype": runner.dtype,
            "where": "in process (transformers generate)",
        },
    )
    if method == "assisted":
        g = runner.assistant.generation_config
        result.config |= {
            "num_assistant_tokens": g.num_assistant_tokens,
            "num_assistant_tokens_schedule": g.num_assistant_tokens_schedule,
            "assistant_confidence_threshold": g.assistant_confidence_threshold,
        }
    if method == "prompt-lookup":
        result.config["prompt_lookup_num_tokens"] = pld_tokens
    try:
        if warmup:
            runner.generate(warmup, 4, method, pld_tokens)
        for pid, ids in prompts:
            run = runner.generate(ids, max_tokens, method, pld_tokens)
            run.prompt_id = pid
            result.runs.append(run)
    except Exception as exc:  # one method failing must not lose the others
        result.error = f"{type(exc).__name__}: {exc}"
    return result
