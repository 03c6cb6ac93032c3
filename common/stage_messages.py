"""What a stage engine sends, and where it goes: the :class:`Outbox` (ZeroMQ sockets, or the tests'
fake transport) and :class:`Messages`, which builds each message from a request's state.

A level sends three kinds of message per request: a span of drafts to the level above
(:meth:`Messages.span`), a notice of its state to the levels below (:meth:`Messages.notice`:
what they must adopt, and the lead it advises), and, at the target, the output to the gateway
(:meth:`Messages.output`, or :meth:`Messages.error`).
"""

from __future__ import annotations

from typing import Protocol

from common.level_request import FinishedRequest, LevelRequest
from common.protocol import (
    LevelStats,
    Notice,
    Output,
    RequestError,
    RouteHop,
    Span,
    Start,
    TokenLogprob,
)


class Outbox(Protocol):
    """Where the engine's messages go (ZeroMQ sockets, or the tests' fake transport)."""

    def send_span(self, hop: RouteHop, span: Span) -> None: ...
    def publish(self, notice: Notice) -> None: ...
    def send_reply(self, endpoint: str, msg: Output | RequestError) -> None: ...
    def subscribe(self, request_id: str, hops: list[RouteHop]) -> None: ...
    def unsubscribe(self, request_id: str) -> None: ...


class Messages:
    """The messages of the stage at ``level`` (``replica``), sent through ``outbox``."""

    def __init__(self, outbox: Outbox, level: int, replica: str):
        self.outbox = outbox
        self.level = level
        self.replica = replica

    def all_stats(self, r: LevelRequest) -> list[LevelStats]:
        """Every level's stats for ``r`` so far: those the span from below carries (an empty
        entry for a level not heard from), then ours."""
        below = list(r.span.stats) if r.span is not None else []
        have = {s.level for s in below}
        below += [
            LevelStats(level=i, replica=r.route[i].replica)
            for i in range(self.level)
            if i not in have
        ]
        return sorted(below, key=lambda s: s.level) + [r.stats.model_copy()]

    def span(self, r: LevelRequest) -> None:
        """Our sequence to the level above, from the end it last told us it holds (all of it
        if it has not, or that was another replica)."""
        above = r.seen.get(self.level + 1)
        hop = r.route[self.level + 1]
        fresh = above is not None and above.replica == hop.replica
        start = min(above.end, len(r.tokens)) if fresh else 0
        self.outbox.send_span(
            hop,
            Span(
                request_id=r.request_id,
                level=self.level,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                base_epoch=above.epoch if fresh else 0,
                epoch=r.epoch,
                stats=self.all_stats(r),
            ),
        )

    def notice(
        self, r: LevelRequest, start: int, rollback: bool, final: bool, lead: int | None
    ) -> None:
        """Our sequence from ``start`` to the levels below, with the lead we advise them."""
        self.outbox.publish(
            Notice(
                request_id=r.request_id,
                level=self.level,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                epoch=r.epoch,
                rollback=rollback,
                final=final,
                drafter_lead=lead,
            )
        )

    def output(self, r: LevelRequest, done: bool) -> None:
        """The target's tokens the gateway lacks (from ``r.sent``), and marks them sent."""
        start = r.sent
        self.outbox.send_reply(
            r.reply_to,
            Output(
                request_id=r.request_id,
                replica=self.replica,
                start=start,
                tokens=r.tokens[start:],
                done=done,
                finish_reason=r.finish_reason,
                stats=self.all_stats(r),
                logprobs=complete(r.logprobs[start:]) if r.top_logprobs >= 0 else [],
            ),
        )
        r.sent = len(r.tokens)

    def resend_finished(self, msg: Start, done: FinishedRequest) -> None:
        """A finished request started again (its output was lost): tell the levels below to let
        go, and repeat the end of the output from what the gateway has (``msg.have``)."""
        self.outbox.publish(
            Notice(
                request_id=msg.request_id,
                level=self.level,
                replica=self.replica,
                start=len(done.tokens),
                tokens=[],
                epoch=0,
                final=True,
            )
        )
        self.outbox.send_reply(
            msg.reply_to,
            Output(
                request_id=msg.request_id,
                replica=self.replica,
                start=msg.have,
                tokens=done.tokens[msg.have :],
                done=True,
                finish_reason=done.finish_reason,
                stats=done.stats,
                logprobs=complete(done.logprobs[msg.have :]),
            ),
        )

    def error(self, reply_to: str, request_id: str, message: str) -> None:
        self.outbox.send_reply(
            reply_to,
            RequestError(
                request_id=request_id, replica=self.replica, level=self.level, message=message
            ),
        )


def complete(logprobs: list[TokenLogprob | None]) -> list[TokenLogprob]:
    """``logprobs`` if every entry is known, else [] (a resumed target does not know those of
    the output it was handed; the gateway has them already).

    >>> complete([None]), complete([])
    ([], [])
    """
    return [] if any(lp is None for lp in logprobs) else list(logprobs)  # type: ignore[misc]
