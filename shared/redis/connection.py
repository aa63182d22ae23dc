"""A connection to one Redis URL, opened once the server answers.

A command whose connection drops is retried on a new connection up to ``RECONNECT_RETRIES``
times (redis-py's Retry). So a write whose reply was lost may have been applied once already
when it is retried: writes must be idempotent (the bus dedups on message id; portfolio scripts
check an operation id), and that is the caller's contract. fakeredis's TCP server closes the
connection after every error reply; the retry also absorbs that.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.clock import Clock, LiveClock
from shared.errors import RedisUnavailable

__all__ = ["RECONNECT_RETRIES", "connect_url"]

RECONNECT_RETRIES = 3


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
