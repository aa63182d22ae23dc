"""The executor's order records: the scripts that write them and the rules that read them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from redis.client import Pipeline

from shared.errors import (
    BrokerError,
)
from shared.logging import get_logger
from shared.models import (
    OrderStatus,
)
from shared.redis.boundary import unavailable

__all__ = ["APPLY_ATTEMPTS", "CREATE_RECORD_SCRIPT", "MARK_UNKNOWN_SCRIPT", "NOT_YET_SHOWN", "PRICE_PLACES",
           "execute_queued", "next_status", "parse_time", "run_pass"]

log = get_logger(component="executor")


# KEYS[1] = the order record; KEYS[2] = the open-orders set; ARGV[1] = client_order_id;
# ARGV[2..] = field, value, ... of a new record. Returns the existing record (flat HGETALL) and
# changes nothing, or creates the record, adds it to the open set and returns an empty list.
CREATE_RECORD_SCRIPT = """
local unpack = unpack or table.unpack
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return {}
"""
# KEYS[1] = the order record; ARGV = field, value, ... Sets them only while the record is
# pending_submit (an order whose outcome became unknown); returns 1 if set, else 0.
MARK_UNKNOWN_SCRIPT = """
local unpack = unpack or table.unpack
if redis.call('HGET', KEYS[1], 'status') ~= 'pending_submit' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
PRICE_PLACES = Decimal("0.000001")
NOT_YET_SHOWN = (OrderStatus.PENDING_SUBMIT, OrderStatus.UNKNOWN)
APPLY_ATTEMPTS = 5  # a report racing another for the same order (or a stalled lock) is re-read


def run_pass(what: str, run: Callable[[], object]) -> None:
    """Run one pass of a background loop; a failure is logged (``executor.<what>_broker_failed``,
    ``_redis_unavailable``, or ``_failed`` with the traceback for a bug), never raised."""
    try:
        run()
    except BrokerError as exc:
        log.warning(f"executor.{what}_broker_failed", error=str(exc))
    except Exception as exc:
        if unavailable(exc):
            log.warning(f"executor.{what}_redis_unavailable", error=str(exc))
        else:
            log.exception(f"executor.{what}_failed")


def next_status(current: OrderStatus, reported: OrderStatus, never_placed: bool) -> tuple[OrderStatus, bool]:
    """The order's status after a report: (status, the broker shows an order given up as never
    placed). Status never moves back from terminal, or to ``new`` once past it."""
    if never_placed and current.is_terminal and reported not in (OrderStatus.UNKNOWN, current):
        return reported, True
    if current.is_terminal or reported is OrderStatus.UNKNOWN:
        return current, False
    if reported is OrderStatus.NEW and current not in NOT_YET_SHOWN:
        return current, False
    return reported, False


def parse_time(text: str) -> datetime:
    """A time the executor wrote in a record (ISO 8601)."""
    return datetime.fromisoformat(text)


def execute_queued(writes: Pipeline) -> None:
    """Send what is queued on ``writes``, if anything."""
    if len(writes):
        writes.execute()
