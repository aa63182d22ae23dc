"""Tests for shared.safety.symbols: sub-penny ticks, rounding never worse than asked, refusals;
property tests.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.models import Side
from shared.safety.limits import Refusal, Rule
from shared.safety.symbols import PENNY, SUB_PENNY, PreparedOrder, SymbolProperties, sub_penny_tick

EQUITY = SymbolProperties("AAPL")
FRACTIONAL = SymbolProperties("AAPL", lot_size=D("0.000000001"))
CRYPTO = SymbolProperties("BTC/USD", tick_size=D("0.5"), lot_size=D("0.0001"), min_quantity=D("0.0002"),
                          min_notional=D("10"))

prices = st.decimals(min_value=D("0.000001"), max_value=D("100000"), places=6, allow_nan=False,
                     allow_infinity=False)
quantities = st.decimals(min_value=D("0.000001"), max_value=D("1000000"), places=6, allow_nan=False,
                         allow_infinity=False)
sides = st.sampled_from([Side.BUY, Side.SELL])
properties = st.sampled_from([EQUITY, FRACTIONAL, CRYPTO, SymbolProperties("X", lot_size=D("10")),
                              SymbolProperties("Y", tick_size=D("0.05"), lot_size=D("0.25"))])


class TestSubPennyRule:
    def test_tick_below_and_at_one_dollar(self) -> None:
        """$0.0001 ticks below $1, $0.01 at $1 and above."""
        assert sub_penny_tick(D("0.9999")) == SUB_PENNY
        assert sub_penny_tick(D("1")) == PENNY
        assert sub_penny_tick(D("250.5")) == PENNY

    @pytest.mark.parametrize(("side", "price", "expected"), [
        (Side.BUY, D("1.005"), D("1.00")),
        (Side.SELL, D("1.001"), D("1.01")),
        (Side.BUY, D("0.123456"), D("0.1234")),
        (Side.SELL, D("0.123401"), D("0.1235")),
        (Side.SELL, D("0.99995"), D("1.0000")),
        (Side.BUY, D("150.00"), D("150.00")),
    ])
    def test_limit_rounding_examples(self, side: Side, price: D, expected: D) -> None:
        """Buy limits round down and sell limits up, to the tick of their level."""
        assert EQUITY.round_price(side, price) == expected

    def test_only_positive_prices_on_the_grid_are_valid(self) -> None:
        """Zero and negative prices are never valid; a sub-penny price is valid below $1, not above."""
        assert not EQUITY.is_valid_price(D(0)) and not EQUITY.is_valid_price(D("-0.01"))
        assert EQUITY.is_valid_price(D("0.0001")) and EQUITY.is_valid_price(D("1.01"))
        assert not EQUITY.is_valid_price(D("1.005"))

    def test_quantity_rounds_toward_zero(self) -> None:
        """9.99 whole shares is 9; fractional keeps nine decimals, truncated."""
        assert EQUITY.round_quantity(D("9.99")) == D(9)
        assert FRACTIONAL.round_quantity(D("1.2345678919")) == D("1.234567891")


class TestRefusals:
    def test_quantity_rounding_to_zero_is_refused(self) -> None:
        """0.5 of a whole-share symbol rounds to zero: refused with a reason, not sent."""
        result = EQUITY.prepare(Side.BUY, D("0.5"), D("10"))
        assert isinstance(result, Refusal) and result.rule is Rule.QUANTITY_ROUNDS_TO_ZERO
        assert "0.5" in result.reason

    def test_price_rounding_to_zero_is_refused(self) -> None:
        """A buy limit of $0.00005 rounds down to zero: refused."""
        result = EQUITY.prepare(Side.BUY, D(10), D("0.00005"))
        assert isinstance(result, Refusal) and result.rule is Rule.PRICE_ROUNDS_TO_ZERO

    @pytest.mark.parametrize("quantity", [D(0), D("-5"), D("Infinity"), D("NaN")])
    def test_a_quantity_that_is_not_a_positive_number_is_refused(self, quantity: D) -> None:
        """A zero, negative, infinite or NaN quantity is refused as not positive (never rounded)."""
        result = EQUITY.prepare(Side.BUY, quantity, D("10"))
        assert isinstance(result, Refusal) and result.rule is Rule.QUANTITY_ROUNDS_TO_ZERO
        assert "not positive" in result.reason

    @pytest.mark.parametrize("price", [D(0), D("-1"), D("Infinity"), D("NaN")])
    def test_a_limit_that_is_not_a_positive_number_is_refused(self, price: D) -> None:
        """A zero, negative, infinite or NaN limit price is refused as not positive (never rounded)."""
        result = EQUITY.prepare(Side.SELL, D(10), price)
        assert isinstance(result, Refusal) and result.rule is Rule.PRICE_ROUNDS_TO_ZERO
        assert "not positive" in result.reason

    @pytest.mark.parametrize(("side", "price"), [(Side.BUY, D("0.0001")), (Side.SELL, D("0.5")),
                                                 (Side.BUY, D("1.00"))])
    def test_a_sub_dollar_limit_is_kept(self, side: Side, price: D) -> None:
        """A positive limit on the tick grid, however small, is sent as it is."""
        assert EQUITY.prepare(side, D(10), price) == PreparedOrder(D(10), price)

    def test_below_min_quantity_and_notional_are_refused(self) -> None:
        """Below the symbol's minimum quantity, then below its minimum notional: each refused."""
        low_qty = CRYPTO.prepare(Side.BUY, D("0.00019"), D("50000"))
        assert isinstance(low_qty, Refusal) and low_qty.rule is Rule.BELOW_MIN_QUANTITY
        low_notional = CRYPTO.prepare(Side.BUY, D("0.0002"), D("40000"))
        assert isinstance(low_notional, Refusal) and low_notional.rule is Rule.BELOW_MIN_NOTIONAL
        assert CRYPTO.prepare(Side.BUY, D("0.0003"), D("40000")) == PreparedOrder(D("0.0003"), D("40000.0"))

    def test_a_market_order_needs_no_price_without_a_minimum_notional(self) -> None:
        """With no minimum notional, a market order (no limit, no reference price) is prepared; a
        minimum of $1 is checked as it is (1 @ 0.99 refused, 1 @ 1.00 sent)."""
        assert EQUITY.prepare(Side.SELL, D(10)) == PreparedOrder(D(10), None)
        dollar = SymbolProperties("X", min_notional=D(1))
        refused = dollar.prepare(Side.BUY, D(1), D("0.99"))
        assert isinstance(refused, Refusal) and refused.rule is Rule.BELOW_MIN_NOTIONAL
        assert dollar.prepare(Side.BUY, D(1), D("1.00")) == PreparedOrder(D(1), D("1.00"))

    def test_market_order_notional_needs_a_reference_price(self) -> None:
        """With a minimum notional and no limit price, the reference price is used; none: refused."""
        assert isinstance(CRYPTO.prepare(Side.SELL, D("0.001")), Refusal)
        market = CRYPTO.prepare(Side.SELL, D("0.001"), reference_price=D("40000"))
        assert market == PreparedOrder(D("0.001"), None)

    @pytest.mark.parametrize("field", ["tick_size", "lot_size", "min_quantity", "min_notional"])
    @pytest.mark.parametrize("value", [D("Infinity"), D("NaN")])
    def test_a_property_that_is_not_a_finite_number_is_refused(self, field: str, value: D) -> None:
        """An infinite or NaN tick, lot or minimum is a configuration error (ValueError)."""
        with pytest.raises(ValueError, match=field):
            SymbolProperties("X", **{field: value})

    def test_invalid_properties_are_refused(self) -> None:
        """A zero lot size or a negative minimum is a configuration error."""
        with pytest.raises(ValueError):
            SymbolProperties("X", lot_size=D(0))
        with pytest.raises(ValueError):
            SymbolProperties("X", min_notional=D(-1))


