"""Alpaca's JSON (strings for every number) to Bastion's values, Decimal throughout.

Statuses: ``new accepted pending_new accepted_for_bidding held stopped suspended calculated
done_for_day`` are all an order the broker has and that may still trade: NEW. The rest map by
name. Trade-update events map the same way; an event with no status of its own (``restated``,
``order_cancel_rejected``...) takes the order's.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.brokers._types import Account, BrokerOrder, OrderRequest, Position
from shared.errors import BrokerError
from shared.models import Fill, OrderEvent, OrderStatus, OrderType, Side

__all__ = ["UpdateFilter", "account", "order", "order_body", "position", "status"]

_STATUS = {
    "new": OrderStatus.NEW, "accepted": OrderStatus.NEW, "pending_new": OrderStatus.NEW,
    "accepted_for_bidding": OrderStatus.NEW, "held": OrderStatus.NEW, "stopped": OrderStatus.NEW,
    "suspended": OrderStatus.NEW, "calculated": OrderStatus.NEW, "done_for_day": OrderStatus.NEW,
    "partially_filled": OrderStatus.PARTIALLY_FILLED, "partial_fill": OrderStatus.PARTIALLY_FILLED,
    "filled": OrderStatus.FILLED, "fill": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELED, "expired": OrderStatus.EXPIRED, "rejected": OrderStatus.REJECTED,
    "replaced": OrderStatus.REPLACED, "pending_cancel": OrderStatus.PENDING_CANCEL,
    "pending_replace": OrderStatus.PENDING_REPLACE,
}
_RANK = {OrderStatus.NEW: 0, OrderStatus.PENDING_CANCEL: 1, OrderStatus.PENDING_REPLACE: 1,
         OrderStatus.PARTIALLY_FILLED: 2}
_NAMESPACE = uuid.UUID("0b7f5a8e-3f3c-4d0a-9a43-5f3e2b1c7d11")


def status(word: str | None) -> OrderStatus:
    """Our status for Alpaca's order status or trade-update event word."""
    return _STATUS.get(word or "", OrderStatus.UNKNOWN)


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise BrokerError(f"broker sent a malformed number: {value!r}") from None


def _req(value: Any) -> Decimal:
    result = _dec(value)
    if result is None:
        raise BrokerError("broker omitted a required number")
    return result


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def order(raw: dict[str, Any]) -> BrokerOrder:
    """A BrokerOrder from Alpaca's Order object."""
    return BrokerOrder(
        broker_order_id=str(raw["id"]), client_order_id=str(raw["client_order_id"]),
        symbol=str(raw["symbol"]),
        side=Side(raw["side"]), order_type=OrderType(str(raw.get("type") or raw.get("order_type"))),
        time_in_force=str(raw["time_in_force"]), quantity=_req(raw.get("qty")),
        filled_quantity=_dec(raw.get("filled_qty")) or Decimal(0),
        filled_avg_price=_dec(raw.get("filled_avg_price")), limit_price=_dec(raw.get("limit_price")),
        stop_price=_dec(raw.get("stop_price")), status=status(raw.get("status")),
        broker_status=str(raw.get("status")), submitted_at=_time(raw.get("submitted_at")),
        order_class=str(raw.get("order_class") or "simple"),
        legs=tuple(order(leg) for leg in raw.get("legs") or ()),
    )


def position(raw: dict[str, Any]) -> Position:
    """A Position from Alpaca's Position object (short quantities negative)."""
    quantity = _req(raw["qty"])
    if raw.get("side") == "short" and quantity > 0:
        quantity = -quantity
    return Position(symbol=str(raw["symbol"]), quantity=quantity,
                    avg_entry_price=_req(raw["avg_entry_price"]),
                    market_value=_dec(raw.get("market_value")), cost_basis=_req(raw["cost_basis"]))


