"""Shipped strategies carry stop-losses; the Donchian breakout enters, stops, takes profit and exits."""

from __future__ import annotations

from decimal import Decimal

from services.strategy import SmaCrossover, SmaParams, SmaState
from services.strategy._builtin import DonchianBreakout, DonchianParams, DonchianState
from shared.models import Bar, ExitReason, Intent, Side
from tests.support.factories import bar

D = Decimal
PARAMS = DonchianParams(entry_bars=3, exit_bars=2, atr_bars=2, stop_atr=D(2), target_atr=D(4))


def candle(minute: int, low: str, high: str, close: str) -> Bar:
    """An AAPL bar opening at its close."""
    return bar("AAPL", minute, open=D(close), high=D(high), low=D(low), close=D(close))


def run(strategy: DonchianBreakout, candles: list[tuple[str, str, str]]) -> list[tuple[int, Intent]]:
    return [(n, intent) for n, (low, high, close) in enumerate(candles)
            for intent in strategy.on_bar(candle(n, low, high, close))]


FLAT = [("99", "101", "100")] * 3  # a channel up to 101, true ranges of 2: ATR 2


def test_breakout_buys_with_an_atr_stop_sized_by_risk() -> None:
    """A close over the 3-bar high buys with no quantity (risk sizes it) and a stop 2 ATR under the
    close; nothing is signalled before the channel has its bars."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    [(n, entry)] = run(strategy, [*FLAT, ("100", "103", "102")])
    assert n == 3 and entry.side is Side.BUY and entry.quantity is None
    assert entry.stop_loss == D(98)  # 102 - 2 x ATR(2)
    assert strategy.state.target == D(110)


def test_target_exit_is_a_take_profit() -> None:
    """Reaching entry + 4 ATR sells the whole position with exit reason take_profit."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    signals = run(strategy, [*FLAT, ("100", "103", "102"), ("105", "111", "110")])
    [(_, exit_)] = [(n, i) for n, i in signals if i.side is Side.SELL]
    assert (exit_.quantity, exit_.exit_reason) == (None, ExitReason.TAKE_PROFIT)


def test_channel_exit_is_a_signal() -> None:
    """A close under the 2-bar low sells with exit reason signal."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    signals = run(strategy, [*FLAT, ("100", "103", "102"), ("101", "104", "103"), ("99.5", "101", "99.8")])
    assert [(n, i.side, i.exit_reason) for n, i in signals] == [(3, Side.BUY, ExitReason.SIGNAL),
                                                               (5, Side.SELL, ExitReason.SIGNAL)]


def test_stop_touched_is_not_sold_again() -> None:
    """A bar through the stop means the executor's protective stop sold: no exit intent follows,
    and the next breakout can enter again."""
    strategy = DonchianBreakout("AAPL", PARAMS, DonchianState())
    signals = run(strategy, [*FLAT, ("100", "103", "102"), ("97", "102", "97.5"), ("97", "99", "98"),
                             ("98", "106", "105")])
    assert [(n, i.side) for n, i in signals] == [(3, Side.BUY), (6, Side.BUY)]


def test_sma_entry_carries_its_stop_and_no_quantity() -> None:
    """The SMA crossover's buy is sized by risk, and protected 200 bps under the close when asked."""
    strategy = SmaCrossover("AAPL", SmaParams(fast=2, slow=4, stop_bps=D(200)), SmaState())
    closes = ["10", "10", "10", "9", "8", "9", "11"]
    [entry] = [i for n, c in enumerate(closes) for i in strategy.on_bar(bar("AAPL", n, c))]
    assert (entry.quantity, entry.stop_loss) == (None, D("10.78"))
