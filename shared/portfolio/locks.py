"""A Redis lock on a named resource that hands out a fencing token with every acquire.

Built on redis-py's :class:`redis.lock.Lock` (its owner token, its release/extend/reacquire
scripts that only act for the owner); this module adds what it lacks:

* **a fencing token**: the acquire is one Lua script that does ``SET lock owner NX PX lease``
  and, only if that succeeded, ``INCR`` of the resource's fence counter, returning the new value.
  Tokens for one resource only grow, and a token is handed out if and only if the lock was taken.
* **typed errors**: :class:`~shared.errors.LockTimeout` when the wait deadline passes,
  :class:`~shared.errors.LockNotOwned` when release/extend finds the lease gone,
  :class:`~shared.errors.RedisUnavailable` when Redis does not answer (redis-py's own errors
  never leave this module).
* **waiting on the injected Clock** (deadline and backoff with jitter), not on ``time.time``.

Guarantee: at most one holder *whose lease has not expired* at any instant, as far as Redis
knows. That is not mutual exclusion against a holder that stalls: a lease is a promise by Redis,
not by the holder. A store that must not take a stale holder's write checks the fencing token
itself -- see :mod:`shared.portfolio`, whose write script refuses a token lower than the newest
it accepted *or lower than the resource's fence counter*. The second check matters::

    time 0.0  A acquires portfolio:{paper}: lease 5 s, fence counter 7 -> token 7.
              A reads cash 10,000 and decides to reserve 6,006.
    time 0.1  A stalls (SIGSTOP, a GC pause, a VM migration) before writing.
    time 5.0  Redis expires A's lock key.
    time 5.1  B acquires: counter 8 -> token 8. B reads cash 10,000 (A wrote nothing).
    time 5.2  A resumes, still believing it holds the lock, and writes under token 7.
              The highest token the store has *accepted* is still 6 (B has not written yet),
              so a check against accepted tokens alone would let A in. The counter is 8:
              7 < 8, the write is refused (StaleFencingToken) and nothing changes.
    time 5.3  B writes under token 8: accepted (8 >= 8), the highest accepted becomes 8.
    time 5.4  A calls release(): the key holds B's owner token, so nothing is deleted and
              A gets LockNotOwned.

Left to the caller: keep critical sections shorter than the lease (or :meth:`FencedLock.extend`
it), send the token with every write, and make the store check it. Deadlocks between several
resources are the caller's to avoid (take them in one order). The lock is not re-entrant, and one
``FencedLock`` object is one holder: do not share it between threads (its owner token is kept on
the object, not in thread-local storage, so that a lock may be released by the code that took it
even from another thread).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import redis
from redis.client import Pipeline
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

from shared.clock import Clock, LiveClock
from shared.config import LockSettings
from shared.errors import LockError, LockNotOwned, LockTimeout, RedisUnavailable
from shared.keys import Keys
from shared.logging import get_logger
from shared.redis.boundary import REDIS_DOWN, refusing_writes
from shared.redis.client import script

__all__ = ["ACQUIRE_SCRIPT", "ACQUIRE_THEN_READ_SCRIPT", "FencedLock", "LockedRead", "fenced"]

log = get_logger(module="locks")

# KEYS[1] = the lock key (keys.lock(resource))
# KEYS[2] = the fence counter (keys.fence(resource))
# ARGV[1] = the owner token (random, identifies this holder for release/extend)
# ARGV[2] = the lease in milliseconds
# returns the new fencing token (an integer >= 1) if the lock was taken, 0 if it is held
ACQUIRE_SCRIPT = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('incr', KEYS[2])
end
return 0
"""

# KEYS[1], KEYS[2], ARGV[1], ARGV[2] as for ACQUIRE_SCRIPT; KEYS[3..] and ARGV[3..] are handed to
# the read (a LockedRead's lua, pasted in for --READ--) as its own KEYS and ARGV
# returns {0} if the lock is held, else {fencing token, whatever the read returns}
ACQUIRE_THEN_READ_SCRIPT = """
local unpack = unpack or table.unpack
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {0}
end
local token = redis.call('incr', KEYS[2])
local function read(KEYS, ARGV)
--READ--
end
return {token, read({unpack(KEYS, 3)}, {unpack(ARGV, 3)})}
"""

# As ACQUIRE_THEN_READ_SCRIPT, but the read runs whether or not the lock was taken
# returns {fencing token, or 0 if the lock is held by another, whatever the read returns}
TRY_THEN_READ_SCRIPT = """
local unpack = unpack or table.unpack
local token = 0
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    token = redis.call('incr', KEYS[2])
end
local function read(KEYS, ARGV)
--READ--
end
return {token, read({unpack(KEYS, 3)}, {unpack(ARGV, 3)})}
"""

