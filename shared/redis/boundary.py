"""Where redis-py's errors become Bastion's, and how a loop waits Redis out.

:func:`redis_errors` is the one translation (as httpx maps httpcore's errors at its boundary):
Redis unreachable, timed out or refusing writes becomes :class:`~shared.errors.RedisUnavailable`,
any other error reply :class:`~shared.errors.RedisCommandFailed`. Code above this module catches
those two, never ``redis.*``.

:class:`WaitOut` is the one back-off policy for a loop that meets an outage: 0.1 s doubling to
2 s (redis-py's :class:`~redis.backoff.ExponentialBackoff`), a warning per try, back to the
first delay after a success.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff

from shared.errors import RedisCommandFailed, RedisUnavailable
from shared.stop import Stoppable

__all__ = ["REDIS_DOWN", "WaitOut", "redis_errors", "refusing_writes", "unavailable"]

# The errors of a command that may or may not have reached Redis (refused, reset, timed out): for
# code that must tell "not sent" from "sent, reply lost" from "refused" (the portfolio's write).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

# Error replies with which Redis refuses a write for now, whatever the command: memory full under
# noeviction, a failing disk (the AOF cannot be written), a read-only replica. A script is refused
# before its first write, so none of it applied. Inside a script the reply keeps its prefix.
_WRITES_REFUSED = ("OOM ", "MISCONF ", "READONLY ")


def refusing_writes(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing writes for now (memory full, disk failing, a replica):
    nothing was written, and the same command can succeed once that passes."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    reply = str(exc).rpartition(" of pipeline caused error: ")[2]  # redis-py's note on a pipeline's
    return reply.startswith(_WRITES_REFUSED)


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot serve us for now -- unreachable, timed out, or refusing
    writes -- rather than anything wrong with the command or the message at hand: to be waited
    out and tried again, never held against a message."""
    down = isinstance(exc, (RedisUnavailable, *REDIS_DOWN))
    return down or refusing_writes(exc)


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py errors raised in the block; ``what`` names the operation in the message."""
    try:
        yield
    except redis.RedisError as exc:
        if unavailable(exc):
            raise RedisUnavailable(f"{what}: {exc}") from exc
        raise RedisCommandFailed(f"{what}: {exc}") from exc


class _Log(Protocol):
    def warning(self, event: str, **fields: Any) -> Any: ...


class WaitOut:
    """Back-off state for one loop that waits out an outage (Redis or the broker away)."""

    POLICY = ExponentialBackoff(cap=2.0, base=0.1)

    def __init__(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next try (0.1 s, 0.2 s, ... at most 2 s); counts a failure."""
        delay = self.POLICY.compute(self.failures)
        self.failures += 1
        return delay

    def wait(self, stop: Stoppable, log: _Log, event: str, exc: BaseException, **fields: Any) -> bool:
        """Log ``event`` with the error and the delay, then wait it out; True if ``stop`` was set."""
        delay = self.next_delay()
        log.warning(event, error=str(exc), retry_in_s=delay, **fields)
        return bool(stop.wait(delay))

    def reset(self) -> None:
        """A try succeeded: the next outage starts from the first delay again."""
        self.failures = 0
