"""The paper exchange's book: orders, positions, cash and fills, kept in Redis.

Guarantees:

* **Durable before visible.** Every change (an order accepted, a fill, a cancel) is one MULTI/EXEC
  that writes the order, the position, the cash, the fill record and the trade update together;
  the reply or the websocket event goes out only after EXEC. A restart loses nothing it answered.
* **A fill is applied once.** A fill's id is ``<order id>:<bar message id>``; it is recorded in
  the same transaction as its effect, and a bar delivered again (the bus is at-least-once) finds
  it recorded and changes nothing. Restarting the exchange never replays a fill.
* **No look-ahead.** An order only trades on bars whose start is at or after its acceptance (a
  bracket leg: strictly after the bar that filled its parent). See :mod:`._matching`.

Left to the caller: **one exchange process per key prefix.** This class serialises its own
threads with a lock and reads state fresh from Redis inside it, but two processes on one prefix
would race. The redelivery case, as a timeline::

    time 0   bar B (id b1) arrives; order O fills 10 @ 100: MULTI writes O, position, cash,
             applied["O:b1"]=10, fill, trade update; EXEC
    time 1   the exchange is SIGKILLed before the bus acknowledges B
    time 2   restarted, it receives B again: "O:b1" is recorded, so O is skipped (its 10 shares
             still count against B's volume); nothing is filled twice
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import redis

from services.paper_exchange import _render as render
from services.paper_exchange._matching import match
from services.paper_exchange._requests import ApiError, invalid, parse_legs, parse_order
from shared.clock import Clock
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Bar

__all__ = ["ApiError", "Exchange", "credentials"]

log = get_logger(component="paper_exchange")

OPEN_STATUSES = frozenset({"new", "partially_filled", "held", "accepted", "pending_new"})
_AVG_QUANTUM = Decimal("0.000001")


def credentials(client: redis.Redis, keys: Keys, settings: PaperExchangeSettings) -> tuple[str, str]:
    """The key pair the exchange accepts: configured, else generated once and kept in Redis."""
    if settings.api_key is not None and settings.secret_key is not None:
        return settings.api_key.get_secret_value(), settings.secret_key.get_secret_value()
    key = keys.paper("credentials")
    client.hsetnx(key, "key_id", "PK" + secrets.token_hex(8).upper())
    client.hsetnx(key, "secret_key", secrets.token_urlsafe(30))
    stored = client.hmget(key, ["key_id", "secret_key"])
    return stored[0].decode(), stored[1].decode()  # type: ignore[union-attr]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt(record: dict[str, Any], name: str) -> Decimal | None:
    value = record.get(name)
    return None if value is None else Decimal(value)


@dataclass
class _Change:
    """Everything one transaction writes, and the trade updates to send once it committed."""

    orders: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]


class Exchange:
    """The book. Thread-safe; every public method reads Redis fresh under one lock."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: PaperExchangeSettings, clock: Clock,
                 publish: Callable[[list[dict[str, Any]]], None] = lambda events: None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.publish = publish
        self.partial_fraction: Callable[[], Decimal | None] = lambda: None
        self._lock = threading.RLock()
        self._hidden: dict[str, int] = {}  # order id -> look-ups left that answer "not found"
        self._staged: dict[str, dict[str, Any]] = {}  # records of the change being built, not yet written
        self._k = {name: keys.paper(name) for name in (
            "account", "orders", "client-ids", "open", "seq", "positions", "prices", "applied", "fills",
            "events")}
        self._init_account()

    @contextmanager
    def _op(self) -> Iterator[None]:
        """One public operation: under the lock; a change left unwritten by an error is dropped."""
        with self._lock:
            try:
                yield
            finally:
                self._staged = {}

    # -- account ------------------------------------------------------------------------------

    def _init_account(self) -> None:
        key = self._k["account"]
        self.client.hsetnx(key, "id", str(uuid.uuid4()))
        self.client.hsetnx(key, "account_number", "PA" + secrets.token_hex(5).upper())
        self.client.hsetnx(key, "cash", render.num(self.settings.starting_cash) or "0")
        self.client.hsetnx(key, "created_at", render.timestamp(self.clock.now()) or "")

    def account(self) -> dict[str, Any]:
        """Alpaca's Account object."""
        with self._op():
            raw = {_text(k): _text(v) for k, v in self.client.hgetall(self._k["account"]).items()}
            cash = Decimal(raw["cash"])
            positions = self._positions()
            prices = self._prices()
            long_value = short_value = Decimal(0)
            for symbol, (qty, avg) in positions.items():
                value = qty * prices.get(symbol, avg)
                if qty > 0:
                    long_value += value
                else:
                    short_value += value
            equity = cash + long_value + short_value
            buying_power = max(cash - self._reserved_cash(), Decimal(0))
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
            cid = parent["client_order_id"]
            if self.client.hexists(self._k["client-ids"], cid):
                raise invalid("client_order_id must be unique")
            self._check_buying_power(parent)
            legs = parse_legs(body, parent, now)
            parent["legs"] = [leg["id"] for leg in legs]
            change = self._change()
            for record in (parent, *legs):
                record["seq"] = int(self.client.incr(self._k["seq"]))
                change.orders[record["id"]] = record
            change.events.append(self._event("new", parent, now))
            self._commit(change, new_client_ids={parent["client_order_id"]: parent["id"],
                                                 **{leg["client_order_id"]: leg["id"] for leg in legs}})
            if hide_lookups:
                self._hidden[parent["id"]] = hide_lookups
            log.info("order.accepted", order_id=parent["id"], client_order_id=cid, symbol=parent["symbol"],
                     side=parent["side"], qty=parent["qty"], type=parent["type"])
            return self._render(parent)

    def _check_buying_power(self, record: dict[str, Any]) -> None:
        qty = Decimal(record["qty"])
        if record["side"] == "sell":
            if self.settings.allow_short:
                return
            held = self._positions().get(record["symbol"], (Decimal(0), Decimal(0)))[0]
            available = held - self._held_for_sells(record["symbol"])
            if qty > available:
                raise ApiError(403, 40310000, "insufficient qty available for order (requested: "
                                              f"{render.num(qty)}, available: {render.num(available)})")
            return
        price = self._estimate(record)
        if price is None:
            return  # no price seen yet for the symbol: nothing to estimate with
        cost = qty * price + qty * self.settings.commission_per_share
        cash = Decimal(self.client.hget(self._k["account"], "cash").decode())  # type: ignore[union-attr]
        available = cash - self._reserved_cash()
        if cost > available:
            raise ApiError(403, 40310000, f"insufficient buying power (needed: {render.num(cost)}, "
                                          f"available: {render.num(available)})")

    def _estimate(self, record: dict[str, Any]) -> Decimal | None:
        limit, stop = _opt(record, "limit_price"), _opt(record, "stop_price")
        last = self._prices().get(record["symbol"])
        price = limit if limit is not None else stop if stop is not None else last
        if price is None:
            return None
        return price * (1 + self.settings.slippage_bps / 10000)

    def _reserved_cash(self) -> Decimal:
        total = Decimal(0)
        for record in self._open_orders():
            if record["side"] == "buy" and record["status"] != "held":
                price = self._estimate(record)
                if price is not None:
                    total += (Decimal(record["qty"]) - Decimal(record["filled_qty"])) * price
        return total

    def _held_for_sells(self, symbol: str) -> Decimal:
        held: dict[str, Decimal] = {}  # one amount per OCO group (a bracket's two legs hold it once)
        for record in self._open_orders():
            if record["symbol"] == symbol and record["side"] == "sell" and record["status"] != "held":
                group = record["parent_id"] or record["id"]
                remaining = Decimal(record["qty"]) - Decimal(record["filled_qty"])
                held[group] = max(held.get(group, Decimal(0)), remaining)
        return sum(held.values(), Decimal(0))

    def get(self, order_id: str) -> dict[str, Any]:
        """An order by id (404 if unknown, or hidden by a fault)."""
        with self._op():
            record = self._load(order_id)
            if record is None or self._hide(order_id):
                raise ApiError(404, 40410000, "order not found")
            return self._render(record)

    def get_by_client_id(self, client_order_id: str) -> dict[str, Any]:
        """An order by client_order_id."""
        with self._op():
            raw = self.client.hget(self._k["client-ids"], client_order_id)
            if raw is None:
                raise ApiError(404, 40410000, "order not found")
            return self.get(_text(raw))

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
            records = [json.loads(v) for v in self.client.hvals(self._k["orders"])]
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
            record = self._load(order_id)
            if record is None:
                raise ApiError(404, 40410000, "order not found")
            if record["status"] not in OPEN_STATUSES:
                raise ApiError(422, 42210000, f"order is not cancelable (status {record['status']})")
            change = self._change()
            self._close(record, "canceled", change)
            parent = self._load(record["parent_id"]) if record["parent_id"] else None
            for other_id in [*record["legs"], *(parent or {}).get("legs", [])]:
                other = self._load(other_id)
                if other is not None and other["status"] in OPEN_STATUSES:
                    self._close(other, "canceled", change)
            self._commit(change)
            return list(change.orders)

    def cancel_all(self) -> list[dict[str, Any]]:
        """Cancel every open order; one ``{"id", "status"}`` per order canceled."""
        with self._op():
            results: list[dict[str, Any]] = []
            for record in self._open_orders():
                current = self._load(record["id"])
                if current is not None and current["status"] in OPEN_STATUSES:
                    results.extend({"id": closed, "status": 200} for closed in self.cancel(record["id"]))
            return results

    # -- positions ----------------------------------------------------------------------------

    def positions(self) -> list[dict[str, Any]]:
        """Every open position, as Alpaca renders them."""
        with self._op():
            prices = self._prices()
            return [render.position(symbol, qty, avg, prices.get(symbol))
                    for symbol, (qty, avg) in sorted(self._positions().items())]

    def position(self, symbol: str) -> dict[str, Any]:
        """One open position; 404 when flat."""
        with self._op():
            held = self._positions().get(symbol)
            if held is None:
                raise ApiError(404, 40410000, "position does not exist")
            return render.position(symbol, held[0], held[1], self._prices().get(symbol))

    def known_symbols(self) -> list[str]:
        """Symbols with a price, a position or an order (for GET /v2/assets)."""
        with self._op():
            names = set(self._prices()) | set(self._positions())
            names |= {json.loads(v)["symbol"] for v in self.client.hvals(self._k["orders"])}
            return sorted(names)

    # -- market data --------------------------------------------------------------------------

    def on_bar(self, bar: Bar) -> int:
        """Trade open orders of ``bar.symbol`` against it; return the number of fills applied."""
        with self._op():
            self.client.hset(self._k["prices"], bar.symbol, render.num(bar.close) or "0")
            budget = bar.volume * self.settings.max_volume_fraction
            applied = 0
            for record in self._open_orders():
                if record["symbol"] != bar.symbol or record["status"] == "held":
                    continue
                record = self._load(record["id"]) or record  # an earlier fill may have closed it
                if record["status"] not in OPEN_STATUSES or record["status"] == "held":
                    continue
                not_before = datetime.fromisoformat(record["not_before"].replace("Z", "+00:00"))
                if bar.time < not_before or (record["strict"] and bar.time == not_before):
                    continue
                if self._expired(record, bar):
                    change = self._change()
                    self._close(record, "expired", change)
                    self._commit(change)
                    continue
                fill_id = f"{record['id']}:{bar.id}"
                done = self.client.hget(self._k["applied"], fill_id)
                if done is not None:
                    budget -= Decimal(_text(done))
                    continue
                buy = record["side"] == "buy"
                result = match(order_type=record["type"], buy=buy, limit=_opt(record, "limit_price"),
                               stop=_opt(record, "stop_price"), triggered=record["triggered"], bar=bar,
                               slippage_bps=self.settings.slippage_bps)
                if result.triggered and not record["triggered"]:
                    record["triggered"] = True
                    if result.price is None:
                        self.client.hset(self._k["orders"], record["id"], json.dumps(record))
                if result.price is None:
                    continue
                quantity = self._fill_quantity(record, budget)
                if quantity <= 0:
                    continue
                budget -= quantity
                self._fill(record, fill_id, quantity, result.price, bar)
                applied += 1
            return applied

    def _expired(self, record: dict[str, Any], bar: Bar) -> bool:
        if record["time_in_force"] != "day":
            return False
        created = datetime.fromisoformat(record["created_at"].replace("Z", "+00:00"))
        return bar.time.astimezone(render.NEW_YORK).date() > created.astimezone(render.NEW_YORK).date()

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
        positions = self._positions()
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
        change = self._change()
        change.orders[record["id"]] = record
        change.events.append({
            **self._event("fill" if complete else "partial_fill", record, now),
            "execution_id": execution_id, "price": render.num(price), "qty": render.num(quantity),
            "position_qty": render.num(new_qty),
        })
        if complete:
            self._after_fill(record, bar, change)
        with self.client.pipeline(transaction=True) as pipe:
            if new_qty == 0:
                pipe.hdel(self._k["positions"], record["symbol"])
            else:
                pipe.hset(self._k["positions"], record["symbol"],
                          json.dumps({"qty": render.num(new_qty), "avg": render.num(new_avg)}))
            pipe.hset(self._k["account"], "cash", render.num(self._cash() + cash_delta) or "0")
            pipe.hset(self._k["applied"], fill_id, render.num(quantity) or "0")
            pipe.xadd(self._k["fills"], {
                "fill_id": fill_id, "execution_id": execution_id, "order_id": record["id"],
                "client_order_id": record["client_order_id"], "symbol": record["symbol"],
                "side": record["side"], "qty": render.num(quantity) or "0", "price": render.num(price) or "0",
                "fee": render.num(fee) or "0", "bar_id": bar.id, "time": stamp or ""})
            self._write(pipe, change)
            pipe.execute()
        self._staged = {}
        log.info("order.fill", order_id=record["id"], client_order_id=record["client_order_id"],
                 qty=render.num(quantity), price=render.num(price), status=record["status"], bar_id=bar.id)
        self._publish(change)

    def _after_fill(self, record: dict[str, Any], bar: Bar, change: _Change) -> None:
        """A filled parent activates its legs; a filled leg cancels its sibling (OCO)."""
        for leg_id in record["legs"]:
            leg = self._load(leg_id)
            if leg is not None and leg["status"] == "held":
                leg.update(status="new", not_before=render.timestamp(bar.time), strict=True,
                           updated_at=render.timestamp(self.clock.now()))
                change.orders[leg_id] = leg
                change.events.append(self._event("new", leg, self.clock.now()))
        if record["parent_id"]:
            parent = self._load(record["parent_id"])
            for sibling_id in (parent or {}).get("legs", []):
                sibling = self._load(sibling_id) if sibling_id != record["id"] else None
                if sibling is not None and sibling["status"] in OPEN_STATUSES:
                    self._close(sibling, "canceled", change)

    def _close(self, record: dict[str, Any], status: str, change: _Change) -> None:
        now = self.clock.now()
        stamp = render.timestamp(now)
        record.update(status=status, updated_at=stamp)
        record["canceled_at" if status == "canceled" else "expired_at"] = stamp
        change.orders[record["id"]] = record
        change.events.append(self._event(status, record, now))

    # -- storage ------------------------------------------------------------------------------

    def _commit(self, change: _Change, new_client_ids: dict[str, str] | None = None) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            if new_client_ids:
                pipe.hset(self._k["client-ids"], mapping=new_client_ids)  # type: ignore[arg-type]
            self._write(pipe, change)
            pipe.execute()
        self._staged = {}
        self._publish(change)

    def _write(self, pipe: Any, change: _Change) -> None:
        for order_id, record in change.orders.items():
            pipe.hset(self._k["orders"], order_id, json.dumps(record))
            if record["status"] in OPEN_STATUSES:
                pipe.zadd(self._k["open"], {order_id: record["seq"]})
            else:
                pipe.zrem(self._k["open"], order_id)
        for event in change.events:
            pipe.xadd(self._k["events"], {"event": json.dumps(event)}, maxlen=10_000, approximate=True)

    def _publish(self, change: _Change) -> None:
        if change.events:
            self.publish(change.events)

    def _event(self, name: str, record: dict[str, Any], now: datetime) -> dict[str, Any]:
        return {"event": name, "timestamp": render.timestamp(now), "order": self._render(record)}

    def _change(self) -> _Change:
        change = _Change(orders={}, events=[])
        self._staged = change.orders
        return change

    def _load(self, order_id: str) -> dict[str, Any] | None:
        if order_id in self._staged:
            return self._staged[order_id]
        raw = self.client.hget(self._k["orders"], order_id)
        return None if raw is None else dict(json.loads(raw))

    def _open_orders(self) -> list[dict[str, Any]]:
        ids = self.client.zrange(self._k["open"], 0, -1)
        if not ids:
            return []
        raws = self.client.hmget(self._k["orders"], list(ids))  # type: ignore[arg-type]
        return [json.loads(raw) for raw in raws if raw is not None]

    def _positions(self) -> dict[str, tuple[Decimal, Decimal]]:
        result = {}
        for symbol, raw in self.client.hgetall(self._k["positions"]).items():
            data = json.loads(raw)
            result[_text(symbol)] = (Decimal(data["qty"]), Decimal(data["avg"]))
        return result

    def _prices(self) -> dict[str, Decimal]:
        return {_text(k): Decimal(_text(v)) for k, v in self.client.hgetall(self._k["prices"]).items()}

    def _cash(self) -> Decimal:
        return Decimal(self.client.hget(self._k["account"], "cash").decode())  # type: ignore[union-attr]

    def _render(self, record: dict[str, Any], *, nested: bool = True) -> dict[str, Any]:
        legs = None
        if record["legs"] and nested:
            legs = []
            for leg_id in record["legs"]:
                leg = self._load(leg_id)
                if leg is not None:
                    legs.append(render.order(leg, None))
        return render.order(record, legs)
