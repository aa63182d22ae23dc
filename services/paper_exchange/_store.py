"""Where the paper exchange's book lives: its Redis keys, read fresh, each change one MULTI/EXEC.

Keys, under ``<prefix>:paper:`` (see shared/keys.py's ``Keys.paper``)::

    account       hash: id, account_number, cash, created_at
    credentials   hash: key_id, secret_key (only when generated)
    orders        hash: order id -> the order's record (JSON; numbers as strings)
    client-ids    hash: client_order_id -> order id (uniqueness)
    open          sorted set: open order ids, scored by acceptance sequence
    open:<SYM>    sorted set: the open order ids of one symbol (the same scores; a bar reads only
                  its symbol's), rebuilt from ``open`` at start
    seq           counter: acceptance sequence
    positions     hash: symbol -> {"qty", "avg"}
    prices        hash: symbol -> last bar close
    applied       hash: fill id -> quantity (a fill recorded here is never applied again)
    fills         stream: every fill (never trimmed)
    events        stream: every trade update sent (about the last 10,000)

Left to the caller: a read-decide-commit sequence is only safe with one writer per prefix; the
exchange holds its lock around it and runs one process per prefix.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis

from services.paper_exchange import _render as render
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.redis_client import reply_text

__all__ = ["OPEN_STATUSES", "Change", "Store", "SubmitView", "credentials"]

OPEN_STATUSES = frozenset({"new", "partially_filled", "held", "accepted", "pending_new"})



def credentials(client: redis.Redis, keys: Keys, settings: PaperExchangeSettings) -> tuple[str, str]:
    """The key pair the exchange accepts: configured, else generated once and kept in Redis."""
    if settings.api_key is not None and settings.secret_key is not None:
        return settings.api_key.get_secret_value(), settings.secret_key.get_secret_value()
    key = keys.paper("credentials")
    client.hsetnx(key, "key_id", "PK" + secrets.token_hex(8).upper())
    client.hsetnx(key, "secret_key", secrets.token_urlsafe(30))
    stored = client.hmget(key, ["key_id", "secret_key"])
    return reply_text(stored[0]), reply_text(stored[1])


@dataclass
class SubmitView:
    """What accepting an order decides on, read together (:meth:`Store.submit_view`)."""

    existing: str | None  # the order id already using the client_order_id
    cash: Decimal
    prices: dict[str, Decimal]
    positions: dict[str, tuple[Decimal, Decimal]]
    open_orders: list[dict[str, Any]]
    seqs: list[int]  # acceptance sequence numbers taken for the order and its legs


# KEYS[1] = the open-orders zset, KEYS[2] = the orders hash; returns every open order's JSON
# record (false for an id without one), read 1000 at a time (unpack has a stack limit)
_OPEN_RECORDS = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i = 1, #ids, 1000 do
    local part = redis.call('HMGET', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #part do out[#out + 1] = part[j] end
end
return out
"""


@dataclass
class Change:
    """Everything one transaction writes; ``events`` are sent only once it has committed."""

    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    client_ids: dict[str, str] = field(default_factory=dict)
    position: tuple[str, Decimal, Decimal] | None = None  # symbol, quantity, average entry
    cash: Decimal | None = None
    fill: dict[str, str] | None = None  # the fill record (has fill_id and qty)