def account(raw: dict[str, Any]) -> Account:
    """An Account from Alpaca's Account object."""
    return Account(account_id=str(raw["id"]), currency=str(raw.get("currency") or "USD"),
                   cash=_req(raw["cash"]), buying_power=_req(raw["buying_power"]),
                   equity=_req(raw.get("equity") or raw["portfolio_value"]),
                   pattern_day_trader=bool(raw.get("pattern_day_trader")),
                   trading_blocked=bool(raw.get("trading_blocked") or raw.get("account_blocked")))


def order_body(request: OrderRequest) -> dict[str, Any]:
    """The POST /v2/orders body; numbers as strings so no float ever touches them."""
    body: dict[str, Any] = {
        "symbol": request.symbol, "qty": str(request.quantity), "side": request.side.value,
        "type": request.order_type.value, "time_in_force": request.time_in_force.value,
        "client_order_id": request.client_order_id,
    }
    if request.limit_price is not None:
        body["limit_price"] = str(request.limit_price)
    if request.stop_price is not None:
        body["stop_price"] = str(request.stop_price)
    if request.take_profit is not None or request.stop_loss is not None:
        both = request.take_profit is not None and request.stop_loss is not None
        body["order_class"] = "oco" if request.oco else "bracket" if both else "oto"
        if request.take_profit is not None:
            body["take_profit"] = {"limit_price": str(request.take_profit)}
        if request.stop_loss is not None:
            body["stop_loss"] = {"stop_price": str(request.stop_loss)}
            if request.stop_loss_limit is not None:
                body["stop_loss"]["limit_price"] = str(request.stop_loss_limit)
    return body


class UpdateFilter:
    """Turns raw trade updates into OrderEvents: repeats removed, progress never goes backwards.

    A fill is known by its ``execution_id`` and passes once. An update behind what was already
    seen for its order (a late ``new`` after ``fill``) is dropped, unless it carries a fill not yet
    seen: that fill passes, stamped with the most advanced status and quantity seen, so a consumer
    counting fills gets each exactly once and a consumer reading status never sees it regress.
    """

    def __init__(self) -> None:
        self._executions: set[str] = set()
        self._seen: set[tuple[str, str, str]] = set()
        self._progress: dict[str, tuple[int, Decimal, OrderStatus]] = {}

    def accept(self, data: dict[str, Any]) -> OrderEvent | None:
        """The OrderEvent for one update's ``data``, or None when it adds nothing."""
        raw_order = data["order"]
        order_id = str(raw_order["id"])
        event = str(data.get("event"))
        new_status = _STATUS.get(event) or status(raw_order.get("status"))
        filled = _dec(raw_order.get("filled_qty")) or Decimal(0)
        execution = data.get("execution_id")
        is_fill = event in ("fill", "partial_fill") and execution is not None
        if is_fill:
            if str(execution) in self._executions:
                return None
            self._executions.add(str(execution))
        else:
            key = (order_id, event, str(filled))
            if key in self._seen:
                return None
            self._seen.add(key)
        rank = 3 if new_status.is_terminal else _RANK.get(new_status, 0)
        best = self._progress.get(order_id)
        if best is not None and (best[0], best[1]) > (rank, filled):
            if not is_fill:
                return None
            rank, filled, new_status = best[0], max(best[1], filled), best[2]
        self._progress[order_id] = (rank, filled, new_status)
        fill = None
        when = _time(data.get("timestamp")) or _time(raw_order.get("updated_at"))
        assert when is not None
        if is_fill:
            fill = Fill(fill_id=str(execution), quantity=_req(data.get("qty")), price=_req(data.get("price")),
                        time=when)
        identity = f"{order_id}:{event}:{execution or filled}"
        return OrderEvent(
            id=str(uuid.uuid5(_NAMESPACE, identity)), time=when,
            client_order_id=str(raw_order["client_order_id"]), broker_order_id=order_id,
            symbol=str(raw_order["symbol"]), side=Side(raw_order["side"]), status=new_status,
            filled_quantity=filled, filled_avg_price=_dec(raw_order.get("filled_avg_price")),
            fill=fill, reason=str(data.get("reason") or ""),
        )
