"""``python -m services.gateway``: the HTTP + ZMQ front of a PipeSpec system.

Settings come from ``PIPESPEC_GATEWAY_*`` environment variables, overridden by ``--field value``
flags, e.g. ``python -m services.gateway --tokenizer ./models/smollm2 --num_levels 3``.
HTTP (uvicorn) and the gateway's ZMQ tasks share one asyncio loop; SIGINT/SIGTERM stop both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import structlog
import uvicorn

from common.logs import configure
from common.security import KeyError_
from common.settings import GatewaySettings
from common.tokenization import eos_token_ids, fingerprint, load_tokenizer
from services.gateway.app import create_app
from services.gateway.client_api import ClientApi
from services.gateway.core import Gateway

log = structlog.get_logger("gateway")

GRACEFUL_SHUTDOWN_S = 5.0  # open HTTP streams get this long after SIGTERM, then are cancelled


class Server(uvicorn.Server):
    """uvicorn without its own signal capture: ``serve`` installs handlers on the loop instead."""

    def capture_signals(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


async def serve(app, settings: GatewaySettings) -> bool:
    """Run until SIGINT/SIGTERM (a second SIGINT forces exit); False if start-up failed."""
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = Server(config)

    def on_signal(sig: signal.Signals) -> None:
        log.info("gateway_stopping", signal=sig.name)
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("http_starting", url=f"http://{settings.http_host}:{settings.http_port}")
    await server.serve()
    return server.started


def main() -> int:
    settings = GatewaySettings(_cli_parse_args=True, _cli_prog_name="python -m services.gateway")
    configure(settings.log_level, service="gateway")
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )  # uvicorn's
    try:
        tokenizer = load_tokenizer(settings.tokenizer)
    except (OSError, ValueError) as exc:
        print(f"gateway: cannot load tokenizer {settings.tokenizer!r}: {exc}", file=sys.stderr)
        return 2
    try:
        gateway = Gateway(
            settings, fingerprint(tokenizer), eos_token_ids(tokenizer, settings.tokenizer)
        )
    except KeyError_ as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(gateway, tokenizer, ClientApi(gateway, tokenizer))
    except (OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0 if asyncio.run(serve(app, settings)) else 1


if __name__ == "__main__":
    sys.exit(main())
