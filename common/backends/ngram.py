"""Prompt-lookup drafting: predict what followed the latest earlier occurrence of the current suffix.

No weights and no tokenizer: it works on raw ids, so it can only draft (level 0). Each request's
history is an :class:`NgramIndex`, fed in turn by each pass (:mod:`common.backends.history`).

Worked example (ngram_max=2, ngram_min=1), history ``5 6 7 5 6``:
    the suffix ``5 6`` occurred at positions 0-1, followed by 7   -> predict 7
    feed 9: history ``5 6 7 5 6 9``; no earlier ``6 9`` nor ``9``  -> None
    feed 5: suffix ``9 5`` is new, but ``5`` was last followed by 6 (positions 3-4) -> predict 6

Each index keeps, for every n-gram seen with a token after it, the stack of positions of those
following tokens; appending and cropping update it in O(ngram_max) per token, so a prediction is a
few dict lookups whatever the history length.
"""

from __future__ import annotations

from common.backends.history import HistoryBackend


class NgramIndex:
    """One request's history and the positions that followed each of its n-grams."""

    def __init__(self, ngram_max: int, ngram_min: int, context: list[int]):
        self._sizes = range(ngram_max, ngram_min - 1, -1)  # longest suffix first
        self._history: list[int] = []
        self._followers: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions right after it
        for token in context:
            self._append(token)

    @property
    def length(self) -> int:
        return len(self._history)

    def _grams_before(self, position: int):
        """The n-grams (each size) that end just before ``position``."""
        for n in self._sizes:
            if n <= position:
                yield tuple(self._history[position - n : position])

    def _append(self, token: int) -> None:
        position = len(self._history)
        for gram in self._grams_before(position):
            self._followers.setdefault(gram, []).append(position)
        self._history.append(token)

    def _predict(self) -> int | None:
        for gram in self._grams_before(len(self._history)):
            positions = self._followers.get(gram)
            if positions:
                return self._history[positions[-1]]
        return None

    def forward(self, tokens: list[int], chooser=None) -> list[int | None]:
        """``chooser`` is ignored: these predictions are deterministic drafts."""
        predictions = []
        for token in tokens:
            self._append(token)
            predictions.append(self._predict())
        return predictions

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"crop({length}) on a history of length {self.length}")
        for position in range(self.length - 1, length - 1, -1):  # undo appends, latest first
            for gram in self._grams_before(position):
                positions = self._followers[gram]
                positions.pop()
                if not positions:
                    del self._followers[gram]
        del self._history[length:]

    def close(self) -> None:
        self._history.clear()
        self._followers.clear()


class NgramBackend(HistoryBackend):
    kind = "ngram"
    can_verify = False
    has_logits = False

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1, kv_pool_tokens: int | None = None):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        super().__init__(kv_pool_tokens)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.name = f"ngram({ngram_min}..{ngram_max})"

    def index(self, context: list[int]) -> NgramIndex:
        """An index of ``context`` (what each request's state is)."""
        return NgramIndex(self.ngram_max, self.ngram_min, context)

    def new_state(self) -> NgramIndex:
        return self.index([])
