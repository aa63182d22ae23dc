"""Connecting to Redis: the configured URL, or the embedded server's when none is given.

:func:`connect` waits (with a deadline) for Redis to answer, so services started together
with the embedded server under honcho or supervisor come up in any order. A connection that
never answers raises :class:`~shared.errors.RedisUnavailable`.

A command whose connection drops is retried on a new connection up to ``RECONNECT_RETRIES``
times (redis-py's Retry). So a write whose reply was lost may have been applied once already
when it is retried: writes must be idempotent (the bus dedups on message id; portfolio scripts
check an operation id), and that is the caller's contract. fakeredis's TCP server closes the
connection after every error reply; the retry also absorbs that.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.clock import Clock, LiveClock
from shared.config import Settings
from shared.errors import RedisUnavailable
from shared.redis.server import embedded_url

__all__ = ["HDEL_IF_UNCHANGED", "RECONNECT_RETRIES", "connect", "connect_url", "resolve_url",
           "script"]

RECONNECT_RETRIES = 3


_SCRIPTS: dict[str, Any] = {}

# KEYS[1] = a hash; ARGV[1] = field; ARGV[2] = the value the caller read
# returns 1 if the field still held that value and was deleted (claimed), else 0
HDEL_IF_UNCHANGED = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('hdel', KEYS[1], ARGV[1])
end
return 0
"""


def reply_text(value: Any) -> str:
    """A Redis reply (bytes, or str under ``decode_responses``) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def script(client: redis.Redis, text: str) -> Any:
    """The Script for Lua ``text``, registered once per process.

    Call it with an explicit client (``script(keys=..., args=..., client=c)``): EVALSHA, and
    SCRIPT LOAD on NOSCRIPT -- lone commands, so even fakeredis's TCP server keeps the connection.
    """
    found = _SCRIPTS.get(text)
    if found is None:
        found = _SCRIPTS[text] = client.register_script(text)
    return found


def resolve_url(settings: Settings) -> str:
    """The Redis URL to use: ``REDIS_URL`` if set, otherwise the embedded server's."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    return embedded_url(settings.embedded_redis.port, settings.embedded_redis.data_dir)


def connect_url(url: str, *, wait_s: float = 30.0, clock: Clock | None = None) -> redis.Redis:
    """A client for ``url`` once the server answers PING; RedisUnavailable after ``wait_s``."""
    clock = clock or LiveClock()
    client = redis.Redis.from_url(
        url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30, decode_responses=False,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), RECONNECT_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    deadline = clock.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            client.ping()
            return client
        except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
            if clock.monotonic() >= deadline:
                client.close()
                raise RedisUnavailable(f"Redis did not answer within {wait_s:g}s: {exc}") from exc
        except redis.ResponseError as exc:  # LOADING an AOF: ready soon
            if "LOADING" not in str(exc) or clock.monotonic() >= deadline:
                raise RedisUnavailable(f"Redis is not ready: {exc}") from exc
        clock.sleep(delay)
        delay = min(delay * 2, 1.0)


def connect(settings: Settings, *, wait_s: float = 30.0, clock: Clock | None = None) -> redis.Redis:
    """A client for the Redis these settings name (see :func:`resolve_url`)."""
    clock = clock or LiveClock()
    deadline = clock.monotonic() + wait_s
    while True:  # the embedded server writes its password file when it first starts
        try:
            url = resolve_url(settings)
            break
        except FileNotFoundError as exc:
            if clock.monotonic() >= deadline:
                raise RedisUnavailable(f"embedded Redis has not started: {exc}") from exc
            clock.sleep(0.1)
    return connect_url(url, wait_s=max(deadline - clock.monotonic(), 1.0), clock=clock)
