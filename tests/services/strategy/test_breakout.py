"""Shipped strategies carry stop-losses; the Donchian breakout enters with a stop and a take-profit
(the broker's), exits on its channel, and enters again once its exits' fill ends the entry."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.strategy import SmaCrossover, SmaParams, SmaState
from services.strategy._builtin import DonchianBreakout, DonchianParams, DonchianState
from shared.models import Bar, ExitReason, Intent, OrderEvent, OrderStatus, Side
from tests.support.factories import T0, bar

D = Decimal
PARAMS = DonchianParams(entry_bars=3, exit_bars=2, atr_bars=2, stop_atr=D(2), target_atr=D(4))


def candle(minute: int, low: str, high: str, close: str) -> Bar:
    """An AAPL bar opening at its close."""
    return bar("AAPL", minute, open=D(close), high=D(high), low=D(low), close=D(close))


def run(strategy: DonchianBreakout, candles: list[tuple[str, str, str]]) -> list[tuple[int, Intent]]:
    return [(n, intent) for n, (low, high, close) in enumerate(candles)
            for intent in strategy.on_bar(candle(n, low, high, close))]


FLAT = [("99", "101", "100")] * 3  # a channel up to 101, true ranges of 2: ATR 2


def test_breakout_buys_with_an_atr_stop_and_target_sized_by_risk() -> None:
    """A close over the 3-bar high buys with no quantity (risk sizes it), a stop 2 ATR under the
    close and a take-profit 4 ATR over it; nothing is signalled before the channel has its bars."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    [(n, entry)] = run(strategy, [*FLAT, ("100", "103", "102")])
    assert n == 3 and entry.side is Side.BUY and entry.quantity is None
    assert (entry.stop_loss, entry.take_profit) == (D(98), D(110))  # 102 -/+ 2 and 4 x ATR(2)
    assert (strategy.state.stop, strategy.state.target) == (D(98), D(110))


def sold(entry: Intent, cid: str) -> OrderEvent:
    """The executor's event that exit ``cid`` protecting ``entry`` sold the position."""
    return OrderEvent(time=T0, client_order_id=cid, intent_id=entry.id, symbol="AAPL", side=Side.SELL,
                      status=OrderStatus.FILLED, filled_quantity=D(10), filled_avg_price=D(110))


@pytest.mark.parametrize("exit_cid", ["bst-x-tp1", "3f1c-stop-leg"])
def test_target_or_stop_is_the_brokers_and_its_fill_ends_the_entry(exit_cid: str) -> None:
    """A bar through the target (or the stop) signals nothing: the broker's OCO pair sells. Until
    its fill is heard the breakout holds (no second entry); after it, the next breakout enters."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    [(_, entry)] = run(strategy, [*FLAT, ("100", "103", "102")])
    assert strategy.on_bar(candle(4, "105", "111", "110")) == []  # through the target
    assert strategy.on_bar(candle(5, "109", "113", "112")) == []  # a new high, still holding
    assert strategy.on_order_event(sold(entry, exit_cid)) == []
    assert (strategy.state.holding, strategy.state.stop, strategy.state.target) == (False, None, None)
    [again] = strategy.on_bar(candle(6, "112", "116", "115"))
    assert again.side is Side.BUY and again.id != entry.id


def test_channel_exit_is_a_signal() -> None:
    """A close under the 2-bar low sells with exit reason signal."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    signals = run(strategy, [*FLAT, ("100", "103", "102"), ("101", "104", "103"), ("99.5", "101", "99.8")])
    assert [(n, i.side, i.exit_reason) for n, i in signals] == [(3, Side.BUY, ExitReason.SIGNAL),
                                                               (5, Side.SELL, ExitReason.SIGNAL)]


def test_sma_entry_carries_its_stop_and_no_quantity() -> None:
    """The SMA crossover's buy is sized by risk, and protected 200 bps under the close when asked."""
    strategy = SmaCrossover("AAPL", SmaParams(fast=2, slow=4, stop_bps=D(200)), SmaState())
    closes = ["10", "10", "10", "9", "8", "9", "11"]
    [entry] = [i for n, c in enumerate(closes) for i in strategy.on_bar(bar("AAPL", n, c))]
    assert (entry.quantity, entry.stop_loss) == (None, D("10.78"))
