"""Heartbeats: one Redis key per service instance that expires when the process stops beating.

``<prefix>:heartbeat:<service>:<instance>`` holds a small JSON status (pid, host, time, and what
the service adds) and lives ``heartbeat_ttl_s``; a live process rewrites it every
``heartbeat_interval_s``. A missing key means the instance is dead or hung: that is what the
monitor alerts on and what ``python -m services.<name> --check`` reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from typing import Any

import redis

from shared.clock import Clock
from shared.keys import Keys

__all__ = ["Heartbeat", "alive_instances"]


class Heartbeat:
    """Beats for one instance, from a daemon thread once :meth:`start` is called."""

    def __init__(self, client: redis.Redis, keys: Keys, service: str, instance: str, clock: Clock,
                 interval_s: float, ttl_s: float) -> None:
        self.client = client
        self.key = keys.heartbeat(service, instance)
        self.clock = clock
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self.status: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write the heartbeat key now, with the current status."""
        body = {"pid": os.getpid(), "host": socket.gethostname(), "at": self.clock.now().isoformat(),
                **self.status}
        self.client.set(self.key, json.dumps(body, default=str), px=self.ttl_ms)

    def start(self) -> None:
        """Beat now and then every interval until :meth:`stop`."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            # a missed beat is what the monitor watches for; the service logs its own Redis errors
            with contextlib.suppress(redis.RedisError):
                self.beat()

    def stop(self) -> None:
        """Stop beating and delete the key (a clean exit is not a death)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 1)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)


def alive_instances(client: redis.Redis, keys: Keys, service: str | None = None) -> dict[str, dict[str, Any]]:
    """Every live heartbeat (``service:instance`` -> status), optionally of one service."""
    pattern = keys.heartbeat(service or "*", "*")
    result: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=pattern, count=500):
        raw: Any = client.get(key)
        if raw is None:
            continue
        full = key.decode() if isinstance(key, bytes) else str(key)
        name = full.removeprefix(f"{keys.prefix}:heartbeat:")
        try:
            status = json.loads(raw)
        except ValueError:
            status = None
        result[name] = status if isinstance(status, dict) else {"value": raw.decode(errors="replace")}
    return result
