"""What the GET routes read, from the keys ``bastion status`` reads (:mod:`shared.keys`).

Each function is blocking (redis-py), run by the routes in a worker thread; none writes. The
status, portfolio, open-order and stream readers are the CLI's own (:mod:`services.cli.commands`);
this module adds the recent ones: order records, fills, alerts and reconciliation reports.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from services.api._desk import ApiError, Desk
from services.cli.commands.portfolio import report
from services.cli.commands.tail import entry
from services.reconciler.service import REPORT_STREAM
from shared.keys import ALERTS, ORDER_EVENTS
from shared.redis.client import reply_text

__all__ = ["alerts", "equity", "fills", "portfolio", "recent_orders", "reconciliation"]

PAGE = 500  # stream entries read per round trip while looking for fills
SCAN_LIMIT = 20_000  # order events looked at for one fills request, at most
_REPORT_JSON = ("differences", "in_flight", "ours", "broker")  # report fields holding JSON


def portfolio(desk: Desk) -> dict[str, Any]:
    """The configured account (``bastion portfolio --json``); 404 while it is not opened."""
    account = desk.settings.portfolio.account
    found = report(desk, account)
    if found is None:
        raise ApiError(404, f"account {account!r} has not been opened (the executor opens it)")
    return found


def recent_orders(desk: Desk, limit: int) -> list[dict[str, str]]:
    """The newest ``limit`` order records by ``created_at``, each with its client_order_id (every
    record is read: the executor keeps one per order it was handed)."""
    prefix = desk.keys.order("")
    found = desk.redis.scan_iter(match=desk.keys.order("*"), count=1000, _type="hash")
    names = [reply_text(k) for k in found]
    with desk.redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        replies = pipe.execute()
    records = [{"client_order_id": name.removeprefix(prefix),
                **{reply_text(k): reply_text(v) for k, v in raw.items()}}
               for name, raw in zip(names, replies, strict=True) if raw]
    records.sort(key=lambda r: (r.get("created_at", ""), r["client_order_id"]), reverse=True)
    return records[:limit]


def fills(desk: Desk, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` order events that carry a fill, newest first (looking back through at
    most ``SCAN_LIMIT`` events of the bounded ``order-events`` stream)."""
    key = desk.keys.stream(ORDER_EVENTS)
    found: list[dict[str, Any]] = []
    end, seen = "+", 0
    while len(found) < limit and seen < SCAN_LIMIT:
        page: Any = desk.redis.xrevrange(key, max=end, count=PAGE)
        if end != "+":
            page = page[1:]  # the entry the previous page ended on
        if not page:
            break
        seen += len(page)
        for entry_id, fields in page:
            event = entry(entry_id, fields)
            if event.get("fill") is not None:
                found.append(event)
        end = reply_text(page[-1][0])
    return found[:limit]


def alerts(desk: Desk, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` entries of the ``alerts`` stream, decoded, newest first."""
    page: Any = desk.redis.xrevrange(desk.keys.stream(ALERTS), count=limit)
    return [entry(entry_id, fields) for entry_id, fields in page]


def equity(desk: Desk, limit: int) -> list[dict[str, str]]:
    """The newest ``limit`` of risk's equity samples (time, equity, cash), newest first."""
    page: Any = desk.redis.xrevrange(desk.keys.equity_history, count=limit)
    return [{reply_text(k): reply_text(v) for k, v in fields.items()} for _, fields in page]


def reconciliation(desk: Desk, limit: int) -> dict[str, Any]:
    """The reconciler's latest report (None before its first pass) and its newest ``limit`` reports."""
    latest: Any = desk.redis.hgetall(desk.keys.reconciliation)
    recent: Any = desk.redis.xrevrange(desk.keys.stream(REPORT_STREAM), count=limit)
    return {"latest": _report(latest) if latest else None,
            "recent": [{"entry_id": reply_text(entry_id), **_report(fields)} for entry_id, fields in recent]}


def _report(raw: dict[Any, Any]) -> dict[str, Any]:
    """A report's flat fields, its JSON fields parsed (a malformed one is left as its text)."""
    fields: dict[str, Any] = {reply_text(k): reply_text(v) for k, v in raw.items()}
    for name in _REPORT_JSON:
        if name in fields:
            with contextlib.suppress(ValueError):
                fields[name] = json.loads(fields[name])
    return fields
