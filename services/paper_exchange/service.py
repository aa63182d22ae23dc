"""The paper exchange's process: the bar-consumer thread and the HTTP loop, inside run_service.

Shape of the loop (shared.service.run_service, as every Bastion service): settings validated
(a bad fault plan too: exit 2 before Redis is touched), signal handlers, heartbeat
``paper-exchange``; the first SIGTERM/SIGINT keeps the exchange serving (HTTP, bars) while a
trade-update stream is still connected or another service's heartbeat is alive, at most
``paper_exchange.stop_wait_s`` (under honcho every process gets the signal at once, and a
stopping executor or risk still needs the exchange for the message in hand), then stops the
consumer (its reads block at most ``BARS_BLOCK_MS``, so it notices within that; the embedded Redis
waits a second longer than the exchange for its clients), lets the bar in hand finish within
``bus.grace_seconds`` and closes the server; a second signal exits at once. A bar consumer that
dies takes the process down (exit 1) rather than leave an exchange that never fills.

Concurrency model: one asyncio loop (HTTP, websockets) in the main thread plus one bar-consumer
thread; the book serialises them with its lock. The bar consumer lingers ``BARS_LINGER_MS`` after
a short read, so at a high bar rate it wakes once per few bars and hands them to
:meth:`Exchange.on_bars` together (one round trip when none of their symbols has an open order;
an order fills that much later, as a venue's matching would lag its own market data; nothing on
the way to an order's acknowledgement waits for it).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable

from services.paper_exchange._engine import Exchange, credentials
from services.paper_exchange._faults import FaultPlan, Faults, parse_plan
from services.paper_exchange._server import Server
from shared.bus import Delivery
from shared.config import Settings, settings_or_exit
from shared.errors import ConfigError, RedisCommandFailed, RedisUnavailable
from shared.heartbeat import alive_instances
from shared.keys import BARS
from shared.logging import get_logger
from shared.models import Bar
from shared.redis.boundary import redis_errors
from shared.service import ServiceContext, run_service
from shared.stop import StopSignal

__all__ = ["consume_bars", "main", "serve"]

log = get_logger(component="paper_exchange")
SERVICE = "paper-exchange"
BARS_LINGER_MS = 10  # the bar consumer's wait after a short read (see the docstring)
BARS_BLOCK_MS = 200  # its longest read: a stop waits no longer for it (the embedded Redis waits for us)


def consume_bars(ctx: ServiceContext, on_bars: Callable[[list[Bar]], object], stop: threading.Event) -> None:
    """Feed the Bars on the bars stream to ``on_bars``, a batch at a time in stream order, until
    ``stop`` (the one bus touch-point); a batch is acknowledged once ``on_bars`` returned."""
    batch: list[Bar] = []

    def handle(delivery: Delivery) -> None:
        if isinstance(delivery.message, Bar):
            batch.append(delivery.message)

    def flush() -> None:
        try:
            on_bars(batch)
        finally:
            batch.clear()

    ctx.consumer(BARS, ctx.settings.paper_exchange.consumer_group, handle, linger_ms=BARS_LINGER_MS,
                 flush=flush, block_ms=BARS_BLOCK_MS).run(stop)


def serve(ctx: ServiceContext) -> None:
    """The service's main: serve until the stop signal (SystemExit(1) if the consumer died)."""
    pe = ctx.settings.paper_exchange
    plan = _plan(ctx.settings)
    key_id, secret = credentials(ctx.redis, ctx.keys, pe)
    exchange = Exchange(ctx.redis, ctx.keys, pe, ctx.clock, symbols=ctx.settings.ingester.symbols)
    server = Server(exchange, key_id=key_id, secret_key=secret, faults=Faults(plan), clock=ctx.clock,
                    host=pe.host, port=pe.port, always_open=pe.always_open)
    stop, failed = threading.Event(), threading.Event()

    def consume() -> None:
        try:
            consume_bars(ctx, exchange.on_bars, stop)
        except Exception:
            log.exception("bars.consumer_failed")
            failed.set()
            stop.set()

    consumer = threading.Thread(target=consume, name="bars")
    def others() -> list[str]:  # the other services still running (they may still call us)
        try:
            with redis_errors("reading heartbeats"):
                alive = alive_instances(ctx.redis, ctx.keys)
        except (RedisUnavailable, RedisCommandFailed):
            return []  # Redis is gone: nobody can be seen, and the services need it more than us
        return [name for name in alive if not name.startswith(f"{SERVICE}:")]

    asyncio.run(_serve(server, ctx.stop, stop, consumer, ctx.settings.bus.grace_seconds, pe.stop_wait_s,
                       others))
    if failed.is_set():
        raise SystemExit(1)


async def _serve(server: Server, signal: StopSignal, stop: threading.Event, consumer: threading.Thread,
                 grace_s: float, stop_wait_s: float, others: Callable[[], list[str]]) -> None:
    loop = asyncio.get_running_loop()
    try:
        await server.start()
        consumer.start()
        while not signal.is_set() and not stop.is_set():
            await asyncio.sleep(0.1)
        log.info("paper_exchange.stopping", waits_for_clients_s=stop_wait_s)
        if not stop.is_set():  # stopping on request, not because the consumer died
            left = await server.clients_gone(stop_wait_s, others)
            if left:
                log.warning("paper_exchange.stopping_with_clients", clients=left)
    finally:
        stop.set()
        await server.stop()
        if consumer.is_alive():
            await loop.run_in_executor(None, consumer.join, grace_s)


def _plan(settings: Settings) -> FaultPlan:
    try:
        return parse_plan(settings.paper_exchange.faults)
    except ValueError as exc:
        raise ConfigError([("paper_exchange.faults", str(exc))]) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m services.paper_exchange`` (``--check``: exit 0 if one is alive)."""
    try:
        _plan(settings_or_exit())  # a bad plan stops the service before it touches Redis
    except ConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 2
    return run_service(SERVICE, serve, argv)
