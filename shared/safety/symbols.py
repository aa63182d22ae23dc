"""Symbol properties (tick, lot, minimum size) and rounding that never makes an order worse.

Guarantee, for every finite positive input (``Decimal`` only, exact -- no float anywhere):

* a quantity rounds **toward zero** to a multiple of ``lot_size``: never more shares than asked;
* a **buy** limit price rounds **down** and a **sell** limit price rounds **up** to a valid tick:
  never a worse price than asked, and never more than one tick better;
* the tick follows the US sub-penny rule (SEC Rule 612) unless the symbol has its own:
  $0.0001 below $1.00, $0.01 at or above $1.00 (the tick of the *rounded* price is valid too:
  a sell of 0.99995 rounds up to 1.0000, a multiple of $0.01);
* an order whose quantity rounds to zero, or falls below ``min_quantity`` or ``min_notional``,
  or whose limit price rounds to zero, is refused with a :class:`~shared.safety.limits.Refusal`
  instead of being sent.

Left to the caller: where the properties come from (the broker's asset list; the defaults
here are whole US-equity shares), and stop prices (whether a stop should trigger earlier or
later is the strategy's choice: :meth:`SymbolProperties.round_price` can be applied with the
side that means "not worse" for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, Decimal, localcontext

from shared.models import Side
from shared.safety.limits import Refusal, Rule

__all__ = ["PENNY", "SUB_PENNY", "PreparedOrder", "SymbolProperties", "ceil_to", "floor_to", "sub_penny_tick"]

PENNY = Decimal("0.01")
SUB_PENNY = Decimal("0.0001")
_ONE = Decimal(1)
_ZERO = Decimal(0)


def sub_penny_tick(price: Decimal) -> Decimal:
    """The US equity tick for ``price``: $0.0001 below $1, $0.01 at or above."""
    return SUB_PENNY if price < _ONE else PENNY


def _to_multiple(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 60
        return ((value / step).to_integral_value(rounding=rounding) * step).quantize(step)


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    """The largest multiple of ``step`` not above ``value``."""
    return _to_multiple(value, step, ROUND_FLOOR)


def ceil_to(value: Decimal, step: Decimal) -> Decimal:
    """The smallest multiple of ``step`` not below ``value``."""
    return _to_multiple(value, step, ROUND_CEILING)


@dataclass(frozen=True)
class PreparedOrder:
    """An order's quantity and limit price after rounding (``limit_price`` None for a market order)."""

    quantity: Decimal
    limit_price: Decimal | None


@dataclass(frozen=True)
class SymbolProperties:
    """How ``symbol`` trades. ``tick_size`` None means the sub-penny rule; ``lot_size`` 1 means
    whole shares (Alpaca's fractional shares: ``Decimal("0.000000001")``)."""

    symbol: str
    tick_size: Decimal | None = None
    lot_size: Decimal = _ONE
    min_quantity: Decimal = _ZERO
    min_notional: Decimal = _ZERO

    def __post_init__(self) -> None:
        for name in ("tick_size", "lot_size"):
            value = getattr(self, name)
            if value is not None and (not value.is_finite() or value <= 0):
                raise ValueError(f"{self.symbol}: {name} must be a positive number, not {value}")
        for name in ("min_quantity", "min_notional"):
            value = getattr(self, name)
            if not value.is_finite() or value < 0:
                raise ValueError(f"{self.symbol}: {name} must not be negative, not {value}")

    def tick_for(self, price: Decimal) -> Decimal:
        """The tick at ``price``: the symbol's own, or the sub-penny rule's."""
        return self.tick_size if self.tick_size is not None else sub_penny_tick(price)

    def round_quantity(self, quantity: Decimal) -> Decimal:
        """``quantity`` toward zero to a multiple of ``lot_size``."""
        with localcontext() as ctx:
            ctx.prec = 60
            lots = (quantity / self.lot_size).to_integral_value(rounding=ROUND_DOWN)
            return (lots * self.lot_size).quantize(self.lot_size)

    def round_price(self, side: Side, price: Decimal) -> Decimal:
        """A limit price never worse than ``price``: down to a tick for a buy, up for a sell."""
        if side is Side.BUY:
            return floor_to(price, self.tick_for(price))
        return ceil_to(price, self.tick_for(price))

    def is_valid_price(self, price: Decimal) -> bool:
        """True if ``price`` is on the tick grid (for its own level)."""
        tick = self.tick_for(price)
        return price > 0 and floor_to(price, tick) == price

    def prepare(self, side: Side, quantity: Decimal, limit_price: Decimal | None = None, *,
                reference_price: Decimal | None = None) -> PreparedOrder | Refusal:
        """Round an order for sending, or refuse it with the reason. The notional minimum is
        checked at the rounded limit price, or at ``reference_price`` for a market order."""
        refuse = self._refuse
        if not quantity.is_finite() or quantity <= 0:
            return refuse(Rule.QUANTITY_ROUNDS_TO_ZERO, f"quantity {quantity} is not positive")
        rounded_qty = self.round_quantity(quantity)
        if rounded_qty <= 0:
            return refuse(Rule.QUANTITY_ROUNDS_TO_ZERO,
                          f"quantity {quantity} rounds to zero at lot size {self.lot_size}")
        if rounded_qty < self.min_quantity:
            return refuse(Rule.BELOW_MIN_QUANTITY,
                          f"quantity {rounded_qty} (from {quantity}) is below the minimum "
                          f"{self.min_quantity}")
        rounded_price: Decimal | None = None
        if limit_price is not None:
            if not limit_price.is_finite() or limit_price <= 0:
                return refuse(Rule.PRICE_ROUNDS_TO_ZERO, f"limit price {limit_price} is not positive")
            rounded_price = self.round_price(side, limit_price)
            if rounded_price <= 0:
                return refuse(Rule.PRICE_ROUNDS_TO_ZERO,
                              f"{side} limit {limit_price} rounds to zero at tick "
                              f"{self.tick_for(limit_price)}")
        if self.min_notional > 0:
            price = rounded_price if rounded_price is not None else reference_price
            if price is None:
                return refuse(Rule.BELOW_MIN_NOTIONAL,
                              f"no price to check the minimum notional {self.min_notional} against")
            notional = rounded_qty * price
            if notional < self.min_notional:
                return refuse(Rule.BELOW_MIN_NOTIONAL,
                              f"{rounded_qty} @ {price} is {notional}, below the minimum notional "
                              f"{self.min_notional}")
        return PreparedOrder(rounded_qty, rounded_price)

    def _refuse(self, rule: Rule, text: str) -> Refusal:
        return Refusal(rule, f"{self.symbol}: {text}")
