"""The HTTP face of the gateway: a minimal OpenAI-compatible completions API.

    POST /v1/completions   {"prompt": str, "max_tokens"?: int, "stream"?: bool, "model"?: str}
    GET  /v1/models        the served model
    GET  /health           200 when every level has a live ready replica, else 503 with the reason
    GET  /metrics          Prometheus text

Decoding is greedy. The final chunk (stream) or the response (non-stream) carries
``spec_decode_stats``: per-request speculative-decoding statistics (see ``events.RequestStats``).
Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway, Generation
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.events import (
    FinishEvent,
    GenerationError,
    GenerationTimeout,
    InvalidRequest,
    TokensEvent,
)
from services.gateway.registry import NoRoute

log = structlog.get_logger("gateway.http")

DISCONNECT_POLL_S = 0.5


class CompletionRequest(BaseModel):
    """The supported subset of OpenAI's completion request; anything else is refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: Optional[str] = None
    prompt: str
    max_tokens: Optional[int] = None  # default: GatewaySettings.default_max_tokens
    stream: bool = False


def error_response(status: int, message: str, type_: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": error_body(status, message, type_, param)}, status_code=status)


def error_body(status: int, message: str, type_: str, param: Optional[str] = None) -> dict:
    return {"message": message, "type": type_, "param": param, "code": status}


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The request body, or InvalidRequest saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            supported = ", ".join(CompletionRequest.model_fields)
            raise InvalidRequest(f"unsupported field {field!r} (supported: {supported})", field) from None
        if error["type"] == "missing":
            raise InvalidRequest(f"field {field!r} is required", field) from None
        raise InvalidRequest(f"{field}: {error['msg']}", field) from None


@dataclass(frozen=True)
class CompletionMeta:
    """What every chunk of one completion repeats."""

    id: str
    created: int
    model: str

    def body(self, text: str, finish_reason: Optional[str]) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }


def final_fields(finish: FinishEvent) -> dict:
    s = finish.stats
    usage = {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    }
    return {"usage": usage, "spec_decode_stats": s.model_dump()}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(gateway: Gateway, tokenizer, client_api: Optional[ClientApi] = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the gateway (and the ZMQ client API)."""
    settings = gateway.settings
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        if client_api is not None:
            await client_api.start()
        try:
            yield
        finally:
            if client_api is not None:
                await client_api.stop()
            await gateway.stop()

    app = FastAPI(title="PipeSpec gateway", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    def reject(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
        gateway.metrics.rejected_requests.labels("http").inc()
        log.info("request_rejected", api="http", status=status, reason=message)
        return error_response(status, message, "invalid_request_error", param)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = parse_completion_request(await request.body())
        except InvalidRequest as exc:
            return reject(400, str(exc), exc.param)
        if body.model is not None and body.model != settings.served_model_name:
            return reject(
                404,
                f"model {body.model!r} does not exist; this server serves {settings.served_model_name!r}",
                "model",
            )
        if not body.prompt:
            return reject(400, "prompt must not be empty", "prompt")
        meta = CompletionMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), settings.served_model_name)
        max_tokens = settings.default_max_tokens if body.max_tokens is None else body.max_tokens
        try:
            generation = gateway.generate(tokenizer.encode(body.prompt), max_tokens, request_id=meta.id)
        except InvalidRequest as exc:
            return reject(400, str(exc), exc.param)
        except NoRoute as exc:
            return error_response(503, f"no route for the request: {exc}", "service_unavailable")
        if body.stream:
            return StreamingResponse(stream_completion(generation, meta), media_type="text/event-stream")
        return await complete(generation, meta, request)

    async def stream_completion(generation: Generation, meta: CompletionMeta) -> AsyncIterator[str]:
        detokenizer = IncrementalDetokenizer(tokenizer)
        try:
            async for event in generation:
                if isinstance(event, TokensEvent):
                    text = detokenizer.add(event.token_ids)
                    if text:
                        yield sse(meta.body(text, None))
                else:
                    yield sse(meta.body(detokenizer.flush(), event.finish_reason) | final_fields(event))
        except GenerationError as exc:
            yield sse({"error": error_body(500, str(exc), "server_error")})
        finally:
            generation.cancel("client disconnected")  # no-op once the request has ended
        yield "data: [DONE]\n\n"

    async def complete(generation: Generation, meta: CompletionMeta, request: Request) -> Response:
        collect = asyncio.ensure_future(collect_completion(generation))
        watch = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            finished = collect.done()
            if not finished:  # the client left first (or the server is stopping)
                generation.cancel("client disconnected")
                collect.cancel()
        if not finished:
            return Response(status_code=499)  # nobody reads this
        try:
            text, finish = collect.result()
        except GenerationTimeout as exc:
            return error_response(504, str(exc), "timeout")
        except GenerationError as exc:
            return error_response(500, str(exc), "server_error")
        return JSONResponse(meta.body(text, finish.finish_reason) | final_fields(finish))

    async def collect_completion(generation: Generation) -> tuple[str, FinishEvent]:
        detokenizer = IncrementalDetokenizer(tokenizer)
        parts = []
        async for event in generation:
            if isinstance(event, TokensEvent):
                parts.append(detokenizer.add(event.token_ids))
            else:
                parts.append(detokenizer.flush())
                return "".join(parts), event
        raise GenerationError("the request ended without a finish event")

    @app.get("/health")
    async def health() -> JSONResponse:
        reason = gateway.unavailable_reason()
        registry = gateway.registry
        body = {
            "status": "ok" if reason is None else "unavailable",
            "reason": reason,
            "levels": [[r.describe() for r in registry.live(level)] for level in range(settings.num_levels)],
            "refused": {replica: refusal.reason for replica, refusal in registry.refusals.items()},
        }
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        context = gateway.registry.target_max_context() or None
        card = {
            "id": settings.served_model_name,
            "object": "model",
            "created": started_at,
            "owned_by": "pipespec",
            "max_model_len": context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def wait_for_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