@dataclass(frozen=True)
class LockedRead:
    """Lua to run atomically right after the lock is taken (see ACQUIRE_THEN_READ_SCRIPT).

    ``lua`` is a function body that sees its own ``KEYS`` (``keys``) and ``ARGV`` (``args``) and
    returns one value; it must only read, and must not call ``error()``.
    """

    lua: str
    keys: list[Any] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)


class FencedLock(Lock):
    """A lease on ``resource`` plus a fencing token; use as ``with FencedLock(...) as lock:``.

    ``lock.fencing_token`` is the token of the current hold (``None`` when not held). The context
    manager releases on exit, also when the block raised (then a failed release is logged and the
    block's exception propagates); a failed release after a clean block raises LockNotOwned.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        resource: str,
        *,
        lease_ms: int,
        wait_ms: int,
        clock: Clock | None = None,
        backoff_ms: tuple[float, float] = (0.5, 20.0),
    ) -> None:
        super().__init__(
            client, keys.lock(resource), timeout=lease_ms / 1000, blocking=True,
            blocking_timeout=wait_ms / 1000, thread_local=False,
        )
        self.resource = resource
        self.fence_key = keys.fence(resource)
        self.lease_ms = lease_ms
        self.wait_ms = wait_ms
        self.clock = clock or LiveClock()
        self.backoff_ms = backoff_ms
        self.fencing_token: int | None = None
        self.reads: Any = None
        self._queued_owner = b""  # the owner token of an attempt queued by queue_try

    @classmethod
    def from_settings(
        cls, client: redis.Redis, keys: Keys, resource: str, settings: LockSettings, clock: Clock
    ) -> FencedLock:
        """A lock with the lease and wait of ``settings``."""
        return cls(client, keys, resource, lease_ms=settings.lease_ms, wait_ms=settings.wait_ms, clock=clock)

    # -- acquiring ------------------------------------------------------------------------------

    def do_acquire(self, token: str | bytes) -> bool:
        """One attempt: SET NX PX and INCR of the fence counter, atomically."""
        return self._attempt(token, None) > 0

    def _attempt(self, owner: str | bytes, reads: LockedRead | None) -> int:
        """One attempt; with ``reads``, their Lua runs in the same script once the lock is taken."""
        keys: list[Any] = [self.name, self.fence_key]
        args: list[Any] = [owner, self.lease_ms]
        if reads is None:
            run = script(self.redis, ACQUIRE_SCRIPT)
        else:
            run = script(self.redis, ACQUIRE_THEN_READ_SCRIPT.replace("--READ--", reads.lua))
            keys += reads.keys
            args += reads.args
        try:
            result = run(keys=keys, args=args, client=self.redis)
        except REDIS_DOWN as exc:
            raise RedisUnavailable(f"acquiring lock {self.resource!r}: {exc}") from exc
        except redis.ResponseError as exc:
            if refusing_writes(exc):
                raise RedisUnavailable(f"acquiring lock {self.resource!r}: {exc}") from exc
            raise LockError(self.resource, f"acquire failed: {exc}") from exc
        fence = int(result if reads is None else result[0])
        if fence > 0:
            self.fencing_token = fence
            self.reads = result[1] if reads is not None else None
        return fence

    def queue_try(self, pipe: Pipeline, reads: LockedRead) -> None:
        """Queue on ``pipe`` one attempt to take the lock, for a caller batching its round trips:
        ``reads`` runs in the same script whether the lock was taken (then after it) or not;
        :meth:`tried_from` reads the reply."""
        if self.local.token is not None:
            raise LockError(self.resource, "already held by this FencedLock (it is not re-entrant)")
        self._queued_owner = uuid.uuid4().hex.encode()
        keys: list[Any] = [self.name, self.fence_key, *reads.keys]
        args: list[Any] = [self._queued_owner, self.lease_ms, *reads.args]
        pipe.eval(TRY_THEN_READ_SCRIPT.replace("--READ--", reads.lua), len(keys), *keys, *args)

    def tried_from(self, reply: Any) -> bool:
        """Whether the attempt :meth:`queue_try` queued took the lock (then it is held, with its
        fencing token); ``self.reads`` is the read's reply either way."""
        fence, self.reads = int(reply[0]), reply[1]
        if fence <= 0:
            return False
        self.fencing_token = fence
        self.local.token = self._queued_owner
        return True

    def acquire(
        self,
        sleep: float | None = None,
        blocking: bool | None = None,
        blocking_timeout: float | None = None,
        token: str | None = None,
        *,
        reads: LockedRead | None = None,
    ) -> int:
        """Take the lock and return its fencing token; LockTimeout after the wait deadline.

        ``blocking=False`` makes one attempt. Between attempts the caller sleeps on the Clock
        with exponential backoff and jitter (``backoff_ms`` = first and largest delay).
        ``reads`` is Lua run inside the acquire script once the lock is taken (read-after-lock in
        the same atomic step and round trip); its return value is ``lock.reads``.
        """
        if self.local.token is not None:
            raise LockError(self.resource, "already held by this FencedLock (it is not re-entrant)")
        owner = (token or uuid.uuid4().hex).encode()
        wait_s = self.wait_ms / 1000 if blocking_timeout is None else blocking_timeout
        blocking = self.blocking if blocking is None else blocking
        deadline = self.clock.monotonic() + wait_s
        delay_ms, cap_ms = self.backoff_ms
        while True:
            fence = self._attempt(owner, reads)
            if fence > 0:
                self.local.token = owner
                return fence
            remaining = deadline - self.clock.monotonic()
            if not blocking or remaining <= 0:
                raise LockTimeout(self.resource, f"not acquired within {wait_s * 1000:g} ms")
            self.clock.sleep(min(remaining, random.uniform(0.5, 1.5) * delay_ms / 1000))
            delay_ms = min(delay_ms * 2, cap_ms)

    # -- holding ------------------------------------------------------------------------------

    def release(self) -> None:
        """Give the lock up; LockNotOwned if its lease expired (someone else may hold it now)."""
        self.fencing_token = None
        if self.local.token is None:
            raise LockError(self.resource, "cannot release a lock that is not held")
        try:
            super().release()
        except LockNotOwnedError as exc:
            raise LockNotOwned(self.resource, "released after its lease expired") from exc
        except redis.exceptions.LockError as exc:
            raise LockError(self.resource, str(exc)) from exc
        except REDIS_DOWN as exc:
            raise RedisUnavailable(f"releasing lock {self.resource!r}: {exc}") from exc
        except redis.ResponseError as exc:
            if refusing_writes(exc):  # a failing disk refuses even the DEL: the lease expires it
                raise RedisUnavailable(f"releasing lock {self.resource!r}: {exc}") from exc
            raise LockError(self.resource, f"release failed: {exc}") from exc

    def queue_release(self, pipe: Pipeline) -> None:
        """Queue on ``pipe`` the release of this hold (:meth:`release` in a caller's round trip);
        the lock counts as given up at once; :meth:`released_from` reads the reply."""
        owner = self.local.token
        if owner is None:
            raise LockError(self.resource, "cannot release a lock that is not held")
        self.local.token = None
        self.fencing_token = None
        pipe.eval(self.LUA_RELEASE_SCRIPT, 1, self.name, owner)

    def released_from(self, reply: Any) -> None:
        """Raise as :meth:`release` would on the reply of the release :meth:`queue_release` queued."""
        if isinstance(reply, Exception):
            raise LockError(self.resource, f"release failed: {reply}")
        if not int(reply):
            raise LockNotOwned(self.resource, "released after its lease expired")

    def extend(self, additional_time: float, replace_ttl: bool = False) -> Literal[True]:
        """Add ``additional_time`` seconds to the lease (or set it, with ``replace_ttl``).

        LockNotOwned if the lease already expired: the fencing token is then worthless, and the
        caller must stop writing.
        """
        try:
            return super().extend(additional_time, replace_ttl)
        except LockNotOwnedError as exc:
            raise LockNotOwned(self.resource, "extended after its lease expired") from exc
        except redis.exceptions.LockError as exc:
            raise LockError(self.resource, str(exc)) from exc
        except REDIS_DOWN as exc:
            raise RedisUnavailable(f"extending lock {self.resource!r}: {exc}") from exc

    @property
    def owner_token(self) -> bytes | None:
        """The random value this holder stored under the lock key (None when not held)."""
        token = self.local.token
        return None if token is None else bytes(token)

    def released_by_store(self) -> None:
        """Forget the hold: a store's script released the lock along with its fenced write."""
        self.local.token, self.fencing_token = None, None

    def owned(self) -> bool:
        """Whether Redis still holds this holder's owner token under the lock key."""
        try:
            return bool(super().owned())
        except REDIS_DOWN as exc:
            raise RedisUnavailable(f"checking lock {self.resource!r}: {exc}") from exc

    def __enter__(self) -> FencedLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.release()
            return
        try:
            self.release()
        except (LockError, RedisUnavailable) as exc:  # keep the block's own exception
            log.warning("lock.release_failed", resource=self.resource, error=str(exc))


@contextmanager
def fenced(client: redis.Redis, keys: Keys, resource: str, settings: LockSettings,
           clock: Clock) -> Iterator[FencedLock]:
    """``with fenced(...) as lock:`` -- a FencedLock with ``settings``' lease and wait."""
    with FencedLock.from_settings(client, keys, resource, settings, clock) as lock:
        yield lock
