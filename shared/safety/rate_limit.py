"""Shared rate limits: one budget in Redis for every process on every host, timed by Redis ``TIME``.

Guarantee: for each bucket with ``limit`` units per ``period``, the grants recorded in any interval
of length ``period`` (as Redis's clock measures it) add up to at most ``limit``, however many
processes on however many hosts call :meth:`RateLimiter.acquire`. Each bucket is a token bucket
whose tokens come back exactly one period after they were spent (a sliding-window log: a sorted
set of grant times), so a burst can use the whole budget at once but never more than the budget
in any window -- which is how Alpaca counts its 200 requests per minute.

* **Redis's clock.** The acquire script reads ``TIME`` itself: no host clock is compared with
  another host's. Hosts only sleep for the durations the script tells them.
* **Weights and linked limits.** A call of weight ``w`` takes ``w`` units. Every endpoint counts
  against the account-wide bucket, and an endpoint with its own limit (``orders``) against its
  bucket as well: one script checks every bucket and records in all or none, so a refusal by
  one bucket never spends another's budget.
* **A 429 pauses everyone.** :meth:`RateLimiter.pause` (``Retry-After`` seconds) or
  :meth:`RateLimiter.pause_until` (a reset header's epoch time) sets a pause key that every
  acquire script checks first; it only ever extends a pause, never shortens it.
* **Waiting** is on the injected Clock: :meth:`acquire` sleeps for exactly the time the script
  says the next slot frees, and raises :class:`~shared.errors.RateLimitTimeout` at once if that is
  beyond the caller's deadline (it never sleeps in vain).

Keys (one hash tag per group, so a group's buckets share a Redis Cluster slot)::

    <prefix>:ratelimit:{<group>}:account          sorted set: member <grant-id>:<unit>, score µs
    <prefix>:ratelimit:{<group>}:endpoint:<name>  the same, for an endpoint with its own limit
    <prefix>:ratelimit:{<group>}:pause            Redis time (µs) until which nothing is granted

Why not a library: pyrate-limiter's ``RedisBucket`` stamps each item with the caller's host
clock (its docstring says it avoids Redis ``TIME`` on purpose), checks one bucket key per call
(no atomic multi-bucket acquire for linked limits) and has no shared pause; ``limits``' Redis
storage (moving window, token bucket) also receives ``now`` from the client as an argument,
works one key per call, and has no pause either. Both would need their scripts rewritten for
the three properties that matter here, so this module is the one script and a loop.

Left to the caller: call :meth:`acquire` before *every* request (including retries), report
a 429 with :meth:`pause`, and choose limits a little under the broker's (other clients of the
same account, if any, are not counted). A grant whose request then failed is not refunded.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from shared.clock import Clock, LiveClock
from shared.config import LimitSettings
from shared.errors import RateLimitTimeout
from shared.keys import Keys
from shared.logging import get_logger
from shared.redis.boundary import redis_errors
from shared.redis.client import script

__all__ = ["ACQUIRE_SCRIPT", "PAUSE_SCRIPT", "Denied", "Grant", "Limit", "RateLimiter"]

log = get_logger(module="rate_limit")
_MICROS = 1_000_000

# KEYS[1] = the group's pause key
# KEYS[2..n] = buckets (sorted sets of grants: member "<grant id>:<unit>", score = Redis time in µs)
# ARGV[1] = weight (units to take from every bucket)
# ARGV[2] = a unique grant id
# ARGV[3..] = for each bucket in turn: its limit (units), its period (µs)
# returns {1, now_us} when granted (recorded in every bucket), {0, wait_us} when not (nothing
#         recorded; wait_us until the pause ends or enough units of the fullest bucket expire),
#         {-1, i} when the weight exceeds bucket i's limit (can never be granted)
ACQUIRE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local weight = tonumber(ARGV[1])
local paused = tonumber(redis.call('get', KEYS[1]) or '0')
if paused > now then
    return {0, paused - now}
end
local wait = 0
for i = 2, #KEYS do
    local limit = tonumber(ARGV[2 * i - 1])
    local period = tonumber(ARGV[2 * i])
    if weight > limit then
        return {-1, i - 1}
    end
    redis.call('zremrangebyscore', KEYS[i], '-inf', string.format('%.0f', now - period))
    local used = redis.call('zcard', KEYS[i])
    if used + weight > limit then
        local index = used + weight - limit - 1
        local entry = redis.call('zrange', KEYS[i], index, index, 'WITHSCORES')
        local frees = tonumber(entry[2]) + period - now
        if frees > wait then wait = frees end
    end
end
if wait > 0 then
    return {0, wait}
end
for i = 2, #KEYS do
    local period = tonumber(ARGV[2 * i])
    for unit = 1, weight do
        redis.call('zadd', KEYS[i], string.format('%.0f', now), ARGV[2] .. ':' .. unit)
    end
    redis.call('pexpire', KEYS[i], math.floor(period / 1000) + 1000)
end
return {1, now}
"""

