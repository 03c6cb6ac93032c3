"""From committed token ids to the text a client sees: incremental detokenization, then stop
strings, found across token (and chunk) boundaries and never shown to the client.

A stop string can begin in one token and end several tokens later, so text that *could* be the
start of a stop string is held back until the following text settles it (vLLM and TGI hold back
the same way). For stop = ["\\n\\n"] and pieces "a\\n", "\\nb":

>>> s = StopMatcher(["\\n\\n"])
>>> s.feed("a\\n"), s.feed("\\nb"), s.matched
('a', '', '\\n\\n')
"""

from __future__ import annotations

from collections.abc import Sequence

from services.gateway.detokenizer import IncrementalDetokenizer


class StopMatcher:
    """Cuts streamed text at the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text that may be the start of a stop string
        self.matched: str | None = None  # the stop string found, once found

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that is safe to show. Once a stop string is found, returns
        the text before it, sets ``matched`` and returns "" ever after."""
        if self.matched is not None:
            return ""
        buffer = self.held + text
        found = [(i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if found:
            index, self.matched = min(found)
            self.held = ""
            return buffer[:index]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that some stop string starts with."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of output that matched no stop string."""
        held, self.held = ("" if self.matched is not None else self.held), ""
        return held


class TextOutput:
    """Token ids in, client text out. ``tokens`` counts the ids that produced the text: with stop
    strings, ids are taken one by one so the count ends at the token that completed the match."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(stops)
        self.tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string was found: the output is complete."""
        return self.stop.matched is not None

    def add(self, token_ids: Sequence[int]) -> str:
        if not self.stop.stops:
            self.tokens += len(token_ids)
            return self.detokenizer.add(token_ids)
        parts = []
        for token in token_ids:
            if self.stopped:
                break
            self.tokens += 1
            parts.append(self.stop.feed(self.detokenizer.add([token])))
        return "".join(parts)

    def finish(self) -> str:
        """The rest of the text once the request has ended by itself (EOS or length)."""
        text = self.stop.feed(self.detokenizer.flush())
        return text + self.stop.flush()
