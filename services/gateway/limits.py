"""The request limits, checked once per request by one pure function, ``check_prompt``.

Both front ends (the HTTP API's ``serving`` and the ZMQ ``client_api``) reach it through
``Gateway.check``, which supplies the settings' limits and the target's context as the registry
knows it; ``Gateway.submit`` then runs the checked ``Prompt`` (once, or n times for n choices)
without checking again. tests/services/gateway/test_limits.py holds the cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.gateway.events import InvalidRequest


@dataclass(frozen=True)
class Limits:
    default_max_tokens: int  # output length when the client gives none
    max_tokens_limit: int  # the most output a client may ask for
    context: int = 0  # the target's context (prompt and output, in tokens); 0: not known


@dataclass(frozen=True)
class Prompt:
    """A prompt that passed ``check_prompt``, with the output length it may produce."""

    ids: tuple[int, ...]
    max_tokens: int


def check_prompt(
    prompt_ids: Sequence[int], max_tokens: int | None, limits: Limits, param: str = "max_tokens"
) -> Prompt:
    """``prompt_ids`` with their output length: ``max_tokens``, checked, or when the client gave
    none, ``default_max_tokens`` capped to the context left after the prompt. Raises
    InvalidRequest naming what is wrong (``param``: the field's name as the client spelled it)."""
    prompt_tokens, context = len(prompt_ids), limits.context
    if not prompt_tokens:
        raise InvalidRequest("prompt must not be empty", "prompt")
    if context and prompt_tokens >= context:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens, but the model's context is {context} tokens "
            "(prompt and output together)",
            "prompt",
        )
    if max_tokens is None:
        default = limits.default_max_tokens
        return Prompt(
            tuple(prompt_ids), min(default, context - prompt_tokens) if context else default
        )
    if max_tokens < 1:
        raise InvalidRequest(f"{param} must be at least 1, got {max_tokens}", param)
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"{param} must be at most {limits.max_tokens_limit}, got {max_tokens}", param
        )
    if context and prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) plus {param} ({max_tokens}) is "
            f"{prompt_tokens + max_tokens} tokens, more than the model's context of {context} tokens",
            param,
        )
    return Prompt(tuple(prompt_ids), max_tokens)
