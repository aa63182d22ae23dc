"""Alpaca's JSON shapes (Trading API v2) for the exchange's internal records.

Numbers that are money or quantities travel as strings, as Alpaca sends them, rendered from
``Decimal`` without an exponent. Times are RFC 3339 UTC with a ``Z``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

__all__ = ["asset", "asset_id", "clock", "num", "order", "parse_timestamp", "position", "timestamp"]

NEW_YORK = ZoneInfo("America/New_York")
_ASSET_NAMESPACE = uuid.UUID("6f1c2d1e-7a51-4c4b-9a53-0b6c5e3a9f10")


def num(value: Decimal | None) -> str | None:
    """``value`` as Alpaca writes numbers: a plain decimal string (no exponent)."""
    if value is None:
        return None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 with microseconds and ``Z``."""
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str) -> datetime:
    """The datetime of a :func:`timestamp` string."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def asset_id(symbol: str) -> str:
    """A stable asset id per symbol."""
    return str(uuid.uuid5(_ASSET_NAMESPACE, symbol))


def order(record: dict[str, Any], legs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """An Alpaca Order object; ``legs`` are the rendered leg orders (None when not nested)."""
    return {
        "id": record["id"],
        "client_order_id": record["client_order_id"],
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
        "submitted_at": record["created_at"],
        "filled_at": record.get("filled_at"),
        "expired_at": record.get("expired_at"),
        "expires_at": None,
        "canceled_at": record.get("canceled_at"),
        "failed_at": record.get("failed_at"),
        "replaced_at": record.get("replaced_at"),
        "replaced_by": record.get("replaced_by"),
        "replaces": record.get("replaces"),
        "asset_id": asset_id(record["symbol"]),
        "symbol": record["symbol"],
        "asset_class": "us_equity",
        "notional": None,
        "qty": record["qty"],
        "filled_qty": record["filled_qty"],
        "filled_avg_price": record.get("filled_avg_price"),
        "order_class": record["order_class"],
        "order_type": record["type"],
        "type": record["type"],
        "side": record["side"],
        "position_intent": ("buy_to_open" if record["side"] == "buy" else "sell_to_close"),
        "time_in_force": record["time_in_force"],
        "limit_price": record.get("limit_price"),
        "stop_price": record.get("stop_price"),
        "status": record["status"],
        "extended_hours": False,
        "legs": legs,
    }  # trail_percent, trail_price, hwm: trailing stops only (the spec types them string, not null)


def position(symbol: str, qty: Decimal, avg: Decimal, last: Decimal | None) -> dict[str, Any]:
    """An Alpaca Position object; market values use the last bar's close (cost if none yet)."""
    price = last if last is not None else avg
    cost = qty * avg
    market = qty * price
    pl = market - cost
    plpc = (pl / abs(cost)) if cost else Decimal(0)
    return {
        "asset_id": asset_id(symbol),
        "symbol": symbol,
        "exchange": "NASDAQ",
        "asset_class": "us_equity",
        "asset_marginable": False,
        "avg_entry_price": num(avg),
        "qty": num(qty),
        "qty_available": num(qty),
        "side": "long" if qty > 0 else "short",
        "market_value": num(market),
        "cost_basis": num(cost),
        "unrealized_pl": num(pl),
        "unrealized_plpc": num(plpc.quantize(Decimal("0.0000001"))),
        "unrealized_intraday_pl": num(pl),
        "unrealized_intraday_plpc": num(plpc.quantize(Decimal("0.0000001"))),
        "current_price": num(price),
        "lastday_price": num(price),
        "change_today": "0",
    }


def asset(symbol: str, shortable: bool) -> dict[str, Any]:
    """An Alpaca Asset object: every asset the exchange trades is an active US equity."""
    return {
        "id": asset_id(symbol),
        "class": "us_equity",
        "exchange": "NASDAQ",
        "symbol": symbol,
        "name": f"{symbol} (paper)",
        "status": "active",
        "tradable": True,
        "marginable": False,
        "shortable": shortable,
        "easy_to_borrow": shortable,
        "fractionable": True,
        "attributes": [],
    }


def clock(now: datetime, always_open: bool) -> dict[str, Any]:
    """Alpaca's Clock: NYSE regular hours on weekdays (no holiday calendar), or always open."""
    local = now.astimezone(NEW_YORK)

    def session(day: datetime) -> tuple[datetime, datetime]:
        start = day.replace(hour=9, minute=30, second=0, microsecond=0)
        return start, day.replace(hour=16, minute=0, second=0, microsecond=0)

    day = local
    while True:
        start, end = session(day)
        if day.weekday() < 5 and end > local:
            break
        day = (day + timedelta(days=1)).replace(hour=0, minute=0)
    is_open = always_open or start <= local < end
    next_open = start if start > local else session(_next_weekday(day))[0]
    return {
        "timestamp": local.isoformat(),
        "is_open": is_open,
        "next_open": next_open.isoformat(),
        "next_close": end.isoformat(),
    }


def _next_weekday(day: datetime) -> datetime:
    day = day + timedelta(days=1)
    while day.weekday() >= 5:
        day = day + timedelta(days=1)
    return day