class TestRoundingProperties:
    @given(props=properties, quantity=quantities)
    def test_quantity_never_grows_and_loses_less_than_a_lot(self, props: SymbolProperties,
                                                            quantity: D) -> None:
        """Rounded quantity is a lot multiple, not above the request, and within one lot of it."""
        rounded = props.round_quantity(quantity)
        assert 0 <= rounded <= quantity
        assert quantity - rounded < props.lot_size
        assert rounded % props.lot_size == 0

    @given(props=properties, side=sides, price=prices)
    def test_limit_never_worse_and_within_one_tick(self, props: SymbolProperties, side: Side,
                                                   price: D) -> None:
        """A buy never pays more and a sell never takes less than asked; the move is under one tick."""
        rounded = props.round_price(side, price)
        tick = props.tick_for(price)
        if side is Side.BUY:
            assert rounded <= price and price - rounded < tick
        else:
            assert rounded >= price and rounded - price < tick

    @given(props=properties, side=sides, price=prices)
    def test_rounded_limit_is_on_the_grid_and_stable(self, props: SymbolProperties, side: Side,
                                                     price: D) -> None:
        """A rounded positive price is on its level's tick grid, and rounding it again changes nothing."""
        rounded = props.round_price(side, price)
        if rounded > 0:
            assert props.is_valid_price(rounded)
            assert props.round_price(side, rounded) == rounded

    @given(props=properties, side=sides, quantity=quantities, price=prices)
    def test_prepare_sends_only_valid_orders(self, props: SymbolProperties, side: Side, quantity: D,
                                             price: D) -> None:
        """prepare either refuses with a reason or returns a positive, rounded order meeting every minimum."""
        result = props.prepare(side, quantity, price)
        if isinstance(result, Refusal):
            assert result.reason
            return
        assert result.limit_price is not None
        assert 0 < result.quantity <= quantity and result.quantity >= props.min_quantity
        assert result.quantity * result.limit_price >= props.min_notional
        assert (result.limit_price <= price) if side is Side.BUY else (result.limit_price >= price)
