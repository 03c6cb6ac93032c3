"""A stage replica faked in a thread over real ZeroMQ sockets, for gateway tests.

It registers with heartbeats like a real stage. Given a ``script`` it acts as the target: on
Start it streams ``script`` (cut at max_tokens / EOS) from ``have``, ``piece`` tokens per Output
every ``delay_s``, then a done Output with per-level stats; with logprobs when the Start asks for
them, as a real target sends them (made-up values; alternatives drawn from the script's tokens). Every message it receives is kept in
``received`` for assertions. ``silence()`` (or ``die_on_start``) makes it stop answering and
heartbeating, like a dead replica. ``kv`` (used, capacity, waiting) is the KV pool its
heartbeats report (attribute, may be changed while it runs; default: none reported).
"""

from __future__ import annotations

import threading
import time
import uuid

import zmq

from common.codec import decode, encode
from common.decoding import apply_stop
from common.protocol import Cancel, Heartbeat, LevelStats, Message, Output, Start, TokenLogprob
from common.sockets import bound_endpoint, open_socket

HEARTBEAT_S = 0.05


class FakeStage:
    def __init__(
        self,
        gateway: str,
        level: int,
        script: list[int] | None = None,
        *,
        piece: int = 2,
        delay_s: float = 0.0,
        fingerprint: str | None = None,
        max_context: int = 0,
        die_on_start: bool = False,
        kv: tuple[int, int, int] = (0, 0, 0),
    ):
        self.gateway, self.level, self.script = gateway, level, script
        self.piece, self.delay_s, self.die_on_start = piece, delay_s, die_on_start
        self.fingerprint, self.max_context = fingerprint, max_context
        self.kv = kv
        self.replica = f"fake-L{level}-{uuid.uuid4().hex[:6]}"
        self.received: list[Message] = []
        self.silent = threading.Event()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._inbox = open_socket(self._ctx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0)
        self.inbox = bound_endpoint(self._inbox)
        self._thread = threading.Thread(target=self._run, name=self.replica, daemon=True)
        self._thread.start()

    def starts(self) -> list[Start]:
        return [m for m in list(self.received) if isinstance(m, Start)]

    def cancels(self) -> list[Cancel]:
        return [m for m in list(self.received) if isinstance(m, Cancel)]

    def silence(self) -> None:
        self.silent.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _heartbeat(self) -> Heartbeat:
        used, capacity, waiting = self.kv
        return Heartbeat(
            replica=self.replica,
            incarnation=self.replica,
            level=self.level,
            inbox=self.inbox,
            notices="tcp://127.0.0.1:9",
            ready=True,
            can_verify=self.level > 0,
            tokenizer_fingerprint=self.fingerprint,
            max_context=self.max_context,
            kv_used_tokens=used,
            kv_capacity_tokens=capacity,
            waiting_requests=waiting,
        )

    def _run(self) -> None:
        push = open_socket(self._ctx, zmq.PUSH, self.gateway, linger_ms=0)
        sending: dict[
            str, tuple[Start, int]
        ] = {}  # request id -> (its Start, next position to send)
        next_beat = 0.0
        while not self._stop.is_set():
            if self.silent.is_set():
                time.sleep(0.01)
                continue
            if time.monotonic() >= next_beat:
                push.send(encode(self._heartbeat()))
                next_beat = time.monotonic() + HEARTBEAT_S
            if self._inbox.poll(int(self.delay_s * 1000) or 5):
                msg = decode(self._inbox.recv())
                self.received.append(msg)
                if isinstance(msg, Start) and self.die_on_start:
                    self.silence()
                    continue
                if isinstance(msg, Start) and self.script is not None:
                    sending[msg.request_id] = (msg, msg.have)
                elif isinstance(msg, Cancel):
                    sending.pop(msg.request_id, None)
            for request_id, (start, pos) in list(sending.items()):
                push.send(encode(self._output(start, pos)))
                sending[request_id] = (start, pos + self.piece)
                if pos + self.piece >= len(self._committed(start)[0]):
                    del sending[request_id]
        push.close()
        self._inbox.close()
        self._ctx.term()

    def _committed(self, start: Start) -> tuple[list[int], str | None]:
        return apply_stop(self.script, start.eos_ids, start.max_tokens)

    def _output(self, start: Start, pos: int) -> Output:
        tokens, reason = self._committed(start)
        piece = tokens[pos : pos + self.piece]
        done = pos + len(piece) >= len(tokens)
        stats = [
            LevelStats(level=0, forward_passes=len(tokens)),
            LevelStats(
                level=1,
                forward_passes=4,
                drafts=3,
                draft_tokens=12,
                accepted_tokens=9,
                rollbacks_issued=2,
            ),
        ]
        return Output(
            request_id=start.request_id,
            replica=self.replica,
            start=pos,
            tokens=piece,
            done=done,
            finish_reason=(reason or "stop") if done else None,
            stats=stats if done else [],
            logprobs=self._logprobs(piece, start.logprobs) if start.logprobs >= 0 else [],
        )

    def _logprobs(self, piece: list[int], top: int) -> list[TokenLogprob]:
        others = list(dict.fromkeys(self.script))[:top]
        return [
            TokenLogprob(
                token=t,
                logprob=-0.25,
                top_ids=others,
                top_logprobs=[-0.25 - i for i in range(len(others))],
            )
            for t in piece
        ]
