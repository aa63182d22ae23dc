"""Tests for shared.safety.protections: each protection at its threshold, expiry on the simulated
clock, restarts, trades stored before exit reasons, an operator's locks.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from shared.clock import SimulatedClock, epoch_micros
from shared.config import ProtectionSettings
from shared.keys import Keys
from shared.models import ExitReason, Side
from shared.safety.limits import Rule
from shared.safety.protections import (
    ANY,
    COOLDOWN,
    LOW_PROFIT,
    MANUAL,
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


def trade(clock: SimulatedClock, symbol: str = "AAPL", pnl: str = "-10",
          reason: ExitReason = ExitReason.STOP_LOSS, side: Side = Side.BUY) -> ClosedTrade:
    return ClosedTrade(uuid.uuid4().hex, symbol, side, D(pnl), reason, clock.now())


def legacy_member(trade_id: str, pnl: str, stop_out: bool) -> str:
    """A closed AAPL long as it was stored before exit reasons, with its ``stop_out`` flag."""
    return json.dumps({"id": trade_id, "symbol": "AAPL", "side": "buy", "pnl": pnl, "stop_out": stop_out},
                      sort_keys=True)


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
        p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
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


    @pytest.mark.parametrize(("reason", "pnl", "required", "counts"), [
        (ExitReason.STOP_LOSS, "-0.01", "0", True),
        (ExitReason.TRAILING_STOP, "-1", "0", True),
        (ExitReason.PROTECTION_FAILED, "-3", "0", True),
        (ExitReason.TRAILING_STOP, "5", "0", False),  # a trailing stop that locked in profit
        (ExitReason.STOP_LOSS, "0", "0", False),  # at the required profit, not below it
        (ExitReason.SIGNAL, "-100", "0", False),
        (ExitReason.TAKE_PROFIT, "-1", "0", False),
        (ExitReason.FLATTEN, "-50", "0", False),
        (ExitReason.STOP_LOSS, "5", "10", True),  # required_profit 10: a +5 stop-out counts
        (ExitReason.TRAILING_STOP, "10", "10", False),
    ])
    def test_a_stop_out_is_a_stop_exit_below_the_required_profit(
            self, redis_client: redis.Redis, keys: Keys, reason: ExitReason, pnl: str, required: str,
            counts: bool) -> None:
        """With a limit of one, a trade locks exactly when a stop closed it below the required profit."""
        clock = SimulatedClock()
        settings = only(stoploss_guard_enabled=True, stoploss_guard_trade_limit=1,
                        stoploss_guard_required_profit=D(required))
        p = Protections(redis_client, keys, settings, clock)
        closed = trade(clock, pnl=pnl, reason=reason)
        assert p.is_stop_out(closed) is counts
        locks = p.record_trade_closed(closed)
        assert [lock.protection for lock in locks] == ([STOPLOSS_GUARD] if counts else [])

    def test_exits_that_are_not_stop_outs_do_not_add_to_the_count(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """A profitable trailing stop and a losing signal exit in the window leave two stop-outs, one
        short of the limit; a losing protection-failed exit is the third and locks."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_trade_closed(trade(clock))
        p.record_trade_closed(trade(clock, pnl="5", reason=ExitReason.TRAILING_STOP))
        p.record_trade_closed(trade(clock, pnl="-40", reason=ExitReason.SIGNAL))
        assert p.record_trade_closed(trade(clock, pnl="-2", reason=ExitReason.TRAILING_STOP)) == []
        [lock] = p.record_trade_closed(trade(clock, pnl="-1", reason=ExitReason.PROTECTION_FAILED))
        assert "3 stop-outs" in lock.reason


