"""The HTTP face of the gateway: an OpenAI-compatible API plus probes and metrics.

    POST /v1/completions        OpenAI completions (``schemas.CompletionRequest``), JSON or SSE
    POST /v1/chat/completions   OpenAI chat completions through the tokenizer's chat template
    GET  /v1/models             the served model
    GET  /health                200 when every level has a live ready replica, else 503 + reason
    GET  /health/live           200 while the gateway's own loops run (no dependency checks)
    GET  /metrics               Prometheus text
    GET  /openapi.json, /docs   the schema, request bodies included

Decoding is greedy. The final chunk (stream) or the response (non-stream) carries
``spec_decode_stats``: per-request speculative-decoding statistics (see ``events.RequestStats``).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad input,
404 unknown model or path, 413 body over ``max_request_bytes``, 429 over the admission limits,
503 no route, 500/504 a failed or timed-out request.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.admission import Overloaded
from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway
from services.gateway.events import InvalidRequest
from services.gateway.registry import NoRoute
from services.gateway.replies import error_body
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest, Strict, parse_body
from services.gateway.serving import OpenAIServing

log = structlog.get_logger("gateway.http")

RETRY_AFTER_S = 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx/5xx."""

    error: ErrorDetail


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# What the generation routes may answer besides 200, in /openapi.json. 400 also covers what JSON
# Schema cannot say: n other than 1, sampling, penalties, an empty prompt or stop string, token
# ids outside the vocabulary, max_tokens over the limit or past the model's context.
GENERATION_ERRORS = {
    200: {
        "description": "the completion (JSON), or with `stream: true` server-sent events",
        # each server-sent event: `data:` holds one JSON chunk, the last one is `[DONE]`
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        },
    },
    400: _error("invalid request (the message and `param` say what is wrong)"),
    404: _error("unknown model"),
    413: _error("request body over max_request_bytes"),
    429: _error("over the admission limits; retry after Retry-After seconds"),
    500: _error("the request failed in a stage"),
    503: _error("no route: some level has no live replica"),
    504: _error("the request timed out"),
}


class BodyTooLarge(InvalidRequest):
    status = 413


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, never holding more than ``limit`` bytes of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(model: type[Strict]) -> dict:
    """``openapi_extra`` naming ``model`` as a route's body (bodies are parsed by ``parse_body``)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI, models: list[type[Strict]]) -> None:
    """Serve ``models`` (and the models they use) in /openapi.json's components."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(gateway: Gateway, tokenizer, client_api: ClientApi | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the gateway (and the ZMQ client API)."""
    settings = gateway.settings
    serving = OpenAIServing(gateway, tokenizer)
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

    app = FastAPI(title="PipeSpec gateway", version="1", lifespan=lifespan)
    install_openapi(app, [CompletionRequest, ChatCompletionRequest])

    def refuse(
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        headers: dict | None = None,
    ) -> JSONResponse:
        gateway.metrics.rejected_requests.labels("http", str(status)).inc()
        log.info("request_rejected", api="http", status=status, reason=message)
        return JSONResponse(
            error_body(status, message, type_, param), status_code=status, headers=headers
        )

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return refuse(exc.status, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return refuse(
            429, str(exc), "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    @app.exception_handler(NoRoute)
    async def no_route(request: Request, exc: NoRoute) -> JSONResponse:
        return refuse(503, f"no route for the request: {exc}", "service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), "invalid_request_error"), exc.status_code
        )

    async def body_of(request: Request, model: type[Strict]) -> Strict:
        return parse_body(await read_body(request, settings.max_request_bytes), model)

    @app.post(
        "/v1/completions",
        openapi_extra=json_body(CompletionRequest),
        responses=GENERATION_ERRORS,
    )
    async def completions(request: Request) -> Response:
        job = serving.completion_job(await body_of(request, CompletionRequest))
        return await serving.respond(request, job)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest),
        responses=GENERATION_ERRORS,
    )
    async def chat_completions(request: Request) -> Response:
        job = serving.chat_job(await body_of(request, ChatCompletionRequest))
        return await serving.respond(request, job)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": settings.served_model_name,
            "object": "model",
            "created": started_at,
            "owned_by": "pipespec",
            "max_model_len": gateway.max_context(),
        }
        return {"object": "list", "data": [card]}

    @app.get("/health", responses={503: {"description": "some level has no live replica"}})
    async def health() -> JSONResponse:
        reason = gateway.unavailable_reason()
        body = {
            "status": "ok" if reason is None else "unavailable",
            "reason": reason,
            # plain TCP between the services (settings: insecure = true): anyone who reaches
            # the ZMQ ports may register as a stage or read prompts
            "insecure": not gateway.secure,
            "restarts": settings.restarts,
            "levels": gateway.live_replicas(),
            "refused": gateway.refused_replicas(),
            "requests_running": gateway.requests_running,
            "requests_waiting": gateway.requests_waiting,
        }
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/health/live", responses={503: {"description": "the gateway's loops stopped"}})
    async def live() -> JSONResponse:
        alive = gateway.alive()
        return JSONResponse(
            {"status": "alive" if alive else "dead"}, status_code=200 if alive else 503
        )

    @app.get(
        "/metrics",
        responses={
            200: {
                "description": "Prometheus text exposition",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
