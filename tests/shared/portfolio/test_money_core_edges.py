"""Edges of the money core that the mutation sample found unpinned (``python -m tests.mutation_sample``)."""

from __future__ import annotations

from decimal import Decimal as D

import fakeredis
import pytest

from shared.config import PortfolioSettings
from shared.errors import LockError
from shared.keys import Keys
from shared.models import Side
from shared.portfolio import Portfolio
from shared.portfolio._state import State, invariant_violations
from shared.portfolio.locks import FencedLock, LockedRead
from shared.safety.limits import is_reducing

KEYS = Keys("edge")


def test_cash_of_exactly_zero_breaks_no_invariant() -> None:
    """An account spent down to exactly $0 is sound: only cash below zero is a violation."""
    assert invariant_violations(State(opened=True, cash=D(0)), allow_short=False) == []
    assert "cash -0.01 < 0" in invariant_violations(State(opened=True, cash=D("-0.01")), allow_short=False)


def test_an_account_may_open_with_zero_cash() -> None:
    """Opening with $0 is allowed (a zero quantity or price elsewhere is not)."""
    book = Portfolio(fakeredis.FakeRedis(), KEYS, "acct", settings=PortfolioSettings(account="acct"))
    assert book.open(D(0)).changed
    assert book.snapshot().cash == D(0)


@pytest.mark.parametrize(("side", "position", "reducing"), [
    (Side.BUY, D(0), False), (Side.SELL, D(0), False), (Side.BUY, D(-5), True), (Side.SELL, D(5), True),
    (Side.BUY, D(5), False), (Side.SELL, D(-5), False)])
def test_only_an_order_against_a_position_reduces_it(side: Side, position: D, reducing: bool) -> None:
    """A buy or a sell from flat opens a position; only a buy of a short or a sell of a long reduces."""
    assert is_reducing(side, position) is reducing


def test_a_fenced_lock_without_a_clock_keeps_time_itself() -> None:
    """A lock made without a clock is usable: it takes and releases (a live clock by default)."""
    lock = FencedLock(fakeredis.FakeRedis(), KEYS, "r", lease_ms=1000, wait_ms=1000)
    assert lock.acquire() and lock.fencing_token == 1
    lock.release()


def test_a_held_fenced_lock_is_not_re_entrant_through_a_batched_try() -> None:
    """Queuing a try on a lock this object already holds is refused, not a second grant."""
    client = fakeredis.FakeRedis()
    lock = FencedLock(client, KEYS, "r", lease_ms=1000, wait_ms=1000)
    assert lock.acquire()
    with client.pipeline(transaction=False) as pipe, pytest.raises(LockError, match="not re-entrant"):
        lock.queue_try(pipe, LockedRead("return 1", [], []))
