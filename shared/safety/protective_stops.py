"""The executor's protective stops as other processes see them: find them, and cancel them on purpose.

A protective stop is an order record (``Keys.order``) with a ``protects`` field naming the entry
it guards (services/executor/_protection.py places them). The executor replaces one that ends
unfilled, unless its record carries a ``cancel_reason``: who cancelled it on purpose (risk, to
let an exit sell the shares it holds; the kill switch, to flatten). :func:`cancel_on_purpose`
writes that reason before it asks the broker, so the replacement never races the cancel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import redis

from shared.keys import Keys
from shared.redis.client import reply_text

__all__ = ["cancel_on_purpose", "open_protective_stops"]


def open_protective_stops(client: redis.Redis, keys: Keys, open_orders: Iterable[str] | None = None
                          ) -> dict[str, list[tuple[str, str]]]:
    """Open protective orders by symbol, as (client_order_id, side), from ``open_orders`` (the
    open-orders set's members, read here when None), in one round trip."""
    if open_orders is None:
        members: Any = client.smembers(keys.open_orders)
        open_orders = [reply_text(m) for m in members]
    cids = sorted(open_orders)
    with client.pipeline(transaction=False) as pipe:
        for cid in cids:
            pipe.hmget(keys.order(cid), ["symbol", "side", "protects"])
        found = pipe.execute()
    stops: dict[str, list[tuple[str, str]]] = {}
    for cid, (symbol, side, protects) in zip(cids, found, strict=True):
        if protects and symbol and side:
            stops.setdefault(reply_text(symbol), []).append((cid, reply_text(side)))
    return stops


def cancel_on_purpose(client: redis.Redis, keys: Keys, cid: str, why: str,
                      cancel: Callable[[str], None]) -> None:
    """Mark protective order ``cid`` cancelled on purpose (``why``), then ``cancel`` it at the broker
    (a broker error propagates: the mark stays, the caller asks again)."""
    client.hset(keys.order(cid), "cancel_reason", why)
    cancel(cid)
