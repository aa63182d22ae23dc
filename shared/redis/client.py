"""The Redis a service uses: the configured URL, or the embedded server's when none is given;
and the helpers every caller of it shares (scripts registered once, replies as text).

:func:`connect` waits (with a deadline) for Redis to answer, so services started together
with the embedded server under honcho or supervisor come up in any order; the connection's
retry contract is :mod:`shared.redis.connection`'s.
"""

from __future__ import annotations

from typing import Any

import redis

from shared.clock import Clock, LiveClock
from shared.config import Settings
from shared.errors import RedisUnavailable
from shared.redis.connection import connect_url
from shared.redis.server import embedded_url

__all__ = ["HDEL_IF_UNCHANGED_SCRIPT", "HSET_IF_NEWER_SCRIPT", "connect", "resolve_url",
           "script"]



_SCRIPTS: dict[str, Any] = {}

# KEYS[1] = a hash; ARGV[1] = field; ARGV[2] = the value the caller read
# returns 1 if the field still held that value and was deleted (claimed), else 0
HDEL_IF_UNCHANGED_SCRIPT = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('hdel', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS[1] = a hash whose values are "<stamp> <text>" (stamp an integer, e.g. epoch µs)
# ARGV[1] = field; ARGV[2] = the new stamp; ARGV[3] = the new text; ARGV[4] = "1" if an entry with
# the same stamp is replaced, "0" if it is kept
# returns 0 if the entry there is newer (or as new, and kept), else writes "<ARGV[2]> <ARGV[3]>" and
# returns the value it replaced, or 1 if the field was empty
HSET_IF_NEWER_SCRIPT = """
local current = redis.call('hget', KEYS[1], ARGV[1])
if current then
    local stamp = tonumber(string.match(current, '^(%d+) '))
    local new = tonumber(ARGV[2])
    if stamp and (stamp > new or (stamp == new and ARGV[4] ~= '1')) then return 0 end
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return current or 1
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
