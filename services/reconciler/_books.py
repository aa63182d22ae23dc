"""The two sets of books the reconciler and ``bastion verify --broker`` compare: ours, the broker's.

Reads the views :func:`~services.reconciler._compare.compare` takes
(:class:`~services.reconciler._compare.Ours` and :class:`~services.reconciler._compare.Theirs`):
our portfolio snapshot and the executor's records of the orders it holds open
(``<prefix>:open-orders``, ``<prefix>:order:<client_order_id>``); the broker's account cash,
positions and open orders, and a look-up of each of our open orders it no longer lists.

The reads are neither atomic nor locked, one side after the other: a fill landing in between
shows up as a difference that a second look no longer finds (the reconciler confirms by looking
twice). Reads only: nothing is written.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis

from services.reconciler._compare import OurOrder, Ours, Theirs
from shared.brokers import Broker, BrokerOrder
from shared.errors import OrderNotFound
from shared.keys import Keys
from shared.portfolio import Portfolio
from shared.redis.client import reply_text

__all__ = ["read_ours", "read_theirs", "with_records"]


def read_ours(client: redis.Redis, keys: Keys, portfolio: Portfolio) -> Ours:
    """Our side: the portfolio's cash and non-zero positions, and the orders held open."""
    snapshot = portfolio.snapshot()
    members: Any = client.smembers(keys.open_orders)
    open_orders = {}
    for cid in sorted(reply_text(raw) for raw in members):
        record = _record(client, keys, cid)
        if record:
            open_orders[cid] = OurOrder.from_record(cid, record)
    return Ours(opened=snapshot.opened, cash=snapshot.cash, reserved=snapshot.reserved,
                positions={s: p.qty for s, p in snapshot.positions.items() if p.qty},
                open_orders=open_orders)


def read_theirs(broker: Broker, ours: Ours) -> Theirs:
    """The broker's side (BrokerError when it cannot be read)."""
    account = broker.account()
    positions = {p.symbol: p.quantity for p in broker.positions() if p.quantity}
    open_orders = {o.client_order_id: o for o in broker.open_orders()}
    looked_up: dict[str, BrokerOrder | None] = {}
    for cid in ours.open_orders:
        if cid in open_orders:
            continue
        try:
            looked_up[cid] = broker.get_order(cid)
        except OrderNotFound:
            looked_up[cid] = None
    return Theirs(cash=account.cash, positions=positions, open_orders=open_orders, looked_up=looked_up)


def with_records(client: redis.Redis, keys: Keys, ours: Ours, theirs: Theirs) -> Ours:
    """``ours`` with our records (open or closed) of the broker's open orders we do not hold open,
    so a broker order closed here is told apart from one never placed."""
    records = {}
    for cid in theirs.open_orders:
        if cid not in ours.open_orders:
            record = _record(client, keys, cid)
            if record:
                records[cid] = OurOrder.from_record(cid, record)
    return replace(ours, records=records)


def _record(client: redis.Redis, keys: Keys, cid: str) -> dict[str, str]:
    raw: Any = client.hgetall(keys.order(cid))
    return {reply_text(k): reply_text(v) for k, v in raw.items()}
