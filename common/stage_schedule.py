"""Schedules: when a request wants a forward pass at a level, and which drafts that pass checks.

The engine asks a schedule four things: :meth:`Schedule.wants_pass` (read-only, so metrics may
ask it too), :meth:`Schedule.update` (the one place a schedule changes a request's state, called
only while planning a step), :meth:`Schedule.drafts`, and, where :attr:`Schedule.advises_leads`,
:meth:`Schedule.lead` (how far this level runs past the target: the base of the lead it advises
the level below, ``common.lead_advice``).
"""

from __future__ import annotations

from common.decoding import anchor_drafts
from common.engine_config import EngineConfig
from common.lead_advice import lead_limit
from common.level_request import LevelRequest


class Schedule:
    """When a request wants a forward pass at this level, and which drafts that pass checks."""

    #: whether drafters run by a lead the level above may advise (only then does the engine
    #: weigh and send lead advice, and :meth:`lead` answer)
    advises_leads: bool = False

    def __init__(self, config: EngineConfig):
        self.config = config
        self.level = config.level

    def is_target(self, r: LevelRequest) -> bool:
        return self.level == r.target_level

    def drafts(self, r: LevelRequest) -> list[int]:
        """The drafts the next pass checks: the span from below that extends our sequence, at
        most ``config.draft_cap`` of them and no more than the room left."""
        if r.span is None or self.level == 0:
            return []
        drafts = anchor_drafts(r.tokens, r.span.start, r.span.tokens)
        if drafts is None:
            return []
        room = r.max_tokens - len(r.tokens) - 1  # positions left after the correction/bonus
        return drafts[: max(0, min(self.config.draft_cap, room))]

    def update(self, r: LevelRequest, now: float) -> None:
        """Record what the decision at ``now`` (seconds on the engine's clock) depends on."""

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        """Whether ``r`` wants a pass at ``now``; no side effects."""
        raise NotImplementedError

    def lead(self, r: LevelRequest) -> int:
        """Tokens past the target's committed length this level drafts at most (0: target);
        only where :attr:`advises_leads`."""
        raise NotImplementedError(f"{type(self).__name__} runs no leads")


class AsyncSchedule(Schedule):
    """PipeSpec: the target always runs; a drafter runs while it is less than its lead past the
    target's committed length: ``max_lead``, or less when the level above advises less (its
    draft-length policy checks fewer drafts under load: ``common.lead_advice``)."""

    advises_leads = True

    def lead(self, r: LevelRequest) -> int:
        if self.is_target(r):
            return 0
        return lead_limit(r.lead.hint, self.config.max_lead)

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        if self.is_target(r):
            return r.finish_reason is None
        if r.stalled or r.ended:
            return False
        return len(r.tokens) < r.target_len + self.lead(r)


class SyncSchedule(Schedule):
    """Lockstep speculative decoding (the paper's "Speculative" baseline): a drafter runs at
    most ``lookahead`` tokens past the level above, and a verifier waits until it has
    ``lookahead`` drafts (or the drafter has ended, or ``sync_wait_s`` has passed)."""

    def _eligible(self, r: LevelRequest) -> bool:
        """Whether the level may run ``r`` at all (before the wait for drafts)."""
        target = self.is_target(r)
        if r.finish_reason is not None or (not target and (r.stalled or r.ended)):
            return False
        if not target:
            above = r.seen.get(self.level + 1)
            if len(r.tokens) >= (above.end if above else 0) + self.config.lookahead:
                return False
        return True

    def _window_full(self, r: LevelRequest) -> bool:
        """A full window of drafts is here, or as many as the drafter will ever send."""
        span = r.span
        room = r.max_tokens - len(r.tokens) - 1
        drafter_done = (
            span is not None
            and bool(span.tokens)
            and (span.tokens[-1] in r.eos_ids or span.start + len(span.tokens) >= r.max_tokens)
        )
        return len(self.drafts(r)) >= min(self.config.lookahead, room) or drafter_done

    def update(self, r: LevelRequest, now: float) -> None:
        """Start a verifier's wait for drafts (``r.waiting_since``) when it first finds its
        window short, and end it when the window is full."""
        if self.level == 0 or not self._eligible(r):
            return
        if self._window_full(r):
            r.waiting_since = None
        elif r.waiting_since is None:
            r.waiting_since = now

    def wants_pass(self, r: LevelRequest, now: float) -> bool:
        if not self._eligible(r):
            return False
        if self.level == 0 or self._window_full(r):
            return True
        return r.waiting_since is not None and now - r.waiting_since >= self.config.sync_wait_s


SCHEDULES: dict[str, type[Schedule]] = {"async": AsyncSchedule, "sync": SyncSchedule}
