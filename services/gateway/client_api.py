"""The gateway's ZeroMQ client API: a ROUTER bound on ``client_port``, one DEALER per client.

Clients authenticate with CURVE like the stages: the ROUTER accepts only the ``client`` key
(``common.security``; ``PipeSpecClient(endpoint, keys_dir=...)``), unless the gateway runs
with ``insecure = true``. Hand the client keypair only to trusted front ends.

A client sends one msgpack map per request (``ClientRequest`` in
``services.gateway.client_schema``) and receives msgpack maps (``ClientEvent``): ``token`` events
as output is committed, then ``done`` (finish reason and statistics) or ``error``. Every event
echoes the request's ``request_id`` so one client may have several requests in flight.
``services.gateway.zmq_client`` is the matching client.

Requests go through the gateway's admission control like HTTP ones (an ``error`` event when it
is full). Replies never block the gateway: ROUTER_MANDATORY makes a vanished client an error, and
a client that stops reading until its queue is full is treated the same way; either cancels the
request.
"""

from __future__ import annotations

import asyncio

import msgpack
import structlog
import zmq
from pydantic import ValidationError

from common.security import CLIENT
from common.sockets import arrivals, bound_endpoint, open_socket
from services.gateway.admission import Overloaded
from services.gateway.client_schema import ClientEvent, ClientRequest
from services.gateway.core import Gateway, Generation, advertised_host
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.events import GenerationError, InvalidRequest, TokensEvent
from services.gateway.registry import NoRoute
from services.gateway.schemas import sampling_params

log = structlog.get_logger("gateway.zmq")

MAX_REQUEST_BYTES = 4 << 20


def parse_client_request(payload: bytes) -> ClientRequest:
    """A ClientRequest, or InvalidRequest saying what is wrong with ``payload``."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidRequest(f"request is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request must be a msgpack map, got {type(body).__name__}")
    try:
        return ClientRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(f"{field}: {error['msg']}", field) from None


class ClientApi:
    def __init__(self, gateway: Gateway, tokenizer):
        self.gateway = gateway
        self.tokenizer = tokenizer
        self.endpoint = ""  # set by start()
        self._router: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task | None = None
        self._requests: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind the ROUTER; call after ``gateway.start()`` (it shares the gateway's context)."""
        s = self.gateway.settings
        self._router = open_socket(
            self.gateway.context,
            zmq.ROUTER,
            f"tcp://{s.bind_host}:{s.client_port}",
            linger_ms=s.linger_ms,
            hwm=s.hwm,
            curve=self.gateway.curve,
            allow={CLIENT},
            # over MAX_REQUEST_BYTES: a clear error; over max_message_bytes: never held at all
            max_msg_bytes=max(s.max_message_bytes, MAX_REQUEST_BYTES + 1024),
        )
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = bound_endpoint(self._router, advertised_host(s))
        self._receiver = asyncio.create_task(self._receive_loop(), name="client-api-receive")
        log.info("client_api_started", endpoint=self.endpoint)

    async def stop(self) -> None:
        tasks = [t for t in (self._receiver, *self._requests) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._router is not None:
            self._router.close(linger=self.gateway.settings.linger_ms)
        self._router = self._receiver = None

    async def _receive_loop(self) -> None:
        async for frames in arrivals(self._router, multipart=True):  # until stop() cancels it
            identity, payload = frames[0], frames[-1]  # a REQ-style empty delimiter may sit between
            try:
                request = parse_client_request(payload)
            except InvalidRequest as exc:
                self.gateway.metrics.decode_rejects.labels("client").inc()
                await self._reject(identity, None, str(exc))
                continue
            task = asyncio.create_task(self._serve(identity, request))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _serve(self, identity: bytes, request: ClientRequest) -> None:
        generation = await self._start(identity, request)
        if generation is None:
            return
        label, detokenizer = request.request_id, IncrementalDetokenizer(self.tokenizer)
        async with generation:  # leaving it early cancels the request at every stage
            try:
                async for event in generation:
                    if isinstance(event, TokensEvent):
                        text = detokenizer.add(event.token_ids)
                        reply = ClientEvent(
                            type="token", request_id=label, text=text, token_ids=event.token_ids
                        )
                        if not await self._send(identity, reply):
                            return
                        continue
                    tail = detokenizer.flush()
                    if tail:
                        await self._send(
                            identity,
                            ClientEvent(type="token", request_id=label, text=tail, token_ids=[]),
                        )
                    stats = event.stats.model_dump()
                    reply = ClientEvent(
                        type="done",
                        request_id=label,
                        finish_reason=event.finish_reason,
                        stats=stats,
                    )
                    await self._send(identity, reply)
            except GenerationError as exc:
                await self._send(
                    identity, ClientEvent(type="error", request_id=label, message=str(exc))
                )

    async def _start(self, identity: bytes, request: ClientRequest) -> Generation | None:
        """The started request (once admitted), or None after telling the client why not."""
        label = request.request_id
        try:
            if not request.prompt:
                raise InvalidRequest("prompt must not be empty", "prompt")
            sampling = sampling_params(request)
            return await self.gateway.generate(
                self.tokenizer.encode(request.prompt), request.max_tokens, sampling=sampling
            )
        except InvalidRequest as exc:
            await self._reject(identity, label, str(exc))
        except Overloaded as exc:
            await self._reject(identity, label, str(exc), code=429)
        except NoRoute as exc:
            await self._send(
                identity, ClientEvent(type="error", request_id=label, message=f"no route: {exc}")
            )
        return None

    async def _reject(
        self, identity: bytes, label: str | None, message: str, code: int = 400
    ) -> None:
        self.gateway.metrics.rejected_requests.labels("zmq", str(code)).inc()
        log.info("request_rejected", api="zmq", client_request_id=label, reason=message)
        await self._send(identity, ClientEvent(type="error", request_id=label, message=message))

    async def _send(self, identity: bytes, event: ClientEvent) -> bool:
        """False if the client is gone or not reading (its queue is full)."""
        payload = msgpack.packb(event.model_dump(exclude_none=True), use_bin_type=True)
        try:
            await self._router.send_multipart([identity, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone, ROUTER_MANDATORY) or EAGAIN (queue full)
            log.warning(
                "client_unreachable",
                client=identity.hex(),
                client_request_id=event.request_id,
                reason=str(exc),
            )
            return False
        return True
