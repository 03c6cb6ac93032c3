"""Incremental detokenization against a real byte-level BPE: no U+FFFD from split characters,
and the streamed pieces always add up to ``decode(all_ids, skip_special_tokens=True)``."""

from __future__ import annotations

import random

import pytest

from services.gateway.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "Ça coûte 3 € — 日本語 🙂 café",
    "def fibonacci(n):\n    return n",
    "🙂🙂🙂",  # 4-byte characters back to back
    " leading space and trailing  ",
]


def stream(tokenizer, ids: list[int], chunk_sizes) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces, i = [], 0
    for size in chunk_sizes:
        if i >= len(ids):
            break
        pieces.append(detokenizer.add(ids[i : i + size]))
        i += size
    pieces.append(detokenizer.add(ids[i:]))
    pieces.append(detokenizer.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert (
        any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids) or text.isascii()
    )  # the hard case is there
    pieces = stream(tokenizer, ids, [1] * len(ids))
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("seed", range(20))
def test_random_chunks_with_special_tokens_match_a_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(rng.choice(TEXTS) + rng.choice(TEXTS))
    ids.insert(rng.randrange(len(ids)), tokenizer.eos_token_id)  # skipped, as in the reference
    ids.append(tokenizer.eos_token_id)
    pieces = stream(tokenizer, ids, [rng.randint(1, 4) for _ in ids])
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)


def test_unfinished_character_is_held_until_flush(tokenizer):
    ids = tokenizer.encode("€")
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(ids[:-1]) == ""
    assert detokenizer.flush() == tokenizer.decode(ids[:-1])  # a truncated stream shows what it got


def test_random_token_soup_still_matches(tokenizer):
    """Model output need not be valid UTF-8; what is emitted must still equal a full decode."""
    rng = random.Random(7)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    pieces = stream(tokenizer, ids, [rng.randint(1, 3) for _ in ids])
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
