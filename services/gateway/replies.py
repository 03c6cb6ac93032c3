"""The JSON the HTTP API sends: OpenAI completion and chat completion objects, stream chunks, SSE
framing, log-probabilities in both OpenAI shapes, and the error shape
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.protocol import TokenLogprob
from services.gateway.events import RequestStats


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def sse(payload: dict) -> str:
    """One server-sent event; the stream ends with ``DONE``."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def usage(stats: RequestStats | Sequence[RequestStats]) -> dict:
    """Usage of one choice, or of several (the prompt counted once, as OpenAI does)."""
    many = [stats] if isinstance(stats, RequestStats) else list(stats)
    prompt, completion = many[0].prompt_tokens, sum(s.completion_tokens for s in many)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: Callable[[int], str]) -> dict:
    """Chat's shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

    >>> e = TokenLogprob(token=7, logprob=-0.1, top_ids=[7, 9], top_logprobs=[-0.1, -2.5])
    >>> chat_logprobs([e], lambda i: f"t{i}")["content"][0]["top_logprobs"][1]
    {'token': 't9', 'logprob': -2.5, 'bytes': [116, 57]}
    """

    def one(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            one(e.token, e.logprob)
            | {"top_logprobs": [one(t, lp) for t, lp in zip(e.top_ids, e.top_logprobs)]}
            for e in entries
        ]
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob], text_of: Callable[[int], str], offset: int = 0
) -> dict:
    """Completions' shape: parallel lists; ``text_offset`` counts characters from ``offset``.

    >>> e = TokenLogprob(token=7, logprob=-0.1, top_ids=[7], top_logprobs=[-0.1])
    >>> completion_logprobs([e, e], lambda i: "ab", offset=3)
    {'tokens': ['ab', 'ab'], 'token_logprobs': [-0.1, -0.1], 'top_logprobs': [{'ab': -0.1}, {'ab': -0.1}], 'text_offset': [3, 5]}
    """
    tokens = [text_of(e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {text_of(t): lp for t, lp in zip(e.top_ids, e.top_logprobs)} for e in entries
        ],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Choice:
    """One finished choice of a non-streamed reply."""

    text: str
    finish_reason: str
    logprobs: dict | None = None  # in the reply's shape (chat or completions)


@dataclass(frozen=True)
class Reply:
    """What every object of one reply repeats; ``chat`` picks chat.completion over text_completion."""

    id: str
    created: int
    model: str
    chat: bool

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(
        self,
        text: str,
        finish_reason: str | None = None,
        role: bool = False,
        index: int = 0,
        logprobs: dict | None = None,
    ) -> dict:
        """A stream chunk of choice ``index``. Chat: ``role`` marks the first one; the last has
        an empty delta."""
        if not self.chat:
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return self._envelope("text_completion", [choice])
        delta = (
            {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        )
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, stats: RequestStats | Sequence[RequestStats]) -> dict:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, []) | {"usage": usage(stats)}

    def whole(self, choices: Sequence[Choice], stats: Sequence[RequestStats]) -> dict:
        """The non-streamed reply, with ``spec_decode_stats`` (this server's extension: choice
        0's; with n > 1 every choice's in ``spec_decode_stats_per_choice``)."""
        out = []
        for index, c in enumerate(choices):
            if self.chat:
                content = {"message": {"role": "assistant", "content": c.text}}
            else:
                content = {"text": c.text}
            out.append(
                {"index": index}
                | content
                | {"logprobs": c.logprobs, "finish_reason": c.finish_reason}
            )
        body = self._envelope("chat.completion" if self.chat else "text_completion", out)
        body |= {"usage": usage(stats), "spec_decode_stats": stats[0].model_dump()}
        if len(stats) > 1:
            body["spec_decode_stats_per_choice"] = [s.model_dump() for s in stats]
        return body
