"""The API's process: the aiohttp server inside run_service.

Shape of the loop (shared.service.run_service, as every Bastion service): settings validated,
signal handlers, heartbeat ``api``; the tokens are read, or generated, before the port opens.
The first SIGTERM/SIGINT stops accepting connections and gives the requests in hand
``STOP_WAIT_S`` to finish (a manual order waiting for risk's decision is cut short: its intent is
already on the stream), then exits 0; a second signal exits at once.

Concurrency model: one asyncio loop in the main thread serving HTTP; blocking Redis and broker
calls in its default thread pool (:mod:`services.api._app`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import cache

from aiohttp import web

from services.api._app import build_app
from services.api._auth import Tokens
from services.api._desk import Desk
from shared.brokers import Broker, build_broker
from shared.logging import get_logger
from shared.service import ServiceContext, run_service
from shared.stop import StopSignal

__all__ = ["main", "serve"]

log = get_logger(component="api")
SERVICE = "api"
STOP_WAIT_S = 3.0  # requests in hand at a stop get this long (under honcho's 5 s before SIGKILL)


def serve(ctx: ServiceContext) -> None:
    """The service's main: serve until the stop signal."""
    settings = ctx.settings

    @cache
    def broker() -> Broker:  # built on the first cancel: the paper exchange may start after us
        return build_broker(settings, client=ctx.redis, clock=ctx.clock)

    tokens = Tokens.load(settings)
    app = build_app(Desk(settings, ctx.redis, ctx.keys, ctx.clock, broker), tokens)
    asyncio.run(_serve(app, settings.api.host, settings.api.port, ctx.stop,
                       [str(path) for path in Tokens.files(settings)]))


async def _serve(app: web.Application, host: str, port: int, stop: StopSignal, auth_files: list[str]) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=STOP_WAIT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        log.info("api.listening", host=host, port=port, auth_files=auth_files)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        log.info("api.stopping")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.api`` (``--check``: exit 0 if one is alive)."""
    return run_service(SERVICE, serve, argv)
