"""What ``Gateway.generate`` yields, and the per-request speculative-decoding statistics.

Vocabulary (vLLM spec-decode, per verifier level i >= 1, i.e. level i checking level i-1's drafts):
drafts = verification passes that checked at least one draft token, draft_tokens = tokens checked,
accepted_tokens = tokens accepted, acceptance_rate = accepted_tokens / draft_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from common.protocol import LevelStats, TokenLogprob
from common.sampling import GREEDY, SamplingParams


class LevelAcceptance(BaseModel):
    level: int  # the verifier's level
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    rollbacks: int  # passes of this level that rejected a draft


class SamplingStats(BaseModel):
    """The sampling the request used; ``seed`` is the one used, given or drawn (greedy when
    ``temperature`` is 0, where the seed changes nothing)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int


class RequestStats(BaseModel):
    """Sent as ``spec_decode_stats`` in the final HTTP chunk / response and as ``stats`` over ZMQ."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    target_forward_passes: int
    tokens_per_target_pass: float
    acceptance: list[LevelAcceptance]  # one per verifier level, level 1 first
    rollbacks: int  # over all verifier levels
    replicas: list[str] = []  # the replica that served each level, level 0 first
    resyncs: int  # Start messages re-sent because output was lost or late
    time_to_first_token_s: float | None
    wall_time_s: float
    tokens_per_s: float
    sampling: SamplingStats | None = None


def request_stats(
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    levels: list[LevelStats],
    resyncs: int,
    time_to_first_token_s: float | None,
    wall_time_s: float,
    sampling: SamplingParams = GREEDY,
) -> RequestStats:
    """Summarise the target's per-level counters (``levels[i]`` is level i; may be empty)."""
    target_passes = levels[-1].forward_passes if levels else 0
    acceptance = [
        LevelAcceptance(
            level=s.level,
            drafts=s.drafts,
            draft_tokens=s.draft_tokens,
            accepted_tokens=s.accepted_tokens,
            acceptance_rate=round(s.acceptance_rate, 4),
            rollbacks=s.rollbacks_issued,
        )
        for s in levels
        if s.level >= 1
    ]
    return RequestStats(
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        target_forward_passes=target_passes,
        tokens_per_target_pass=round(completion_tokens / target_passes, 4)
        if target_passes
        else 0.0,
        acceptance=acceptance,
        rollbacks=sum(a.rollbacks for a in acceptance),
        replicas=[s.replica for s in levels],
        resyncs=resyncs,
        time_to_first_token_s=None
        if time_to_first_token_s is None
        else round(time_to_first_token_s, 4),
        wall_time_s=round(wall_time_s, 4),
        tokens_per_s=round(completion_tokens / wall_time_s, 2) if wall_time_s > 0 else 0.0,
        sampling=SamplingStats(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            seed=sampling.seed,
        ),
    )


@dataclass(frozen=True)
class TokensEvent:
    """Newly committed output tokens, in order; with their log-probabilities when asked for."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request that ended normally."""

    finish_reason: str  # "stop" (EOS), "length" (max_tokens) or "cancelled"
    stats: RequestStats


class GenerationError(Exception):
    """A request failed (a stage reported an error, or it timed out)."""


class GenerationTimeout(GenerationError):
    """The request ran past ``request_timeout_s``."""


class RequestCancelled(GenerationError):
    """The request was cancelled (e.g. its client left) while its consumer waited for output."""


class InvalidRequest(ValueError):
    """The request is malformed or over a limit; ``param`` names the offending field and
    ``status`` is the HTTP status it gets (subclasses: 404, 413)."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