# KEYS[1] = the group's pause key
# ARGV[1] = pause for this many µs from now ("0": not relative)
# ARGV[2] = pause until this Redis time in µs ("0": not absolute)
# returns {now_us, paused_until_us}: the pause only ever grows (max of the old and the new end)
PAUSE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = math.max(now + tonumber(ARGV[1]), tonumber(ARGV[2]))
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if current > untl then untl = current end
if untl > now then
    redis.call('set', KEYS[1], string.format('%.0f', untl), 'PX', math.floor((untl - now) / 1000) + 1000)
end
return {now, untl}
"""

@dataclass(frozen=True)
class Limit:
    """``limit`` units per ``period_s`` seconds (any window of that length)."""

    limit: int
    period_s: float

    def __post_init__(self) -> None:
        if self.limit < 1 or not self.period_s > 0:
            raise ValueError(f"a rate limit needs limit >= 1 and period_s > 0, not {self}")


@dataclass(frozen=True)
class Grant:
    """A granted request: ``at_us`` is Redis's time of the grant (µs since the epoch)."""

    endpoint: str
    weight: int
    at_us: int
    waited: float


@dataclass(frozen=True)
class Denied:
    """A request not granted now: the next chance is in ``retry_in`` seconds."""

    endpoint: str
    weight: int
    retry_in: float


