"""The book and its market side: open orders traded against bars, fills applied once.

:class:`Book` holds the exchange's lock, its :class:`~._store.Store` and its market time, and
fills open orders from bars; :class:`~._engine.Exchange` adds what clients call.

Guarantees:

* **A fill is applied once.** A fill's id is ``<order id>:<bar message id>``; it is recorded in
  the same transaction as its effect, and a bar delivered again (the bus is at-least-once) finds
  it recorded and changes nothing. Restarting the exchange never replays a fill.
* **No look-ahead.** An order only trades on bars whose start is at or after its acceptance (a
  bracket leg: strictly after the bar that filled its parent). See :mod:`._matching`.
* **Nothing trades unchecked.** An order placed before it could be valued (a market order before
  its symbol's first price) is checked against buying power at its first fill, at that fill's
  price and before anything fills, and rejected if it does not fit (see :mod:`._buying_power`).

Left to the caller: **one exchange process per key prefix.** This class serialises its own
threads with a lock and holds the book in memory (see :mod:`._store`); two processes on one prefix
would each trust their own copy. The redelivery case, as a timeline::

    time 0   bar B (id b1) arrives; order O fills 10 @ 100: MULTI writes O, position, cash,
             applied["O:b1"]=10, fill, trade update; EXEC
    time 1   the exchange is SIGKILLed before the bus acknowledges B
    time 2   restarted, it receives B again: "O:b1" is recorded, so O is skipped (its 10 shares
             still count against B's volume); nothing is filled twice
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import redis

import services.paper_exchange._buying_power as bp
import services.paper_exchange._render as render
from services.paper_exchange._matching import match
from services.paper_exchange._store import OPEN_STATUSES, PRICES_EVERY_S, Change, Store
from shared.clock import Clock
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Bar

__all__ = ["Book"]

log = get_logger(component="paper_exchange")

_AVG_QUANTUM = Decimal("0.000001")


def _opt(record: dict[str, Any], name: str) -> Decimal | None:
    value = record.get(name)
    return None if value is None else Decimal(value)


class Book:
    """The book's state and its market side. Thread-safe: every public method runs under one lock."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: PaperExchangeSettings, clock: Clock,
                 publish: Callable[[list[dict[str, Any]]], None] = lambda events: None) -> None:
        self.store = Store(client, keys)
        self.settings = settings
        self.clock = clock
        self.publish = publish
        self.partial_fraction: Callable[[], Decimal | None] = lambda: None
        self._lock = threading.RLock()
        self._prices_written = clock.monotonic()
        self._market_time: datetime | None = None  # the newest bar time seen (see market_now)
        self.store.load_book(settings.starting_cash, clock.now())

    @contextmanager
    def _op(self) -> Iterator[None]:
        """One public operation: under the lock; a change left unwritten by an error is dropped."""
        with self._lock:
            try:
                yield
            finally:
                self.store.drop_staged()

    # -- buying power -------------------------------------------------------------------------

    def _open_of(self, symbol: str, *, besides: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.store.open_orders() if r["symbol"] == symbol and r["id"] != besides]

    def _buying_power(self, *, besides: str | None = None, unvalued: bool = True) -> Decimal:
        """The account's buying power, leaving out the open order ``besides`` (and, unless
        ``unvalued``, the orders accepted before they could be valued: each is checked at its own
        first fill, in acceptance order)."""
        orders = [r for r in self.store.open_orders()
                  if r["id"] != besides and (unvalued or not r.get("unpriced"))]
        return bp.buying_power(self.store.cash(), self.store.positions(), self.store.prices(), orders,
                               self.settings.slippage_bps)

    def _need(self, record: dict[str, Any], last: Decimal | None, *, besides: str | None = None) -> bp.Need:
        held = self.store.positions().get(record["symbol"], (Decimal(0), Decimal(0)))[0]
        return bp.need(record, held, self._open_of(record["symbol"], besides=besides), last,
                       self.settings.slippage_bps, self.settings.commission_per_share)

    def _fits_at(self, record: dict[str, Any], price: Decimal) -> bool:
        """Whether ``record``, placed before it could be valued, fits the buying power at ``price``."""
        cost = self._need(record, price, besides=record["id"]).cost
        return cost is not None and cost <= self._buying_power(besides=record["id"], unvalued=False)

    # -- market data --------------------------------------------------------------------------

    def market_now(self) -> datetime:
        """The exchange's now for trading: the wall clock, or the newest bar's time when the
        bars run ahead of it (the synthetic market's minutes pass 60 to a second). A new order
        trades on bars from this time on, and a day order expires on a later New York date than
        this one's; judged by the wall clock alone, every day order would expire on the first
        bar of a market a day ahead."""
        now = self.clock.now()
        market = self._market_time
        return market if market is not None and market > now else now

    def _saw(self, bars: list[Bar]) -> None:
        newest = max(bar.time for bar in bars)
        if self._market_time is None or newest > self._market_time:
            self._market_time = newest

    def on_bars(self, bars: list[Bar]) -> int:
        """Trade a batch of bars in order (:meth:`on_bar` each), but a symbol without open orders
        only takes its last price: a batch that trades nothing touches no Redis, except to write
        the last prices once every ``PRICES_EVERY_S`` (outside the lock)."""
        last = {bar.symbol: bar.close for bar in bars}
        if not last:
            return 0
        with self._op():
            self._saw(bars)
            trading = self.store.mark(last)
            applied = sum(self.on_bar(bar) for bar in bars if bar.symbol in trading)
            prices = {}
            if self.clock.monotonic() - self._prices_written >= PRICES_EVERY_S:
                self._prices_written = self.clock.monotonic()
                prices = self.store.take_unwritten_prices()
        self.store.write_prices(prices)
        return applied

    def on_bar(self, bar: Bar) -> int:
        """Trade open orders of ``bar.symbol`` against it; return the number of fills applied."""
        with self._op():
            budget = bar.volume * self.settings.max_volume_fraction
            applied = 0
            committed = False
            self._saw([bar])
            self.store.mark({bar.symbol: bar.close})
            for record, done in self.store.open_orders_of(bar.symbol, bar.id):
                if committed:  # an earlier fill on this bar may have changed or closed it (OCO)
                    current = self.store.open_order(record["id"])
                    if current is None:
                        continue
                    record = current
                if record["status"] == "held":
                    continue
                not_before = render.parse_timestamp(record["not_before"])
                if bar.time < not_before or (record["strict"] and bar.time == not_before):
                    continue
                if self._expired(record, bar):
                    change = self.store.change()
                    self._close(record, "expired", change)
                    self._commit(change)
                    committed = True
                    continue
                fill_id = f"{record['id']}:{bar.id}"
                if done is not None:  # applied already: this bar was delivered again
                    budget -= done
                    continue
                buy = record["side"] == "buy"
                result = match(order_type=record["type"], buy=buy, limit=_opt(record, "limit_price"),
                               stop=_opt(record, "stop_price"), triggered=record["triggered"], bar=bar,
                               slippage_bps=self.settings.slippage_bps)
                if result.triggered and not record["triggered"]:
                    record["triggered"] = True
                    if result.price is None:
                        self.store.save_order(record)
                if result.price is None:
                    continue
                quantity = self._fill_quantity(record, budget)
                if quantity <= 0:
                    continue
                if record.get("unpriced"):  # placed before it could be valued: checked now
                    if not self._fits_at(record, result.price):
                        self._reject(record, result.price)
                        committed = True
                        continue
                    record["unpriced"] = False
                budget -= quantity
                self._fill(record, fill_id, quantity, result.price, bar)
                committed = True
                applied += 1
            return applied

    def _expired(self, record: dict[str, Any], bar: Bar) -> bool:
        if record["time_in_force"] != "day":
            return False
        since = render.parse_timestamp(record["not_before"])
        return bar.time.astimezone(render.NEW_YORK).date() > since.astimezone(render.NEW_YORK).date()

    def _fill_quantity(self, record: dict[str, Any], budget: Decimal) -> Decimal:
        remaining = Decimal(record["qty"]) - Decimal(record["filled_qty"])
        quantity = min(remaining, budget)
        fraction = self.partial_fraction()
        if fraction is not None and remaining > 1:
            quantity = min(quantity, max(remaining * fraction, Decimal(1)))
        whole = remaining == remaining.to_integral_value()
        return quantity.to_integral_value(rounding=ROUND_FLOOR) if whole else quantity

    def _fill(self, record: dict[str, Any], fill_id: str, quantity: Decimal, price: Decimal,
              bar: Bar) -> None:
        now = self.clock.now()
        stamp = render.timestamp(now)
        buy = record["side"] == "buy"
        old_filled = Decimal(record["filled_qty"])
        old_avg = _opt(record, "filled_avg_price") or Decimal(0)
        filled = old_filled + quantity
        avg = ((old_avg * old_filled + price * quantity) / filled).quantize(_AVG_QUANTUM)
        complete = filled >= Decimal(record["qty"])
        record.update(filled_qty=render.num(filled), filled_avg_price=render.num(avg), updated_at=stamp,
                      status="filled" if complete else "partially_filled")
        if complete:
            record["filled_at"] = stamp
        fee = quantity * self.settings.commission_per_share
        positions = self.store.positions()
        qty, avg_entry = positions.get(record["symbol"], (Decimal(0), Decimal(0)))
        delta = quantity if buy else -quantity
        new_qty = qty + delta
        if new_qty == 0:
            new_avg = Decimal(0)
        elif qty == 0 or (qty > 0) == (delta > 0):
            new_avg = ((abs(qty) * avg_entry + quantity * price) / abs(new_qty)).quantize(_AVG_QUANTUM)
        elif (qty > 0) != (new_qty > 0):
            new_avg = price  # the position flipped side
        else:
            new_avg = avg_entry
        cash_delta = -(quantity * price) - fee if buy else quantity * price - fee
        execution_id = str(uuid.uuid5(uuid.NAMESPACE_URL, fill_id))
        change = self.store.change()
        change.orders[record["id"]] = record
        if not complete:
            self._shrink_group(record, change)
        change.events.append({
            **self._event("fill" if complete else "partial_fill", record, now),
            "execution_id": execution_id, "price": render.num(price), "qty": render.num(quantity),
            "position_qty": render.num(new_qty),
        })
        if complete:
            self._after_fill(record, bar, change)
        change.position = (record["symbol"], new_qty, new_avg)
        change.cash = self.store.cash() + cash_delta
        change.fill = {
            "fill_id": fill_id, "execution_id": execution_id, "order_id": record["id"],
            "client_order_id": record["client_order_id"], "symbol": record["symbol"],
            "side": record["side"], "qty": render.num(quantity) or "0", "price": render.num(price) or "0",
            "fee": render.num(fee) or "0", "bar_id": bar.id, "time": stamp or ""}
        self._commit(change)
        log.info("order.fill", order_id=record["id"], client_order_id=record["client_order_id"],
                 qty=render.num(quantity), price=render.num(price), status=record["status"], bar_id=bar.id)

    def _oco_group(self, record: dict[str, Any]) -> list[str]:
        """The ids of the other orders of ``record``'s OCO group: a bracket or OTO leg's sibling
        legs; an oco order's take-profit (the parent) and stop-loss leg. Empty for an entry."""
        if record["order_class"] == "oco":
            root = self.store.load(record["parent_id"]) if record["parent_id"] else record
            members = [] if root is None else [root["id"], *root["legs"]]
        elif record["parent_id"]:
            members = list((self.store.load(record["parent_id"]) or {}).get("legs", []))
        else:
            members = []
        return [member for member in members if member != record["id"]]

    def _after_fill(self, record: dict[str, Any], bar: Bar, change: Change) -> None:
        """A filled parent activates its held legs; a filled member of an OCO group cancels the
        rest of it."""
        for leg_id in record["legs"]:
            leg = self.store.load(leg_id)
            if leg is not None and leg["status"] == "held":
                leg.update(status="new", not_before=render.timestamp(bar.time), strict=True,
                           updated_at=render.timestamp(self.clock.now()))
                change.orders[leg_id] = leg
                change.events.append(self._event("new", leg, self.clock.now()))
        for other_id in self._oco_group(record):
            other = self.store.load(other_id)
            if other is not None and other["status"] in OPEN_STATUSES:
                self._close(other, "canceled", change)

    def _shrink_group(self, record: dict[str, Any], change: Change) -> None:
        """A partly filled member of an OCO group (an oco's pair, a bracket's two exit legs)
        leaves each other open member only what it has left to trade, so the two never sell more
        than the position together. Alpaca documents this for a bracket's take-profit ("the
        stop-loss order will be adjusted to the remaining quantity") and says an oco's orders work
        as a bracket's legs do; it names no trade update for it, so none is sent: the order keeps
        its id, its ``qty`` shrinks and ``updated_at`` moves. An entry is in no group."""
        left = bp.remaining(record)
        for other_id in self._oco_group(record):
            other = self.store.load(other_id)
            if other is None or other["status"] not in OPEN_STATUSES or bp.remaining(other) <= left:
                continue
            other.update(qty=render.num(Decimal(other["filled_qty"]) + left),
                         updated_at=render.timestamp(self.clock.now()))
            change.orders[other_id] = other

    def _close(self, record: dict[str, Any], status: str, change: Change) -> None:
        now = self.clock.now()
        stamp = render.timestamp(now)
        record.update(status=status, updated_at=stamp)
        record["canceled_at" if status == "canceled" else "expired_at"] = stamp
        change.orders[record["id"]] = record
        change.events.append(self._event(status, record, now))

    def _reject(self, record: dict[str, Any], price: Decimal) -> None:
        """Reject an order that turned out, at its first fill's price, not to fit the buying power
        (its held legs are canceled with it)."""
        now = self.clock.now()
        stamp = render.timestamp(now)
        record.update(status="rejected", failed_at=stamp, updated_at=stamp, unpriced=False)
        change = self.store.change()
        change.orders[record["id"]] = record
        change.events.append(self._event("rejected", record, now))
        for leg_id in record["legs"]:
            leg = self.store.load(leg_id)
            if leg is not None and leg["status"] in OPEN_STATUSES:
                self._close(leg, "canceled", change)
        self._commit(change)
        log.warning("order.rejected", order_id=record["id"], client_order_id=record["client_order_id"],
                    symbol=record["symbol"], side=record["side"], qty=record["qty"], price=render.num(price),
                    reason="insufficient buying power at its first price")

    # -- helpers ------------------------------------------------------------------------------

    def _commit(self, change: Change) -> None:
        self.store.commit(change)
        if change.events:
            self.publish(change.events)

    def _event(self, name: str, record: dict[str, Any], now: datetime) -> dict[str, Any]:
        return {"event": name, "timestamp": render.timestamp(now), "order": self._render(record)}

    def _render(self, record: dict[str, Any], *, nested: bool = True) -> dict[str, Any]:
        legs = None
        if record["legs"] and nested:
            legs = []
            for leg_id in record["legs"]:
                leg = self.store.load(leg_id)
                if leg is not None:
                    legs.append(render.order(leg, None))
        return render.order(record, legs)
