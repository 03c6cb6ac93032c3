"""Serving one OpenAI request: from a validated body to prompt ids (chat template included), then
through the gateway to a JSON reply or an SSE stream.

Text goes through ``TextOutput``: stop strings end the request (``finish_reason`` "stop") and
never reach the client. A client that disconnects, while queued for admission or while its
request runs, cancels the request at every stage: the non-streamed path watches the connection
itself; for streams, Starlette cancels the body iterator on disconnect, and ``GenerationStream``
cancels whatever is left when the response ends for any reason.

A request with ``n`` choices runs as n generations whose seeds derive from the request's
(``common.sampling.derive_seed``; choice 0 keeps it); their stream chunks interleave, each with
its ``index``. Log-probabilities come with the tokens from the target (``TokensEvent``).
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from common.protocol import TokenLogprob
from common.sampling import SamplingParams, derive_seed
from services.gateway.core import Gateway, Generation, Prompt
from services.gateway.events import (
    GenerationError,
    GenerationTimeout,
    InvalidRequest,
    RequestStats,
    TokensEvent,
)
from services.gateway.replies import (
    DONE,
    Choice,
    Reply,
    chat_logprobs,
    completion_logprobs,
    error_body,
    sse,
    usage,
)
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
    prompt: Prompt  # checked against the limits, with its output length
    stops: list[str]
    echo: str  # text sent before the completion (completions with ``echo``), else ""
    stream: bool
    include_usage: bool
    sampling: SamplingParams  # seed: the request's, or drawn for it
    n: int = 1
    top_logprobs: int = -1  # -1: no logprobs


@dataclass(frozen=True)
class Outcome:
    finish_reason: str
    stats: RequestStats


@dataclass(frozen=True)
class Piece:
    """Text of one choice as it settles, with the log-probabilities of the tokens behind it."""

    text: str
    logprobs: list[TokenLogprob]


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
        if body.echo and body.logprobs is not None:
            raise InvalidRequest("echo with logprobs is not supported (no prompt logprobs)", "echo")
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
        prompt = self.gateway.check(ids, max_tokens, param)  # the one check, before queueing
        chat = isinstance(body, ChatCompletionRequest)
        kind = "chatcmpl" if chat else "cmpl"
        reply = Reply(f"{kind}-{uuid.uuid4().hex}", int(time.time()), self.model_name, chat)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.user is not None:
            log.info("request_user", request_id=reply.id, user=body.user)
        return Job(
            reply,
            prompt,
            body.stop_strings(),
            echo,
            body.stream,
            include_usage,
            body.sampling(),
            body.n,
            body.top_logprobs_wanted(),
        )

    # -- running -------------------------------------------------------------------------------

    async def respond(self, request: Request, job: Job) -> Response:
        """Admit and run ``job``. Raises InvalidRequest, Overloaded or NoRoute before it starts."""
        generations: list[Generation] = []
        try:
            for index in range(job.n):
                sampling = dataclasses.replace(
                    job.sampling, seed=derive_seed(job.sampling.seed, index)
                )
                request_id = job.reply.id if job.n == 1 else f"{job.reply.id}-{index}"
                started = await until_disconnected(
                    request.receive,
                    self.gateway.submit(job.prompt, request_id, sampling, job.top_logprobs),
                )
                if started is None:
                    _cancel_all(generations, "client disconnected")
                    return Response(status_code=CLIENT_GONE)
                generations.append(started[0])
        except BaseException:
            _cancel_all(generations, "request not admitted")
            raise
        if job.stream:
            return GenerationStream(self._sse(generations, job), generations)
        work = asyncio.gather(*(self._collect(g, job) for g in generations))
        try:
            finished = await until_disconnected(request.receive, work)
        except GenerationTimeout as exc:
            _cancel_all(generations, "timeout")
            return JSONResponse(error_body(504, str(exc), "timeout"), status_code=504)
        except GenerationError as exc:
            _cancel_all(generations, "failed")
            return JSONResponse(error_body(500, str(exc), "server_error"), status_code=500)
        if finished is None:
            _cancel_all(generations, "client disconnected")
            return Response(status_code=CLIENT_GONE)
        choices, stats = zip(*finished[0])
        return JSONResponse(job.reply.whole(choices, stats))

    def _logprobs_json(self, job: Job, entries: list[TokenLogprob], offset: int) -> dict | None:
        if job.top_logprobs < 0:
            return None
        if job.reply.chat:
            return chat_logprobs(entries, self._token_text)
        return completion_logprobs(entries, self._token_text, offset)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    async def _pieces(self, generation: Generation, job: Job) -> AsyncIterator[Piece | Outcome]:
        """The text as it is committed, then one Outcome."""
        output = TextOutput(self.tokenizer, job.stops)
        async for event in generation:
            if isinstance(event, TokensEvent):
                before = output.tokens
                text = output.add(event.token_ids)
                logprobs = event.logprobs[: output.tokens - before]
                if text or logprobs:
                    yield Piece(text, logprobs)
                if output.stopped:
                    yield Outcome("stop", generation.stop(output.tokens))
                    return
            else:
                text = output.finish()
                if text:
                    yield Piece(text, [])
                yield Outcome("stop" if output.stopped else event.finish_reason, event.stats)
                return

    async def _collect(self, generation: Generation, job: Job) -> tuple[Choice, RequestStats]:
        parts, logprobs = [job.echo], []
        async for piece in self._pieces(generation, job):
            if isinstance(piece, Outcome):
                text = "".join(parts)
                lp = self._logprobs_json(job, logprobs, len(job.echo))
                return Choice(text, piece.finish_reason, lp), piece.stats
            parts.append(piece.text)
            logprobs.extend(piece.logprobs)
        raise GenerationError("the request ended without a finish event")

    async def _sse(self, generations: list[Generation], job: Job) -> AsyncIterator[str]:
        reply = job.reply
        null_usage = {"usage": None} if job.include_usage else {}  # as OpenAI: null until the end
        for index in range(len(generations)):
            if reply.chat:
                yield sse(reply.chunk("", role=True, index=index) | null_usage)
            if job.echo:
                yield sse(reply.chunk(job.echo, index=index) | null_usage)
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for piece in self._pieces(generation, job):
                    await merged.put((index, piece))
            except GenerationError as exc:
                await merged.put((index, exc))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
        offsets = [len(job.echo)] * len(generations)
        stats: list[RequestStats | None] = [None] * len(generations)
        try:
            while any(s is None for s in stats):
                index, piece = await merged.get()
                if isinstance(piece, GenerationError):
                    status, kind = (
                        (504, "timeout")
                        if isinstance(piece, GenerationTimeout)
                        else (500, "server_error")
                    )
                    yield sse(error_body(status, str(piece), kind))
                    break
                if isinstance(piece, Piece):
                    lp = self._logprobs_json(job, piece.logprobs, offsets[index])
                    offsets[index] += len(piece.text)
                    yield sse(reply.chunk(piece.text, index=index, logprobs=lp) | null_usage)
                    continue
                stats[index] = piece.stats
                final = reply.chunk("", piece.finish_reason, index=index) | null_usage
                yield sse(final | {"spec_decode_stats": piece.stats.model_dump()})
            else:
                if job.include_usage:
                    yield sse(reply.usage_chunk(stats))
                log.info("stream_finished", request_id=reply.id, **usage(stats))
        finally:
            for task in tasks:
                task.cancel()
        yield DONE


def _cancel_all(generations: list[Generation], reason: str) -> None:
    for generation in generations:
        generation.cancel(reason)


class GenerationStream(StreamingResponse):
    """An SSE response that cancels its generation however the response ends: finished (a no-op
    then), client gone, server stopping, or a send that failed before the body started."""

    def __init__(self, content: AsyncIterator[str], generations: list[Generation]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.generations = generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel_all(self.generations, "response ended early")


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
