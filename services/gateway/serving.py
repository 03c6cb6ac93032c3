"""Serving one OpenAI request: from a validated body to prompt ids (chat template included), then
through the gateway to a JSON reply or an SSE stream.

Text goes through ``TextOutput``: stop strings end the request (``finish_reason`` "stop") and
never reach the client. A client that disconnects, while queued for admission or while its
request runs, cancels the request at every stage: the non-streamed path watches the connection
itself; for streams, Starlette cancels the body iterator on disconnect, and ``GenerationStream``
cancels whatever is left when the response ends for any reason.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import jinja2
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.core import Gateway, Generation
from services.gateway.events import (
    GenerationError,
    GenerationTimeout,
    InvalidRequest,
    RequestStats,
    TokensEvent,
)
from services.gateway.replies import DONE, Reply, error_body, sse, usage
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest, RequestFields
from services.gateway.text_output import TextOutput

log = structlog.get_logger("gateway.http")

T = TypeVar("T")
CLIENT_GONE = 499  # nginx's code for "client closed request"; nobody reads it


class ModelNotFound(InvalidRequest):
    status = 404


def load_chat_template(value: str | None) -> str | None:
    """The ``chat_template`` setting: a Jinja template (it has a "{"), or a file holding one."""
    if value is None or "{" in value:
        return value
    if not Path(value).is_file():
        raise ValueError(f"chat_template {value!r} is neither a Jinja template nor a file")
    return Path(value).read_text()


@dataclass(frozen=True)
class Job:
    """One validated request, ready to run."""

    reply: Reply
    prompt_ids: list[int]
    max_tokens: int | None  # None: the gateway's default
    stops: list[str]
    echo: str  # text sent before the completion (completions with ``echo``), else ""
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Outcome:
    finish_reason: str
    stats: RequestStats


class OpenAIServing:
    def __init__(self, gateway: Gateway, tokenizer):
        self.gateway, self.tokenizer = gateway, tokenizer
        self.model_name = gateway.settings.served_model_name
        self.chat_template = load_chat_template(gateway.settings.chat_template)

    # -- preparing -----------------------------------------------------------------------------

    def completion_job(self, body: CompletionRequest) -> Job:
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise InvalidRequest("prompt must not be empty", "prompt")
            ids = self.tokenizer.encode(body.prompt)
        else:
            ids = self._checked_ids(body.prompt)
        echo = "" if not body.echo else self.tokenizer.decode(ids, skip_special_tokens=True)
        return self._job(body, ids, echo)

    def chat_job(self, body: ChatCompletionRequest) -> Job:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest(
                "this model's tokenizer has no chat template: use /v1/completions, or start the "
                "gateway with chat_template set",
                "messages",
            )
        messages = [  # templates know "system"; OpenAI's newer name for it is "developer"
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            | ({"name": m.name} if m.name else {})
            for m in body.messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise InvalidRequest(
                f"the chat template cannot render these messages: {exc}", "messages"
            ) from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template has them
        return self._job(body, ids)

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt"
            )
        return ids

    def _job(self, body: RequestFields, ids: list[int], echo: str = "") -> Job:
        if body.model is not None and body.model != self.model_name:
            raise ModelNotFound(
                f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                "model",
            )
        max_tokens, param = body.output_limit()
        self.gateway.max_tokens_for(len(ids), max_tokens, param)  # reject now, before queueing
        chat = isinstance(body, ChatCompletionRequest)
        kind = "chatcmpl" if chat else "cmpl"
        reply = Reply(f"{kind}-{uuid.uuid4().hex}", int(time.time()), self.model_name, chat)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.user is not None:
            log.info("request_user", request_id=reply.id, user=body.user)
        return Job(reply, ids, max_tokens, body.stop_strings(), echo, body.stream, include_usage)

    # -- running -------------------------------------------------------------------------------

    async def respond(self, request: Request, job: Job) -> Response:
        """Admit and run ``job``. Raises InvalidRequest, Overloaded or NoRoute before it starts."""
        started = await until_disconnected(
            request.receive, self.gateway.generate(job.prompt_ids, job.max_tokens, job.reply.id)
        )
        if started is None:
            return Response(status_code=CLIENT_GONE)
        generation: Generation = started[0]
        if job.stream:
            return GenerationStream(self._sse(generation, job), generation)
        try:
            finished = await until_disconnected(request.receive, self._collect(generation, job))
        except GenerationTimeout as exc:
            return JSONResponse(error_body(504, str(exc), "timeout"), status_code=504)
        except GenerationError as exc:
            return JSONResponse(error_body(500, str(exc), "server_error"), status_code=500)
        if finished is None:
            generation.cancel("client disconnected")
            return Response(status_code=CLIENT_GONE)
        text, outcome = finished[0]
        return JSONResponse(job.reply.whole(text, outcome.finish_reason, outcome.stats))

    async def _pieces(self, generation: Generation, job: Job) -> AsyncIterator[str | Outcome]:
        """The text as it is committed, then one Outcome."""
        output = TextOutput(self.tokenizer, job.stops)
        async for event in generation:
            if isinstance(event, TokensEvent):
                text = output.add(event.token_ids)
                if text:
                    yield text
                if output.stopped:
                    yield Outcome("stop", generation.stop(output.tokens))
                    return
            else:
                text = output.finish()
                if text:
                    yield text
                yield Outcome("stop" if output.stopped else event.finish_reason, event.stats)
                return

    async def _collect(self, generation: Generation, job: Job) -> tuple[str, Outcome]:
        parts = [job.echo]
        async for piece in self._pieces(generation, job):
            if isinstance(piece, Outcome):
                return "".join(parts), piece
            parts.append(piece)
        raise GenerationError("the request ended without a finish event")

    async def _sse(self, generation: Generation, job: Job) -> AsyncIterator[str]:
        reply = job.reply
        null_usage = {"usage": None} if job.include_usage else {}  # as OpenAI: null until the end
        if reply.chat:
            yield sse(reply.chunk("", role=True) | null_usage)
        if job.echo:
            yield sse(reply.chunk(job.echo) | null_usage)
        try:
            async for piece in self._pieces(generation, job):
                if isinstance(piece, str):
                    yield sse(reply.chunk(piece) | null_usage)
                    continue
                final = reply.chunk("", piece.finish_reason) | null_usage
                yield sse(final | {"spec_decode_stats": piece.stats.model_dump()})
                if job.include_usage:
                    yield sse(reply.usage_chunk(piece.stats))
                log.info("stream_finished", request_id=reply.id, **usage(piece.stats))
        except GenerationError as exc:
            status, kind = (
                (504, "timeout") if isinstance(exc, GenerationTimeout) else (500, "server_error")
            )
            yield sse(error_body(status, str(exc), kind))
        yield DONE


class GenerationStream(StreamingResponse):
    """An SSE response that cancels its generation however the response ends: finished (a no-op
    then), client gone, server stopping, or a send that failed before the body started."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel("response ended early")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> tuple[T] | None:
    """``(result,)`` of ``work``, or None if the client disconnects first (``work`` is then
    cancelled). The request body must have been read already."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
    return None if gone else (task.result(),)
