"""What risk needs to know about an account's recent activity, written by the executor and risk.

* **The broker balance** risk sized on last (``cash``, ``equity``, ``buying_power``, when it was
  read) and how many fills were applied since: the executor counts fills, risk refreshes the
  balance from the broker when :func:`shared.safety.limits.needs_refresh` says so.
* **Day trades** (pattern day trading): the executor records, per New York trading day, how much
  of each symbol was opened that day, and every order whose fill closed part of a position opened
  the same day (a completed day trade, one per order).

Guarantee: each write is one MULTI, so a reader never sees half of it (a fill's counts go in the
MULTI that also writes its order's record, :meth:`AccountActivity.queue_fill`). A refresh subtracts the
fill count it read *before* asking the broker, so a fill applied during the refresh is still
counted afterwards (never lost, at worst counted towards the next refresh). Recording a fill is
at most once: the caller records a fill only after the portfolio applied it for the first time,
and a crash between the two loses that one record (the PDT count then errs towards allowing one
trade -- the broker's own PDT check still stands behind it).

Left to the caller: the executor is the only writer of the day-trade keys (one per account), and
serialises its own calls.

Keys (``redis-cli``; all share the account's hash tag)::

    <prefix>:portfolio:{acct}:balance            cash equity buying_power refreshed_at fills_since
    <prefix>:portfolio:{acct}:day-trades         ZRANGE ... WITHSCORES: client_order_id, day yyyymmdd
    <prefix>:portfolio:{acct}:opened:<yyyy-mm-dd> symbol -> signed quantity opened that day (expires)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.keys import Keys
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text
from shared.safety.limits import trading_day

__all__ = ["AccountActivity", "Balance", "pending_day_trades"]

_ZERO = Decimal(0)
_OPENED_TTL_S = 3 * 24 * 3600
DAY_TRADE_WINDOW_DAYS = 14  # calendar days of day trades read (the PDT rule counts 5 business days)


@dataclass(frozen=True)
class Balance:
    """The balance as last read from the broker, and the fills applied since."""

    cash: Decimal | None
    equity: Decimal | None
    buying_power: Decimal | None
    refreshed_at: datetime | None
    fills_since: int


class AccountActivity:
    """Balance refreshes, fill counts and day trades of one account."""

    def __init__(self, client: redis.Redis, keys: Keys, account: str) -> None:
        self.client = client
        self.balance_key = keys.portfolio_part(account, "balance")
        self.day_trades_key = keys.portfolio_part(account, "day-trades")
        self._keys = keys
        self._account = account

    def opened_key(self, day: date) -> str:
        """The hash of what was opened on ``day``."""
        return self._keys.portfolio_part(self._account, f"opened:{day.isoformat()}")

    # -- balance -------------------------------------------------------------------------------

    def balance(self) -> Balance:
        """The last refreshed balance (fields None when it was never read)."""
        with redis_errors("account activity"):
            return self.balance_from(self.client.hgetall(self.balance_key))

    def queue_reads(self, pipe: Pipeline, now: datetime) -> None:
        """Queue on ``pipe`` the balance, opened-today and day-trade reads, in that order (for a
        caller batching reads; :meth:`balance_from`, :meth:`opened_from`, :meth:`day_trades_from`)."""
        pipe.hgetall(self.balance_key)
        pipe.hgetall(self.opened_key(trading_day(now)))
        pipe.zrangebyscore(self.day_trades_key, _day_score(now), "+inf", withscores=True)

    @staticmethod
    def balance_from(raw: Any) -> Balance:
        """The balance in a reply of the balance read."""
        fields = {reply_text(k): reply_text(v) for k, v in raw.items()}

        def money(name: str) -> Decimal | None:
            return Decimal(fields[name]) if name in fields else None

        at = fields.get("refreshed_at")
        return Balance(money("cash"), money("equity"), money("buying_power"),
                       datetime.fromisoformat(at) if at else None, int(fields.get("fills_since", "0")))

    def record_balance(self, cash: Decimal, equity: Decimal, buying_power: Decimal, at: datetime,
                       fills_seen: int) -> None:
        """Store a balance just read from the broker; ``fills_seen`` is the count read before."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.balance_key, mapping={"cash": str(cash), "equity": str(equity),
                                                 "buying_power": str(buying_power),
                                                 "refreshed_at": at.isoformat()})
            pipe.hincrby(self.balance_key, "fills_since", -fills_seen)
            with redis_errors("account activity"):
                pipe.execute()

    # -- fills and day trades ------------------------------------------------------------------

    def queue_fill(self, pipe: Pipeline, client_order_id: str, symbol: str, signed_qty: Decimal,
                   position_before: Decimal, at: datetime) -> bool:
        """Count one applied fill (``signed_qty``: + buy, - sell) against ``position_before``: read
        what ``symbol`` opened on ``at``'s trading day (one round trip) and queue the writes on
        ``pipe``, a MULTI the caller executes; True if it completed a day trade (it closed part of
        a position opened that day)."""
        day = trading_day(at)
        key = self.opened_key(day)
        with redis_errors("account activity"):
            opened = _dec(self.client.hget(key, symbol))
        closing = _ZERO
        if position_before and (position_before > 0) != (signed_qty > 0):
            closing = min(abs(signed_qty), abs(position_before))
        opening = abs(signed_qty) - closing
        day_trade = closing > 0 and opened != 0 and (opened > 0) == (position_before > 0)
        if day_trade:
            opened -= min(closing, abs(opened)) * (1 if opened > 0 else -1)
        if opening > 0:
            opened += opening if signed_qty > 0 else -opening
        pipe.hincrby(self.balance_key, "fills_since", 1)
        pipe.hset(key, symbol, str(opened))
        pipe.expire(key, _OPENED_TTL_S)
        if day_trade:
            pipe.zadd(self.day_trades_key, {client_order_id: int(day.strftime("%Y%m%d"))})
        return day_trade

    def opened_today(self, now: datetime) -> dict[str, Decimal]:
        """Signed quantity of each symbol opened on ``now``'s trading day and not yet closed."""
        with redis_errors("account activity"):
            return self.opened_from(self.client.hgetall(self.opened_key(trading_day(now))))

    @staticmethod
    def opened_from(raw: Any) -> dict[str, Decimal]:
        """What was opened today, from a reply of the opened-today read."""
        return {reply_text(k): _dec(v) for k, v in raw.items() if _dec(v)}

    def day_trades(self, now: datetime) -> list[date]:
        """The trading day of each completed day trade within the last ``DAY_TRADE_WINDOW_DAYS``."""
        with redis_errors("account activity"):
            raw = self.client.zrangebyscore(self.day_trades_key, _day_score(now), "+inf", withscores=True)
        return self.day_trades_from(raw)

    @staticmethod
    def day_trades_from(raw: Any) -> list[date]:
        """The day trades in a reply of the day-trade read."""
        return [_day(int(score)) for _, score in raw]


def pending_day_trades(reservations: Mapping[str, tuple[str, str, Decimal]],
                       opened: Mapping[str, Decimal]) -> int:
    """Open orders (``rid -> (side, symbol, remaining)``) that would complete a day trade: a sell of
    a symbol opened long today, a buy of one opened short today."""
    count = 0
    for side, symbol, remaining in reservations.values():
        today = opened.get(symbol, _ZERO)
        if remaining > 0 and ((side == "sell" and today > 0) or (side == "buy" and today < 0)):
            count += 1
    return count


def _day_score(now: datetime) -> int:
    """The score of the oldest day trade still counted at ``now``."""
    since = trading_day(now) - timedelta(days=DAY_TRADE_WINDOW_DAYS)
    return int(since.strftime("%Y%m%d"))


def _day(stamp: int) -> date:
    return date(stamp // 10_000, stamp // 100 % 100, stamp % 100)


def _dec(value: Any) -> Decimal:
    return Decimal(reply_text(value)) if value is not None else _ZERO



