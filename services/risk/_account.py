"""Risk's view of the account before each decision: the limits snapshot and the broker balance.

:class:`AccountView` reads everything :func:`shared.safety.limits.check_order` decides on, fresh for each
intent: positions and open reservations from the portfolio (a pending order is its reservation's
unfilled part, so an order risk approved a moment ago counts before the executor has recorded
it), marks, the open orders (the executor's ``open-orders`` set and every open reservation),
completed and pending day trades, when each symbol's newest bar arrived (stale data), the broker
balance, the trading state, protection locks, the deferred queue and whether the intent was
decided already -- all in one pipelined round trip (:meth:`AccountView.read`). Nothing is cached
but each order's reservation id, which never changes: two risk processes see the same state.

The balance is refreshed from the broker when :func:`shared.safety.limits.needs_refresh` says so (older
than ``balance_max_age_s``, or ``balance_refresh_after_fills`` fills since); the broker handle is
built lazily on first use, and a failure to build it or to reach it is reported as a reason (a
string), never raised: the caller refuses what needs a fresh balance and lets exits through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import redis

from shared.brokers import Broker
from shared.bus import Idempotency
from shared.clock import Clock
from shared.config import LimitSettings
from shared.errors import BrokerError, ConfigError
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import CLIENT_ORDER_PREFIX
from shared.portfolio import Held, Portfolio, Snapshot
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text
from shared.safety.account_activity import AccountActivity, Balance, pending_day_trades
from shared.safety.deferred import DeferredQueue
from shared.safety.limits import AccountSnapshot, OrderSubmissions, Refusal, bar_arrivals_from, needs_refresh
from shared.safety.protections import ProtectionLock, Protections
from shared.safety.trading_state import KillSwitch, TradingStatus

__all__ = ["AccountView", "Reads", "client_order_id"]

log = get_logger(component="risk")
MARKET_CLOCK_TTL_S = 30.0  # how long an answer from the broker's market clock is trusted
_ZERO = Decimal(0)
_REMEMBERED_ORDERS = 100_000  # client_order_id -> reservation id pairs kept before starting over


def client_order_id(intent_id: str) -> str:
    """The broker's client_order_id for the order an intent becomes (deterministic)."""
    return f"{CLIENT_ORDER_PREFIX}{intent_id}"


