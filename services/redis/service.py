"""Run the embedded Redis in the foreground until SIGTERM/SIGINT (the Procfile's ``redis``)."""

from __future__ import annotations

import threading

from shared.config import settings_or_exit
from shared.logging import configure_logging, get_logger
from shared.redis.server import RedisServer
from shared.stop import StopSignal

__all__ = ["main"]


def main() -> int:
    """Run the embedded Redis in the foreground until SIGTERM/SIGINT (the Procfile's ``redis``)."""
    settings = settings_or_exit()
    configure_logging("redis", settings.log.level)
    log = get_logger()
    stop = StopSignal()  # a second signal, or the server still up 15 s after the wait: exit 1 now
    stop.install(grace_seconds=settings.embedded_redis.stop_wait_s + 15)
    if settings.redis_url is not None:
        log.info("redis.external", detail="REDIS_URL is set: no embedded Redis started")
        while not stop.wait(3600):
            pass
        return 0
    server = RedisServer(settings.embedded_redis.port, settings.embedded_redis.data_dir)
    server.start(own_group=True)
    log.info("redis.started", port=server.port, binary=str(server.binary), data_dir=str(server.data_dir))
    assert server.process is not None
    while not stop.wait(0.5):
        if server.process.poll() is not None:
            log.error("redis.exited", returncode=server.process.returncode)
            return 1
    wait_s = settings.embedded_redis.stop_wait_s
    log.info("redis.stopping", waits_for_clients_s=wait_s)
    remaining = server.other_clients(wait_s, threading.Event())
    if remaining:
        log.warning("redis.stopping_with_clients", clients=remaining)
    server.stop()
    log.info("redis.stopped")
    return 0

