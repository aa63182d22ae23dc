"""Pure price logic: when an order executes against a bar, and at what price.

No look-ahead: the caller only offers bars whose start is at or after the moment the order was
accepted (a bracket leg: strictly after the bar that filled its parent). Within a bar the path of
prices is unknown, so every choice here is the conservative one for the trader: a market order
takes the bar's open; a stop triggers at the worse of the open and the stop; a limit fills when
the bar touches it, never at a better price than the open; slippage always moves the price
against the order and rounding never improves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from shared.models import Bar

__all__ = ["Match", "match", "round_price"]

_CENT = Decimal("0.01")
_SUB_PENNY = Decimal("0.0001")
_BPS = Decimal("10000")


@dataclass(frozen=True)
class Match:
    """Whether the order triggered on this bar, and the fill price if it executes."""

    triggered: bool
    price: Decimal | None


def round_price(price: Decimal, buy: bool) -> Decimal:
    """Round to the tick (a cent, or 0.0001 below $1), never in the trader's favour."""
    tick = _CENT if price >= 1 else _SUB_PENNY
    return price.quantize(tick, rounding=ROUND_CEILING if buy else ROUND_FLOOR)


def _slip(price: Decimal, buy: bool, slippage_bps: Decimal) -> Decimal:
    factor = slippage_bps / _BPS
    moved = price * (1 + factor) if buy else price * (1 - factor)
    return round_price(moved, buy)


def match(*, order_type: str, buy: bool, limit: Decimal | None, stop: Decimal | None,
          triggered: bool, bar: Bar, slippage_bps: Decimal) -> Match:
    """Decide the fill price of one order against one bar (``None``: no execution)."""
    reference = bar.open
    if order_type in ("stop", "stop_limit") and not triggered:
        assert stop is not None
        if buy and bar.high >= stop:
            reference = max(bar.open, stop)
        elif not buy and bar.low <= stop:
            reference = min(bar.open, stop)
        else:
            return Match(False, None)
        triggered = True
        if order_type == "stop_limit":
            assert limit is not None
            if (buy and reference > limit) or (not buy and reference < limit):
                return Match(True, None)  # triggered beyond the limit: rests as a limit order
            return Match(True, _cap(_slip(reference, buy, slippage_bps), buy, limit))
    if order_type in ("market", "stop"):
        return Match(triggered, _slip(reference, buy, slippage_bps))
    assert limit is not None
    if buy:
        if bar.low > limit:
            return Match(triggered, None)
        return Match(triggered, _cap(_slip(min(bar.open, limit), buy, slippage_bps), buy, limit))
    if bar.high < limit:
        return Match(triggered, None)
    return Match(triggered, _cap(_slip(max(bar.open, limit), buy, slippage_bps), buy, limit))


def _cap(price: Decimal, buy: bool, limit: Decimal) -> Decimal:
    return min(price, limit) if buy else max(price, limit)
