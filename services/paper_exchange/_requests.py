"""Reading an Alpaca order request into the exchange's record, refusing what it cannot trade.

Errors are Alpaca's: HTTP 422 with code 40010001 and a message naming the field.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import services.paper_exchange._render as render

__all__ = ["ApiError", "check_oco_stop", "invalid", "parse_close_qty", "parse_legs", "parse_order",
           "parse_replace"]

_SYMBOL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./-")
_OCO_GAP = Decimal("0.01")  # Alpaca: an oco's stop at least $0.01 beyond its base price


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


def _client_order_id(value: Any) -> str:
    cid = value or str(uuid.uuid4())
    if not isinstance(cid, str) or len(cid) > 128:
        raise invalid("client_order_id must be a string of at most 128 characters")
    return cid


def _time_in_force(value: Any) -> str:
    if value not in ("day", "gtc"):
        raise invalid(f"time_in_force {value!r} is not supported (day, gtc)")
    return str(value)


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
    tif = _time_in_force(body.get("time_in_force"))
    if body.get("extended_hours"):
        raise invalid("extended_hours orders are not supported by the paper exchange")
    order_class = body.get("order_class") or "simple"
    if order_class not in ("simple", "bracket", "oto", "oco"):
        raise invalid(f"order_class {order_class!r} is not supported (simple, bracket, oto, oco)")
    limit = body.get("limit_price") if order_class != "oco" else _oco_limit(body, order_type)
    stop = body.get("stop_price")
    if order_type in ("limit", "stop_limit") and limit is None:
        raise invalid(f"limit_price is required for {order_type} orders")
    if order_type in ("stop", "stop_limit") and stop is None:
        raise invalid(f"stop_price is required for {order_type} orders")
    if order_type in ("market", "stop") and limit is not None:
        raise invalid(f"limit_price is not allowed for {order_type} orders")
    if order_type in ("market", "limit") and stop is not None:
        raise invalid(f"stop_price is not allowed for {order_type} orders")
    cid = _client_order_id(body.get("client_order_id"))
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


def _oco_limit(body: dict[str, Any], order_type: Any) -> Any:
    """The limit price of an oco order: its take-profit's. Alpaca's oco is an exit of a position
    held: a take-profit limit order (the order itself, ``type`` limit) and a stop-loss leg, both
    working at once. ``limit_price`` may be omitted; Alpaca appears to ignore one that differs from
    ``take_profit.limit_price`` (alpaca-py issue #401), which is ambiguous, so it is refused here."""
    if order_type != "limit":
        raise invalid(f"oco orders must have type limit (the take-profit order), got {order_type!r}")
    take_profit, stop_loss = body.get("take_profit"), body.get("stop_loss")
    if not isinstance(take_profit, dict) or take_profit.get("limit_price") is None:
        raise invalid("oco orders need take_profit.limit_price")
    if not isinstance(stop_loss, dict) or stop_loss.get("stop_price") is None:
        raise invalid("oco orders need stop_loss.stop_price")
    tp_price = _dec(take_profit["limit_price"], "take_profit.limit_price")
    limit = body.get("limit_price")
    if limit is not None and _dec(limit, "limit_price") != tp_price:
        raise invalid(f"limit_price of an oco order must equal take_profit.limit_price or be omitted "
                      f"(limit_price {limit}, take_profit.limit_price {take_profit['limit_price']})")
    return take_profit["limit_price"]


def parse_replace(body: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH /v2/orders/{order_id} body changes on ``old`` (absent or null: kept);
    ApiError(422) naming what is wrong."""
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            continue
        if name == "qty":
            changes["qty"] = render.num(_dec(value, "qty"))
        elif name in ("limit_price", "stop_price"):
            kinds = ("limit", "stop_limit") if name == "limit_price" else ("stop", "stop_limit")
            if old["type"] not in kinds:
                raise invalid(f"{name} cannot be set on a {old['type']} order")
            changes[name] = render.num(_dec(value, name))
        elif name == "time_in_force":
            changes[name] = _time_in_force(value)
        elif name == "client_order_id":
            changes[name] = _client_order_id(value)
        elif name == "trail":
            raise invalid("trail is not supported by the paper exchange (no trailing_stop orders)")
        else:
            raise invalid(f"{name} cannot be replaced (qty, limit_price, stop_price, time_in_force, "
                          "client_order_id)")
    return changes


def parse_close_qty(query: dict[str, str], held: Decimal) -> Decimal:
    """The quantity DELETE /v2/positions/{symbol} closes of a position of ``held`` shares: ``qty``,
    or ``percentage`` of it (whole shares unless the position is fractional), or all of it."""
    qty, percentage = query.get("qty"), query.get("percentage")
    size = abs(held)
    if qty is not None and percentage is not None:
        raise invalid("give only one of qty and percentage")
    if qty is not None:
        return _dec(qty, "qty")
    if percentage is None:
        return size
    share = _dec(percentage, "percentage")
    if share > 100:
        raise invalid(f"percentage must be at most 100, got {percentage!r}")
    amount = size * share / 100
    if size == size.to_integral_value():
        amount = amount.to_integral_value(rounding=ROUND_FLOOR)
    if amount <= 0:
        raise invalid(f"{percentage}% of {render.num(size)} shares is less than one share")
    return amount


def parse_legs(body: dict[str, Any], parent: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """The legs of ``parent``: a bracket's or OTO's exits (the opposite side, held until it fills),
    or an oco's stop-loss (the same side, working from the start like the take-profit it is a leg
    of; :func:`_oco_limit` has checked both are given)."""
    take_profit, stop_loss = body.get("take_profit"), body.get("stop_loss")
    order_class = parent["order_class"]
    if order_class == "simple":
        if take_profit or stop_loss:
            raise invalid("take_profit/stop_loss need order_class bracket, oto or oco")
        return []
    oco = order_class == "oco"
    if parent["type"] not in ("market", "limit"):
        raise invalid(f"{order_class} orders must enter with a market or limit order")
    if order_class == "bracket" and not (take_profit and stop_loss):
        raise invalid("bracket orders need both take_profit and stop_loss")
    if order_class == "oto" and bool(take_profit) == bool(stop_loss):
        raise invalid("oto orders need exactly one of take_profit and stop_loss")
    stamp = render.timestamp(now)
    legs = []
    tp_price = sl_price = None
    if take_profit:
        tp_price = _dec((take_profit or {}).get("limit_price"), "take_profit.limit_price")
        if not oco:  # an oco's take-profit is the parent itself
            legs.append({"type": "limit", "limit_price": render.num(tp_price), "stop_price": None})
    if stop_loss:
        sl_price = _dec((stop_loss or {}).get("stop_price"), "stop_loss.stop_price")
        sl_limit = (stop_loss or {}).get("limit_price")
        legs.append({"type": "stop_limit" if sl_limit is not None else "stop",
                     "stop_price": render.num(sl_price),
                     "limit_price": render.num(_dec(sl_limit, "stop_loss.limit_price"))
                     if sl_limit is not None else None})
    if tp_price is not None and sl_price is not None:
        # A long's exits sell, the take-profit above the stop (a short's buy, below it): a bracket's
        # close what its entry opens, an oco's side is the exit's. Alpaca wants an oco's stop at
        # least $0.01 beyond its take-profit (one of its "base prices", see check_oco_stop).
        long = parent["side"] == ("sell" if oco else "buy")
        spread = tp_price - sl_price if long else sl_price - tp_price
        gap = _OCO_GAP if oco else Decimal(0)
        if spread <= 0 or spread < gap:
            beyond = f"at least {gap} beyond" if gap else "beyond"
            raise invalid(f"take_profit.limit_price must be {beyond} stop_loss.stop_price "
                          f"(take_profit {tp_price}, stop_loss {sl_price})")
    if oco:
        status, not_before, strict = "new", parent["not_before"], parent["strict"]
    else:
        status, not_before, strict = "held", stamp, True
    return [{
        **leg, "id": str(uuid.uuid4()), "client_order_id": str(uuid.uuid4()), "symbol": parent["symbol"],
        "side": parent["side"] if oco else ("sell" if parent["side"] == "buy" else "buy"),
        "time_in_force": parent["time_in_force"], "qty": parent["qty"],
        "order_class": order_class, "status": status, "filled_qty": "0", "filled_avg_price": None,
        "created_at": stamp, "updated_at": stamp, "not_before": not_before, "strict": strict,
        "triggered": False, "parent_id": parent["id"], "legs": [],
    } for leg in legs]


def check_oco_stop(parent: dict[str, Any], legs: list[dict[str, Any]], last: Decimal | None) -> None:
    """Refuse an oco whose stop-loss is not at least $0.01 beyond the current price ``last`` (Alpaca's
    other "base price" of an oco's stop: such a stop would trigger at once). No price, no check."""
    if parent["order_class"] != "oco" or last is None:
        return
    stop = Decimal(legs[0]["stop_price"])
    sell = parent["side"] == "sell"
    if (sell and stop > last - _OCO_GAP) or (not sell and stop < last + _OCO_GAP):
        where = "below" if sell else "above"
        raise invalid(f"stop_loss.stop_price must be at least {_OCO_GAP} {where} the current price "
                      f"(stop_loss {render.num(stop)}, price {render.num(last)})")
