"""Tests for shared.safety.protections: each protection at its threshold, expiry on the simulated
clock, restarts.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import redis

from shared.clock import SimulatedClock
from shared.config import ProtectionSettings
from shared.keys import Keys
from shared.models import Side
from shared.safety.limits import Rule
from shared.safety.protections import (
    ANY,
    COOLDOWN,
    LOW_PROFIT,
    MAX_DRAWDOWN,
    STOPLOSS_GUARD,
    ClosedTrade,
    Protections,
    max_drawdown,
)

US = timedelta(microseconds=1)
OFF = {"stoploss_guard_enabled": False, "max_drawdown_enabled": False, "cooldown_enabled": False,
       "low_profit_enabled": False}


def only(**fields: Any) -> ProtectionSettings:
    """Settings with every protection off except what ``fields`` turns on."""
    return ProtectionSettings(**{**OFF, **fields})


def trade(clock: SimulatedClock, symbol: str = "AAPL", pnl: str = "-10", stop_out: bool = True,
          side: Side = Side.BUY) -> ClosedTrade:
    return ClosedTrade(uuid.uuid4().hex, symbol, side, D(pnl), stop_out, clock.now())


class TestStoplossGuard:
    SETTINGS = only(stoploss_guard_enabled=True, stoploss_guard_trade_limit=3, stoploss_guard_lookback_s=3600,
                    stoploss_guard_duration_s=600)

    def test_locks_at_the_nth_stop_out_not_before_and_expires_on_time(self, redis_client: redis.Redis,
                                                                       keys: Keys) -> None:
        """Two stop-outs lock nothing; the third locks every entry for 600 s from it, to the microsecond."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        for _ in range(2):
            assert p.record_trade_closed(trade(clock)) == []
            clock.advance(timedelta(minutes=1))
        assert p.check("MSFT", Side.BUY) is None
        third = trade(clock)
        [lock] = p.record_trade_closed(third)
        assert (lock.protection, lock.symbol, lock.side) == (STOPLOSS_GUARD, ANY, ANY)
        assert lock.until == third.at + timedelta(seconds=600)
        assert p.check("MSFT", Side.SELL) == lock
        clock.set(lock.until - US)
        assert p.check("MSFT", Side.BUY) is not None
        clock.set(lock.until)
        assert p.check("MSFT", Side.BUY) is None
        assert p.active_locks() == []
        assert not redis_client.hlen(keys.protection_locks)  # the expired lock was swept

    def test_only_stop_outs_within_the_lookback_count(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Losing exits that were not stop-outs do not count, nor a stop-out exactly one lookback old."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_trade_closed(trade(clock))  # t0: leaves the window at t0 + 3600
        p.record_trade_closed(trade(clock, stop_out=False))
        clock.advance(timedelta(seconds=10))
        p.record_trade_closed(trade(clock))
        clock.set(clock.now() + timedelta(seconds=3590))  # exactly t0 + 3600
        assert p.record_trade_closed(trade(clock)) == []

    def test_one_microsecond_inside_the_lookback_counts(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The same sequence one microsecond earlier still has three stop-outs in the window: locked."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_trade_closed(trade(clock))
        clock.advance(timedelta(seconds=10))
        p.record_trade_closed(trade(clock))
        clock.advance(timedelta(seconds=3590) - US)
        assert len(p.record_trade_closed(trade(clock))) == 1

    def test_per_symbol_and_side_scopes(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Per symbol and side, two long stop-outs on AAPL lock AAPL longs only."""
        clock = SimulatedClock()
        settings = only(stoploss_guard_enabled=True, stoploss_guard_trade_limit=2,
                        stoploss_guard_per_symbol=True,
                        stoploss_guard_per_side=True)
        p = Protections(redis_client, keys, settings, clock)
        p.record_trade_closed(trade(clock, "AAPL"))
        p.record_trade_closed(trade(clock, "MSFT"))
        p.record_trade_closed(trade(clock, "AAPL", side=Side.SELL))
        assert p.active_locks() == []
        [lock] = p.record_trade_closed(trade(clock, "AAPL"))
        assert (lock.symbol, lock.side) == ("AAPL", "buy")
        assert p.check("AAPL", Side.BUY) is not None
        assert p.check("AAPL", Side.SELL) is None and p.check("MSFT", Side.BUY) is None

    def test_locks_and_events_survive_a_restart(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Two stop-outs seen by one risk process and a third by its restarted successor lock trading;
        a third object then sees the lock."""
        clock = SimulatedClock()
        first = Protections(redis_client, keys, self.SETTINGS, clock)
        first.record_trade_closed(trade(clock))
        first.record_trade_closed(trade(clock))
        restarted = Protections(redis_client, keys, self.SETTINGS, clock)
        assert len(restarted.record_trade_closed(trade(clock))) == 1
        refusal = Protections(redis_client, keys, self.SETTINGS, clock).refusal("SPY", Side.BUY)
        assert refusal is not None and refusal.rule is Rule.PROTECTION_LOCK
        assert "3 stop-outs" in refusal.reason

    def test_a_repeated_event_counts_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The same closed trade recorded three times (redelivery) is one stop-out."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        same = trade(clock)
        for _ in range(3):
            assert p.record_trade_closed(same) == []


class TestMaxDrawdown:
    SETTINGS = only(max_drawdown_enabled=True, max_drawdown_fraction=D("0.10"), max_drawdown_lookback_s=3600,
                    max_drawdown_duration_s=1800)

    def test_locks_at_exactly_the_limit_not_before(self, redis_client: redis.Redis, keys: Keys) -> None:
        """From a $100,000 peak, $90,001 locks nothing and $90,000 (10.00%) halts every entry for 1800 s."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        assert p.record_equity(D(100_000)) == []
        clock.advance(timedelta(minutes=5))
        assert p.record_equity(D(90_001)) == []
        clock.advance(timedelta(minutes=5))
        [lock] = p.record_equity(D(90_000))
        assert (lock.protection, lock.symbol, lock.side) == (MAX_DRAWDOWN, ANY, ANY)
        assert lock.until == clock.now() + timedelta(seconds=1800)
        clock.set(lock.until - US)
        assert p.check("AAPL", Side.SELL) is not None
        clock.set(lock.until)
        assert p.check("AAPL", Side.SELL) is None

    def test_a_peak_outside_the_lookback_does_not_count(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A peak exactly one lookback old has left the window, so the fall from it is not a drawdown."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_equity(D(100_000))
        clock.advance(timedelta(seconds=3600))
        assert p.record_equity(D(80_000)) == []

    def test_drawdown_is_measured_from_the_running_peak(self) -> None:
        """Rises after a trough do not hide it: 100 -> 120 -> 96 -> 130 is a 20% drawdown."""
        clock = SimulatedClock()
        samples = []
        for value in (100, 120, 96, 130):
            samples.append((clock.now(), D(value)))
            clock.advance(timedelta(minutes=1))
        drawdown, trough_at = max_drawdown(samples)
        assert drawdown == D("0.2") and trough_at == samples[2][0]


class TestCooldown:
    def test_exit_locks_its_symbol_for_the_duration(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Any exit (even a winner) locks that symbol, both sides, for exactly 300 s; others are free."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(cooldown_enabled=True, cooldown_duration_s=300), clock)
        assert p.check("AAPL", Side.BUY) is None
        exit_ = trade(clock, pnl="25", stop_out=False)
        [lock] = p.record_trade_closed(exit_)
        assert (lock.protection, lock.symbol) == (COOLDOWN, "AAPL")
        assert lock.until == exit_.at + timedelta(seconds=300)
        assert p.check("AAPL", Side.SELL) is not None and p.check("MSFT", Side.BUY) is None
        clock.advance(timedelta(seconds=300) - US)
        assert p.check("AAPL", Side.BUY) is not None
        clock.advance(US)
        assert p.check("AAPL", Side.BUY) is None

    def test_a_later_lock_extends_and_an_earlier_never_shortens(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """A second exit extends the cooldown; a late-reported older exit leaves it as it is."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(cooldown_enabled=True, cooldown_duration_s=300), clock)
        old = trade(clock, stop_out=False)
        clock.advance(timedelta(seconds=100))
        [later] = p.record_trade_closed(trade(clock, stop_out=False))
        assert p.record_trade_closed(old) == []
        assert p.check("AAPL", Side.BUY) == later


class TestLowProfitPairs:
    SETTINGS = only(low_profit_enabled=True, low_profit_trade_limit=2, low_profit_required=D("0"),
                    low_profit_lookback_s=86_400, low_profit_duration_s=3600)

    def test_locks_below_the_required_profit_not_at_it(self, redis_client: redis.Redis, keys: Keys) -> None:
        """-5 then +5 is exactly the required 0: no lock; another -0.01 is below it: the symbol locks."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        assert p.record_trade_closed(trade(clock, pnl="-5", stop_out=False)) == []  # one trade: too few
        assert p.record_trade_closed(trade(clock, pnl="5", stop_out=False)) == []
        [lock] = p.record_trade_closed(trade(clock, pnl="-0.01", stop_out=False))
        assert (lock.protection, lock.symbol) == (LOW_PROFIT, "AAPL") and "-0.01" in lock.reason
        assert p.check("AAPL", Side.BUY) is not None and p.check("MSFT", Side.BUY) is None

    def test_other_symbols_do_not_count(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Losses on MSFT do not lock AAPL, whose single trade is below the trade limit."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_trade_closed(trade(clock, "MSFT", pnl="-100", stop_out=False))
        assert p.record_trade_closed(trade(clock, "AAPL", pnl="-100", stop_out=False)) == []


class TestLocks:
    def test_listing_and_manual_unlock(self, redis_client: redis.Redis, keys: Keys) -> None:
        """active_locks lists locks longest first; unlock removes one by hand."""
        clock = SimulatedClock()
        settings = only(cooldown_enabled=True, cooldown_duration_s=300, max_drawdown_enabled=True)
        p = Protections(redis_client, keys, settings, clock)
        p.record_trade_closed(trade(clock, stop_out=False))
        p.record_equity(D(100))
        p.record_equity(D(50))
        assert [lock.protection for lock in p.active_locks()] == [MAX_DRAWDOWN, COOLDOWN]
        assert p.unlock(MAX_DRAWDOWN)
        assert [lock.protection for lock in p.active_locks()] == [COOLDOWN]
        assert not p.unlock(MAX_DRAWDOWN)

    def test_disabled_protections_record_but_never_lock(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With everything off, stop-outs and a crash in equity lock nothing."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(), clock)
        for _ in range(10):
            assert p.record_trade_closed(trade(clock)) == []
        p.record_equity(D(100))
        assert p.record_equity(D(1)) == []
        assert p.active_locks() == []