class Store:
    """Reads and writes of the book; records of the change being built are visible to ``load``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self._k = {name: keys.paper(name) for name in (
            "account", "orders", "client-ids", "open", "seq", "positions", "prices", "applied", "fills",
            "events")}
        self._staged: dict[str, dict[str, Any]] = {}

    def init_account(self, starting_cash: Decimal, now: datetime) -> None:
        """Create the account once (a restart keeps the existing one)."""
        key = self._k["account"]
        self.client.hsetnx(key, "id", str(uuid.uuid4()))
        self.client.hsetnx(key, "account_number", "PA" + secrets.token_hex(5).upper())
        self.client.hsetnx(key, "cash", render.num(starting_cash) or "0")
        self.client.hsetnx(key, "created_at", render.timestamp(now) or "")

    def account_fields(self) -> dict[str, str]:
        return {reply_text(k): reply_text(v) for k, v in self.client.hgetall(self._k["account"]).items()}

    def cash(self) -> Decimal:
        return Decimal(reply_text(self.client.hget(self._k["account"], "cash")))

    def change(self) -> Change:
        """Start building a change (its records shadow Redis for ``load`` until committed)."""
        change = Change()
        self._staged = change.orders
        return change

    def drop_staged(self) -> None:
        self._staged = {}

    def load(self, order_id: str) -> dict[str, Any] | None:
        if order_id in self._staged:
            return self._staged[order_id]
        raw = self.client.hget(self._k["orders"], order_id)
        return None if raw is None else dict(json.loads(raw))

    def order_id_for(self, client_order_id: str) -> str | None:
        raw = self.client.hget(self._k["client-ids"], client_order_id)
        return None if raw is None else reply_text(raw)

    def all_orders(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.client.hvals(self._k["orders"])]

    def open_orders(self) -> list[dict[str, Any]]:
        return self._load_many(self.client.zrange(self._k["open"], 0, -1))

    def _load_many(self, ids: Any) -> list[dict[str, Any]]:
        if not ids:
            return []
        raws = self.client.hmget(self._k["orders"], list(ids))
        return [json.loads(raw) for raw in raws if raw is not None]

    def submit_view(self, client_order_id: str, seqs: int) -> SubmitView:
        """The client_order_id's owner, cash, prices, positions and open orders, and ``seqs``
        consecutive acceptance sequence numbers, in one round trip (an order then refused leaves
        a gap in the numbers, which only order the orders)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self._k["client-ids"], client_order_id)
            pipe.hget(self._k["account"], "cash")
            pipe.hgetall(self._k["prices"])
            pipe.hgetall(self._k["positions"])
            pipe.eval(_OPEN_RECORDS, 2, self._k["open"], self._k["orders"])
            pipe.incrby(self._k["seq"], seqs)
            existing, cash, prices, positions, records, last = pipe.execute()
        return SubmitView(None if existing is None else reply_text(existing), Decimal(reply_text(cash)),
                          _prices_from(prices), _positions_from(positions),
                          [json.loads(raw) for raw in records if raw is not None],
                          list(range(int(last) - seqs + 1, int(last) + 1)))

    def index_open_orders(self) -> int:
        """Rebuild every symbol's open-order index from ``open`` (at start); the orders indexed."""
        records = self.open_orders()
        with self.client.pipeline(transaction=True) as pipe:
            for record in records:
                pipe.zadd(self._open_of(record["symbol"]), {record["id"]: record["seq"]})
            pipe.execute()
        return len(records)

    def mark_and_open_orders(self, symbol: str, price: Decimal, bar_id: str
                             ) -> list[tuple[dict[str, Any], Decimal | None]]:
        """Record ``symbol``'s last price and read its open orders, in acceptance order, each with
        the quantity already filled on bar ``bar_id`` (None if none): two round trips at most."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self._k["prices"], symbol, render.num(price) or "0")
            pipe.zrange(self._open_of(symbol), 0, -1)
            _, ids = pipe.execute()
        if not ids:
            return []
        names = [reply_text(order_id) for order_id in ids]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self._k["orders"], names)
            pipe.hmget(self._k["applied"], [f"{name}:{bar_id}" for name in names])
            raws, done = pipe.execute()
        return [(json.loads(raw), None if qty is None else Decimal(reply_text(qty)))
                for raw, qty in zip(raws, done, strict=True) if raw is not None]

    def mark_and_symbols_with_open_orders(self, prices: dict[str, Decimal]) -> set[str]:
        """Record each symbol's last price and return those of them with open orders (one round trip)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self._k["prices"], mapping={s: render.num(p) or "0" for s, p in prices.items()})
            for symbol in prices:
                pipe.exists(self._open_of(symbol))
            found = pipe.execute()[1:]
        return {symbol for symbol, exists in zip(prices, found, strict=True) if exists}

    def _open_of(self, symbol: str) -> str:
        return f"{self._k['open']}:{symbol}"

    def save_order(self, record: dict[str, Any]) -> None:
        """Write one record outside a change (a stop's trigger flag: no event, no money)."""
        self.client.hset(self._k["orders"], record["id"], json.dumps(record))

    def positions(self) -> dict[str, tuple[Decimal, Decimal]]:
        return _positions_from(self.client.hgetall(self._k["positions"]))

    def prices(self) -> dict[str, Decimal]:
        return _prices_from(self.client.hgetall(self._k["prices"]))

    def commit(self, change: Change) -> None:
        """Write ``change`` in one MULTI/EXEC."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                if change.client_ids:
                    pipe.hset(self._k["client-ids"], mapping=change.client_ids)  # type: ignore[arg-type]
                if change.position is not None:
                    symbol, quantity, average = change.position
                    if quantity == 0:
                        pipe.hdel(self._k["positions"], symbol)
                    else:
                        pipe.hset(self._k["positions"], symbol,
                                  json.dumps({"qty": render.num(quantity), "avg": render.num(average)}))
                if change.cash is not None:
                    pipe.hset(self._k["account"], "cash", render.num(change.cash) or "0")
                if change.fill is not None:
                    pipe.hset(self._k["applied"], change.fill["fill_id"], change.fill["qty"])
                    pipe.xadd(self._k["fills"], change.fill)  # type: ignore[arg-type]
                for order_id, record in change.orders.items():
                    pipe.hset(self._k["orders"], order_id, json.dumps(record))
                    if record["status"] in OPEN_STATUSES:
                        pipe.zadd(self._k["open"], {order_id: record["seq"]})
                        pipe.zadd(self._open_of(record["symbol"]), {order_id: record["seq"]})
                    else:
                        pipe.zrem(self._k["open"], order_id)
                        pipe.zrem(self._open_of(record["symbol"]), order_id)
                for event in change.events:
                    pipe.xadd(self._k["events"], {"event": json.dumps(event)}, maxlen=10_000,
                              approximate=True)
                pipe.execute()
        finally:
            self._staged = {}


def _positions_from(raw: Any) -> dict[str, tuple[Decimal, Decimal]]:
    """symbol -> (quantity, average entry), from HGETALL of the positions hash."""
    result = {}
    for symbol, value in raw.items():
        data = json.loads(value)
        result[reply_text(symbol)] = (Decimal(data["qty"]), Decimal(data["avg"]))
    return result


def _prices_from(raw: Any) -> dict[str, Decimal]:
    """symbol -> last close, from HGETALL of the prices hash."""
    return {reply_text(k): Decimal(reply_text(v)) for k, v in raw.items()}
