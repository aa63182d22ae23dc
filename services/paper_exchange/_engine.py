"""The paper exchange's book: orders, positions, cash and fills, held in memory and kept in Redis.

Guarantees:

* **Durable before visible.** Every change (an order accepted, a fill, a cancel) is one MULTI/EXEC
  that writes the order, the position, the cash, the fill record and the trade update together;
  memory takes the change, and the reply or the websocket event goes out, only after EXEC. A
  restart reads the book back from Redis and loses nothing it answered.
* **A fill is applied once.** A fill's id is ``<order id>:<bar message id>``; it is recorded in
  the same transaction as its effect, and a bar delivered again (the bus is at-least-once) finds
  it recorded and changes nothing. Restarting the exchange never replays a fill.
* **No look-ahead.** An order only trades on bars whose start is at or after its acceptance (a
  bracket leg: strictly after the bar that filled its parent). See :mod:`._matching`.

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

from services.paper_exchange import _render as render
from services.paper_exchange._matching import match
from services.paper_exchange._requests import ApiError, invalid, parse_legs, parse_order
from services.paper_exchange._store import OPEN_STATUSES, PRICES_EVERY_S, Change, Store, credentials
from shared.clock import Clock
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Bar

__all__ = ["ApiError", "Exchange", "credentials"]

log = get_logger(component="paper_exchange")

_AVG_QUANTUM = Decimal("0.000001")


def _opt(record: dict[str, Any], name: str) -> Decimal | None:
    value = record.get(name)
    return None if value is None else Decimal(value)


class Exchange:
    """The book. Thread-safe: every public method runs under one lock."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: PaperExchangeSettings, clock: Clock,
                 publish: Callable[[list[dict[str, Any]]], None] = lambda events: None) -> None:
        self.store = Store(client, keys)
        self.settings = settings
        self.clock = clock
        self.publish = publish
        self.partial_fraction: Callable[[], Decimal | None] = lambda: None
        self._lock = threading.RLock()
        self._hidden: dict[str, int] = {}  # order id -> look-ups left that answer "not found"
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

    # -- account ------------------------------------------------------------------------------

    def account(self) -> dict[str, Any]:
        """Alpaca's Account object."""
        with self._op():
            raw = self.store.account_fields()
            cash = Decimal(raw["cash"])
            positions = self.store.positions()
            prices = self.store.prices()
            long_value = short_value = Decimal(0)
            for symbol, (qty, avg) in positions.items():
                value = qty * prices.get(symbol, avg)
                if qty > 0:
                    long_value += value
                else:
                    short_value += value
            equity = cash + long_value + short_value
            buying_power = max(cash - self._reserved_cash(self.store.open_orders(), prices), Decimal(0))
            money = {name: render.num(value) for name, value in (
                ("cash", cash), ("buying_power", buying_power), ("regt_buying_power", buying_power),
                ("daytrading_buying_power", buying_power), ("non_marginable_buying_power", buying_power),
                ("equity", equity), ("last_equity", equity), ("portfolio_value", equity),
                ("long_market_value", long_value), ("short_market_value", short_value))}
            return {
                "id": raw["id"], "account_number": raw["account_number"], "status": "ACTIVE",
                "crypto_status": "INACTIVE", "currency": "USD", **money,
                "accrued_fees": "0", "pending_transfer_out": "0", "pending_transfer_in": "0",
                "pattern_day_trader": False, "trading_blocked": False, "transfers_blocked": False,
                "account_blocked": False, "created_at": raw["created_at"], "trade_suspended_by_user": False,
                "multiplier": "1", "shorting_enabled": self.settings.allow_short,
                "initial_margin": "0", "maintenance_margin": "0", "last_maintenance_margin": "0",
                "sma": "0", "daytrade_count": 0,
            }

    # -- orders -------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], *, hide_lookups: int = 0) -> dict[str, Any]:
        """Validate and accept an order (with its legs); raise ApiError as Alpaca would."""
        with self._op():
            now = self.clock.now()
            parent = parse_order(body, now)
            parent["not_before"] = render.timestamp(self.market_now())
            cid = parent["client_order_id"]
            legs = parse_legs(body, parent, now)
            if self.store.order_id_for(cid) is not None:
                raise invalid("client_order_id must be unique")
            self._check_buying_power(parent)
            parent["legs"] = [leg["id"] for leg in legs]
            change = self.store.change()
            for record, seq in zip((parent, *legs), self.store.take_seqs(1 + len(legs)), strict=True):
                record["seq"] = seq
                change.orders[record["id"]] = record
            change.events.append(self._event("new", parent, now))
            change.client_ids = {record["client_order_id"]: record["id"] for record in (parent, *legs)}
            self._commit(change)
            if hide_lookups:
                self._hidden[parent["id"]] = hide_lookups
            log.info("order.accepted", order_id=parent["id"], client_order_id=cid, symbol=parent["symbol"],
                     side=parent["side"], qty=parent["qty"], type=parent["type"])
            return self._render(parent)

    def _check_buying_power(self, record: dict[str, Any]) -> None:
        qty = Decimal(record["qty"])
        open_orders = self.store.open_orders()
        if record["side"] == "sell":
            if self.settings.allow_short:
                return
            held = self.store.positions().get(record["symbol"], (Decimal(0), Decimal(0)))[0]
            available = held - self._held_for_sells(record["symbol"], open_orders)
            if qty > available:
                raise ApiError(403, 40310000, "insufficient qty available for order (requested: "
                                              f"{render.num(qty)}, available: {render.num(available)})")
            return
        prices = self.store.prices()
        price = self._estimate(record, prices)
        if price is None:
            return  # no price seen yet for the symbol: nothing to estimate with
        cost = qty * price + qty * self.settings.commission_per_share
        available = self.store.cash() - self._reserved_cash(open_orders, prices)
        if cost > available:
            raise ApiError(403, 40310000, f"insufficient buying power (needed: {render.num(cost)}, "
                                          f"available: {render.num(available)})")

    def _estimate(self, record: dict[str, Any], prices: dict[str, Decimal]) -> Decimal | None:
        limit, stop = _opt(record, "limit_price"), _opt(record, "stop_price")
        last = prices.get(record["symbol"])
        price = limit if limit is not None else stop if stop is not None else last
        if price is None:
            return None
        return price * (1 + self.settings.slippage_bps / 10000)

    def _reserved_cash(self, open_orders: list[dict[str, Any]], prices: dict[str, Decimal]) -> Decimal:
        total = Decimal(0)
        for record in open_orders:
            if record["side"] == "buy" and record["status"] != "held":
                price = self._estimate(record, prices)
                if price is not None:
                    total += (Decimal(record["qty"]) - Decimal(record["filled_qty"])) * price
        return total

    def _held_for_sells(self, symbol: str, open_orders: list[dict[str, Any]]) -> Decimal:
        held: dict[str, Decimal] = {}  # one amount per OCO group (a bracket's two legs hold it once)
        for record in open_orders:
            if record["symbol"] == symbol and record["side"] == "sell" and record["status"] != "held":
                group = record["parent_id"] or record["id"]
                remaining = Decimal(record["qty"]) - Decimal(record["filled_qty"])
                held[group] = max(held.get(group, Decimal(0)), remaining)
        return sum(held.values(), Decimal(0))

    def get(self, order_id: str) -> dict[str, Any]:
        """An order by id (404 if unknown, or hidden by a fault)."""
        with self._op():
            record = self.store.load(order_id)
            if record is None or self._hide(order_id):
                raise ApiError(404, 40410000, "order not found")
            return self._render(record)

    def get_by_client_id(self, client_order_id: str) -> dict[str, Any]:
        """An order by client_order_id."""
        with self._op():
            order_id = self.store.order_id_for(client_order_id)
            if order_id is None:
                raise ApiError(404, 40410000, "order not found")
            return self.get(order_id)

    def _hide(self, order_id: str) -> bool:
        left = self._hidden.get(order_id, 0)
        if left <= 0:
            return False
        self._hidden[order_id] = left - 1
        return True

    def list_orders(self, status: str = "open", limit: int = 50, direction: str = "desc",
                    nested: bool = False, symbols: set[str] | None = None) -> list[dict[str, Any]]:
        """Orders filtered as GET /v2/orders does (status open/closed/all)."""
        with self._op():
            records = self.store.open_orders() if status == "open" else self.store.all_orders()
            chosen = []
            for record in records:
                is_open = record["status"] in OPEN_STATUSES
                if (status == "open" and not is_open) or (status == "closed" and is_open):
                    continue
                if symbols and record["symbol"] not in symbols:
                    continue
                if nested and record["parent_id"]:
                    continue
                if self._hidden.get(record["id"], 0) > 0:
                    continue
                chosen.append(record)
            chosen.sort(key=lambda r: r["seq"], reverse=(direction != "asc"))
            return [self._render(r, nested=nested) for r in chosen[:limit]]

    def cancel(self, order_id: str) -> list[str]:
        """Cancel an open order with its legs (or its OCO sibling); return the ids canceled.

        404 if unknown, 422 if no longer cancelable.
        """
        with self._op():
            record = self.store.load(order_id)
            if record is None:
                raise ApiError(404, 40410000, "order not found")
            if record["status"] not in OPEN_STATUSES:
                raise ApiError(422, 42210000, f"order is not cancelable (status {record['status']})")
            change = self.store.change()
            self._close(record, "canceled", change)
            parent = self.store.load(record["parent_id"]) if record["parent_id"] else None
            for other_id in [*record["legs"], *(parent or {}).get("legs", [])]:
                other = self.store.load(other_id)
                if other is not None and other["status"] in OPEN_STATUSES:
                    self._close(other, "canceled", change)
            self._commit(change)
            return list(change.orders)

    def cancel_all(self) -> list[dict[str, Any]]:
        """Cancel every open order; one ``{"id", "status"}`` per order canceled."""
        with self._op():
            results: list[dict[str, Any]] = []
            for record in self.store.open_orders():
                if self.store.open_order(record["id"]) is not None:  # not closed as an earlier one's leg
                    results.extend({"id": closed, "status": 200} for closed in self.cancel(record["id"]))
            return results

    # -- positions ----------------------------------------------------------------------------

    def positions(self) -> list[dict[str, Any]]:
        """Every open position, as Alpaca renders them."""
        with self._op():
            prices = self.store.prices()
            return [render.position(symbol, qty, avg, prices.get(symbol))
                    for symbol, (qty, avg) in sorted(self.store.positions().items())]

    def position(self, symbol: str) -> dict[str, Any]:
        """One open position; 404 when flat."""
        with self._op():
            held = self.store.positions().get(symbol)
            if held is None:
                raise ApiError(404, 40410000, "position does not exist")
            return render.position(symbol, held[0], held[1], self.store.prices().get(symbol))

    def known_symbols(self) -> list[str]:
        """Symbols with a price, a position or an order (for GET /v2/assets)."""
        with self._op():
            names = set(self.store.prices()) | set(self.store.positions())
            names |= {record["symbol"] for record in self.store.all_orders()}
            return sorted(names)

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
                not_before = datetime.fromisoformat(record["not_before"].replace("Z", "+00:00"))
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
                budget -= quantity
                self._fill(record, fill_id, quantity, result.price, bar)
                committed = True
                applied += 1
            return applied

    def _expired(self, record: dict[str, Any], bar: Bar) -> bool:
        if record["time_in_force"] != "day":
            return False
        since = datetime.fromisoformat(record["not_before"].replace("Z", "+00:00"))
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

    def _after_fill(self, record: dict[str, Any], bar: Bar, change: Change) -> None:
        """A filled parent activates its legs; a filled leg cancels its sibling (OCO)."""
        for leg_id in record["legs"]:
            leg = self.store.load(leg_id)
            if leg is not None and leg["status"] == "held":
                leg.update(status="new", not_before=render.timestamp(bar.time), strict=True,
                           updated_at=render.timestamp(self.clock.now()))
                change.orders[leg_id] = leg
                change.events.append(self._event("new", leg, self.clock.now()))
        if record["parent_id"]:
            parent = self.store.load(record["parent_id"])
            for sibling_id in (parent or {}).get("legs", []):
                sibling = self.store.load(sibling_id) if sibling_id != record["id"] else None
                if sibling is not None and sibling["status"] in OPEN_STATUSES:
                    self._close(sibling, "canceled", change)

    def _close(self, record: dict[str, Any], status: str, change: Change) -> None:
        now = self.clock.now()
        stamp = render.timestamp(now)
        record.update(status=status, updated_at=stamp)
        record["canceled_at" if status == "canceled" else "expired_at"] = stamp
        change.orders[record["id"]] = record
        change.events.append(self._event(status, record, now))

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
