"""shared/redis/boundary.py: redis-py's errors translated once, and the one back-off policy."""

from __future__ import annotations

import threading

import fakeredis
import pytest
import redis
from structlog.testing import capture_logs

from shared.errors import RedisCommandFailed, RedisUnavailable
from shared.logging import get_logger
from shared.redis.boundary import WaitOut, redis_errors


@pytest.mark.parametrize(("error", "expected"), [
    (redis.ConnectionError("Connection refused"), RedisUnavailable),
    (redis.TimeoutError("Timeout reading"), RedisUnavailable),
    (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), RedisUnavailable),
    (redis.ResponseError("MISCONF Errors writing to the AOF file"), RedisUnavailable),
    (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), RedisUnavailable),
    (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     RedisCommandFailed),
])
def test_redis_errors_become_bastions_naming_the_operation(error: redis.RedisError,
                                                           expected: type[Exception]) -> None:
    """An outage (or writes refused for now) is RedisUnavailable, any other reply RedisCommandFailed;
    the message names the operation and the original error is kept as the cause."""
    with pytest.raises(expected) as raised, redis_errors("reading the book"):
        raise error
    assert str(raised.value).startswith("reading the book: ")
    assert raised.value.__cause__ is error


def test_a_real_error_reply_is_a_command_failure() -> None:
    """A command Redis answers with an error (a list command on a string) is RedisCommandFailed."""
    client = fakeredis.FakeRedis()
    client.set("k", "v")
    with pytest.raises(RedisCommandFailed, match="WRONGTYPE"), redis_errors("pushing"):
        client.lpush("k", "x")


def test_other_errors_pass_through_untouched() -> None:
    """Only redis-py's errors are translated: a bug in the block stays what it is."""
    with pytest.raises(KeyError), redis_errors("anything"):
        raise KeyError("not redis")


def test_wait_out_doubles_from_a_tenth_to_two_seconds_and_starts_over_after_a_success() -> None:
    """The one back-off: 0.1 s doubling, capped at 2 s; reset() after a success starts again."""
    outage = WaitOut()
    assert [outage.next_delay() for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    outage.reset()
    assert outage.next_delay() == 0.1


def test_wait_out_logs_each_try_and_returns_at_once_when_stopped() -> None:
    """wait() logs the event with the error and the delay, and says whether the stop was set."""
    outage, stop = WaitOut(), threading.Event()
    stop.set()
    with capture_logs() as logs:
        assert outage.wait(stop, get_logger(), "probe.redis_unavailable", RedisUnavailable("down"), extra=1)
    assert logs == [{"event": "probe.redis_unavailable", "error": "down", "retry_in_s": 0.1, "extra": 1,
                     "log_level": "warning"}]