class TestStoredBeforeExitReasons:
    SETTINGS = TestStoplossGuard.SETTINGS

    def test_a_stop_out_flag_reads_as_stop_loss_or_signal(self) -> None:
        """A member with ``stop_out`` true decodes as STOP_LOSS, false as SIGNAL; the rest as stored."""
        clock = SimulatedClock()
        at = epoch_micros(clock.now())
        stop = ClosedTrade.decode(legacy_member("t1", "-4.5", True), at)
        assert stop == ClosedTrade("t1", "AAPL", Side.BUY, D("-4.5"), ExitReason.STOP_LOSS, clock.now())
        assert ClosedTrade.decode(legacy_member("t2", "-4.5", False), at).exit_reason is ExitReason.SIGNAL

    def test_a_trade_is_stored_with_its_exit_reason(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The stored member names the exit reason and reads back as the same trade."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        closed = trade(clock, reason=ExitReason.TRAILING_STOP)
        p.record_trade_closed(closed)
        [(member, score)] = redis_client.zrange(p.trades_key, 0, -1, withscores=True)
        assert json.loads(member)["exit_reason"] == "trailing_stop" and "stop_out" not in json.loads(member)
        assert ClosedTrade.decode(member.decode(), score) == closed

    def test_stored_stop_outs_still_count_after_the_upgrade(self, redis_client: redis.Redis,
                                                            keys: Keys) -> None:
        """Two stop-outs stored with the flag (and a flagged non-stop) plus one new stop-out reach the
        limit of three."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        at = epoch_micros(clock.now())
        redis_client.zadd(p.trades_key, {legacy_member("old1", "-3", True): at,
                                         legacy_member("old2", "-3", True): at,
                                         legacy_member("old3", "-3", False): at})
        clock.advance(timedelta(minutes=1))
        [lock] = p.record_trade_closed(trade(clock))
        assert (lock.protection, "3 stop-outs" in lock.reason) == (STOPLOSS_GUARD, True)

    def test_a_trade_redelivered_across_the_upgrade_counts_once(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """A stop-out stored with the flag and recorded again with its exit reason is one stop-out."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        redis_client.zadd(p.trades_key, {legacy_member("t1", "-3", True): epoch_micros(clock.now()),
                                         legacy_member("t2", "-3", True): epoch_micros(clock.now())})
        again = ClosedTrade("t1", "AAPL", Side.BUY, D("-3"), ExitReason.STOP_LOSS, clock.now())
        assert p.record_trade_closed(again) == []
        assert redis_client.zcard(p.trades_key) == 2


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
        exit_ = trade(clock, pnl="25", reason=ExitReason.SIGNAL)
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
        old = trade(clock, reason=ExitReason.SIGNAL)
        clock.advance(timedelta(seconds=100))
        [later] = p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
        assert p.record_trade_closed(old) == []
        assert p.check("AAPL", Side.BUY) == later


class TestLowProfitPairs:
    SETTINGS = only(low_profit_enabled=True, low_profit_trade_limit=2, low_profit_required=D("0"),
                    low_profit_lookback_s=86_400, low_profit_duration_s=3600)

    def test_locks_below_the_required_profit_not_at_it(self, redis_client: redis.Redis, keys: Keys) -> None:
        """-5 then +5 is exactly the required 0: no lock; another -0.01 is below it: the symbol locks."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        assert p.record_trade_closed(trade(clock, pnl="-5", reason=ExitReason.SIGNAL)) == []  # too few trades
        assert p.record_trade_closed(trade(clock, pnl="5", reason=ExitReason.SIGNAL)) == []
        [lock] = p.record_trade_closed(trade(clock, pnl="-0.01", reason=ExitReason.SIGNAL))
        assert (lock.protection, lock.symbol, lock.side) == (LOW_PROFIT, "AAPL", ANY)
        assert "-0.01" in lock.reason
        assert p.check("AAPL", Side.BUY) is not None and p.check("MSFT", Side.BUY) is None

    def test_other_symbols_do_not_count(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Losses on MSFT do not lock AAPL, whose single trade is below the trade limit."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        p.record_trade_closed(trade(clock, "MSFT", pnl="-100", reason=ExitReason.SIGNAL))
        assert p.record_trade_closed(trade(clock, "AAPL", pnl="-100", reason=ExitReason.SIGNAL)) == []

    def losing_longs_winning_short(self, p: Protections, clock: SimulatedClock) -> list[list[Any]]:
        """AAPL: a long -5, a short +100, a long -1 (the symbol made 94; its longs lost 6)."""
        return [p.record_trade_closed(trade(clock, pnl=pnl, reason=ExitReason.SIGNAL, side=side))
                for pnl, side in (("-5", Side.BUY), ("100", Side.SELL), ("-1", Side.BUY))]

    def test_both_sides_are_judged_together_by_default(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Without per-side, a symbol's longs and shorts are summed: +94 locks nothing."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, self.SETTINGS, clock)
        assert self.losing_longs_winning_short(p, clock) == [[], [], []]
        assert p.active_locks() == []

    def test_per_side_judges_and_locks_each_entry_side(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With per-side, the two losing longs lock AAPL buys only; the lone short is too few to judge."""
        clock = SimulatedClock()
        settings = self.SETTINGS.model_copy(update={"low_profit_per_side": True})
        p = Protections(redis_client, keys, settings, clock)
        first, second, [lock] = self.losing_longs_winning_short(p, clock)
        assert first == second == []
        assert (lock.protection, lock.symbol, lock.side) == (LOW_PROFIT, "AAPL", "buy")
        assert "AAPL buy entries realised -6 over 2 trades" in lock.reason
        assert p.check("AAPL", Side.BUY) == lock and p.check("AAPL", Side.SELL) is None


