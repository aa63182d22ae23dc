"""Position sizing: how many shares an intent that names no size should trade.

A pure function over an :class:`~shared.safety.limits.AccountSnapshot`, like the limit checks:

* an **exit** (an order against the position) without a size takes the whole position that other
  orders do not already hold; a sell with neither a position nor a stop-loss is refused (a short
  entry is never sized by accident);
* an **entry** with a stop-loss risks ``max_risk_fraction`` of equity between the entry price and
  the stop: ``shares = equity x fraction / |price - stop|`` (a stop on the wrong side of the
  entry price is refused);
* an entry without a stop takes ``position_fraction`` of equity: ``shares = equity x fraction / price``;

then the entry is cut down to what every limit allows -- the position's quantity cap and equity
fraction (counting pending orders), the largest order notional, gross leverage, and the buying
power with the fee buffer -- so a sized order never fails a limit the sizing knew about. What
bound the size is returned beside it, so a log line or a refusal can say why an order is small.
Rounding to the symbol's lot is the caller's (:class:`~shared.safety.symbols.SymbolProperties`).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from shared.config import LimitSettings, RiskSettings
from shared.models import Side
from shared.safety.limits import AccountSnapshot, Refusal, Rule, is_reducing

__all__ = ["Sized", "check_exits", "size_order"]

_ZERO = Decimal(0)


@dataclass(frozen=True)
class Sized:
    """A size (before lot rounding) and what set it (``"max_order_notional"``, ``"risk 0.01 of ..."``)."""

    quantity: Decimal
    basis: str


def size_order(symbol: str, side: Side, price: Decimal, stop_loss: Decimal | None, *, free_position: Decimal,
               buying_power: Decimal, fee_buffer_bps: Decimal, snapshot: AccountSnapshot,
               risk: RiskSettings, limits: LimitSettings) -> Sized | Refusal:
    """The size of an intent on ``symbol`` at ``price`` that gave none. ``free_position``: the
    signed position less what other orders hold; ``buying_power``: cash not reserved."""
    position = snapshot.positions.get(symbol, _ZERO)
    if is_reducing(side, position):
        if not is_reducing(side, free_position):
            return Refusal(Rule.SIZING, f"the {symbol} position of {position} is held by other orders")
        return Sized(abs(free_position), "the whole position")
    if side is Side.SELL and stop_loss is None and not position:
        return Refusal(Rule.SIZING, f"no {symbol} position to sell (a short entry names a quantity or a "
                                    "stop_loss)")
    if snapshot.equity <= 0:
        return Refusal(Rule.NO_EQUITY, f"equity is {snapshot.equity}: nothing to size an entry on")
    if stop_loss is not None:
        wrong_side = check_exits(side, price, stop_loss, None)
        if wrong_side is not None:
            return wrong_side
        distance = abs(price - stop_loss)
        wanted = Sized(snapshot.equity * risk.max_risk_fraction / distance,
                       f"risk {risk.max_risk_fraction} of equity {snapshot.equity} to a stop {distance} away")
    else:
        wanted = Sized(snapshot.equity * risk.position_fraction / price,
                       f"position_fraction {risk.position_fraction} of equity {snapshot.equity}")
    caps = [wanted, *_caps(symbol, price, buying_power, fee_buffer_bps, snapshot, limits)]
    smallest = min(caps, key=lambda s: s.quantity)
    if smallest.quantity <= 0:
        return Refusal(Rule.SIZING, f"no room for a {side} {symbol} entry: {smallest.basis} is used up")
    return smallest


def check_exits(side: Side, price: Decimal, stop_loss: Decimal | None,
                take_profit: Decimal | None) -> Refusal | None:
    """A refusal when an entry's stop-loss is not on the losing side of its price, or its
    take-profit not on the winning side."""
    long = side is Side.BUY
    if stop_loss is not None and (stop_loss >= price if long else stop_loss <= price):
        return Refusal(Rule.SIZING, f"stop_loss {stop_loss} is not {'below' if long else 'above'} "
                                    f"the {side} entry price {price}")
    if take_profit is not None and (take_profit <= price if long else take_profit >= price):
        return Refusal(Rule.SIZING, f"take_profit {take_profit} is not {'above' if long else 'below'} "
                                    f"the {side} entry price {price}")
    return None


def _caps(symbol: str, price: Decimal, buying_power: Decimal, fee_buffer_bps: Decimal,
          snapshot: AccountSnapshot, limits: LimitSettings) -> list[Sized]:
    """The most shares each limit lets an entry add (may be zero or negative: used up)."""
    exposure = abs(snapshot.positions.get(symbol, _ZERO) + snapshot.pending.get(symbol, _ZERO))
    caps = [Sized(limits.max_position_fraction * snapshot.equity / price - exposure, "max_position_fraction"),
            Sized(limits.max_order_notional / price, "max_order_notional"),
            Sized(buying_power / (price * (1 + fee_buffer_bps / Decimal(10_000))), "buying power")]
    if limits.max_position_quantity is not None:
        caps.append(Sized(limits.max_position_quantity - exposure, "max_position_quantity"))
    gross = _ZERO
    for other in set(snapshot.positions) | set(snapshot.pending):
        quantity = abs(snapshot.positions.get(other, _ZERO) + snapshot.pending.get(other, _ZERO))
        mark = price if other == symbol else snapshot.prices.get(other)
        if quantity and mark is None:
            return [*caps, Sized(_ZERO, f"gross exposure (no price for {other})")]
        gross += quantity * (mark or _ZERO)
    caps.append(Sized((limits.max_gross_leverage * snapshot.equity - gross) / price, "max_gross_leverage"))
    return caps
