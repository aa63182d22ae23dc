"""The buying-power rule: what an order needs before the exchange lets it trade.

The account is cash-only (multiplier 1). **Buying power** is equity less the gross value of the
positions less what the open orders reserve; a short's proceeds sit in cash, so that is
``cash - 2 x (value of the short positions) - reserved``, and plain ``cash - reserved`` for an
account that only holds longs.

An order's remaining quantity splits, against its symbol's position and the open orders placed
before it, into a **closing part** (a sell of shares held long, a buy covering a short, not
already claimed by an earlier open order on the same side) and an **opening part** (the rest):

* the closing part needs shares, not money;
* a sell's opening part is a short sale: refused unless ``allow_short``;
* the opening part needs buying power: ``opening qty x price x (1 + slippage) + qty x
  commission``, priced at the order's limit (limit, stop_limit), else its stop (stop), else the
  symbol's last price (market). A market order whose opening part has no price yet cannot be
  valued: the caller decides (see :class:`Need`).

An open order **reserves** its remaining opening part at that price (one amount per OCO group: a
bracket's two active exit legs, or an oco order's take-profit and its stop-loss leg, claim the same
shares once); an order not valued yet reserves nothing until its symbol has a price.

Pure functions over the book's records; the caller holds the book's lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["Need", "buying_power", "free_to_close", "need", "remaining", "valuation_price"]

_BPS = Decimal(10000)


def remaining(record: dict[str, Any]) -> Decimal:
    """The quantity of ``record`` not filled yet."""
    return Decimal(record["qty"]) - Decimal(record["filled_qty"])


def valuation_price(record: dict[str, Any], last: Decimal | None) -> Decimal | None:
    """The price ``record`` is valued at: its limit, else its stop, else the last price, else the
    price it was valued at when placed (None: it cannot be valued)."""
    for name in ("limit_price", "stop_price"):
        if record.get(name) is not None:
            return Decimal(record[name])
    if last is not None:
        return last
    valued = record.get("valued_at")
    return None if valued is None else Decimal(valued)


def _root(record: dict[str, Any]) -> str:
    """The order a record's group is named after: its parent, else itself."""
    return str(record["parent_id"] or record["id"])


def _groups(orders: Iterable[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Active open orders of one symbol in acceptance order, an OCO group as one entry: the orders
    of one side sharing a root (a bracket's exit legs share a parent; an oco's stop-loss leg has
    its take-profit as parent)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in sorted(orders, key=lambda r: int(r["seq"])):
        if record["status"] != "held":
            groups.setdefault((record["side"], _root(record)), []).append(record)
    return [(side, members) for (side, _), members in groups.items()]


def _walk(position: Decimal, orders: Iterable[dict[str, Any]]
          ) -> tuple[dict[str, Decimal], list[tuple[list[dict[str, Any]], Decimal]]]:
    """The shares still free to close on each side, and each group's opening quantity."""
    free = {"sell": max(position, Decimal(0)), "buy": max(-position, Decimal(0))}
    opening = []
    for side, members in _groups(orders):
        wanted = max(remaining(r) for r in members)
        closing = min(wanted, free[side])
        free[side] -= closing
        opening.append((members, wanted - closing))
    return free, opening


def free_to_close(position: Decimal, orders: Iterable[dict[str, Any]], side: str) -> Decimal:
    """Shares a new ``side`` order may close: the position on the other side less what earlier
    open ``side`` orders already claim of it."""
    return _walk(position, orders)[0][side]


def _reserved(position: Decimal, orders: Iterable[dict[str, Any]], last: Decimal | None,
              slippage_bps: Decimal) -> Decimal:
    total = Decimal(0)
    for members, opening in _walk(position, orders)[1]:
        if opening <= 0:
            continue
        prices = [p for p in (valuation_price(r, last) for r in members) if p is not None]
        if prices:
            total += opening * max(prices) * (1 + slippage_bps / _BPS)
    return total


def buying_power(cash: Decimal, positions: dict[str, tuple[Decimal, Decimal]], prices: dict[str, Decimal],
                 open_orders: Iterable[dict[str, Any]], slippage_bps: Decimal) -> Decimal:
    """Equity less the gross value of the positions less the open orders' reservations (may be
    negative: a short that rose, or a fill the reservation underestimated)."""
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for record in open_orders:
        by_symbol.setdefault(record["symbol"], []).append(record)
    short_value = sum((-qty * prices.get(symbol, avg) for symbol, (qty, avg) in positions.items() if qty < 0),
                      Decimal(0))
    reserved = Decimal(0)
    for symbol in set(by_symbol) | set(positions):
        held = positions.get(symbol, (Decimal(0), Decimal(0)))[0]
        reserved += _reserved(held, by_symbol.get(symbol, []), prices.get(symbol), slippage_bps)
    return cash - 2 * short_value - reserved


@dataclass(frozen=True)
class Need:
    """What a new order needs: ``free`` shares it may close, its ``opening`` quantity, and the
    money that opening part takes (``cost``; None when it cannot be valued yet)."""

    free: Decimal
    opening: Decimal
    cost: Decimal | None


def need(record: dict[str, Any], position: Decimal, open_orders: Iterable[dict[str, Any]],
         last: Decimal | None, slippage_bps: Decimal, commission_per_share: Decimal) -> Need:
    """What ``record`` (not among ``open_orders``, which are its symbol's) needs to trade in full.

    An exit shares its shares with the rest of its OCO group: their claim is not counted against it.
    Its group is its root's, or for a replacement the replaced order's (a replaced oco take-profit's
    stop-loss leg still names the old order as parent)."""
    qty = remaining(record)
    side = record["side"]
    linked = {_root(record), record.get("replaces")}
    others = [r for r in open_orders if not (r["side"] == side and _root(r) in linked)]
    free = free_to_close(position, others, record["side"])
    opening = max(qty - free, Decimal(0))
    if opening == 0:
        return Need(free, opening, Decimal(0))
    price = valuation_price(record, last)
    if price is None:
        return Need(free, opening, None)
    return Need(free, opening, opening * price * (1 + slippage_bps / _BPS) + qty * commission_per_share)
