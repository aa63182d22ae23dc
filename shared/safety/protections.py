"""Freqtrade's protections, on account money, with locks persisted in Redis.

The risk service feeds in events and asks before each entry:

* :meth:`Protections.record_trade_closed` -- a round trip closed (its realised PnL after fees, and
  whether a stop-loss closed it);
* :meth:`Protections.record_equity` -- an account equity sample;
* :meth:`Protections.refusal` / :meth:`Protections.check` -- is an entry on (symbol, side) locked?

The four protections (parameters in :class:`~shared.config.ProtectionSettings`):

* **StoplossGuard**: when the stop-outs closed within the lookback reach ``trade_limit`` (counted
  globally, per symbol, per side, or per symbol and side), entries in that scope are locked
  until the last of them + ``duration``.
* **MaxDrawdown**: when account equity, within the lookback, has fallen from a peak by at least
  ``max_drawdown_fraction`` of that peak, every entry is locked until that sample + ``duration``.
* **CooldownPeriod**: after any exit on a symbol, its entries are locked for ``duration``.
* **LowProfitPairs**: when a symbol's realised PnL over the lookback (at least ``trade_limit``
  trades) is below ``low_profit_required``, its entries are locked until its last trade + ``duration``.

Guarantee: a protection triggers on the event that reaches its threshold -- not one before --
and its lock is active while ``now < until`` by the injected Clock, so it expires exactly on
time. Events "within the lookback" are those with ``at > now - lookback`` (Freqtrade's rule).
Locks live in the hash ``Keys.protection_locks`` (field ``<protection>:<symbol>:<side>``, value
``"<until µs> <json>"``) and events in two sorted sets beside it, so a new :class:`Protections`
over the same Redis -- a restarted risk service -- sees every lock and every event. Writing a
lock never shortens one already there (one script compares the ends); an expired lock is
removed lazily, only if nobody replaced it meanwhile. Recording the same trade twice (same
``trade_id`` and fields) is a no-op, so redelivered events are harmless.

Left to the caller: apply :meth:`Protections.refusal` to entries only (an exit is never locked),
decide what is a stop-out, alert on the locks each ``record_*`` returns, and engage the trading
state (:mod:`shared.safety.trading_state`) if a lock should also stop exits. Times come from the
caller's Clock: processes on several hosts that share the locks must keep their clocks in sync.
Its keys are :attr:`~shared.keys.Keys.protection_locks`, :attr:`~shared.keys.Keys.closed_trades`
and :attr:`~shared.keys.Keys.equity_samples`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.clock import Clock, LiveClock, epoch_micros, from_epoch_micros, utc
from shared.config import ProtectionSettings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Side
from shared.redis.boundary import redis_errors
from shared.redis.client import HDEL_IF_UNCHANGED_SCRIPT, HSET_IF_NEWER_SCRIPT, script
from shared.safety.limits import Refusal, Rule

__all__ = [
    "ANY",
    "COOLDOWN",
    "LOW_PROFIT",
    "MAX_DRAWDOWN",
    "STOPLOSS_GUARD",
    "ClosedTrade",
    "ProtectionLock",
    "Protections",
    "max_drawdown",
]

log = get_logger(module="protections")
ANY = "*"
STOPLOSS_GUARD = "stoploss_guard"
MAX_DRAWDOWN = "max_drawdown"
COOLDOWN = "cooldown"
LOW_PROFIT = "low_profit"




@dataclass(frozen=True)
class ClosedTrade:
    """A closed round trip: ``side`` is its entry side (BUY for a long), ``pnl`` realised after fees."""

    trade_id: str
    symbol: str
    side: Side
    pnl: Decimal
    stop_out: bool
    at: datetime

    def encode(self) -> str:
        return json.dumps({"id": self.trade_id, "symbol": self.symbol, "side": self.side.value,
                           "pnl": str(self.pnl), "stop_out": self.stop_out}, sort_keys=True)

    @classmethod
    def decode(cls, member: str, score: float) -> ClosedTrade:
        data = json.loads(member)
        return cls(data["id"], data["symbol"], Side(data["side"]), Decimal(data["pnl"]),
                   bool(data["stop_out"]), from_epoch_micros(int(score)))


@dataclass(frozen=True)
class ProtectionLock:
    """Entries on ``symbol`` (``*``: all) and ``side`` (``*``: both) are locked until ``until``."""

    protection: str
    symbol: str
    side: str
    until: datetime
    reason: str
    at: datetime

    @property
    def field(self) -> str:
        """The lock's field in the locks hash."""
        return f"{self.protection}:{self.symbol}:{self.side}"

    def blocks(self, symbol: str, side: Side | str) -> bool:
        """True if this lock covers an entry of ``side`` on ``symbol``."""
        return self.symbol in (ANY, symbol) and self.side in (ANY, Side(side).value)

    def active(self, now: datetime) -> bool:
        """True while ``now < until``."""
        return utc(now) < self.until

    def encode(self) -> str:
        return json.dumps({"protection": self.protection, "symbol": self.symbol, "side": self.side,
                           "until": self.until.isoformat(), "reason": self.reason, "at": self.at.isoformat()})

    @classmethod
    def decode(cls, value: str) -> ProtectionLock:
        data = json.loads(value.split(" ", 1)[1])
        return cls(data["protection"], data["symbol"], data["side"], datetime.fromisoformat(data["until"]),
                   data["reason"], datetime.fromisoformat(data["at"]))


