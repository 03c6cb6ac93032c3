import random
import time

import pytest

from common.backends import load_backend
from common.backends.ngram import NgramBackend
from common.settings import StageSettings


def scan_predict(history: list[int], ngram_max: int, ngram_min: int):
    """Reference: scan back for the latest earlier occurrence of the longest suffix."""
    for n in range(ngram_max, ngram_min - 1, -1):
        if n > len(history):
            continue
        suffix = history[-n:]
        for end in range(
            len(history) - 1, n - 1, -1
        ):  # occurrence history[end-n:end], then history[end]
            if history[end - n : end] == suffix:
                return history[end]
    return None


def test_docstring_example():
    session = NgramBackend(ngram_max=2, ngram_min=1).index([5, 6, 7, 5])
    assert session.forward([6, 9, 5]) == [7, None, 6]
    assert session.length == 7


def test_backend_attributes():
    backend = NgramBackend()
    assert (backend.kind, backend.can_verify, backend.tokenizer_fingerprint) == (
        "ngram",
        False,
        None,
    )
    assert backend.eos_token_ids == () and backend.max_context == 0


def test_empty_session_has_no_prediction():
    session = NgramBackend().index([])
    assert session.length == 0 and session.forward([]) == []
    assert session.forward([4]) == [None]


def test_longest_suffix_wins_over_a_later_shorter_match():
    # "1 2" was followed by 3; "2" alone was last followed by 8
    session = NgramBackend(ngram_max=2, ngram_min=1).index([1, 2, 3, 2, 8, 1])
    assert session.forward([2]) == [3]
    # with only unigrams, the latest "2" wins
    assert NgramBackend(ngram_max=1, ngram_min=1).index([1, 2, 3, 2, 8, 1]).forward([2]) == [8]


def test_ngram_min_excludes_short_matches():
    session = NgramBackend(ngram_max=3, ngram_min=2).index([4, 5, 6, 9])
    assert session.forward([5]) == [None]  # "9 5" unseen; "5" alone is too short


def test_random_forwards_and_crops_match_a_full_scan():
    rng = random.Random(0)
    for ngram_max, ngram_min in [(3, 1), (4, 2), (1, 1)]:
        history = [rng.randrange(6) for _ in range(20)]
        session = NgramBackend(ngram_max, ngram_min).index(list(history))
        for _ in range(300):
            if rng.random() < 0.3:
                keep = rng.randint(0, session.length)
                session.crop(keep)
                del history[keep:]
            tokens = [rng.randrange(6) for _ in range(rng.randint(0, 5))]
            expected = []
            for token in tokens:
                history.append(token)
                expected.append(scan_predict(history, ngram_max, ngram_min))
            assert session.forward(tokens) == expected
            assert session.length == len(history)


def test_crop_bounds():
    session = NgramBackend().index([1, 2, 3])
    session.crop(3)
    with pytest.raises(ValueError):
        session.crop(4)
    with pytest.raises(ValueError):
        session.crop(-1)
    session.crop(0)
    assert session.length == 0 and session.forward([1]) == [None]


def test_close_empties_the_session():
    session = NgramBackend().index([1, 2, 1])
    session.close()
    assert session.length == 0


def test_long_history_is_fast():
    rng = random.Random(1)
    session = NgramBackend(ngram_max=3).index([rng.randrange(500) for _ in range(4000)])
    start = time.perf_counter()
    for _ in range(200):  # draft 8, reject 4, as a drafter does
        session.forward([rng.randrange(500) for _ in range(8)])
        session.crop(session.length - 4)
    assert time.perf_counter() - start < 1.0


def test_invalid_sizes():
    with pytest.raises(ValueError):
        NgramBackend(ngram_max=1, ngram_min=2)
    with pytest.raises(ValueError):
        NgramBackend(ngram_max=0, ngram_min=0)


def test_load_backend():
    backend = load_backend(StageSettings(level=0, backend="ngram", ngram_max=4, ngram_min=2))
    assert isinstance(backend, NgramBackend) and (backend.ngram_max, backend.ngram_min) == (4, 2)


def test_load_backend_rejects_a_model():
    with pytest.raises(ValueError, match="no weights"):
        load_backend(StageSettings(level=0, backend="ngram", model="smollm2-135m"))
