"""The request limits (``services.gateway.limits.check_prompt``): one pure function, a table of
cases. Both APIs reach it once per request through ``Gateway.check``."""

from __future__ import annotations

import re

import pytest

from services.gateway.events import InvalidRequest
from services.gateway.limits import Limits, Prompt, check_prompt

LIMITS = Limits(default_max_tokens=256, max_tokens_limit=4096, context=1024)
NO_CONTEXT = Limits(default_max_tokens=256, max_tokens_limit=4096)  # no target known yet

# (prompt tokens, max_tokens, limits, param) -> the output length, or (param, part of the message)
CASES = [
    (3, None, LIMITS, "max_tokens", 256),  # the default
    (900, None, LIMITS, "max_tokens", 124),  # the default, capped to the context left
    (1023, None, LIMITS, "max_tokens", 1),
    (3, None, NO_CONTEXT, "max_tokens", 256),
    (3, 1, LIMITS, "max_tokens", 1),
    (24, 1000, LIMITS, "max_tokens", 1000),  # exactly the context
    (3, 4096, NO_CONTEXT, "max_tokens", 4096),
    (0, 5, LIMITS, "max_tokens", ("prompt", "prompt must not be empty")),
    (0, None, NO_CONTEXT, "max_tokens", ("prompt", "prompt must not be empty")),
    (1024, None, LIMITS, "max_tokens", ("prompt", "the prompt is 1024 tokens")),
    (1024, 5, LIMITS, "max_tokens", ("prompt", "context is 1024 tokens")),
    (3, 0, LIMITS, "max_tokens", ("max_tokens", "max_tokens must be at least 1, got 0")),
    (3, -2, NO_CONTEXT, "max_tokens", ("max_tokens", "at least 1, got -2")),
    (3, 4097, NO_CONTEXT, "max_tokens", ("max_tokens", "max_tokens must be at most 4096")),
    (25, 1000, LIMITS, "max_tokens", ("max_tokens", "is 1025 tokens, more than the model's")),
    (
        25,
        1000,
        LIMITS,
        "max_completion_tokens",
        ("max_completion_tokens", "plus max_completion_tokens (1000)"),
    ),
    (
        3,
        0,
        LIMITS,
        "max_completion_tokens",
        ("max_completion_tokens", "max_completion_tokens must"),
    ),
]


@pytest.mark.parametrize(("prompt_tokens", "max_tokens", "limits", "param", "expected"), CASES)
def test_check_prompt(prompt_tokens, max_tokens, limits, param, expected):
    ids = list(range(prompt_tokens))
    if isinstance(expected, int):
        assert check_prompt(ids, max_tokens, limits, param) == Prompt(tuple(ids), expected)
        return
    field, message = expected
    with pytest.raises(InvalidRequest, match=re.escape(message)) as exc:
        check_prompt(ids, max_tokens, limits, param)
    assert exc.value.param == field


def test_the_checked_prompt_is_a_copy():
    ids = [1, 2, 3]
    prompt = check_prompt(ids, None, LIMITS)
    ids.append(4)
    assert prompt.ids == (1, 2, 3)
