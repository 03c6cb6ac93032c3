"""A step's commit, per request: what a level always does with its pass's predictions.

Accept the longest prefix of the drafts that matches the predictions and append one
correction/bonus token (:func:`accept`, which cuts the sequence at a stop token or
``max_tokens``), then count the pass in the request's stats (:func:`record`). A prediction is
greedy, or, for a sampled request, what the request's :class:`common.sampling.Chooser` picks
(:func:`chooser_for`, :func:`predictions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from common.backends.batched import RunResult
from common.decoding import accept_greedy, apply_stop
from common.level_request import LevelRequest
from common.sampling import Chooser

log = structlog.get_logger("stage")

MAX_COUNTED_POSITIONS = 32


@dataclass(frozen=True)
class Verdict:
    """What one pass decided for one request."""

    drafts: int  # drafts it checked
    accepted: int  # ... of which it accepted (the longest matching prefix)
    old_len: int  # the sequence's length before
    emitted: int  # tokens appended: accepted + 1, less what a stop cut off
    finish: str | None  # why the sequence ended here, if it did (as ``apply_stop`` says)

    @property
    def rejected(self) -> bool:
        """A draft was rejected: drafts built on it are invalid (a rollback)."""
        return self.accepted < self.drafts


def chooser_for(r: LevelRequest, at_target: bool) -> Chooser | None:
    """None for a plain greedy pass; else what picks this pass's tokens (and, at the target,
    records their log-probabilities). Row 0 predicts generated position ``len(r.tokens)``."""
    logprobs = r.top_logprobs if at_target and r.top_logprobs >= 0 else None
    if r.sampling.greedy and logprobs is None:
        return None
    return Chooser(r.sampling, len(r.tokens), top_logprobs=logprobs)


def predictions(result: RunResult, chooser: Chooser | None) -> list[int | None]:
    """A pass's predictions for one request, one per draft plus one (None: a drafter with
    nothing to propose)."""
    if chooser is not None and result.logits is not None:
        return chooser(result.logits)
    return result.greedy


def accept(
    r: LevelRequest, drafts: list[int], preds: list[int], chooser: Chooser | None
) -> Verdict:
    """Append the accepted drafts and the correction/bonus to ``r.tokens`` (cut at a stop), with
    their logprobs where the chooser recorded them; a rejection starts a new epoch."""
    m = accept_greedy(drafts, preds)
    old_len = len(r.tokens)
    r.tokens, finish = apply_stop(
        r.tokens + drafts[:m] + [preds[m]], r.eos_ids, r.max_tokens, checked=old_len
    )
    if chooser is not None and chooser.logprobs is not None:
        r.logprobs = (r.logprobs[:old_len] + chooser.logprobs[: m + 1])[: len(r.tokens)]
    verdict = Verdict(len(drafts), m, old_len, len(r.tokens) - old_len, finish)
    if verdict.rejected:
        r.epoch += 1
    return verdict


def record(r: LevelRequest, level: int, v: Verdict, seconds: float) -> None:
    """Count the pass (``seconds``: its share of the batched pass) in ``r.stats``."""
    st = r.stats
    st.forward_passes += 1
    st.emitted_tokens += v.emitted
    if v.drafts:
        st.drafts += 1
        st.draft_tokens += v.drafts
        st.accepted_tokens += v.accepted
        count_positions(st.accepted_per_pos, v.accepted)
        log.debug(  # the trace the acceptance tests replay against the drafter offline
            "drafts_verified",
            request_id=r.request_id,
            stage_level=level,
            position=v.old_len,  # output index of the first draft
            drafts=v.drafts,
            accepted=v.accepted,
        )
    if v.rejected:
        st.rollbacks_issued += 1
    st.busy_s += seconds


def count_positions(per_pos: list[int], accepted: int) -> None:
    """Add one pass that accepted ``accepted`` drafts: positions 0..accepted-1 each count once.

    >>> per_pos = [3]
    >>> count_positions(per_pos, 2); per_pos
    [4, 1]
    """
    n = min(accepted, MAX_COUNTED_POSITIONS)
    if len(per_pos) < n:
        per_pos.extend([0] * (n - len(per_pos)))
    for j in range(n):
        per_pos[j] += 1
