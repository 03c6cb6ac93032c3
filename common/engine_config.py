"""What one :class:`common.stage_engine.StageEngine` reads: its level, its schedule and its timers.

A stage service builds it from its settings (``StageSettings.engine_config()``); the simulations
(``common.simnet.build``) build it directly. Nothing here is about backends, sockets or
operations, so a simulated system needs no service settings.

>>> EngineConfig(level=1, schedule="sync").draft_cap   # sync: a window of `lookahead` drafts
8
>>> EngineConfig(level=1).draft_cap                     # async: up to max_verify_tokens
32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["async", "sync"]
DraftPolicy = Literal["goodput", "all"]


@dataclass(frozen=True)
class EngineConfig:
    """One engine's settings. The defaults are ``StageSettings``' (a test keeps them equal)."""

    level: int  # 0 = smallest drafter; the target is the highest level of a request's route
    schedule: ScheduleKind = "async"  # async: PipeSpec; sync: lockstep speculative decoding
    max_lead: int = 16  # async: tokens a drafter may run past the target's committed length
    lookahead: int = 8  # sync: drafts per verification (tokens); a drafter's lead (tokens)
    sync_wait_s: float = 2.0  # sync: seconds a verifier waits for a full window, then verifies
    max_verify_tokens: int = 32  # async: draft tokens one pass checks, at most
    request_ttl_s: float = 60.0  # seconds a drafter keeps a request it hears nothing about
    done_retention_s: float = 60.0  # seconds the target keeps a finished output for re-sends
    republish_interval_s: float = 0.05  # seconds between repeats of state to a stale drafter
    max_batch_tokens: int = 512  # tokens one batched pass feeds, all requests together (one
    #   request's prefill may exceed it alone); requests past it wait for the next pass
    draft_policy: DraftPolicy = "goodput"  # goodput: common.draft_policy weighs drafts against
    #   the pass's cost; all: check every draft on offer (up to draft_cap)
    drafter_cost: float = 0.0  # goodput: what one token the level below drafts costs this level,
    #   relative to its one-token pass, where they share compute (0: the drafter has its own device)
    threads: int | None = None  # the cores this level uses while its drafters run
    threads_alone: int | None = None  # the cores rule: threads for a pass in which the policy
    #   wants no drafts (the drafters below idle and free their cores); None: no switching
    max_drafting_load: int | None = None  # the cores rule: requests (the most of recent passes)
    #   above which the level does not draft at all (draft_policy.drafting_allowed); None: no cap

    @property
    def sharing_cost(self) -> float:
        """What a pass costs on ``threads`` relative to one on ``threads_alone`` (1: no cores
        rule): the quantized kernels scale about linearly with cores (1 thread: 1.8x the time of
        2 on Qwen 1.5B; docs/cpu-kernels.md), so drafting, which keeps the drafters' cores
        busy, must gain that much (``draft_policy.draft_lengths``).

        >>> EngineConfig(level=1, threads=1, threads_alone=2).sharing_cost
        2.0
        >>> EngineConfig(level=1).sharing_cost, EngineConfig(level=1, threads_alone=2).sharing_cost
        (1.0, 1.0)
        """
        if self.threads and self.threads_alone and self.threads < self.threads_alone:
            return self.threads_alone / self.threads
        return 1.0

    @property
    def draft_cap(self) -> int:
        """Draft tokens one verification pass checks, at most (before the room left)."""
        return self.lookahead if self.schedule == "sync" else self.max_verify_tokens
