"""What a strategy sees of the account in ``on_bar``: ``self.account``, a frozen :class:`AccountView`.

The worker reads the account once per pass, after reading the pass's bars and before the first
``on_bar``: the marks, the trading state and the open-order set go in the same pipelined round
trip as the states the pass needs; the portfolio is one more (:meth:`Portfolio.snapshot`); the
records of open orders are read, in one more, only when some may be of the pass's symbols (an
order's symbol never changes, so a worker remembers it). Every symbol of a pass sees the view
of that one read, each of its own position and orders.

Guarantee: a view is consistent per source (one script for the portfolio) but not across them,
and it is a pass old by the time risk judges an intent: risk decides on the account afresh,
under its lock. Left to the strategy: decide on ``(state, bar, account)`` only. A refused commit
runs the pass again on fresh reads, so a view that changed meanwhile may change what a bar
emits; nothing of the refused run was published, so nothing is doubled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.clock import Clock
from shared.config import Settings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import OrderStatus, OrderType, Side
from shared.portfolio import Portfolio, Snapshot
from shared.redis.client import reply_text
from shared.safety.trading_state import KillSwitch, TradingState

__all__ = ["AccountReader", "AccountView", "OpenOrder"]

log = get_logger(component="strategy")
ZERO = Decimal(0)


@dataclass(frozen=True)
class OpenOrder:
    """One of the symbol's orders the executor holds open (its record, ``<prefix>:order:<cid>``)."""

    client_order_id: str
    side: Side
    quantity: Decimal
    filled: Decimal  # applied to the portfolio so far
    status: OrderStatus
    order_type: OrderType


@dataclass(frozen=True)
class AccountView:
    """The account as one strategy sees it for one batch; frozen (assigning a field raises).

    Built outside a worker (a strategy's own unit test), it is a flat, empty, ACTIVE account
    unless given otherwise.
    """

    symbol: str
    position_qty: Decimal = ZERO  # signed: negative when short
    avg_cost: Decimal = ZERO
    equity: Decimal = ZERO  # cash + every position at its last mark (its average cost without one)
    buying_power: Decimal = ZERO  # cash not held by a reservation
    open_orders: tuple[OpenOrder, ...] = ()
    trading_state: TradingState = TradingState.ACTIVE


class AccountReader:
    """Reads the views of one pass: :meth:`queue` the batched reads, then :meth:`views`."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock) -> None:
        self.client = client
        self.keys = keys
        self.portfolio = Portfolio(client, keys, settings.portfolio.account, settings=settings.portfolio,
                                   lock_settings=settings.lock, clock=clock)
        self.kill_switch = KillSwitch(client, keys, clock)
        self._symbol_of: dict[str, str] = {}  # client_order_id -> symbol, for the orders still open

    def queue(self, pipe: Pipeline) -> None:
        """Queue on ``pipe`` the three reads :meth:`views` takes the replies of, in this order."""
        pipe.hgetall(self.keys.last_price)
        self.kill_switch.queue_current(pipe)
        pipe.smembers(self.keys.open_orders)

    def views(self, replies: Sequence[Any], symbols: Collection[str]) -> dict[str, AccountView]:
        """The view of each of ``symbols``, from the replies of :meth:`queue`'s reads and the
        portfolio read now."""
        marks_raw, status_raw, members = replies
        book = self.portfolio.snapshot()
        equity = book.equity(self.portfolio.marks_from(marks_raw))
        state = self.kill_switch.status_from(status_raw).state
        orders = self._open_orders(sorted(reply_text(m) for m in members), symbols)
        return {symbol: _view(symbol, book, equity, state, orders.get(symbol, ())) for symbol in symbols}

    def _open_orders(self, cids: list[str], symbols: Collection[str]) -> dict[str, tuple[OpenOrder, ...]]:
        """The open orders of ``symbols`` among ``cids``: the records of those whose symbol is one
        of them or not yet known, read in one round trip."""
        self._symbol_of = {cid: self._symbol_of[cid] for cid in cids if cid in self._symbol_of}
        wanted = [cid for cid in cids if cid not in self._symbol_of or self._symbol_of[cid] in symbols]
        if not wanted:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for cid in wanted:
                pipe.hgetall(self.keys.order(cid))
            records = pipe.execute()
        found: dict[str, list[OpenOrder]] = {}
        for cid, raw in zip(wanted, records, strict=True):
            record = {reply_text(k): reply_text(v) for k, v in raw.items()}
            if "symbol" not in record:
                continue  # the set names an order whose record is gone: nothing to show
            self._symbol_of[cid] = record["symbol"]
            order = _order(cid, record)
            if order is not None and record["symbol"] in symbols:
                found.setdefault(record["symbol"], []).append(order)
        return {symbol: tuple(orders) for symbol, orders in found.items()}


def _order(cid: str, record: Mapping[str, str]) -> OpenOrder | None:
    """An open order from the executor's record; None when it is terminal or malformed (logged)."""
    try:
        order = OpenOrder(cid, Side(record["side"]), Decimal(record["quantity"]),
                          Decimal(record.get("applied_qty", "0")), OrderStatus(record["status"]),
                          OrderType(record.get("order_type", "market")))
    except (KeyError, ValueError, ArithmeticError) as exc:
        log.warning("strategy.order_record_unreadable", client_order_id=cid, error=repr(exc))
        return None
    return None if order.status.is_terminal else order


def _view(symbol: str, book: Snapshot, equity: Decimal, state: TradingState,
          orders: tuple[OpenOrder, ...]) -> AccountView:
    held = book.positions.get(symbol)
    return AccountView(symbol=symbol, position_qty=held.qty if held else ZERO,
                       avg_cost=held.avg_cost if held else ZERO, equity=equity,
                       buying_power=book.buying_power, open_orders=orders, trading_state=state)
