"""The JSON the HTTP API sends: OpenAI completion and chat completion objects, stream chunks, SSE
framing and the error shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.gateway.events import RequestStats


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def sse(payload: dict) -> str:
    """One server-sent event; the stream ends with ``DONE``."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def usage(stats: RequestStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


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

    def chunk(self, text: str, finish_reason: str | None = None, role: bool = False) -> dict:
        """A stream chunk. Chat: ``role`` marks the first one; the last has an empty delta."""
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("text_completion", [choice])
        delta = (
            {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        )
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, stats: RequestStats) -> dict:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, []) | {"usage": usage(stats)}

    def whole(self, text: str, finish_reason: str, stats: RequestStats) -> dict:
        """The non-streamed reply, with ``spec_decode_stats`` (this server's extension)."""
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        return body | {"usage": usage(stats), "spec_decode_stats": stats.model_dump()}
