"""The paper exchange's book: held in memory by its one process, each change written through to
Redis in one MULTI/EXEC before memory (or anyone) sees it.

Keys, under ``<prefix>:paper:`` (see shared/keys.py's ``Keys.paper``)::

    account       hash: id, account_number, cash, created_at
    credentials   hash: key_id, secret_key (only when generated)
    orders        hash: order id -> the order's record (JSON; numbers as strings)
    client-ids    hash: client_order_id -> order id (uniqueness)
    open          sorted set: open order ids, scored by acceptance sequence
    seq           the last acceptance sequence number taken by a written order
    positions     hash: symbol -> {"qty", "avg"}
    prices        hash: symbol -> last bar close (written with the next change, or at most
                  ``PRICES_EVERY_S`` late)
    applied       hash: fill id -> quantity (a fill recorded here is never applied again)
    fills         stream: every fill (never trimmed)
    events        stream: every trade update sent (about the last 10,000)

It also reads (never writes) the ingester's ``<prefix>:last-price`` hash, only for a symbol it
has no price or asset for yet (:meth:`Store.ingested_price`, :meth:`Store.ingested_symbols`).

In memory, read from those keys at start (:meth:`Store.load_book`): the cash, the open orders in
full, every client_order_id, the sequence, the positions, the prices and the applied fills of
the open orders. So accepting an order for a symbol the exchange has a price for, or applying a
fill, reads nothing from Redis and writes once; a closed order is read from Redis when asked for.

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
from redis.typing import EncodableT, FieldT

import services.paper_exchange._render as render
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.redis.client import reply_text

__all__ = ["OPEN_STATUSES", "PRICES_EVERY_S", "Change", "Store", "credentials"]

OPEN_STATUSES = frozenset({"new", "partially_filled", "held", "accepted", "pending_new"})
PRICES_EVERY_S = 1.0  # the last prices reach Redis at most this late (only a restart reads them)


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
class Change:
    """Everything one transaction writes; ``events`` are sent only once it has committed."""

    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    client_ids: dict[str, str] = field(default_factory=dict)
    position: tuple[str, Decimal, Decimal] | None = None  # symbol, quantity, average entry
    cash: Decimal | None = None
    fill: dict[str, str] | None = None  # the fill record (has fill_id and qty)


def _copy(record: dict[str, Any]) -> dict[str, Any]:
    """A record the caller may change without touching the book (its only mutable value: legs)."""
    return {**record, "legs": list(record["legs"])}


class Store:
    """The book. Records it hands out are copies; a change's records shadow the book for ``load``
    until :meth:`commit` writes them to Redis and then to memory."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self._k = {name: keys.paper(name) for name in (
            "account", "orders", "client-ids", "open", "seq", "positions", "prices", "applied", "fills",
            "events")}
        self._ingested = keys.last_price  # the ingester's: symbol -> close of its newest bar
        self._staged: dict[str, dict[str, Any]] = {}
        self._account: dict[str, str] = {}
        self._cash = Decimal(0)
        self._open: dict[str, dict[str, Any]] = {}  # open order id -> record
        self._open_of: dict[str, set[str]] = {}  # symbol -> its open order ids
        self._client_ids: dict[str, str] = {}
        self._seq = 0  # the last sequence number taken
        self._written_seq = 0
        self._positions: dict[str, tuple[Decimal, Decimal]] = {}
        self._prices: dict[str, Decimal] = {}
        self._unwritten_prices: dict[str, Decimal] = {}
        self._applied: dict[str, Decimal] = {}  # fill id -> quantity, for the open orders

    def load_book(self, starting_cash: Decimal, now: datetime) -> None:
        """Create the account once (a restart keeps the existing one) and read the book into memory."""
        key = self._k["account"]
        self.client.hsetnx(key, "id", str(uuid.uuid4()))
        self.client.hsetnx(key, "account_number", "PA" + secrets.token_hex(5).upper())
        self.client.hsetnx(key, "cash", render.num(starting_cash) or "0")
        self.client.hsetnx(key, "created_at", render.timestamp(now) or "")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.get(self._k["seq"])
            pipe.hgetall(self._k["client-ids"])
            pipe.hgetall(self._k["positions"])
            pipe.hgetall(self._k["prices"])
            pipe.zrange(self._k["open"], 0, -1)
            account, seq, client_ids, positions, prices, open_ids = pipe.execute()
        self._account = {reply_text(k): reply_text(v) for k, v in account.items()}
        self._cash = Decimal(self._account["cash"])
        self._seq = self._written_seq = int(seq or 0)
        self._client_ids = {reply_text(k): reply_text(v) for k, v in client_ids.items()}
        self._positions = _positions_from(positions)
        self._prices = _prices_from(prices)
        self._open, self._open_of = {}, {}
        if open_ids:
            for raw in self.client.hmget(self._k["orders"], list(open_ids)):
                if raw is not None:
                    self._remember(json.loads(raw))
        self._applied = {}
        for fill_id, qty in self.client.hscan_iter(self._k["applied"], count=1000):
            name = reply_text(fill_id)
            if name.partition(":")[0] in self._open:
                self._applied[name] = Decimal(reply_text(qty))

    def account_fields(self) -> dict[str, str]:
        return {**self._account, "cash": render.num(self._cash) or "0"}

    def cash(self) -> Decimal:
        return self._cash

    def change(self) -> Change:
        """Start building a change (its records shadow the book for ``load`` until committed)."""
        change = Change()
        self._staged = change.orders
        return change

    def drop_staged(self) -> None:
        self._staged = {}

    def load(self, order_id: str) -> dict[str, Any] | None:
        """An order by id: staged, open (from memory) or closed (from Redis)."""
        if order_id in self._staged:
            return self._staged[order_id]
        if order_id in self._open:
            return _copy(self._open[order_id])
        raw = self.client.hget(self._k["orders"], order_id)
        return None if raw is None else dict(json.loads(raw))

    def open_order(self, order_id: str) -> dict[str, Any] | None:
        """An open order by id (None once it has closed)."""
        record = self._open.get(order_id)
        return None if record is None else _copy(record)

    def order_id_for(self, client_order_id: str) -> str | None:
        return self._client_ids.get(client_order_id)

    def all_orders(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.client.hvals(self._k["orders"])]

    def open_orders(self) -> list[dict[str, Any]]:
        """Every open order, in acceptance order."""
        return sorted((_copy(r) for r in self._open.values()), key=lambda r: int(r["seq"]))

    def take_seqs(self, count: int) -> list[int]:
        """``count`` consecutive acceptance sequence numbers (an order then refused leaves a gap in
        the numbers, which only order the orders)."""
        first = self._seq + 1
        self._seq += count
        return list(range(first, self._seq + 1))

    def mark(self, prices: dict[str, Decimal]) -> set[str]:
        """Take each symbol's last price; return those of them with open orders."""
        self._prices.update(prices)
        self._unwritten_prices.update(prices)
        return {symbol for symbol in prices if self._open_of.get(symbol)}

    def open_orders_of(self, symbol: str, bar_id: str) -> list[tuple[dict[str, Any], Decimal | None]]:
        """``symbol``'s open orders in acceptance order, each with the quantity already filled on
        bar ``bar_id`` (None if none)."""
        records = sorted((self._open[i] for i in self._open_of.get(symbol, ())), key=lambda r: int(r["seq"]))
        return [(_copy(r), self._applied.get(f"{r['id']}:{bar_id}")) for r in records]

    def take_unwritten_prices(self) -> dict[str, Decimal]:
        """The prices marked since the last call, for :meth:`write_prices` (which needs no lock)."""
        taken, self._unwritten_prices = self._unwritten_prices, {}
        return taken

    def write_prices(self, prices: dict[str, Decimal]) -> None:
        """Write last prices to Redis (for a restart's estimates until its first bar)."""
        if prices:
            self.client.hset(self._k["prices"], mapping=_price_fields(prices))

    def save_order(self, record: dict[str, Any]) -> None:
        """Write one open record outside a change (a stop's trigger flag: no event, no money)."""
        self.client.hset(self._k["orders"], record["id"], json.dumps(record))
        self._remember(_copy(record))

    def positions(self) -> dict[str, tuple[Decimal, Decimal]]:
        return dict(self._positions)

    def prices(self) -> dict[str, Decimal]:
        return dict(self._prices)

    def ingested_price(self, symbol: str) -> Decimal | None:
        """The ingester's last close of ``symbol`` (a read from Redis), or None."""
        raw = self.client.hget(self._ingested, symbol)
        return None if raw is None else Decimal(reply_text(raw))

    def ingested_symbols(self) -> set[str]:
        """Every symbol the ingester has published a bar for (a read from Redis)."""
        return {reply_text(name) for name in self.client.hkeys(self._ingested)}

    def commit(self, change: Change) -> None:
        """Write ``change`` in one MULTI/EXEC, then into memory (an error leaves memory as it was)."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                if change.client_ids:
                    pipe.hset(self._k["client-ids"], mapping=change.client_ids)  # type: ignore[arg-type]
                if self._seq != self._written_seq:
                    pipe.set(self._k["seq"], self._seq)
                if change.position is not None:
                    symbol, quantity, average = change.position
                    if quantity == 0:
                        pipe.hdel(self._k["positions"], symbol)
                    else:
                        pipe.hset(self._k["positions"], symbol,
                                  json.dumps({"qty": render.num(quantity), "avg": render.num(average)}))
                if change.cash is not None:
                    pipe.hset(self._k["account"], "cash", render.num(change.cash) or "0")
                prices = self._unwritten_prices
                if prices:
                    pipe.hset(self._k["prices"], mapping=_price_fields(prices))
                if change.fill is not None:
                    pipe.hset(self._k["applied"], change.fill["fill_id"], change.fill["qty"])
                    pipe.xadd(self._k["fills"], change.fill)  # type: ignore[arg-type]
                for order_id, record in change.orders.items():
                    pipe.hset(self._k["orders"], order_id, json.dumps(record))
                    if record["status"] in OPEN_STATUSES:
                        pipe.zadd(self._k["open"], {order_id: record["seq"]})
                    else:
                        pipe.zrem(self._k["open"], order_id)
                for event in change.events:
                    pipe.xadd(self._k["events"], {"event": json.dumps(event)}, maxlen=10_000,
                              approximate=True)
                pipe.execute()
            self._apply(change)
        finally:
            self._staged = {}

    def _apply(self, change: Change) -> None:
        self._written_seq = self._seq
        self._unwritten_prices = {}
        self._client_ids.update(change.client_ids)
        if change.position is not None:
            symbol, quantity, average = change.position
            if quantity == 0:
                self._positions.pop(symbol, None)
            else:
                self._positions[symbol] = (quantity, average)
        if change.cash is not None:
            self._cash = change.cash
        if change.fill is not None:
            self._applied[change.fill["fill_id"]] = Decimal(change.fill["qty"])
        for record in change.orders.values():
            if record["status"] in OPEN_STATUSES:
                self._remember(_copy(record))
            else:
                self._forget(record)

    def _remember(self, record: dict[str, Any]) -> None:
        self._open[record["id"]] = record
        self._open_of.setdefault(record["symbol"], set()).add(record["id"])

    def _forget(self, record: dict[str, Any]) -> None:
        """A closed order leaves memory, with its applied fills (no bar can fill it again)."""
        order_id = record["id"]
        self._open.pop(order_id, None)
        self._open_of.get(record["symbol"], set()).discard(order_id)
        prefix = f"{order_id}:"
        for fill_id in [name for name in self._applied if name.startswith(prefix)]:
            del self._applied[fill_id]


def _positions_from(raw: Any) -> dict[str, tuple[Decimal, Decimal]]:
    """symbol -> (quantity, average entry), from HGETALL of the positions hash."""
    result = {}
    for symbol, value in raw.items():
        data = json.loads(value)
        result[reply_text(symbol)] = (Decimal(data["qty"]), Decimal(data["avg"]))
    return result


def _price_fields(prices: dict[str, Decimal]) -> dict[FieldT, EncodableT]:
    return {symbol: render.num(price) or "0" for symbol, price in prices.items()}


def _prices_from(raw: Any) -> dict[str, Decimal]:
    """symbol -> last close, from HGETALL of the prices hash."""
    return {reply_text(k): Decimal(reply_text(v)) for k, v in raw.items()}
