"""Reading an Alpaca order request into the exchange's record, refusing what it cannot trade.

Errors are Alpaca's: HTTP 422 with code 40010001 and a message naming the field.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from services.paper_exchange import _render as render

__all__ = ["ApiError", "invalid", "parse_legs", "parse_order"]

_SYMBOL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./-")


class ApiError(Exception):
    """An Alpaca-style error reply: HTTP ``status`` with ``{"code": ..., "message": ...}``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code} {message}")


def invalid(message: str) -> ApiError:
    return ApiError(422, 40010001, message)


def _dec(value: Any, field: str, *, positive: bool = True) -> Decimal:
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise invalid(f"invalid {field}: {value!r}") from None
    if not result.is_finite() or (positive and result <= 0):
        raise invalid(f"{field} must be a positive number, got {value!r}")
    return result



def parse_order(body: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The internal record of a POST /v2/orders body; ApiError(422) naming what is wrong."""
    symbol = body.get("symbol")
    if not isinstance(symbol, str) or not symbol or not set(symbol) <= _SYMBOL_CHARS or len(symbol) > 32:
        raise invalid(f"invalid symbol: {symbol!r}")
    if body.get("notional") is not None:
        raise invalid("notional orders are not supported by the paper exchange; give qty")
    if body.get("qty") is None:
        raise invalid("qty is required")
    qty = _dec(body["qty"], "qty")
    side = body.get("side")
    if side not in ("buy", "sell"):
        raise invalid(f"invalid side: {side!r}")
    order_type = body.get("type") or body.get("order_type")
    if order_type not in ("market", "limit", "stop", "stop_limit"):
        raise invalid(f"order type {order_type!r} is not supported (market, limit, stop, stop_limit)")
    tif = body.get("time_in_force")
    if tif not in ("day", "gtc"):
        raise invalid(f"time_in_force {tif!r} is not supported (day, gtc)")
    if body.get("extended_hours"):
        raise invalid("extended_hours orders are not supported by the paper exchange")
    limit = body.get("limit_price")
    stop = body.get("stop_price")
    if order_type in ("limit", "stop_limit") and limit is None:
        raise invalid(f"limit_price is required for {order_type} orders")
    if order_type in ("stop", "stop_limit") and stop is None:
        raise invalid(f"stop_price is required for {order_type} orders")
    if order_type in ("market", "stop") and limit is not None:
        raise invalid(f"limit_price is not allowed for {order_type} orders")
    if order_type in ("market", "limit") and stop is not None:
        raise invalid(f"stop_price is not allowed for {order_type} orders")
    cid = body.get("client_order_id") or str(uuid.uuid4())
    if not isinstance(cid, str) or len(cid) > 128:
        raise invalid("client_order_id must be a string of at most 128 characters")
    order_class = body.get("order_class") or "simple"
    if order_class not in ("simple", "bracket", "oto"):
        raise invalid(f"order_class {order_class!r} is not supported (simple, bracket, oto)")
    stamp = render.timestamp(now)
    return {
        "id": str(uuid.uuid4()), "client_order_id": cid, "symbol": symbol, "side": side,
        "type": order_type, "time_in_force": tif, "qty": render.num(qty),
        "limit_price": render.num(_dec(limit, "limit_price")) if limit is not None else None,
        "stop_price": render.num(_dec(stop, "stop_price")) if stop is not None else None,
        "order_class": order_class, "status": "new", "filled_qty": "0", "filled_avg_price": None,
        "created_at": stamp, "updated_at": stamp, "not_before": stamp, "strict": False,
        "triggered": False, "parent_id": None, "legs": [],
    }

def parse_legs(body: dict[str, Any], parent: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """The bracket/OTO exit legs of ``parent`` (held until it fills)."""
    take_profit, stop_loss = body.get("take_profit"), body.get("stop_loss")
    order_class = parent["order_class"]
    if order_class == "simple":
        if take_profit or stop_loss:
            raise invalid("take_profit/stop_loss need order_class bracket or oto")
        return []
    if parent["type"] not in ("market", "limit"):
        raise invalid(f"{order_class} orders must enter with a market or limit order")
    if order_class == "bracket" and not (take_profit and stop_loss):
        raise invalid("bracket orders need both take_profit and stop_loss")
    if order_class == "oto" and bool(take_profit) == bool(stop_loss):
        raise invalid("oto orders need exactly one of take_profit and stop_loss")
    exit_side = "sell" if parent["side"] == "buy" else "buy"
    stamp = render.timestamp(now)
    legs = []
    tp_price = sl_price = None
    if take_profit:
        tp_price = _dec((take_profit or {}).get("limit_price"), "take_profit.limit_price")
        legs.append({"type": "limit", "limit_price": render.num(tp_price), "stop_price": None})
    if stop_loss:
        sl_price = _dec((stop_loss or {}).get("stop_price"), "stop_loss.stop_price")
        sl_limit = (stop_loss or {}).get("limit_price")
        legs.append({"type": "stop_limit" if sl_limit is not None else "stop",
                     "stop_price": render.num(sl_price),
                     "limit_price": render.num(_dec(sl_limit, "stop_loss.limit_price"))
                     if sl_limit is not None else None})
    if tp_price is not None and sl_price is not None:
        buy = parent["side"] == "buy"
        if (buy and tp_price <= sl_price) or (not buy and tp_price >= sl_price):
            raise invalid("take_profit.limit_price must be beyond stop_loss.stop_price "
                           f"(take_profit {tp_price}, stop_loss {sl_price})")
    return [{
        **leg, "id": str(uuid.uuid4()), "client_order_id": str(uuid.uuid4()), "symbol": parent["symbol"],
        "side": exit_side, "time_in_force": parent["time_in_force"], "qty": parent["qty"],
        "order_class": order_class, "status": "held", "filled_qty": "0", "filled_avg_price": None,
        "created_at": stamp, "updated_at": stamp, "not_before": stamp, "strict": True,
        "triggered": False, "parent_id": parent["id"], "legs": [],
    } for leg in legs]