class RateLimiter:
    """The shared buckets of one ``group`` (one broker account): an account-wide limit, and
    optional per-endpoint limits linked to it."""

    def __init__(self, client: redis.Redis, keys: Keys, *, account: Limit,
                 endpoints: Mapping[str, Limit] | None = None, group: str = "alpaca",
                 clock: Clock | None = None) -> None:
        self.client = client
        self.keys = keys
        self.account = account
        self.endpoints = dict(endpoints or {})
        self.group = group
        self.clock = clock or LiveClock()

    @classmethod
    def from_settings(cls, client: redis.Redis, keys: Keys, settings: LimitSettings, *,
                      group: str = "alpaca", clock: Clock | None = None) -> RateLimiter:
        """The broker's limiter from ``api_rate_limit``/``api_rate_period_s``/``endpoint_rate_limits``."""
        period = settings.api_rate_period_s
        return cls(client, keys, account=Limit(settings.api_rate_limit, period),
                   endpoints={name: Limit(n, period) for name, n in settings.endpoint_rate_limits.items()},
                   group=group, clock=clock)

    def bucket_key(self, name: str) -> str:
        """The Redis key of bucket ``name`` ("account", "pause", or "endpoint:<endpoint>")."""
        return self.keys.rate_limit(f"{{{self.group}}}:{name}")

    def try_acquire(self, endpoint: str, weight: int = 1) -> Grant | Denied:
        """One attempt: take ``weight`` units from every bucket ``endpoint`` counts against, or none."""
        status, value = self._attempt(endpoint, weight)
        if status == 1:
            return Grant(endpoint, weight, value, 0.0)
        return Denied(endpoint, weight, value / _MICROS)

    def acquire(self, endpoint: str, weight: int = 1, timeout: float | None = None) -> Grant:
        """Block (on the Clock) until ``weight`` units are granted; RateLimitTimeout as soon as the
        next slot is known to be beyond ``timeout`` seconds from the call (None: wait as long as it takes)."""
        start = self.clock.monotonic()
        while True:
            status, value = self._attempt(endpoint, weight)
            waited = self.clock.monotonic() - start
            if status == 1:
                return Grant(endpoint, weight, value, waited)
            wait = value / _MICROS
            if timeout is not None and waited + wait > timeout:
                raise RateLimitTimeout(endpoint, weight, waited, wait)
            self.clock.sleep(wait)

    def pause(self, seconds: float) -> tuple[int, int]:
        """After a 429: grant nothing, to any process, for ``seconds`` (Retry-After) from Redis's now.
        Returns (Redis now, paused until), both in µs."""
        return self._pause(max(int(seconds * _MICROS), 0), 0)

    def pause_until(self, epoch_seconds: float) -> tuple[int, int]:
        """After a 429 with a reset header: grant nothing until that epoch time (Redis's clock)."""
        return self._pause(0, max(int(epoch_seconds * _MICROS), 0))

    def paused_until(self) -> int:
        """The Redis time (µs) the current pause ends, 0 if none was set (it may be in the past)."""
        with redis_errors("rate limit"):
            value = self.client.get(self.bucket_key("pause"))
        return int(value) if value else 0

    def _buckets(self, endpoint: str) -> tuple[list[str], list[int]]:
        keys = [self.bucket_key("pause"), self.bucket_key("account")]
        args = [self.account.limit, int(self.account.period_s * _MICROS)]
        own = self.endpoints.get(endpoint)
        if own is not None:
            keys.append(self.bucket_key(f"endpoint:{endpoint}"))
            args += [own.limit, int(own.period_s * _MICROS)]
        return keys, args

    def queue_try_acquire(self, pipe: Pipeline, endpoint: str, weight: int = 1) -> str:
        """Queue one attempt (as :meth:`try_acquire`) on ``pipe``, for a caller batching its round
        trips; returns the grant id, for :meth:`attempt_from` and :meth:`refund`."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, not {weight}")
        keys, limits = self._buckets(endpoint)
        grant_id = uuid.uuid4().hex
        pipe.eval(ACQUIRE_SCRIPT, len(keys), *keys, weight, grant_id, *limits)
        return grant_id

    def attempt_from(self, reply: Any, endpoint: str, weight: int = 1) -> Grant | Denied:
        """The outcome in the reply of a queued attempt (:meth:`queue_try_acquire`)."""
        status, value = self._outcome(reply, endpoint, weight)
        if status == 1:
            return Grant(endpoint, weight, value, 0.0)
        return Denied(endpoint, weight, value / _MICROS)

    def refund(self, endpoint: str, grant_id: str, weight: int = 1) -> None:
        """Give back a grant that was not used (its units count again at once)."""
        with self.client.pipeline(transaction=True) as pipe:
            self.queue_refund(pipe, endpoint, grant_id, weight)
            with redis_errors("rate limit"):
                pipe.execute()

    def queue_refund(self, pipe: Pipeline, endpoint: str, grant_id: str, weight: int = 1) -> None:
        """Queue :meth:`refund`'s writes on ``pipe`` (for a caller batching its round trips)."""
        keys, _ = self._buckets(endpoint)
        members = [f"{grant_id}:{unit}" for unit in range(1, weight + 1)]
        for key in keys[1:]:  # not the pause key
            pipe.zrem(key, *members)

    def _attempt(self, endpoint: str, weight: int) -> tuple[int, int]:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, not {weight}")
        keys, limits = self._buckets(endpoint)
        grant_id = uuid.uuid4().hex
        run = script(self.client, ACQUIRE_SCRIPT)
        with redis_errors("rate limit"):
            reply = run(keys=keys, args=[weight, grant_id, *limits], client=self.client)
        return self._outcome(reply, endpoint, weight)

    def _outcome(self, reply: Any, endpoint: str, weight: int) -> tuple[int, int]:
        keys, _ = self._buckets(endpoint)
        status, value = int(reply[0]), int(reply[1])
        if status == -1:
            raise ValueError(f"weight {weight} of {endpoint!r} exceeds the limit of bucket "
                             f"{keys[value]}: it could never be granted")
        if status == 0 and value <= 0:  # defensive: never spin without sleeping
            value = 1
        return status, value

    def _pause(self, relative_us: int, absolute_us: int) -> tuple[int, int]:
        run = script(self.client, PAUSE_SCRIPT)
        key = self.bucket_key("pause")
        with redis_errors("rate limit"):
            reply = run(keys=[key], args=[relative_us, absolute_us], client=self.client)
        now, until = int(reply[0]), int(reply[1])
        log.warning("rate_limit.paused", group=self.group, seconds=max(until - now, 0) / _MICROS)
        return now, until

