"""Pure decoding logic of PipeSpec: accept, anchor, reconcile, stop. No I/O, no models.

Positions are indices into a request's generated tokens (the prompt is not counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def accept_greedy(drafts: Sequence[int], predictions: Sequence[int | None]) -> int:
    """Number of drafts accepted: the longest prefix where each draft equals the verifier's
    greedy prediction for its position.

    ``predictions[j]`` is the verifier's token *after* ``drafts[j-1]`` (``predictions[0]`` after the
    last committed token), so ``len(predictions) == len(drafts) + 1``. The verifier then appends
    ``drafts[:m] + [predictions[m]]``: the accepted drafts plus one correction (m < len(drafts))
    or bonus (m == len(drafts)) token.

    >>> accept_greedy([5, 7, 9], [5, 7, 8, 4])   # 9 rejected: commit 5 7 + correction 8
    2
    >>> accept_greedy([5, 7], [5, 7, 3])          # all accepted: commit 5 7 + bonus 3
    2
    """
    m = 0
    while m < len(drafts) and drafts[m] == predictions[m]:
        m += 1
    return m


def find_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """First index where ``a`` and ``b`` differ, or the shorter length if one prefixes the other.

    >>> find_divergence([1, 2, 3], [1, 2, 4, 5])
    2
    >>> find_divergence([1, 2], [1, 2, 3])
    2
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def anchor_drafts(sequence: Sequence[int], start: int, tokens: Sequence[int]) -> list[int] | None:
    """Drafts usable by a verifier whose own sequence is ``sequence``, from a span
    ``tokens`` placed at position ``start``.

    The span must *anchor*: start at or before the end of ``sequence`` and agree with it where
    they overlap. Returns the part beyond the end of ``sequence`` (possibly empty), or None if
    the span does not anchor (it was built on another prefix, or leaves a gap).

    >>> anchor_drafts([1, 2, 3], 1, [2, 3, 4, 5])   # overlap 2 3 agrees
    [4, 5]
    >>> anchor_drafts([1, 2, 3], 1, [2, 9, 4]) is None   # built on another prefix
    True
    >>> anchor_drafts([1, 2, 3], 4, [5]) is None         # gap at position 3
    True
    """
    n = len(sequence)
    if start > n:
        return None
    overlap = n - start
    if list(tokens[:overlap]) != list(sequence[start : start + min(overlap, len(tokens))]):
        return None
    return list(tokens[overlap:])


@dataclass(frozen=True)
class Reconcile:
    """How a lower level adopts a higher level's state: ``new = own[:keep] + adopt``."""

    keep: int
    adopt: list[int]
    rewrote: bool  # own tokens from ``keep`` on were discarded (a rollback)


def reconcile(own: Sequence[int], start: int, theirs: Sequence[int]) -> Reconcile | None:
    """Plan how a lower level with sequence ``own`` follows a higher level whose sequence from
    position ``start`` is ``theirs``. None if it cannot: ``start`` is beyond ``own`` (a gap).

    Three cases, for own = [1, 2, 3, 4]:

    >>> reconcile([1, 2, 3, 4], 1, [2, 7])        # diverges at 2: roll back, take 7
    Reconcile(keep=2, adopt=[7], rewrote=True)
    >>> reconcile([1, 2, 3, 4], 2, [3, 4, 5, 6])  # agrees, theirs is longer: adopt 5 6
    Reconcile(keep=4, adopt=[5, 6], rewrote=False)
    >>> reconcile([1, 2, 3, 4], 0, [1, 2])        # agrees, own is ahead: keep drafting
    Reconcile(keep=4, adopt=[], rewrote=False)
    """
    if start > len(own):
        return None
    d = find_divergence(own[start:], theirs)
    q = start + d
    if q < len(own) and d < len(theirs):
        return Reconcile(keep=q, adopt=list(theirs[d:]), rewrote=True)
    return Reconcile(keep=len(own), adopt=list(theirs[len(own) - start :]), rewrote=False)


def apply_stop(
    tokens: Sequence[int], eos_ids: Iterable[int], max_tokens: int, checked: int = 0
) -> tuple[list[int], str | None]:
    """Cut generated tokens at the first end-of-sequence token (kept, as ``generate`` keeps it)
    or at ``max_tokens``; the finish reason is "stop", "length" or None (not finished).
    ``checked``: a prefix already known to hold no end token, not scanned again.

    >>> apply_stop([4, 2, 9, 2], {2}, 10)
    ([4, 2], 'stop')
    >>> apply_stop([4, 5, 6], {2}, 2)
    ([4, 5], 'length')
    >>> apply_stop([4, 5], {2}, 3)
    ([4, 5], None)
    >>> apply_stop([4, 5, 2], {2}, 9, checked=2)
    ([4, 5, 2], 'stop')
    """
    eos = eos_ids if isinstance(eos_ids, (set, frozenset)) else set(eos_ids)
    limit = min(len(tokens), max_tokens)
    for i in range(checked, limit):
        if tokens[i] in eos:
            return list(tokens[: i + 1]), "stop"
    if len(tokens) >= max_tokens:
        return list(tokens[:max_tokens]), "length"
    return list(tokens), None
