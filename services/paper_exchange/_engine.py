"""What clients call on the paper exchange: account, orders, positions and assets.

Guarantees:

* **Durable before visible.** Every change (an order accepted, replaced or canceled, a position
  closed, a fill) is one MULTI/EXEC that writes the orders, the position, the cash, the fill
  record and the trade updates together; memory takes the change, and the reply or the websocket
  event goes out, only after EXEC. A restart reads the book back from Redis and loses nothing it
  answered.
* **Every order is checked** against the asset list (:mod:`._assets`) and the buying-power rule
  (:mod:`._buying_power`) before it is accepted; one that cannot be valued yet is either refused
  or checked at its first fill (``paper_exchange.unpriced_orders``, see :mod:`._book`).
* **Refusals are Alpaca's**: :class:`ApiError` with Alpaca's status and message; a refused
  request changes nothing.

The fill side (bars in, fills out) and what is left to the caller are in :mod:`._book`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import redis

import services.paper_exchange._buying_power as bp
import services.paper_exchange._render as render
from services.paper_exchange._assets import Assets
from services.paper_exchange._book import Book, log
from services.paper_exchange._requests import (
    ApiError,
    check_oco_stop,
    invalid,
    parse_close_qty,
    parse_legs,
    parse_order,
    parse_replace,
)
from services.paper_exchange._store import OPEN_STATUSES, credentials
from shared.clock import Clock
from shared.config import PaperExchangeSettings
from shared.keys import Keys

__all__ = ["ApiError", "Exchange", "credentials"]

_STAMPS = ("filled_at", "canceled_at", "expired_at", "failed_at", "replaced_at", "replaced_by", "replaces",
           "valued_at", "unpriced")


class Exchange(Book):
    """The book with its client API. Thread-safe: every public method runs under one lock.

    ``symbols`` are the ingester's; the exchange also trades ``settings.symbols`` and every symbol
    it has seen a bar for (see :mod:`._assets`)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: PaperExchangeSettings, clock: Clock,
                 publish: Callable[[list[dict[str, Any]]], None] = lambda events: None,
                 symbols: Iterable[str] = ()) -> None:
        super().__init__(client, keys, settings, clock, publish)
        self.assets = Assets([*symbols, *settings.symbols], self.store)
        self._hidden: dict[str, int] = {}  # order id -> look-ups left that answer "not found"

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
            buying_power = max(self._buying_power(), Decimal(0))
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
            self.assets.check_tradable(parent["symbol"])
            parent["not_before"] = render.timestamp(self.market_now())
            legs = parse_legs(body, parent, now)
            if parent["order_class"] == "oco":
                check_oco_stop(parent, legs, self._last_price(parent["symbol"]))
            if self.store.order_id_for(parent["client_order_id"]) is not None:
                raise invalid("client_order_id must be unique")
            self._check(parent)
            return self._accept(parent, legs, hide_lookups)

    def _accept(self, parent: dict[str, Any], legs: list[dict[str, Any]],
                hide_lookups: int) -> dict[str, Any]:
        """Write a checked order and its legs, send ``new`` for each not held (an oco's stop-loss
        leg works from the start: its own ``new``, after its take-profit's), and answer the order."""
        parent["legs"] = [leg["id"] for leg in legs]
        change = self.store.change()
        for record, seq in zip((parent, *legs), self.store.take_seqs(1 + len(legs)), strict=True):
            record["seq"] = seq
            change.orders[record["id"]] = record
        change.events.extend(self._event("new", record, self.clock.now())
                             for record in (parent, *legs) if record["status"] != "held")
        change.client_ids = {record["client_order_id"]: record["id"] for record in (parent, *legs)}
        self._commit(change)
        if hide_lookups:
            self._hidden[parent["id"]] = hide_lookups
        log.info("order.accepted", order_id=parent["id"], client_order_id=parent["client_order_id"],
                 symbol=parent["symbol"], side=parent["side"], qty=parent["qty"], type=parent["type"])
        return self._render(parent)

    def _check(self, record: dict[str, Any], *, besides: str | None = None) -> None:
        """Refuse what the buying-power rule refuses (403, as Alpaca), leaving out the open order
        ``besides`` (the one a replacement replaces). An order needing money that cannot be valued
        yet is refused or marked ``unpriced`` (checked at its first fill), as configured. An oco
        order only exits (Alpaca): any opening part is refused as a short sale is."""
        symbol = record["symbol"]
        last = self.store.prices().get(symbol)
        need = self._need(record, last, besides=besides)
        if need.cost is None:  # no bar seen here yet: the ingester's last close, if it has one
            last = self.store.ingested_price(symbol)
            need = self._need(record, last, besides=besides)
        short_sale = record["side"] == "sell" and not self.settings.allow_short
        exit_only = record["order_class"] == "oco" or short_sale
        if exit_only and need.opening > 0:
            requested = render.num(bp.remaining(record))
            raise ApiError(403, 40310000, f"insufficient qty available for order (requested: {requested}, "
                                          f"available: {render.num(need.free)})")
        if need.cost is None:
            if self.settings.unpriced_orders == "refuse":
                raise ApiError(403, 40310000, f"insufficient buying power: a market order for {symbol} "
                                              "cannot be valued before the exchange has a price for it "
                                              "(place a limit order, or wait for its first bar)")
            record["unpriced"] = True
            return
        if record["type"] == "market" and last is not None:
            record["valued_at"] = render.num(last)  # its reservation's price until the exchange has one
        available = self._buying_power(besides=besides)
        if need.cost > available:
            raise ApiError(403, 40310000, f"insufficient buying power (needed: {render.num(need.cost)}, "
                                          f"available: {render.num(available)})")

    def _last_price(self, symbol: str) -> Decimal | None:
        """The symbol's last close here, else the ingester's (None when neither has one)."""
        last = self.store.prices().get(symbol)
        return last if last is not None else self.store.ingested_price(symbol)

    def replace(self, order_id: str, body: dict[str, Any], *, hide_lookups: int = 0) -> dict[str, Any]:
        """PATCH /v2/orders/{order_id}: a new order with ``body``'s changes (qty, limit_price,
        stop_price, time_in_force, client_order_id) replaces an open one, which becomes
        ``replaced``. The new order trades the old one's unfilled quantity unless ``qty`` is given,
        keeps its place in a bracket, and is checked like a new order (without the old one's
        reservation). 404 if unknown, 422 if no longer open."""
        with self._op():
            old = self.store.load(order_id)
            if old is None:
                raise ApiError(404, 40410000, "order not found")
            if old["status"] not in OPEN_STATUSES:
                raise ApiError(422, 42210000, f"order is not replaceable (status {old['status']})")
            changes = parse_replace(body, old)
            changes.setdefault("client_order_id", str(uuid.uuid4()))
            if self.store.order_id_for(changes["client_order_id"]) is not None:
                raise invalid("client_order_id must be unique")
            now = self.clock.now()
            stamp = render.timestamp(now)
            new = {key: value for key, value in old.items() if key not in _STAMPS}
            new.update(id=str(uuid.uuid4()), qty=render.num(bp.remaining(old)), filled_qty="0",
                       filled_avg_price=None, status="held" if old["status"] == "held" else "new",
                       created_at=stamp, updated_at=stamp, triggered=False, replaces=old["id"],
                       legs=list(old["legs"]))
            new.update(changes)
            start = self.market_now()
            if start > render.parse_timestamp(old["not_before"]):
                new.update(not_before=render.timestamp(start), strict=False)
            if new["status"] != "held":
                self._check(new, besides=old["id"])
            old.update(status="replaced", replaced_by=new["id"], replaced_at=stamp, updated_at=stamp)
            (new["seq"],) = self.store.take_seqs(1)
            change = self.store.change()
            change.orders.update({old["id"]: old, new["id"]: new})
            change.client_ids = {new["client_order_id"]: new["id"]}
            parent = self.store.load(old["parent_id"]) if old["parent_id"] else None
            if parent is not None:  # the new leg takes the old one's place in its bracket
                parent["legs"] = [new["id"] if leg == old["id"] else leg for leg in parent["legs"]]
                change.orders[parent["id"]] = parent
            for leg_id in old["legs"]:  # the new entry takes the old one's legs
                leg = self.store.load(leg_id)
                if leg is not None:
                    leg["parent_id"] = new["id"]
                    change.orders[leg_id] = leg
            change.events.append(self._event("replaced", old, now))
            if new["status"] != "held":
                change.events.append(self._event("new", new, now))
            self._commit(change)
            if hide_lookups:
                self._hidden[new["id"]] = hide_lookups
            log.info("order.replaced", order_id=old["id"], replaced_by=new["id"],
                     client_order_id=new["client_order_id"], qty=new["qty"])
            return self._render(new)

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
        """Cancel an open order with its legs and the rest of its OCO group (a bracket leg's
        sibling; an oco's take-profit and stop-loss leg); return the ids canceled.

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
            for other_id in dict.fromkeys([*record["legs"], *self._oco_group(record)]):
                other = self.store.load(other_id)  # closed already if it was met before
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

    def _held(self, name: str) -> tuple[str, Decimal, Decimal]:
        """The open position named by a symbol or an asset id; 404 when flat."""
        symbol = self.assets.find(name)
        held = None if symbol is None else self.store.positions().get(symbol)
        if symbol is None or held is None:
            raise ApiError(404, 40410000, "position does not exist")
        return symbol, held[0], held[1]

    def position(self, name: str) -> dict[str, Any]:
        """One open position, by symbol or asset id; 404 when flat."""
        with self._op():
            symbol, qty, avg = self._held(name)
            return render.position(symbol, qty, avg, self.store.prices().get(symbol))

    def close_position(self, name: str, query: dict[str, str], *, hide_lookups: int = 0) -> dict[str, Any]:
        """DELETE /v2/positions/{symbol_or_asset_id}: a market day order closing the position, all
        of it or ``qty`` / ``percentage`` of it. Never opens the other side: 403 when the quantity
        exceeds the shares not already held for open closing orders (as Alpaca)."""
        with self._op():
            symbol, held, _ = self._held(name)
            qty = parse_close_qty(query, held)
            side = "sell" if held > 0 else "buy"
            free = bp.free_to_close(held, self._open_of(symbol), side)
            if qty > free:
                raise ApiError(403, 40310000, f"insufficient qty available for order (requested: "
                                              f"{render.num(qty)}, available: {render.num(free)})")
            record = parse_order({"symbol": symbol, "qty": render.num(qty), "side": side, "type": "market",
                                  "time_in_force": "day"}, self.clock.now())
            record["not_before"] = render.timestamp(self.market_now())
            self._check(record)
            return self._accept(record, [], hide_lookups)

    def close_all_positions(self, cancel_orders: bool) -> list[dict[str, Any]]:
        """DELETE /v2/positions: close every position (canceling every open order first when
        ``cancel_orders``); one ``{"symbol", "status", "body"}`` per position, ``body`` the closing
        order or the refusal."""
        with self._op():
            if cancel_orders:
                self.cancel_all()
            results: list[dict[str, Any]] = []
            for symbol, (held, _) in sorted(self.store.positions().items()):
                try:
                    results.append({"symbol": symbol, "status": 200, "body": self.close_position(symbol, {})})
                except ApiError as exc:
                    free = bp.free_to_close(held, self._open_of(symbol), "sell" if held > 0 else "buy")
                    results.append({"symbol": symbol, "status": exc.status, "body": {
                        "code": exc.code, "message": exc.message, "symbol": symbol,
                        "available": render.num(free), "existing_qty": render.num(abs(held)),
                        "held_for_orders": render.num(abs(held) - free)}})
            return results

    # -- assets -------------------------------------------------------------------------------

    def asset(self, name: str) -> dict[str, Any]:
        """GET /v2/assets/{symbol_or_asset_id}; 404 ``asset not found`` for one not traded here."""
        with self._op():
            return render.asset(self.assets.get(name), self.settings.allow_short)

    def asset_list(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """GET /v2/assets (see :meth:`._assets.Assets.listing`)."""
        with self._op():
            return self.assets.listing(query, self.settings.allow_short)
