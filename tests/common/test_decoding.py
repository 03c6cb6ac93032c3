"""Table-driven tests of the pure decoding functions (``common/decoding.py``): one row per case,
each with the reason it exists, plus the invariants every row must satisfy."""

from __future__ import annotations

import pytest

from common.decoding import (
    Reconcile,
    accept_greedy,
    anchor_drafts,
    apply_stop,
    find_divergence,
    reconcile,
)


@pytest.mark.parametrize(
    "drafts, predictions, accepted",
    [
        ([], [4], 0),  # nothing to verify: only the bonus token
        ([5], [5, 6], 1),  # one draft, accepted
        ([5], [4, 6], 0),  # one draft, rejected: correction 4
        ([5, 7, 9], [5, 7, 8, 4], 2),  # rejected in the middle
        ([5, 7, 9], [1, 7, 9, 4], 0),  # later matches do not count after a rejection
        ([5, 7], [5, 7, 3], 2),  # all accepted: bonus 3
        ([5, 7, 9], [5, None, 9, 4], 1),  # no prediction (a drafter-only level) rejects
        ([3, 3, 3, 3], [3, 3, 3, 3, 3], 4),  # repeated tokens
    ],
)
def test_accept_greedy(drafts, predictions, accepted):
    assert accept_greedy(drafts, predictions) == accepted
    # what the verifier commits: the accepted drafts, then its own prediction
    committed = drafts[:accepted] + [predictions[accepted]]
    assert committed[:accepted] == predictions[:accepted]


@pytest.mark.parametrize(
    "a, b, index",
    [
        ([], [], 0),
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),  # equal
        ([1, 2, 3], [1, 2, 4, 5], 2),
        ([1, 2], [1, 2, 3], 2),  # a prefixes b
        ([1, 2, 3], [1], 1),  # b prefixes a
        ([9], [1, 2], 0),  # differ at once
    ],
)
def test_find_divergence(a, b, index):
    assert find_divergence(a, b) == index == find_divergence(b, a)
    assert a[:index] == b[:index]


@pytest.mark.parametrize(
    "sequence, start, tokens, drafts",
    [
        ([1, 2, 3], 3, [4, 5], [4, 5]),  # starts right at the end
        ([1, 2, 3], 1, [2, 3, 4, 5], [4, 5]),  # overlap agrees
        ([1, 2, 3], 0, [1, 2, 3], []),  # all overlap: nothing new
        ([1, 2, 3], 0, [1, 2], []),  # shorter than the sequence, agrees
        ([], 0, [7, 8], [7, 8]),  # empty sequence
        ([1, 2, 3], 3, [], []),  # empty span at the end
        ([1, 2, 3], 1, [2, 9, 4], None),  # built on another prefix
        ([1, 2, 3], 0, [5], None),  # disagrees at the first position
        ([1, 2, 3], 4, [5], None),  # gap at position 3
    ],
)
def test_anchor_drafts(sequence, start, tokens, drafts):
    assert anchor_drafts(sequence, start, tokens) == drafts
    if drafts is not None:  # the drafts continue the sequence exactly where the span says
        extended = sequence + drafts
        assert extended[start : start + len(tokens)] == tokens


@pytest.mark.parametrize(
    "own, start, theirs, plan",
    [
        ([1, 2, 3, 4], 1, [2, 7], Reconcile(2, [7], True)),  # diverge: roll back, take 7
        ([1, 2, 3, 4], 2, [3, 4, 5, 6], Reconcile(4, [5, 6], False)),  # theirs longer: adopt
        ([1, 2, 3, 4], 0, [1, 2], Reconcile(4, [], False)),  # own ahead: keep drafting
        ([1, 2, 3, 4], 4, [5], Reconcile(4, [5], False)),  # starts at our end
        ([1, 2, 3, 4], 0, [9], Reconcile(0, [9], True)),  # diverge at position 0
        ([1, 2, 3, 4], 0, [1, 2, 3, 4], Reconcile(4, [], False)),  # the same: a no-op
        ([], 0, [5, 6], Reconcile(0, [5, 6], False)),  # nothing of our own yet
        ([1, 2, 3, 4], 2, [], Reconcile(4, [], False)),  # empty notice
        ([1, 2, 3, 4], 5, [6], None),  # gap at position 4: cannot follow
    ],
)
def test_reconcile(own, start, theirs, plan):
    got = reconcile(own, start, theirs)
    assert got == plan
    if got is None:
        return
    new = list(own[: got.keep]) + got.adopt
    # afterwards the lower level agrees with the higher one wherever both have tokens
    assert new[start : start + len(theirs)] == theirs[: len(new) - start]
    assert got.rewrote == (got.keep < len(own))
    # idempotent: applying the same notice again changes nothing
    again = reconcile(new, start, theirs)
    assert again == Reconcile(len(new), [], False)


@pytest.mark.parametrize(
    "tokens, eos, max_tokens, checked, cut, reason",
    [
        ([4, 2, 9, 2], {2}, 10, 0, [4, 2], "stop"),  # the first EOS is kept
        ([2], {2}, 10, 0, [2], "stop"),  # EOS first
        ([4, 5, 6], {2}, 2, 0, [4, 5], "length"),  # over the limit
        ([4, 5], {2}, 2, 0, [4, 5], "length"),  # exactly at the limit
        ([4, 5], {2}, 3, 0, [4, 5], None),  # not finished
        ([], {2}, 3, 0, [], None),
        ([4, 5, 2], {2}, 9, 2, [4, 5, 2], "stop"),  # the checked prefix is not rescanned
        ([4, 2, 6], {2, 6}, 9, 0, [4, 2], "stop"),  # several EOS ids
        ([4, 5, 2], [2], 2, 0, [4, 5], "length"),  # EOS past the limit does not count
        ([4, 5, 2], (), 9, 0, [4, 5, 2], None),  # no EOS ids (n-gram): only the limit
    ],
)
def test_apply_stop(tokens, eos, max_tokens, checked, cut, reason):
    assert apply_stop(tokens, eos, max_tokens, checked) == (cut, reason)
    assert cut == tokens[: len(cut)] and len(cut) <= max_tokens
