"""Risk's view of the account before each decision: the limits snapshot and the broker balance.

:class:`AccountView` reads everything :func:`shared.limits.check_order` decides on, fresh for each
intent: positions and open reservations from the portfolio (a pending order is its reservation's
unfilled part, so an order risk approved a moment ago counts before the executor has recorded
it), marks, the open orders (the executor's ``open-orders`` set and every open reservation),
completed and pending day trades, last bars, and the broker balance. Nothing is cached: two risk
processes see the same state.

The balance is refreshed from the broker when :func:`shared.limits.needs_refresh` says so (older
than ``balance_max_age_s``, or ``balance_refresh_after_fills`` fills since); the broker handle is
built lazily on first use, and a failure to build it or to reach it is reported as a reason (a
string), never raised: the caller refuses what needs a fresh balance and lets exits through.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import redis

from shared.account_activity import AccountActivity, pending_day_trades
from shared.brokers import Broker
from shared.clock import Clock
from shared.config import LimitSettings
from shared.errors import BrokerError, ConfigError
from shared.keys import Keys
from shared.limits import AccountSnapshot, needs_refresh, read_last_bars
from shared.logging import get_logger
from shared.portfolio import Portfolio, Snapshot

__all__ = ["AccountView"]

log = get_logger(component="risk")
MARKET_CLOCK_TTL_S = 30.0  # how long an answer from the broker's market clock is trusted
_ZERO = Decimal(0)


class AccountView:
    """Builds :class:`~shared.limits.AccountSnapshot` values and keeps the balance fresh."""

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

    def refresh_if_needed(self) -> str | None:
        """Refresh the balance from the broker if it is stale; None when fresh, else why it is not."""
        balance = self.activity.balance()
        now = self.clock.now()
        if not needs_refresh(balance.refreshed_at, balance.fills_since, now, self.limits):
            return None
        try:
            account = self.broker().account()
        except (BrokerError, ConfigError) as exc:
            log.warning("risk.balance_refresh_failed", error=str(exc))
            return f"the balance could not be refreshed from the broker ({type(exc).__name__}: {exc})"
        self.activity.record_balance(account.cash, account.equity, account.buying_power, now,
                                     balance.fills_since)
        log.info("risk.balance_refreshed", cash_before=_opt(balance.cash), cash=str(account.cash),
                 equity_before=_opt(balance.equity), equity=str(account.equity),
                 buying_power=str(account.buying_power), fills_since=balance.fills_since,
                 previous_refresh=balance.refreshed_at.isoformat() if balance.refreshed_at else None)
        return None

    def snapshot(self, book: Snapshot | None = None) -> AccountSnapshot:
        """Everything the limits decide on, read now."""
        book = book or self.portfolio.snapshot()
        marks = self.portfolio.marks()
        now = self.clock.now()
        balance = self.activity.balance()
        open_reservations = {rid: (r.side, r.symbol, r.qty - r.filled)
                             for rid, r in book.reservations.items()}
        pending: dict[str, Decimal] = {}
        for side, symbol, remaining in open_reservations.values():
            pending[symbol] = pending.get(symbol, _ZERO) + (remaining if side == "buy" else -remaining)
        opened = self.activity.opened_today(now)
        return AccountSnapshot(
            now=now,
            equity=balance.equity if balance.equity is not None else book.equity(marks),
            positions={s: p.qty for s, p in book.positions.items() if p.qty},
            pending=pending,
            prices=marks,
            open_orders=self._open_orders(set(book.reservations)),
            day_trades=self.activity.day_trades(now),
            pending_day_trades=pending_day_trades(open_reservations, opened),
            opened_today=opened,
            last_bars=read_last_bars(self.client, self.keys),
            balance_refreshed_at=balance.refreshed_at,
            fills_since_refresh=balance.fills_since,
        )

    def _open_orders(self, reservation_ids: set[str]) -> int:
        """Orders not yet terminal: every open reservation, and every open order the executor
        tracks whose reservation is already closed (counted once each)."""
        members: Any = self.client.smembers(self.keys.open_orders)
        cids = sorted(_text(m) for m in members)
        if not cids:
            return len(reservation_ids)
        with self.client.pipeline(transaction=False) as pipe:
            for cid in cids:
                pipe.hget(self.keys.order(cid), "reservation_id")
            owners: list[Any] = pipe.execute()
        extra = {cid for cid, rid in zip(cids, owners, strict=True)
                 if rid is None or _text(rid) not in reservation_ids}
        return len(reservation_ids) + len(extra)


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