class TestLocks:
    def test_listing_and_manual_unlock(self, redis_client: redis.Redis, keys: Keys) -> None:
        """active_locks lists locks longest first; unlock removes one by its field, logging who and
        why, and reports a second unlock of it as nothing removed (logged too)."""
        clock = SimulatedClock()
        settings = only(cooldown_enabled=True, cooldown_duration_s=300, max_drawdown_enabled=True)
        p = Protections(redis_client, keys, settings, clock)
        p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
        p.record_equity(D(100))
        p.record_equity(D(50))
        assert [lock.protection for lock in p.active_locks()] == [MAX_DRAWDOWN, COOLDOWN]
        with capture_logs() as logs:
            assert not p.unlock(MAX_DRAWDOWN, "AAPL", ANY, "wrong symbol", "alice")
            assert p.unlock(MAX_DRAWDOWN, ANY, ANY, "equity feed glitch", "alice")
            assert not p.unlock(MAX_DRAWDOWN, ANY, ANY, "again", "bob")
        assert [lock.protection for lock in p.active_locks()] == [COOLDOWN]
        assert [(e["event"], e["who"], e["reason"]) for e in logs] == [
            ("protections.unlock_found_none", "alice", "wrong symbol"),
            ("protections.unlocked", "alice", "equity feed glitch"),
            ("protections.unlock_found_none", "bob", "again")]
        assert logs[1]["protection"] == MAX_DRAWDOWN and "drew down" in logs[1]["lock_reason"]

    def test_unlocking_an_expired_lock_removes_nothing_live(self, redis_client: redis.Redis,
                                                             keys: Keys) -> None:
        """A lock past its end that nobody swept yet is not reported as removed, and is gone after."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(cooldown_enabled=True, cooldown_duration_s=300), clock)
        p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
        clock.advance(timedelta(seconds=300))
        assert not p.unlock(COOLDOWN, "AAPL", ANY, "late", "alice")
        assert not redis_client.hlen(keys.protection_locks)

    def test_unlock_needs_a_reason(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An unlock with a blank reason or no one to name is refused and the lock stays."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(cooldown_enabled=True), clock)
        p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
        for reason, who in ((" ", "alice"), ("why", "")):
            with pytest.raises(ValueError, match="reason and who"):
                p.unlock(COOLDOWN, "AAPL", ANY, reason, who)
        assert p.check("AAPL", Side.BUY) is not None

    def test_an_unlocked_protection_locks_again_on_its_next_trigger(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """Unlocking StoplossGuard keeps its events: the next stop-out in the window locks again."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, TestStoplossGuard.SETTINGS, clock)
        for _ in range(2):
            p.record_trade_closed(trade(clock))
        [lock] = p.record_trade_closed(trade(clock))
        assert p.unlock(STOPLOSS_GUARD, ANY, ANY, "reviewed the stops", "alice")
        assert p.check("AAPL", Side.BUY) is None
        clock.advance(timedelta(minutes=1))
        [again] = p.record_trade_closed(trade(clock))
        assert again.field == lock.field and "4 stop-outs" in again.reason

    def test_a_manual_lock_refuses_entries_until_it_ends(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A manual lock on AAPL buys refuses them, naming who and why, to the microsecond of its end;
        AAPL sells and other symbols stay free."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(), clock)
        until = clock.now() + timedelta(minutes=30)
        with capture_logs() as logs:
            lock = p.lock("AAPL", Side.BUY, until, "earnings at 16:00", "alice")
        assert lock is not None and (lock.protection, lock.symbol, lock.side, lock.until) == (
            MANUAL, "AAPL", "buy", until)
        assert [(e["event"], e["who"], e["protection"]) for e in logs] == [
            ("protections.locked", "alice", MANUAL)]
        refusal = p.refusal("AAPL", Side.BUY)
        assert refusal is not None and refusal.rule is Rule.PROTECTION_LOCK
        assert "manual locks AAPL buy" in refusal.reason and "earnings at 16:00 (by alice)" in refusal.reason
        assert p.check("AAPL", Side.SELL) is None and p.check("MSFT", Side.BUY) is None
        clock.set(until - US)
        assert p.check("AAPL", Side.BUY) == lock
        clock.set(until)
        assert p.check("AAPL", Side.BUY) is None

    def test_a_manual_lock_is_never_shortened(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A shorter manual lock on the same symbol and side is kept out (None); a longer one extends."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(), clock)
        long_ = p.lock("AAPL", ANY, clock.now() + timedelta(hours=2), "halt news", "alice")
        assert p.lock("AAPL", ANY, clock.now() + timedelta(hours=1), "shorter", "bob") is None
        assert p.check("AAPL", Side.BUY) == long_
        longer = p.lock("AAPL", ANY, clock.now() + timedelta(hours=3), "longer", "bob")
        assert longer is not None and p.active_locks() == [longer]

    def test_manual_and_protection_locks_stand_apart(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A manual lock beside a cooldown on the same symbol: unlocking one leaves the other."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(cooldown_enabled=True, cooldown_duration_s=300), clock)
        p.record_trade_closed(trade(clock, reason=ExitReason.SIGNAL))
        p.lock("AAPL", ANY, clock.now() + timedelta(seconds=60), "shorter than the cooldown", "alice")
        assert [lock.protection for lock in p.active_locks()] == [COOLDOWN, MANUAL]
        assert p.unlock(COOLDOWN, "AAPL", ANY, "cooldown not needed", "alice")
        assert [lock.protection for lock in p.active_locks()] == [MANUAL]

    @pytest.mark.parametrize(("symbol", "side", "minutes", "reason", "who", "message"), [
        ("AAPL", "up", 5, "x", "alice", "not a valid Side"),
        ("AAPL", ANY, 0, "x", "alice", "must end after now"),
        ("AAPL", ANY, -5, "x", "alice", "must end after now"),
        ("AAPL", ANY, 5, "  ", "alice", "a symbol, a reason and who"),
        (" ", ANY, 5, "x", "alice", "a symbol, a reason and who"),
        ("AAPL", ANY, 5, "x", "", "a symbol, a reason and who"),
    ])
    def test_a_bad_manual_lock_is_refused(self, redis_client: redis.Redis, keys: Keys, symbol: str, side: str,
                                          minutes: int, reason: str, who: str, message: str) -> None:
        """A bad side, an end not after now, or a blank symbol, reason or who raise and write nothing."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(), clock)
        with pytest.raises(ValueError, match=message):
            p.lock(symbol, side, clock.now() + timedelta(minutes=minutes), reason, who)
        assert not redis_client.hlen(keys.protection_locks)

    def test_disabled_protections_record_but_never_lock(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With everything off, stop-outs and a crash in equity lock nothing."""
        clock = SimulatedClock()
        p = Protections(redis_client, keys, only(), clock)
        for _ in range(10):
            assert p.record_trade_closed(trade(clock)) == []
        p.record_equity(D(100))
        assert p.record_equity(D(1)) == []
        assert p.active_locks() == []