class AccountView:
    """Builds :class:`~shared.safety.limits.AccountSnapshot` values and keeps the balance fresh."""

    def __init__(self, client: redis.Redis, keys: Keys, portfolio: Portfolio, limits: LimitSettings,
                 clock: Clock, broker_factory: Callable[[], Broker] | None) -> None:
        self.client = client
        self.keys = keys
        self.portfolio = portfolio
        self.limits = limits
        self.clock = clock
        self.activity = AccountActivity(client, keys, portfolio.account)
        self._broker_factory = broker_factory
        self._broker: Broker | None = None
        self._market_open = True
        self._market_checked_at: float | None = None
        self._reservation_of: dict[str, str] = {}  # client_order_id -> its reservation id

    def broker(self) -> Broker:
        """The broker handle, built on first use (ConfigError / BrokerError when it cannot be)."""
        if self._broker is None:
            if self._broker_factory is None:
                raise ConfigError([("broker", "risk has no broker to refresh the balance from")])
            self._broker = self._broker_factory()
        return self._broker

    def market_closed(self) -> str | None:
        """Why orders cannot execute now because the market is closed, or None when it is open.

        The broker's clock is asked at most every ``MARKET_CLOCK_TTL_S`` seconds; a broker that
        cannot be asked counts as open here (the stale-balance rule already holds entries back).
        """
        now = self.clock.monotonic()
        if self._market_checked_at is None or now - self._market_checked_at >= MARKET_CLOCK_TTL_S:
            try:
                self._market_open = self.broker().market_open()
            except (BrokerError, ConfigError) as exc:
                log.warning("risk.market_clock_failed", error=str(exc))
                self._market_open = True
            self._market_checked_at = now
        return None if self._market_open else "the market is closed"

    def read(self, intent_id: str, *, once: Idempotency, kill_switch: KillSwitch, protections: Protections,
             deferred: DeferredQueue, submissions: OrderSubmissions) -> Reads:
        """Everything one decision reads, in one pipelined round trip, with a submission counted
        in the same trip (the caller refunds it unless the decision becomes an order).

        The same trip tries to take the account lock before reading the portfolio: when it is
        free (``reads.held``), the whole decision is made under it, read after it, and the
        reservation is written without locking again; the caller must spend it
        (``Portfolio.reserve(held=...)`` or :meth:`let_go`). A market clock due for a refresh is
        asked first, so that no broker call is made under the lock.
        """
        self.market_closed()
        now = self.clock.now()
        with redis_errors("risk: reading the account"), self.client.pipeline(transaction=False) as pipe:
            admission_id = submissions.queue_admit(pipe)
            once.queue_seen(pipe, intent_id)
            lock = self.portfolio.queue_reads_holding(pipe, intent_id)
            self.activity.queue_reads(pipe, now)
            kill_switch.queue_current(pipe)
            protections.queue_locks(pipe)
            deferred.queue_read(pipe)
            pipe.hgetall(self.keys.bar_arrival)
            pipe.smembers(self.keys.open_orders)
            (admission, seen, book, marks, balance, opened, day_trades, status, locks, queued, arrivals,
             open_orders) = pipe.execute()
        snapshot, held = self.portfolio.held_from(lock, book, intent_id)
        return Reads(
            now=now, seen=bool(seen), book=snapshot, held=held,
            marks=self.portfolio.marks_from(marks), balance=self.activity.balance_from(balance),
            opened_today=self.activity.opened_from(opened),
            day_trades=self.activity.day_trades_from(day_trades),
            status=kill_switch.status_from(status), locks=protections.locks_from(locks), deferred=queued,
            bar_arrivals=bar_arrivals_from(arrivals), open_orders=sorted(reply_text(m) for m in open_orders),
            admission_id=admission_id, admission=submissions.admitted(admission))

    def refresh_if_needed(self, reads: Reads) -> str | None:
        """Refresh the balance from the broker if it is stale (``reads.balance`` is then replaced);
        None when fresh, else why it is not."""
        balance = reads.balance
        now = self.clock.now()
        if not needs_refresh(balance.refreshed_at, balance.fills_since, now, self.limits):
            return None
        self.let_go(reads)  # no broker call under the lock: the reservation will lock again
        try:
            account = self.broker().account()
        except (BrokerError, ConfigError) as exc:
            log.warning("risk.balance_refresh_failed", error=str(exc))
            return f"the balance could not be refreshed from the broker ({type(exc).__name__}: {exc})"
        self.activity.record_balance(account.cash, account.equity, account.buying_power, now,
                                     balance.fills_since)
        reads.balance = Balance(account.cash, account.equity, account.buying_power, now, 0)
        log.info("risk.balance_refreshed", cash_before=_opt(balance.cash), cash=str(account.cash),
                 equity_before=_opt(balance.equity), equity=str(account.equity),
                 buying_power=str(account.buying_power), fills_since=balance.fills_since,
                 previous_refresh=balance.refreshed_at.isoformat() if balance.refreshed_at else None)
        return None

    def let_go(self, reads: Reads) -> None:
        """Release the account lock ``reads`` holds, if it still holds it."""
        if reads.held is not None:
            held, reads.held = reads.held, None
            self.portfolio.let_go(held)

    def snapshot(self, reads: Reads) -> AccountSnapshot:
        """Everything the limits decide on, from one decision's reads."""
        book, marks, balance = reads.book, reads.marks, reads.balance
        open_reservations = {rid: (r.side, r.symbol, r.qty - r.filled)
                             for rid, r in book.reservations.items()}
        pending: dict[str, Decimal] = {}
        for side, symbol, remaining in open_reservations.values():
            pending[symbol] = pending.get(symbol, _ZERO) + (remaining if side == "buy" else -remaining)
        return AccountSnapshot(
            now=reads.now,
            equity=balance.equity if balance.equity is not None else book.equity(marks),
            positions={s: p.qty for s, p in book.positions.items() if p.qty},
            pending=pending,
            prices=marks,
            open_orders=self._open_orders(reads.open_orders, set(book.reservations)),
            day_trades=reads.day_trades,
            pending_day_trades=pending_day_trades(open_reservations, reads.opened_today),
            opened_today=reads.opened_today,
            bar_arrivals=reads.bar_arrivals,
            balance_refreshed_at=balance.refreshed_at,
            fills_since_refresh=balance.fills_since,
        )

    def _open_orders(self, cids: list[str], reservation_ids: set[str]) -> int:
        """Orders not yet terminal: every open reservation, and every open order the executor
        tracks whose reservation is already closed (counted once each). An order risk approved
        has the client_order_id derived from its reservation's id (the intent id); any other
        order's reservation id is read from its record once and remembered (it never changes)."""
        ours = {client_order_id(rid) for rid in reservation_ids}
        unknown = [cid for cid in cids if cid not in ours and cid not in self._reservation_of]
        if unknown:
            with self.client.pipeline(transaction=False) as pipe:
                for cid in unknown:
                    pipe.hget(self.keys.order(cid), "reservation_id")
                owners: list[Any] = pipe.execute()
            if len(self._reservation_of) + len(unknown) > _REMEMBERED_ORDERS:
                self._reservation_of.clear()
            self._reservation_of.update((cid, reply_text(rid))
                                        for cid, rid in zip(unknown, owners, strict=True) if rid is not None)
        extra = {cid for cid in cids
                 if cid not in ours and self._reservation_of.get(cid) not in reservation_ids}
        return len(reservation_ids) + len(extra)


@dataclass
class Reads:
    """What one decision reads (:meth:`AccountView.read`): one consistent moment, one round trip."""

    now: datetime
    seen: bool  # the intent was decided already
    book: Snapshot  # read under ``held`` when that is set
    held: Held | None  # the account lock, taken in the same round trip (None: it was busy, or let go)
    marks: dict[str, Decimal]
    balance: Balance
    opened_today: dict[str, Decimal]
    day_trades: list[date]
    status: TradingStatus
    locks: list[ProtectionLock]
    deferred: Any  # the deferred queue's raw read (for DeferredQueue.get)
    bar_arrivals: dict[str, datetime]  # when the ingester accepted each symbol's newest bar
    open_orders: list[str]  # client_order_ids the executor tracks as open
    admission_id: str  # the submission counted for this decision (OrderSubmissions.queue_refund)
    admission: Refusal | None  # None: counted; else why the submissions limit refuses


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
