"""The shape every service process shares (``python -m services.<name>``).

:func:`run_service` reads and validates settings (exit 2 naming every bad field), configures
structlog JSON with the service name, connects to Redis (waiting for it), installs the stop
signal (first SIGTERM: finish what is in hand, exit 0; second, or grace expired: exit now),
beats a heartbeat, and calls the service's ``main(ctx)``. ``--check`` exits 0 if an instance of
the service has a live heartbeat and 1 otherwise (for supervisors and scripts).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.bus import Consumer, Handler, Publisher
from shared.clock import Clock, LiveClock
from shared.config import Settings, settings_or_exit
from shared.errors import RedisUnavailable
from shared.heartbeat import Heartbeat, alive_instances
from shared.keys import Keys
from shared.logging import configure_logging, get_logger
from shared.redis.client import connect
from shared.stop import StopSignal

__all__ = ["ServiceContext", "run_service"]


@dataclass
class ServiceContext:
    """What a service's ``main`` receives: settings, clock, Redis, key names, stop flag, heartbeat."""

    name: str
    instance: str
    settings: Settings
    clock: Clock
    redis: redis.Redis
    keys: Keys
    stop: StopSignal
    heartbeat: Heartbeat
    log: Any = field(default=None)

    def consumer(self, stream: str, group: str, handler: Handler, consumer_name: str | None = None, *,
                 linger_ms: int = 0, flush: Callable[[], None] | None = None,
                 block_ms: int | None = None) -> Consumer:
        """A consumer of ``stream`` in ``group`` with this service's bus settings (``linger_ms`` and
        ``flush`` as :class:`~shared.bus.Consumer` takes them; ``block_ms`` replaces
        ``bus.block_ms``, the longest a read waits, so the longest a stop waits for the read)."""
        settings = self.settings.bus
        if block_ms is not None:
            settings = settings.model_copy(update={"block_ms": block_ms})
        return Consumer(self.redis, self.keys, stream=stream, group=group, handler=handler,
                        settings=settings, clock=self.clock, name=consumer_name or self.instance,
                        linger_ms=linger_ms, flush=flush)

    def publisher(self) -> Publisher:
        """A publisher that keeps streams bounded."""
        return Publisher(self.redis, self.keys, self.settings.bus)


def run_service(name: str, main: Callable[[ServiceContext], None], argv: Sequence[str] | None = None,
                *, clock: Clock | None = None) -> int:
    """Run one service process around ``main``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("--check", action="store_true", help="exit 0 if an instance has a live heartbeat")
    parser.add_argument("--instance", default=None, help="instance name (default: host-pid)")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging(name, settings.log.level)
    log = get_logger()
    clock = clock or LiveClock()
    try:
        client = connect(settings, clock=clock, wait_s=5.0 if args.check else 30.0)
    except RedisUnavailable as exc:
        log.error("service.redis_unavailable", error=str(exc))
        return 1
    keys = Keys(settings.key_prefix)
    if args.check:
        alive = alive_instances(client, keys, name)
        print(f"{name}: {len(alive)} live instance(s)")
        return 0 if alive else 1
    instance = args.instance or os.environ.get("BASTION_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"
    stop = StopSignal()
    stop.install(settings.bus.grace_seconds)
    heartbeat = Heartbeat(client, keys, name, instance, clock, settings.service.heartbeat_interval_s,
                          settings.service.heartbeat_ttl_s)
    ctx = ServiceContext(name, instance, settings, clock, client, keys, stop, heartbeat, log)
    heartbeat.start()
    log.info("service.started", instance=instance)
    # What start-up made (modules, settings, clients) lives as long as the process: keep it out
    # of every collection, so a collection walks only what the service allocates while it runs
    # (a full one then takes a few ms, not ~50, on the message path).
    gc.collect()
    gc.freeze()
    try:
        main(ctx)
    except RedisUnavailable as exc:
        log.error("service.redis_unavailable", error=str(exc))
        return 1
    finally:
        heartbeat.stop()
        client.close()
    log.info("service.stopped", instance=instance)
    return 0
