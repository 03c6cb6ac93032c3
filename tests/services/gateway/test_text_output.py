"""Stop strings: found across pieces and tokens, cut before the stop string, never leaked, and
the held-back text released when the output ends without one."""

from __future__ import annotations

import random

import pytest

from services.gateway.text_output import StopMatcher, TextOutput

TEXT = "Ça coûte 3 € — 日本語 🙂 café"


def feed_all(stops, pieces) -> tuple[list[str], str]:
    matcher = StopMatcher(stops)
    out = [matcher.feed(p) for p in pieces]
    if matcher.matched is None:
        out.append(matcher.flush())
    return out, matcher.matched


@pytest.mark.parametrize(
    "stops, pieces, text, matched",
    [
        (["\n\n"], ["a\n", "\nb"], "a", "\n\n"),  # split over two pieces
        (["END"], ["xE", "N", "D", "yy"], "x", "END"),  # over three
        (["END"], ["xEN", "Dy"], "x", "END"),
        (["END"], ["xEN", "O"], "xENO", None),  # a false start is released
        (["END"], ["xEN"], "xEN", None),  # ... also at the very end
        (["abc", "b"], ["ab", "c"], "a", "b"),  # the earliest match wins
        (["bc", "abcd"], ["abc", "d"], "a", "bc"),
        (["aab"], ["aaa", "ab"], "aa", "aab"),  # overlapping prefixes
        (["x"], ["", "x"], "", "x"),
        ([], ["plain"], "plain", None),
    ],
)
def test_stop_matcher_table(stops, pieces, text, matched):
    out, found = feed_all(stops, pieces)
    assert "".join(out) == text and found == matched


def test_nothing_is_emitted_after_a_match():
    matcher = StopMatcher(["!"])
    assert matcher.feed("hi! there") == "hi"
    assert matcher.feed("more") == "" and matcher.flush() == ""


@pytest.mark.parametrize("seed", range(30))
def test_random_splits_equal_a_cut_of_the_whole_text(seed):
    rng = random.Random(seed)
    stop = TEXT[rng.randrange(len(TEXT) - 3) :][: rng.randint(1, 4)]
    cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(1, 8)))
    pieces = [TEXT[a:b] for a, b in zip([0] + cuts, cuts + [len(TEXT)])]
    out, found = feed_all([stop, "never there"], pieces)
    assert "".join(out) == TEXT[: TEXT.find(stop)] and found == stop
    emitted = ""
    for piece in out:  # no prefix of the output ever shows any part of the stop string past the cut
        emitted += piece
        assert TEXT.startswith(emitted) and len(emitted) <= TEXT.find(stop)


def one_by_one(tokenizer, ids, stops) -> tuple[str, TextOutput]:
    output = TextOutput(tokenizer, stops)
    text = "".join(output.add([i]) for i in ids)
    if not output.stopped:
        text += output.finish()
    return text, output


@pytest.mark.parametrize("stop", ["€", "3 € —", "日本", "🙂", " caf", "é"])
def test_text_output_stops_inside_multibyte_tokens(tokenizer, stop):
    ids = tokenizer.encode(TEXT)
    text, output = one_by_one(tokenizer, ids, [stop])
    assert text == TEXT[: TEXT.find(stop)] and output.stopped
    # the count ends where the stop string became visible (a split character waits for its end)
    assert stop in tokenizer.decode(ids[: output.tokens])


def test_text_output_without_a_match_gives_the_full_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    output = TextOutput(tokenizer, ["nowhere", "é!"])
    text = output.add(ids[:5]) + output.add(ids[5:]) + output.finish()
    assert text == TEXT and output.tokens == len(ids) and not output.stopped
