"""A step's plan: each request's part of the next batched pass (:class:`PlannedRun`), and how many
of its drafts it checks (:func:`policy_drafts`, then :func:`within_room`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.backends.batched import Run
from common.draft_policy import acceptance_estimate, draft_lengths
from common.level_request import LevelRequest


@dataclass
class PlannedRun:
    """One request's part of the next pass: what its KV cache lacks, then the drafts it checks."""

    r: LevelRequest
    pending: list[int]
    drafts: list[int]

    def run(self) -> Run:
        """What the backend runs: the pending tokens and the drafts, with a row of predictions
        per draft plus one (the correction or bonus)."""
        return Run(self.r.request_id, self.pending + self.drafts, rows=len(self.drafts) + 1)


def policy_drafts(plan: Sequence[PlannedRun], curve: Sequence[tuple[int, float]]) -> list[int]:
    """Drafts the goodput policy (``common.draft_policy``) checks per planned request, given
    what each feeds anyway and its acceptance so far. Making the drafts costs this level
    nothing now (they are made): only checking them counts."""
    return draft_lengths(
        [len(p.pending) for p in plan],
        [acceptance_estimate(p.r.stats.accepted_tokens, p.r.stats.draft_tokens) for p in plan],
        [len(p.drafts) for p in plan],
        curve,
    )


def within_room(counts: Sequence[int], room: int) -> list[int]:
    """``counts`` of drafts cut, in plan order, to the ``room`` (tokens) the batch has left.

    >>> within_room([3, 2, 4], room=6), within_room([3, 2], room=0), within_room([1], room=-2)
    ([3, 2, 1], [0, 0], [0])
    """
    kept = []
    for k in counts:
        k = max(0, min(k, room))
        room -= k
        kept.append(k)
    return kept
