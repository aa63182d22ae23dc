"""Position sizing: risk per stop distance, a fraction of equity, the whole position, the caps."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from shared.config import LimitSettings, RiskSettings
from shared.models import Side
from shared.safety.limits import AccountSnapshot, Refusal, Rule
from shared.safety.sizing import Sized, check_exits, size_order
from tests.support.factories import T0

D = Decimal
LOOSE = LimitSettings(max_position_fraction=D(1), max_order_notional=D(1_000_000))


def size(side: Side = Side.BUY, price: str = "100", stop: str | None = None, *, equity: str = "100000",
         positions: dict[str, Decimal] | None = None, pending: dict[str, Decimal] | None = None,
         prices: dict[str, Decimal] | None = None, free: str = "0", buying_power: str = "1000000",
         risk: dict[str, Any] | None = None, limits: LimitSettings = LOOSE) -> Sized | Refusal:
    snapshot = AccountSnapshot(now=T0, equity=D(equity), positions=positions or {}, pending=pending or {},
                               prices=prices or {})
    return size_order("AAPL", side, D(price), None if stop is None else D(stop), free_position=D(free),
                      buying_power=D(buying_power), fee_buffer_bps=D(0), snapshot=snapshot,
                      risk=RiskSettings(**(risk or {})), limits=limits)


def quantity(result: Sized | Refusal) -> Decimal:
    assert isinstance(result, Sized), result
    return result.quantity


class TestEntries:
    def test_risk_fraction_over_stop_distance(self) -> None:
        """1% of $100,000 at risk with a stop $2 below a $100 entry: 500 shares."""
        result = size(stop="98", risk={"max_risk_fraction": "0.01"})
        assert quantity(result) == D(500)
        assert "to a stop 2 away" in result.basis  # type: ignore[union-attr]

    def test_short_entry_stop_above(self) -> None:
        """A short entry's stop is above the price: 2% of $50,000 over $5 is 200 shares."""
        result = size(Side.SELL, stop="105", equity="50000", risk={"max_risk_fraction": "0.02"})
        assert quantity(result) == 200

    def test_without_stop_a_fraction_of_equity(self) -> None:
        """No stop: position_fraction of equity in the position (5% of $100,000 at $100: 50 shares)."""
        assert quantity(size(risk={"position_fraction": "0.05"})) == D(50)

    @pytest.mark.parametrize(("side", "stop"), [(Side.BUY, "100"), (Side.BUY, "101"), (Side.SELL, "99")])
    def test_stop_on_the_wrong_side_refused(self, side: Side, stop: str) -> None:
        """A stop at or beyond the entry price is refused, not sized on a zero or negative distance."""
        result = size(side, stop=stop)
        assert isinstance(result, Refusal) and result.rule is Rule.SIZING
        assert f"stop_loss {stop} is not" in result.reason

    def test_no_equity_refused(self) -> None:
        """An account without equity sizes nothing."""
        result = size(equity="0")
        assert isinstance(result, Refusal) and result.rule is Rule.NO_EQUITY


class TestCaps:
    def test_position_fraction_cap_counts_the_position_and_pending(self) -> None:
        """Risk asks 500 shares; 25% of $100,000 at $100 is 250, less 100 held and 50 pending: 100."""
        limits = LimitSettings(max_position_fraction=D("0.25"), max_order_notional=D(1_000_000))
        result = size(stop="98", positions={"AAPL": D(100)}, pending={"AAPL": D(50)}, limits=limits)
        assert quantity(result) == D(100)
        assert isinstance(result, Sized) and result.basis == "max_position_fraction"

    def test_order_notional_cap(self) -> None:
        """At most max_order_notional per order: $20,000 at $100 is 200 shares."""
        limits = LimitSettings(max_position_fraction=D(1), max_order_notional=D(20_000))
        assert size(stop="99", limits=limits) == Sized(D(200), "max_order_notional")

    def test_buying_power_cap_with_the_fee_buffer(self) -> None:
        """Cash not reserved, with the fee buffer, bounds the entry."""
        snapshot = AccountSnapshot(now=T0, equity=D(100_000))
        result = size_order("AAPL", Side.BUY, D(100), D(98), free_position=D(0), buying_power=D(10_010),
                            fee_buffer_bps=D(10), snapshot=snapshot, risk=RiskSettings(), limits=LOOSE)
        assert result == Sized(D(100), "buying power")

    def test_gross_leverage_cap_counts_other_symbols(self) -> None:
        """$100,000 equity at 1x with $90,000 of MSFT held leaves $10,000: 100 shares at $100."""
        result = size(stop="98", positions={"MSFT": D(300)}, prices={"MSFT": D(300)})
        assert result == Sized(D(100), "max_gross_leverage")

    def test_quantity_cap(self) -> None:
        """max_position_quantity less the position held."""
        limits = LimitSettings(max_position_fraction=D(1), max_order_notional=D(1_000_000),
                               max_position_quantity=D(30))
        result = size(stop="98", positions={"AAPL": D(10)}, limits=limits)
        assert result == Sized(D(20), "max_position_quantity")

    def test_used_up_cap_refused_naming_it(self) -> None:
        """When a cap leaves no room the refusal names it."""
        limits = LimitSettings(max_position_fraction=D("0.1"), max_order_notional=D(1_000_000))
        result = size(positions={"AAPL": D(100)}, limits=limits)
        assert isinstance(result, Refusal) and "max_position_fraction is used up" in result.reason


class TestExits:
    def test_exit_takes_the_free_position(self) -> None:
        """A sell of a long without a size sells what other orders do not hold."""
        assert size(Side.SELL, positions={"AAPL": D(40)}, free="30") == Sized(D(30), "the whole position")

    def test_exit_of_a_held_position_refused(self) -> None:
        """When other orders hold the whole position there is nothing to sell."""
        result = size(Side.SELL, positions={"AAPL": D(40)}, free="0")
        assert isinstance(result, Refusal) and "held by other orders" in result.reason

    def test_unsized_sell_when_flat_refused(self) -> None:
        """A sell with no size, no position and no stop is not sized into a short."""
        result = size(Side.SELL)
        assert isinstance(result, Refusal) and "no AAPL position to sell" in result.reason

    def test_buy_to_cover_a_short(self) -> None:
        """A buy against a short position covers it whole."""
        assert quantity(size(Side.BUY, positions={"AAPL": D(-25)}, free="-25")) == D(25)


@pytest.mark.parametrize(("side", "stop", "target", "word"), [
    (Side.BUY, "100", None, "stop_loss 100 is not below"),
    (Side.SELL, "99", None, "stop_loss 99 is not above"),
    (Side.BUY, "95", "100", "take_profit 100 is not above"),
    (Side.SELL, "105", "101", "take_profit 101 is not below"),
])
def test_exits_on_the_wrong_side(side: Side, stop: str, target: str | None, word: str) -> None:
    """A stop-loss at or beyond the entry price, or a take-profit at or short of it, is refused
    with the reason."""
    refusal = check_exits(side, D(100), D(stop), None if target is None else D(target))
    assert refusal is not None and word in refusal.reason


@pytest.mark.parametrize(("side", "stop", "target"), [
    (Side.BUY, "95", None), (Side.SELL, "105", None), (Side.BUY, None, None),
    (Side.BUY, "95", "110"), (Side.SELL, "105", "90"),
])
def test_exits_on_their_sides_pass(side: Side, stop: str | None, target: str | None) -> None:
    """A long's stop below the price and target above, a short's the other way round, or none, pass."""
    assert check_exits(side, D(100), None if stop is None else D(stop),
                       None if target is None else D(target)) is None
