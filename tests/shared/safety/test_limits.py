"""Tests for shared.safety.limits: every pre-trade rule at its threshold, PDT, staleness, submissions
per minute.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
import redis

from shared.config import LimitSettings, load_settings
from shared.errors import ConfigError
from shared.keys import Keys
from shared.models import Side
from shared.safety.limits import (
    AccountSnapshot,
    OrderCheck,
    OrderSubmissions,
    Rule,
    business_days,
    check_gross_exposure,
    check_open_orders,
    check_order,
    check_order_notional,
    check_pdt,
    check_position,
    check_stale_balance,
    check_stale_data,
    is_day_trade,
    is_reducing,
    needs_refresh,
    read_bar_arrivals,
    trading_day,
)

NOW = datetime(2026, 1, 12, 15, 0, tzinfo=UTC)  # a Monday, 10:00 in New York
SETTINGS = LimitSettings()


def snapshot(**fields: Any) -> AccountSnapshot:
    base: dict[str, Any] = {"now": NOW, "equity": D(100_000), "balance_refreshed_at": NOW,
                            "bar_arrivals": {"AAPL": NOW}}
    base.update(fields)
    return AccountSnapshot(**base)


def buy(quantity: str, price: str = "100", symbol: str = "AAPL") -> OrderCheck:
    return OrderCheck(symbol, Side.BUY, D(quantity), D(price))


def sell(quantity: str, price: str = "100", symbol: str = "AAPL") -> OrderCheck:
    return OrderCheck(symbol, Side.SELL, D(quantity), D(price))


class TestSettings:
    def test_bad_values_are_named(self) -> None:
        """A negative size, a fraction above 1 and a zero lookback each fail, named by field."""
        with pytest.raises(ConfigError) as caught:
            load_settings(limits={"max_order_notional": "-5", "max_position_fraction": "1.5",
                                  "stale_data_after_s": 0},
                          protections={"max_drawdown_lookback_s": 0, "max_drawdown_fraction": "0"})
        fields = {field for field, _ in caught.value.problems}
        assert fields == {"limits.max_order_notional", "limits.max_position_fraction",
                          "limits.stale_data_after_s", "protections.max_drawdown_lookback_s",
                          "protections.max_drawdown_fraction"}

    def test_min_notional_above_max_is_refused(self) -> None:
        """min_order_notional above max_order_notional is a configuration error."""
        with pytest.raises(ConfigError):
            load_settings(limits={"min_order_notional": "10", "max_order_notional": "5"})


class TestOrderRules:
    def test_is_reducing(self) -> None:
        """A sell of a long or a buy of a short reduces; through zero or from flat does not."""
        assert is_reducing(Side.SELL, D(10)) and is_reducing(Side.BUY, D(-10))
        assert not is_reducing(Side.BUY, D(10)) and not is_reducing(Side.SELL, D(0))
        assert not is_reducing(Side.SELL, D(10), D(11))
        assert is_reducing(Side.SELL, D("0.5"), D("0.5")) and is_reducing(Side.SELL, D(1), D(1))
        assert is_reducing(Side.BUY, D("-0.5"), D("0.5")) and not is_reducing(Side.BUY, D("-0.5"), D(1))

    def test_max_order_notional_at_and_above(self) -> None:
        """500 x $100 = $50,000 is allowed; one more share is refused."""
        assert check_order_notional(buy("500"), SETTINGS) is None
        refusal = check_order_notional(buy("501"), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MAX_ORDER_NOTIONAL and "50000" in refusal.reason

    def test_min_order_notional_only_for_entries(self) -> None:
        """$0.99 is below the $1 minimum for an entry, but an exit of the same size passes."""
        assert check_order_notional(buy("1", "1"), SETTINGS) is None
        refusal = check_order_notional(buy("1", "0.99"), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MIN_ORDER_NOTIONAL
        assert check_order_notional(sell("1", "0.99"), SETTINGS, entry=False) is None

    def test_position_quantity_cap_counts_pending_orders(self) -> None:
        """With 60 held and 30 pending, a cap of 100 allows 10 more and refuses 11."""
        settings = LimitSettings(max_position_quantity=D(100))
        snap = snapshot(positions={"AAPL": D(60)}, pending={"AAPL": D(30)})
        assert check_position(buy("10"), snap, settings) is None
        refusal = check_position(buy("11"), snap, settings)
        assert refusal is not None and refusal.rule is Rule.MAX_POSITION_QUANTITY

    def test_position_fraction_of_equity(self) -> None:
        """25% of $100,000 at $100 is 250 shares: 250 allowed, 251 refused; a reducing sell always passes."""
        assert check_position(buy("250"), snapshot(), SETTINGS) is None
        refusal = check_position(buy("251"), snapshot(), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MAX_POSITION_FRACTION
        assert check_position(sell("100"), snapshot(positions={"AAPL": D(1000)}), SETTINGS) is None

    def test_no_equity_refuses_new_exposure(self) -> None:
        """With zero equity an entry is refused for that reason."""
        refusal = check_position(buy("1"), snapshot(equity=D(0)), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.NO_EQUITY

    def test_no_equity_refuses_new_gross_exposure(self) -> None:
        """With zero or negative equity, an order adding gross exposure is refused for that reason;
        one reducing it passes."""
        for equity in (D(0), D(-1)):
            refusal = check_gross_exposure(buy("1"), snapshot(equity=equity), SETTINGS)
            assert refusal is not None and refusal.rule is Rule.NO_EQUITY
        held = snapshot(equity=D(0), positions={"AAPL": D(5)})
        assert check_gross_exposure(sell("5"), held, SETTINGS) is None

    def test_an_order_that_flips_to_the_same_size_does_not_grow_exposure(self) -> None:
        """Selling 600 of a 300 long leaves a 300 short: the position and gross exposure do not grow, so
        neither cap refuses it even when the position is already above both."""
        big = snapshot(positions={"AAPL": D(1200)}, prices={"AAPL": D(100)})
        assert check_position(sell("2400"), big, SETTINGS) is None
        assert check_gross_exposure(sell("2400"), big, SETTINGS) is None
        assert check_position(sell("2401"), big, SETTINGS) is not None

    def test_pending_orders_add_to_the_position_in_gross_exposure(self) -> None:
        """A pending buy adds to the same symbol's long: 500 held + 500 pending at $100 is all of the
        $100,000 equity, so one more share is refused."""
        snap = snapshot(positions={"AAPL": D(500)}, pending={"AAPL": D(500)})
        refusal = check_gross_exposure(buy("1"), snap, SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MAX_GROSS_EXPOSURE

    def test_no_equity_means_zero_or_less(self) -> None:
        """Equity of 50 cents is still equity: an entry above its fraction is refused for size, not for
        having no equity."""
        snap = snapshot(equity=D("0.5"))
        for check in (check_position, check_gross_exposure):
            refusal = check(buy("1"), snap, SETTINGS)
            assert refusal is not None and refusal.rule is not Rule.NO_EQUITY

    def test_gross_exposure(self) -> None:
        """$80,000 held elsewhere plus $20,000 is exactly 1x equity; $20,100 is above."""
        snap = snapshot(positions={"MSFT": D(200)}, prices={"MSFT": D(400)})
        assert check_gross_exposure(buy("200"), snap, SETTINGS) is None
        refusal = check_gross_exposure(buy("201"), snap, SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MAX_GROSS_EXPOSURE
        assert check_gross_exposure(sell("100", symbol="MSFT", price="400"), snap, SETTINGS) is None

    def test_gross_exposure_needs_every_price(self) -> None:
        """A held symbol without a price makes exposure unknown: an entry is refused."""
        refusal = check_gross_exposure(buy("1"), snapshot(positions={"MSFT": D(1)}), SETTINGS)
        assert refusal is not None and "MSFT" in refusal.reason

    def test_a_snapshot_counts_no_open_order_or_pending_day_trade_unless_told(self) -> None:
        """A snapshot that says nothing of open orders or pending day trades counts none: one order
        allowed leaves room for the first, and two day trades done leave room for the third."""
        assert check_open_orders(snapshot(), LimitSettings(max_open_orders=1)) is None
        plain = snapshot(equity=D(24_999), positions={"AAPL": D(10)}, opened_today={"AAPL": D(10)},
                         day_trades=[date(2026, 1, 8), date(2026, 1, 9)])
        assert check_pdt(sell("10"), plain, SETTINGS) is None

    def test_max_open_orders(self) -> None:
        """49 open orders leave room for one more; 50 do not."""
        assert check_open_orders(snapshot(open_orders=49), SETTINGS) is None
        refusal = check_open_orders(snapshot(open_orders=50), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.MAX_OPEN_ORDERS

    def test_check_order_lists_every_broken_rule(self) -> None:
        """An oversized entry on stale data with 50 open orders gets every refusal at once."""
        snap = snapshot(open_orders=50, bar_arrivals={"AAPL": NOW - timedelta(hours=1)})
        rules = [r.rule for r in check_order(buy("1500"), snap, SETTINGS)]
        assert rules == [Rule.STALE_DATA, Rule.MAX_ORDER_NOTIONAL, Rule.MAX_OPEN_ORDERS,
                         Rule.MAX_POSITION_FRACTION, Rule.MAX_GROSS_EXPOSURE]
        assert check_order(buy("10"), snapshot(), SETTINGS) == []


class TestPatternDayTrading:
    BELOW = D(24_999)

    def day_trade_snapshot(self, equity: D, completed: list[date], pending: int = 0) -> AccountSnapshot:
        return snapshot(equity=equity, positions={"AAPL": D(10)}, opened_today={"AAPL": D(10)},
                        day_trades=completed, pending_day_trades=pending)

    def test_business_days_skip_the_weekend(self) -> None:
        """Five business days back from Monday 12 Jan 2026 are Mon 12, Fri 9, Thu 8, Wed 7, Tue 6."""
        assert business_days(date(2026, 1, 12), 5) == [date(2026, 1, d) for d in (12, 9, 8, 7, 6)]
        assert trading_day(datetime(2026, 1, 13, 3, 0, tzinfo=UTC)) == date(2026, 1, 12)  # 22:00 in NY

    def test_selling_shares_bought_today_is_a_day_trade(self) -> None:
        """A sell against today's buy is a day trade; a sell of an older position is not."""
        assert is_day_trade(sell("10"), self.day_trade_snapshot(self.BELOW, []))
        assert not is_day_trade(sell("10"), snapshot(positions={"AAPL": D(10)}))
        assert not is_day_trade(buy("10"), self.day_trade_snapshot(self.BELOW, []))

    @pytest.mark.parametrize("opened", [D(1), D("0.5")])
    def test_any_quantity_opened_today_makes_a_day_trade(self, opened: D) -> None:
        """One share, or a fraction of one, bought today and sold is a day trade; so is one share shorted
        today and bought back; buying back an older short is not."""
        assert is_day_trade(sell(str(opened)), snapshot(positions={"AAPL": opened},
                                                        opened_today={"AAPL": opened}))
        assert is_day_trade(buy(str(opened)), snapshot(positions={"AAPL": -opened},
                                                       opened_today={"AAPL": -opened}))
        assert not is_day_trade(buy(str(opened)), snapshot(positions={"AAPL": -opened}))

    def test_an_order_that_is_not_a_day_trade_is_never_refused_for_pdt(self) -> None:
        """With three day trades done and equity below the threshold, selling an older position passes,
        and with PDT disabled so does a fourth day trade."""
        done = [date(2026, 1, 6), date(2026, 1, 8), date(2026, 1, 9)]
        old = snapshot(equity=self.BELOW, positions={"AAPL": D(10)}, day_trades=done)
        assert check_pdt(sell("10"), old, SETTINGS) is None
        off = LimitSettings(pdt_enabled=False)
        assert check_pdt(sell("10"), self.day_trade_snapshot(self.BELOW, done), off) is None

    def test_fourth_day_trade_refused_below_threshold(self) -> None:
        """With 3 day trades in the last 5 business days and equity $24,999, the 4th is refused."""
        done = [date(2026, 1, 6), date(2026, 1, 8), date(2026, 1, 9)]
        refusal = check_pdt(sell("10"), self.day_trade_snapshot(self.BELOW, done), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.PATTERN_DAY_TRADING
        assert "number 4" in refusal.reason and "25000" in refusal.reason

    def test_third_day_trade_allowed(self) -> None:
        """Two done: the 3rd day trade is allowed below the threshold."""
        done = [date(2026, 1, 8), date(2026, 1, 9)]
        assert check_pdt(sell("10"), self.day_trade_snapshot(self.BELOW, done), SETTINGS) is None

    def test_pending_orders_count(self) -> None:
        """Two done and one pending: this one would be the 4th, refused."""
        done = [date(2026, 1, 8), date(2026, 1, 9)]
        snap = self.day_trade_snapshot(self.BELOW, done, pending=1)
        assert check_pdt(sell("10"), snap, SETTINGS) is not None

    def test_fourth_day_trade_allowed_at_threshold(self) -> None:
        """The same 4th day trade with equity of exactly $25,000 is allowed."""
        done = [date(2026, 1, 6), date(2026, 1, 8), date(2026, 1, 9)]
        assert check_pdt(sell("10"), self.day_trade_snapshot(D(25_000), done), SETTINGS) is None

    def test_day_trades_outside_the_window_do_not_count(self) -> None:
        """Day trades on the Monday a week before (the 6th business day back) do not count."""
        done = [date(2026, 1, 5)] * 3
        assert check_pdt(sell("10"), self.day_trade_snapshot(self.BELOW, done), SETTINGS) is None

    def test_check_order_applies_pdt(self) -> None:
        """check_order includes the PDT refusal for an exit (exits are not exempt from PDT)."""
        done = [date(2026, 1, 6), date(2026, 1, 8), date(2026, 1, 9)]
        rules = [r.rule for r in check_order(sell("10"), self.day_trade_snapshot(self.BELOW, done), SETTINGS)]
        assert rules == [Rule.PATTERN_DAY_TRADING]


class TestStaleness:
    def test_stale_data_refused_then_accepted_after_a_fresh_bar(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """No bar accepted for 121 s is refused (limit 120 s); after a bar arrives the entry passes."""
        redis_client.hset(keys.bar_arrival, "AAPL", (NOW - timedelta(seconds=121)).isoformat())
        arrivals = read_bar_arrivals(redis_client, keys)
        refusal = check_stale_data("AAPL", arrivals.get("AAPL"), NOW, SETTINGS)
        assert refusal is not None and refusal.rule is Rule.STALE_DATA
        assert refusal.reason == "no bar for AAPL accepted for 121s, the limit is 120s"
        assert check_order(buy("1"), snapshot(bar_arrivals=arrivals), SETTINGS)[0].rule is Rule.STALE_DATA
        redis_client.hset(keys.bar_arrival, "AAPL", (NOW - timedelta(seconds=120)).isoformat())
        arrivals = read_bar_arrivals(redis_client, keys)
        assert check_stale_data("AAPL", arrivals.get("AAPL"), NOW, SETTINGS) is None
        assert check_order(buy("1"), snapshot(bar_arrivals=arrivals), SETTINGS) == []

    def test_the_bar_time_is_not_what_is_read(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Only the arrival hash counts: a bar time of now in ``last-bar`` does not make a symbol fresh
        whose arrival is old, nor one from years ago make a just-arrived symbol stale."""
        redis_client.hset(keys.last_bar, mapping={"AAPL": NOW.isoformat(),
                                                  "MSFT": "2019-01-02T14:30:00+00:00"})
        redis_client.hset(keys.bar_arrival, mapping={"AAPL": (NOW - timedelta(seconds=130)).isoformat(),
                                                     "MSFT": NOW.isoformat()})
        arrivals = read_bar_arrivals(redis_client, keys)
        refusal = check_stale_data("AAPL", arrivals.get("AAPL"), NOW, SETTINGS)
        assert refusal is not None
        assert refusal.reason == "no bar for AAPL accepted for 130s, the limit is 120s"
        assert check_stale_data("MSFT", arrivals.get("MSFT"), NOW, SETTINGS) is None

    def test_stale_data_never_blocks_an_exit(self) -> None:
        """A sell of a held position passes on stale data; a symbol never seen is stale for entries."""
        old = snapshot(positions={"AAPL": D(5)}, bar_arrivals={})
        assert check_order(sell("5"), old, SETTINGS) == []
        refusal = check_stale_data("ZZZ", None, NOW, SETTINGS)
        assert refusal is not None and refusal.reason == "no bar for ZZZ accepted yet"

    def test_arrival_in_epoch_seconds_and_garbage(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Epoch seconds are read; an unreadable value is left out (the symbol counts as stale)."""
        redis_client.hset(keys.bar_arrival, mapping={"SPY": str(NOW.timestamp()), "BAD": "yesterday"})
        assert read_bar_arrivals(redis_client, keys) == {"SPY": NOW}

    def test_stale_balance_by_age(self) -> None:
        """Refreshed 301 s ago: refused; 300 s ago: accepted; a refresh makes it fresh again."""
        assert needs_refresh(NOW - timedelta(seconds=301), 0, NOW, SETTINGS)
        assert not needs_refresh(NOW - timedelta(seconds=300), 0, NOW, SETTINGS)
        stale = snapshot(balance_refreshed_at=NOW - timedelta(seconds=301))
        refusal = check_stale_balance(stale, SETTINGS)
        assert refusal is not None and refusal.rule is Rule.STALE_BALANCE and "301" in refusal.reason
        assert check_order(buy("1"), stale, SETTINGS)[0].rule is Rule.STALE_BALANCE
        assert check_order(buy("1"), snapshot(balance_refreshed_at=NOW), SETTINGS) == []

    def test_a_fresh_snapshot_counts_no_fill_since_the_refresh(self) -> None:
        """A snapshot that says nothing of fills counts none: even with a refresh after every fill it is
        fresh; one fill makes it stale."""
        settings = LimitSettings(balance_refresh_after_fills=1)
        assert check_stale_balance(snapshot(), settings) is None
        refusal = check_stale_balance(snapshot(fills_since_refresh=1), settings)
        assert refusal is not None and refusal.rule is Rule.STALE_BALANCE

    def test_stale_balance_by_fills(self) -> None:
        """Nine fills since the refresh are fine; the tenth asks for a refresh; never read is stale."""
        assert not needs_refresh(NOW, 9, NOW, SETTINGS)
        assert needs_refresh(NOW, 10, NOW, SETTINGS)
        refusal = check_stale_balance(snapshot(fills_since_refresh=10), SETTINGS)
        assert refusal is not None and "10 fills" in refusal.reason
        assert needs_refresh(None, 0, NOW, SETTINGS)

    def test_a_balance_never_read_is_stale(self) -> None:
        """With no balance read from the broker yet, sizing is refused, saying so."""
        refusal = check_stale_balance(snapshot(balance_refreshed_at=None), SETTINGS)
        assert refusal is not None and refusal.rule is Rule.STALE_BALANCE and "never read" in refusal.reason
        assert check_order(buy("1"), snapshot(balance_refreshed_at=None), SETTINGS)[0] == refusal


class TestOrderSubmissions:
    def test_submissions_per_minute_counted_in_redis(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With 3 per minute, three submissions pass and the 4th is refused, also for a second process."""
        settings = LimitSettings(max_orders_per_minute=3)
        first = OrderSubmissions(redis_client, keys, settings)
        assert [first.admit() for _ in range(3)] == [None, None, None]
        refusal = OrderSubmissions(redis_client, keys, settings).admit()
        assert refusal is not None and refusal.rule is Rule.MAX_ORDERS_PER_MINUTE
