"""The OpenAI request bodies the gateway accepts, as pydantic models (they also document the API
in /openapi.json), and ``parse_body``, which turns a raw body into one or an InvalidRequest that
names the offending field.

Sampling (``common.sampling``): ``temperature`` 0 or absent is greedy; above 0 the output is a
seeded sample with ``top_p``, ``top_k`` and ``min_p`` (vLLM's extensions) applied after the
temperature, in transformers' order; ``seed`` fixes it (a random one is drawn and reported in
``spec_decode_stats`` when absent). ``n`` choices run as n requests with derived seeds.
``logprobs`` (completions: the number of alternatives; chat: a flag, with ``top_logprobs``)
returns the target model's raw log-probabilities. ``frequency_penalty`` and ``presence_penalty``
are accepted at 0 only. Fields not listed here are refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import secrets
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.protocol import MAX_TOP_K
from common.sampling import MAX_TOP_LOGPROBS, SamplingParams
from services.gateway.events import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n
INT64 = 2**63


class SamplingFields(Protocol):
    """A request's sampling fields, as the HTTP bodies (``RequestFields``) and the ZMQ client API
    (``client_schema.ClientRequest``) both carry them; None: the field is absent."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None


def draw_seed(seed: int | None) -> int:
    """The request's ``seed``, or a fresh random one (63 bits) when it gave none.

    >>> draw_seed(7), 0 <= draw_seed(None) < 2**63
    (7, True)
    """
    return secrets.randbits(63) if seed is None else seed


def sampling_params(fields: SamplingFields) -> SamplingParams:
    """The ``SamplingParams`` of a request's sampling fields: an absent field takes its neutral
    value (temperature 0 is greedy), ``top_k`` -1 (vLLM's "off") is 0, and the seed is the
    request's or one drawn for it (``draw_seed``; the stats report it).

    >>> sampling_params(CompletionRequest(prompt="hi", temperature=0.5, top_k=-1, seed=3))
    SamplingParams(temperature=0.5, seed=3, top_p=1.0, top_k=0, min_p=0.0)
    """
    return SamplingParams(
        temperature=fields.temperature or 0.0,
        seed=draw_seed(fields.seed),
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=max(0, fields.top_k or 0),
        min_p=fields.min_p or 0.0,
    )


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False  # one more chunk before [DONE], with usage and empty choices


class RequestFields(Strict):
    """What completions and chat completions share."""

    model: str | None = None  # the served model name; absent means that one
    max_tokens: int | None = None  # absent: GatewaySettings.default_max_tokens, within the context
    temperature: float | None = Field(None, ge=0, le=2)  # 0 or absent: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # vLLM's extension; 0 or -1: off
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's extension
    stop: str | list[str] | None = None  # up to MAX_STOP_STRINGS, never part of the output
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    user: str | None = None  # logged with the request
    frequency_penalty: float | None = None  # 0 only
    presence_penalty: float | None = None  # 0 only
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; only 0 is accepted")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> RequestFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def output_limit(self) -> tuple[int | None, str]:
        """The requested output length and the field that gave it (for error messages)."""
        return self.max_tokens, "max_tokens"

    def top_logprobs_wanted(self) -> int:
        """-1: no logprobs; else how many alternatives per token."""
        return -1

    def sampling(self) -> SamplingParams:
        """The sampling parameters (``sampling_params``), a seed drawn when the body gave none."""
        return sampling_params(self)


class CompletionRequest(RequestFields):
    """POST /v1/completions."""

    prompt: str | list[int]  # text, or token ids (a list holding one string is that string)
    echo: bool = False  # put the prompt's text before the completion
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token

    def top_logprobs_wanted(self) -> int:
        return -1 if self.logprobs is None else self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if isinstance(value, str) or (
            isinstance(value, list) and all(type(v) is int for v in value)
        ):
            return value
        if isinstance(value, list) and all(isinstance(v, (str, list)) for v in value):
            raise ValueError("only one prompt per request is supported")
        raise ValueError("prompt must be a string or a list of token ids")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value):
        """Checks the parts here, so an error names the part rather than each union member."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        for i, part in enumerate(value):
            try:
                TextPart.model_validate(part)
            except ValidationError as exc:
                error = exc.errors(include_url=False)[0]
                field = ".".join(str(p) for p in error["loc"])
                raise ValueError(
                    f"part {i}: {field + ': ' if field else ''}{error['msg']}"
                ) from None
        return value

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatCompletionRequest(RequestFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # wins over max_tokens (deprecated by OpenAI)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs is only allowed with logprobs: true")
        return self

    def top_logprobs_wanted(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else -1

    def output_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def parse_body(raw: bytes, model: type[Strict]) -> Strict:
    """``raw`` as ``model``, or InvalidRequest saying what is wrong (and with which field)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    try:  # JSON may spell lone UTF-16 surrogates ("\ud800"), which are not text
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "request body contains an unpaired surrogate escape (e.g. \\ud800)"
        ) from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc, model) from None


def _invalid(exc: ValidationError, model: type[Strict]) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        if len(error["loc"]) == 1:
            supported = ", ".join(model.model_fields)
            return InvalidRequest(f"unsupported field {field!r} (supported: {supported})", field)
        return InvalidRequest(f"unsupported field {field!r}", field)
    if error["type"] == "missing":
        return InvalidRequest(f"field {field!r} is required", field)
    return InvalidRequest(f"{field}: {message}" if field else message, field or None)