def max_drawdown(samples: Iterable[tuple[datetime, Decimal]]) -> tuple[Decimal, datetime | None]:
    """The largest fall from a running peak, as a fraction of that peak, over samples in time
    order; with the time of the trough (None when equity never fell)."""
    peak: Decimal | None = None
    worst = Decimal(0)
    trough_at: datetime | None = None
    for at, equity in sorted(samples, key=lambda sample: sample[0]):
        if peak is None or equity > peak:
            peak = equity
            continue
        if peak > 0:
            drawdown = (peak - equity) / peak
            if drawdown > worst:
                worst, trough_at = drawdown, at
    return worst, trough_at


class Protections:
    """The four protections over one Redis (one key prefix); cheap to construct."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: ProtectionSettings,
                 clock: Clock | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock or LiveClock()
        self.trades_key = keys.closed_trades
        self.equity_key = keys.equity_samples

    # -- events ---------------------------------------------------------------------------------

    def record_trade_closed(self, trade: ClosedTrade) -> list[ProtectionLock]:
        """Record a closed trade and evaluate StoplossGuard, Cooldown and LowProfitPairs; return the
        locks written (new, or extended)."""
        at_us = epoch_micros(trade.at)
        with redis_errors("protections"):
            self.client.zadd(self.trades_key, {trade.encode(): at_us})
        self._prune(self.trades_key, max(self.settings.stoploss_guard_lookback_s,
                                         self.settings.low_profit_lookback_s))
        now = self.clock.now()
        written: list[ProtectionLock] = []
        s = self.settings
        if s.cooldown_enabled:
            self._lock(written, COOLDOWN, trade.symbol, ANY, trade.at, s.cooldown_duration_s,
                       f"cooldown after the exit of {trade.symbol} at {trade.at.isoformat()}", now)
        if s.stoploss_guard_enabled and trade.stop_out:
            self._stoploss_guard(trade, now, written)
        if s.low_profit_enabled:
            self._low_profit(trade.symbol, now, written)
        return written

    def record_equity(self, equity: Decimal, at: datetime | None = None) -> list[ProtectionLock]:
        """Record an account equity sample and evaluate MaxDrawdown; return the locks written."""
        at = utc(at) if at is not None else self.clock.now()
        at_us = epoch_micros(at)
        with redis_errors("protections"):
            self.client.zadd(self.equity_key, {f"{at_us}:{equity}": at_us})
        self._prune(self.equity_key, self.settings.max_drawdown_lookback_s)
        written: list[ProtectionLock] = []
        s = self.settings
        if not s.max_drawdown_enabled:
            return written
        now = self.clock.now()
        samples = [(from_epoch_micros(int(score)), Decimal(member.split(":", 1)[1]))
                   for member, score in self._since(self.equity_key, now, s.max_drawdown_lookback_s)]
        drawdown, trough_at = max_drawdown(samples)
        if trough_at is not None and drawdown >= s.max_drawdown_fraction:
            self._lock(written, MAX_DRAWDOWN, ANY, ANY, trough_at, s.max_drawdown_duration_s,
                       f"account equity drew down {drawdown:.4f} (limit {s.max_drawdown_fraction}) within "
                       f"{s.max_drawdown_lookback_s:g}s", now)
        return written

    # -- queries --------------------------------------------------------------------------------

    def active_locks(self) -> list[ProtectionLock]:
        """Every lock still active by the Clock, longest first (``bastion status``); expired ones
        are swept."""
        with redis_errors("protections"):
            return self.locks_from(self.client.hgetall(self.keys.protection_locks))

    def queue_locks(self, pipe: Pipeline) -> None:
        """Queue on ``pipe`` the read :meth:`locks_from` parses (for a caller batching reads)."""
        pipe.hgetall(self.keys.protection_locks)

    def locks_from(self, raw: Any) -> list[ProtectionLock]:
        """The active locks in a reply of the read :meth:`queue_locks` queues (expired ones swept)."""
        now = self.clock.now()
        active = []
        for name, value in raw.items():
            text = value.decode() if isinstance(value, bytes) else str(value)
            lock = ProtectionLock.decode(text)
            if lock.active(now):
                active.append(lock)
            else:
                field = name.decode() if isinstance(name, bytes) else str(name)
                self._run(HDEL_IF_UNCHANGED_SCRIPT, [self.keys.protection_locks], [field, text])
        return sorted(active, key=lambda lock: lock.until, reverse=True)

    def check(self, symbol: str, side: Side | str, locks: list[ProtectionLock] | None = None
              ) -> ProtectionLock | None:
        """The active lock that ends last among those blocking an entry of ``side`` on ``symbol``
        (among ``locks``, as :meth:`active_locks` returns them, when the caller read them already)."""
        found = self.active_locks() if locks is None else locks
        return next((lock for lock in found if lock.blocks(symbol, side)), None)

    def refusal(self, symbol: str, side: Side | str, locks: list[ProtectionLock] | None = None
                ) -> Refusal | None:
        """Why an entry of ``side`` on ``symbol`` is locked, or None (``locks`` as for :meth:`check`)."""
        lock = self.check(symbol, side, locks)
        if lock is None:
            return None
        return Refusal(Rule.PROTECTION_LOCK, f"{lock.protection} locks {symbol} {Side(side).value} entries "
                       f"until {lock.until.isoformat()}: {lock.reason}")

    def unlock(self, protection: str, symbol: str = ANY, side: str = ANY) -> bool:
        """Remove one lock by hand (an operator's override); True if there was one."""
        field = f"{protection}:{symbol}:{side}"
        with redis_errors("protections"):
            return bool(self.client.hdel(self.keys.protection_locks, field))

    # -- the protections ------------------------------------------------------------------------

    def _stoploss_guard(self, trade: ClosedTrade, now: datetime, written: list[ProtectionLock]) -> None:
        s = self.settings
        symbol = trade.symbol if s.stoploss_guard_per_symbol else ANY
        side = trade.side.value if s.stoploss_guard_per_side else ANY
        stops = [t for t in self._trades(now, s.stoploss_guard_lookback_s)
                 if t.stop_out and symbol in (ANY, t.symbol) and side in (ANY, t.side.value)]
        if len(stops) >= s.stoploss_guard_trade_limit:
            last = max(t.at for t in stops)
            self._lock(written, STOPLOSS_GUARD, symbol, side, last, s.stoploss_guard_duration_s,
                       f"{len(stops)} stop-outs within {s.stoploss_guard_lookback_s:g}s "
                       f"(limit {s.stoploss_guard_trade_limit})", now)

    def _low_profit(self, symbol: str, now: datetime, written: list[ProtectionLock]) -> None:
        s = self.settings
        trades = [t for t in self._trades(now, s.low_profit_lookback_s) if t.symbol == symbol]
        if len(trades) < s.low_profit_trade_limit:
            return
        profit = sum((t.pnl for t in trades), Decimal(0))
        if profit < s.low_profit_required:
            last = max(t.at for t in trades)
            self._lock(written, LOW_PROFIT, symbol, ANY, last, s.low_profit_duration_s,
                       f"{symbol} realised {profit} over {len(trades)} trades in "
                       f"{s.low_profit_lookback_s:g}s, below {s.low_profit_required}", now)

    # -- storage --------------------------------------------------------------------------------

    def _lock(self, written: list[ProtectionLock], protection: str, symbol: str, side: str, start: datetime,
              duration_s: float, reason: str, now: datetime) -> None:
        until = utc(start) + timedelta(seconds=duration_s)
        lock = ProtectionLock(protection, symbol, side, until, reason, now)
        if not lock.active(now):
            return
        args = [lock.field, epoch_micros(lock.until), lock.encode(), "0"]  # a lock is never shortened
        if self._run(HSET_IF_NEWER_SCRIPT, [self.keys.protection_locks], args):
            log.warning("protections.locked", protection=protection, symbol=symbol, side=side,
                        until=lock.until.isoformat(), reason=reason)
            written.append(lock)

    def _trades(self, now: datetime, lookback_s: float) -> list[ClosedTrade]:
        return [ClosedTrade.decode(member, score)
                for member, score in self._since(self.trades_key, now, lookback_s)]

    def _since(self, key: str, now: datetime, lookback_s: float) -> list[tuple[str, float]]:
        start = epoch_micros(now - timedelta(seconds=lookback_s))
        with redis_errors("protections"):
            raw: Any = self.client.zrangebyscore(key, f"({start}", "+inf", withscores=True)
        return [(member.decode() if isinstance(member, bytes) else str(member), float(score))
                for member, score in raw]

    def _prune(self, key: str, lookback_s: float) -> None:
        """Drop events older than any lookback can reach (twice the lookback: late events still count)."""
        horizon = epoch_micros(self.clock.now() - timedelta(seconds=2 * lookback_s))
        with redis_errors("protections"):
            self.client.zremrangebyscore(key, "-inf", f"({horizon}")

    def _run(self, text: str, keys: list[str], args: list[Any]) -> Any:
        run = script(self.client, text)
        with redis_errors("protections"):
            return run(keys=keys, args=args, client=self.client)

