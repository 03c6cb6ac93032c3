"""Incremental detokenization: text deltas as tokens arrive, never a half character.

A byte-level BPE may split one UTF-8 character over several tokens; decoding a prefix then ends
in U+FFFD. Each step decodes a short window twice, the tokens already emitted (``prefix``) and
those plus the new ones (``full``), and emits ``full[len(prefix):]`` once it no longer ends in
U+FFFD (the scheme of vLLM and TGI). The window keeps the context that decoders need at its
start (SentencePiece spaces, partial characters), so the concatenated deltas equal
``tokenizer.decode(all_ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens before this are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; returns the text they complete ("" while a character is unfinished)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (e.g. an unfinished character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
