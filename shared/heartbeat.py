"""Heartbeats: one Redis key per service instance that expires when the process stops beating.

``<prefix>:heartbeat:<service>:<instance>`` holds a small JSON status (pid, host, time, and what
the service adds) and lives ``heartbeat_ttl_s``; a live process rewrites it every
``heartbeat_interval_s``. A missing key means the instance is dead or hung: that is what the
monitor alerts on and what ``python -m services.<name> --check`` reports.

Each beat also adds ``<service>:<instance>`` to the set ``<prefix>:heartbeats``, so finding the
live instances is two round trips (SMEMBERS, then MGET of their keys) whatever the size of the
keyspace -- a SCAN for the key pattern would walk every key in Redis, and strategy workers look
every few seconds. A name whose key has expired is dropped from the set by the reader.
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
from shared.redis.client import reply_text, script

__all__ = ["Heartbeat", "alive_instances"]


class Heartbeat:
    """Beats for one instance, from a daemon thread once :meth:`start` is called."""

    def __init__(self, client: redis.Redis, keys: Keys, service: str, instance: str, clock: Clock,
                 interval_s: float, ttl_s: float) -> None:
        self.client = client
        self.key = keys.heartbeat(service, instance)
        self.index = keys.heartbeats
        self.name = f"{service}:{instance}"
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
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.key, json.dumps(body, default=str), px=self.ttl_ms)
            pipe.sadd(self.index, self.name)
            pipe.execute()

    def start(self) -> None:
        """Beat now and then every interval until :meth:`stop` (a beat Redis refuses is skipped)."""
        with contextlib.suppress(redis.RedisError):
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
        with contextlib.suppress(redis.RedisError), self.client.pipeline(transaction=False) as pipe:
            pipe.delete(self.key)
            pipe.srem(self.index, self.name)
            pipe.execute()


# KEYS[1] = the heartbeats set; KEYS[i + 1] = the heartbeat key of the name in ARGV[i]
# removes each name from the set whose key does not exist (now); returns how many it removed
_FORGET_EXPIRED_SCRIPT = """
local removed = 0
for i, name in ipairs(ARGV) do
    if redis.call('EXISTS', KEYS[i + 1]) == 0 then
        removed = removed + redis.call('SREM', KEYS[1], name)
    end
end
return removed
"""


def alive_instances(client: redis.Redis, keys: Keys, service: str | None = None) -> dict[str, dict[str, Any]]:
    """Every live heartbeat (``service:instance`` -> status), optionally of one service."""
    members: Any = client.smembers(keys.heartbeats)
    names = sorted(reply_text(m) for m in members)
    if service is not None:
        names = [n for n in names if n.split(":", 1)[0] == service]
    if not names:
        return {}
    values: Any = client.mget([keys.heartbeat(*name.split(":", 1)) for name in names])
    result: dict[str, dict[str, Any]] = {}
    gone = []
    for name, raw in zip(names, values, strict=True):
        if raw is None:
            gone.append(name)
            continue
        try:
            status = json.loads(raw)
        except ValueError:
            status = None
        result[name] = status if isinstance(status, dict) else {"value": raw.decode(errors="replace")}
    if gone:  # expired: forget them, each only if its key is still missing (a beat may be racing)
        forget = script(client, _FORGET_EXPIRED_SCRIPT)
        forget(keys=[keys.heartbeats, *(keys.heartbeat(*name.split(":", 1)) for name in gone)], args=gone,
               client=client)
    return result
