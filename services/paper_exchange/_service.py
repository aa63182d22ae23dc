"""The paper exchange's process: settings, Redis, the bar consumer thread and the HTTP loop.

Shape of the loop (as every Bastion service): signal handlers first; the first SIGTERM/SIGINT
stops accepting work and lets the bar in hand finish within ``bus.grace_seconds``; a second
exits at once; ``finally`` stops the consumer, closes the server and deregisters the heartbeat.

Concurrency model: one asyncio loop (HTTP, websockets, heartbeat) plus one bar-consumer thread;
the book serialises them with its lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

import redis

from services.paper_exchange._engine import Exchange, credentials
from services.paper_exchange._faults import FaultPlan, Faults, parse_plan
from services.paper_exchange._server import Server
from shared.clock import Clock, LiveClock
from shared.config import Settings, settings_or_exit
from shared.errors import ConfigError
from shared.keys import BARS, Keys
from shared.logging import configure_logging, get_logger
from shared.models import Bar
from shared.redis_client import connect

__all__ = ["consume_bars", "main", "run"]

log = get_logger(component="paper_exchange")
SERVICE = "paper-exchange"
HEARTBEAT_S = 2.0


def consume_bars(client: redis.Redis, keys: Keys, settings: Settings, clock: Clock, name: str,
                 on_bar: Callable[[Bar], object], stop: threading.Event) -> None:
    """Feed every Bar on the bars stream to ``on_bar`` until ``stop`` (the one bus touch-point)."""
    from shared.bus import Consumer, Delivery

    def handle(delivery: Delivery) -> None:
        if isinstance(delivery.message, Bar):
            on_bar(delivery.message)

    Consumer(client, keys, stream=BARS, group=settings.paper_exchange.consumer_group, name=name,
             handler=handle, settings=settings.bus, clock=clock).run(stop)


def run(settings: Settings, client: redis.Redis, clock: Clock | None = None) -> int:
    """Serve until a signal; return the exit status."""
    clock = clock or LiveClock()
    keys = Keys(settings.key_prefix)
    pe = settings.paper_exchange
    plan = _plan(settings)
    key_id, secret = credentials(client, keys, pe)
    exchange = Exchange(client, keys, pe, clock)
    server = Server(exchange, key_id=key_id, secret_key=secret, faults=Faults(plan), clock=clock,
                    host=pe.host, port=pe.port, always_open=pe.always_open)
    instance = f"{socket.gethostname()}-{os.getpid()}"
    stop = threading.Event()
    failed = threading.Event()
    consumer = threading.Thread(target=_guard(consume_bars, stop, failed), name="bars",
                                args=(client, keys, settings, clock, instance, exchange.on_bar, stop))
    asyncio.run(_serve(server, client, keys, instance, stop, consumer, settings.bus.grace_seconds))
    return 1 if failed.is_set() else 0


def _plan(settings: Settings) -> FaultPlan:
    try:
        return parse_plan(settings.paper_exchange.faults)
    except ValueError as exc:
        raise ConfigError([("paper_exchange.faults", str(exc))]) from None


def _guard(target: Callable[..., None], stop: threading.Event, failed: threading.Event
           ) -> Callable[..., None]:
    """Run ``target``; if it dies, stop the whole process (exit 1) rather than serve stale prices."""
    def run(*args: object) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("bars.consumer_failed")
            failed.set()
            stop.set()
    return run


async def _serve(server: Server, client: redis.Redis, keys: Keys, instance: str, stop: threading.Event,
                 consumer: threading.Thread, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("paper_exchange.exit_now")
            os._exit(1)
        log.info("paper_exchange.stopping")
        stop.set()
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    heartbeat = keys.heartbeat(SERVICE, instance)
    try:
        await server.start()
        consumer.start()
        while not stopping.is_set() and not stop.is_set():
            client.set(heartbeat, "1", px=int(HEARTBEAT_S * 2500))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), HEARTBEAT_S)
    finally:
        stop.set()
        await server.stop()
        await loop.run_in_executor(None, consumer.join, grace_s)
        client.delete(heartbeat)
        log.info("paper_exchange.stopped")


def _check(settings: Settings) -> int:
    """Exit status for ``--check``: 0 when some instance's heartbeat is live."""
    client = connect(settings, wait_s=5)
    pattern = Keys(settings.key_prefix).heartbeat(SERVICE, "*")
    return 0 if next(iter(client.scan_iter(match=pattern, count=1000)), None) is not None else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m services.paper_exchange``."""
    parser = argparse.ArgumentParser(prog="python -m services.paper_exchange", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 0 if an exchange is heartbeating, else 1")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging("paper-exchange", settings.log.level)
    if args.check:
        return _check(settings)
    try:
        _plan(settings)  # a bad plan stops the service before it touches Redis
        return run(settings, connect(settings))
    except ConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 2
