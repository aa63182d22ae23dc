"""Freqtrade's protections, on account money, with locks persisted in Redis.

The risk service feeds in events and asks before each entry:

* :meth:`Protections.record_trade_closed` -- a round trip closed (its realised PnL after fees, and
  its :class:`~shared.models.ExitReason`: what closed it);
* :meth:`Protections.record_equity` -- an account equity sample;
* :meth:`Protections.refusal` / :meth:`Protections.check` -- is an entry on (symbol, side) locked?

The four protections (parameters in :class:`~shared.config.ProtectionSettings`):

* **StoplossGuard**: when the stop-outs closed within the lookback reach ``trade_limit`` (counted
  globally, per symbol, per side, or per symbol and side), entries in that scope are locked
  until the last of them + ``duration``. A stop-out is a trade whose exit reason is a stop
  (``ExitReason.is_stop``: stop-loss, trailing stop, protection failed) and whose PnL is below
  ``required_profit`` (money, after fees; Freqtrade's rule on profit), so with the default 0 a
  trailing stop that closed in profit does not count.
* **MaxDrawdown**: when account equity, within the lookback, has fallen from a peak by at least
  ``max_drawdown_fraction`` of that peak, every entry is locked until that sample + ``duration``.
* **CooldownPeriod**: after any exit on a symbol, its entries are locked for ``duration``.
* **LowProfitPairs**: when a symbol's realised PnL over the lookback (at least ``trade_limit``
  trades) is below ``low_profit_required``, its entries are locked until its last trade + ``duration``.
  With ``low_profit_per_side`` the trades are grouped by entry side and only that side is locked.

An operator manages locks with :meth:`Protections.lock` (a lock by hand, under the protection
``manual``, honoured like any other) and :meth:`Protections.unlock`; both log who and why. An
unlock removes the lock, not the events that caused it::

    time 0: StoplossGuard (limit 4) locks every entry after the 4th stop-out
    time 1: an operator unlocks it
    time 2: a 5th stop-out closes: 5 stop-outs within the lookback, so it locks again

Guarantee: a protection triggers on the event that reaches its threshold -- not one before --
and its lock is active while ``now < until`` by the injected Clock, so it expires exactly on
time. Events "within the lookback" are those with ``at > now - lookback`` (Freqtrade's rule).
Locks live in the hash ``Keys.protection_locks`` (field ``<protection>:<symbol>:<side>``, value
``"<until µs> <json>"``) and events in two sorted sets beside it, so a new :class:`Protections`
over the same Redis -- a restarted risk service -- sees every lock and every event. Writing a
lock never shortens one already there (one script compares the ends); an expired lock is
removed lazily, only if nobody replaced it meanwhile. Recording the same trade twice (same
``trade_id`` and fields) is a no-op, so redelivered events are harmless; a trade stored with the
earlier ``stop_out`` flag reads as STOP_LOSS (true) or SIGNAL (false), and recording it again
with its exit reason replaces it rather than counting it twice.

Left to the caller: apply :meth:`Protections.refusal` to entries only (an exit is never locked),
give each closed trade its exit reason, alert on the locks each ``record_*`` returns, and engage
the trading state (:mod:`shared.safety.trading_state`) if a lock should also stop exits. Times
come from the caller's Clock: processes on several hosts that share the locks must keep their
clocks in sync.
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
from shared.models import ExitReason, Side
from shared.redis.boundary import redis_errors
from shared.redis.client import HDEL_IF_UNCHANGED_SCRIPT, HSET_IF_NEWER_SCRIPT, reply_text, script
from shared.safety.limits import Refusal, Rule

__all__ = [
    "ANY",
    "COOLDOWN",
    "LOW_PROFIT",
    "MANUAL",
    "MAX_DRAWDOWN",
    "PROTECTIONS",
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
MANUAL = "manual"
PROTECTIONS = (STOPLOSS_GUARD, MAX_DRAWDOWN, COOLDOWN, LOW_PROFIT, MANUAL)


@dataclass(frozen=True)
class ClosedTrade:
    """A closed round trip: ``side`` is its entry side (BUY for a long), ``pnl`` realised after fees,
    ``exit_reason`` what closed it."""

    trade_id: str
    symbol: str
    side: Side
    pnl: Decimal
    exit_reason: ExitReason
    at: datetime

    def _fields(self) -> dict[str, str]:
        return {"id": self.trade_id, "symbol": self.symbol, "side": self.side.value, "pnl": str(self.pnl)}

    def encode(self) -> str:
        return json.dumps({**self._fields(), "exit_reason": self.exit_reason.value}, sort_keys=True)

    def _legacy_encodings(self) -> list[str]:
        """This trade as it was stored before exit reasons, with either ``stop_out`` flag."""
        return [json.dumps({**self._fields(), "stop_out": flag}, sort_keys=True) for flag in (True, False)]

    @classmethod
    def decode(cls, member: str, score: float) -> ClosedTrade:
        """A stored trade; one stored with a ``stop_out`` flag reads as STOP_LOSS (true) or SIGNAL."""
        data = json.loads(member)
        if "exit_reason" in data:
            reason = ExitReason(data["exit_reason"])
        else:
            reason = ExitReason.STOP_LOSS if data["stop_out"] else ExitReason.SIGNAL
        return cls(data["id"], data["symbol"], Side(data["side"]), Decimal(data["pnl"]), reason,
                   from_epoch_micros(int(score)))


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
    """The four protections and the operator's locks over one Redis (one key prefix); cheap to
    construct."""

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
        with redis_errors("protections"), self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.trades_key, *trade._legacy_encodings())  # itself, if stored before exit reasons
            pipe.zadd(self.trades_key, {trade.encode(): at_us})
            pipe.execute()
        self._prune(self.trades_key, max(self.settings.stoploss_guard_lookback_s,
                                         self.settings.low_profit_lookback_s))
        now = self.clock.now()
        written: list[ProtectionLock] = []
        s = self.settings
        if s.cooldown_enabled:
            self._lock(written, COOLDOWN, trade.symbol, ANY, trade.at, s.cooldown_duration_s,
                       f"cooldown after the exit of {trade.symbol} at {trade.at.isoformat()}", now)
        if s.stoploss_guard_enabled and self.is_stop_out(trade):
            self._stoploss_guard(trade, now, written)
        if s.low_profit_enabled:
            self._low_profit(trade, now, written)
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

    def is_stop_out(self, trade: ClosedTrade) -> bool:
        """True if StoplossGuard counts ``trade``: a stop closed it, below the required profit."""
        return trade.exit_reason.is_stop and trade.pnl < self.settings.stoploss_guard_required_profit

    # -- an operator's locks --------------------------------------------------------------------

    def lock(self, symbol: str, side: Side | str, until: datetime, reason: str, who: str
             ) -> ProtectionLock | None:
        """Lock entries of ``side`` (``*``: both) on ``symbol`` (``*``: all) until ``until`` by hand,
        under the protection :data:`MANUAL`; return the lock, or None when the manual lock already
        on that symbol and side ends as late or later (it is kept: a lock is never shortened).
        ValueError for a blank symbol, reason or who, a bad side, or ``until`` not after now."""
        side_value = ANY if side == ANY else Side(side).value
        if not (symbol.strip() and reason.strip() and who.strip()):
            raise ValueError("a manual lock needs a symbol, a reason and who")
        now = self.clock.now()
        lock = ProtectionLock(MANUAL, symbol, side_value, utc(until), f"{reason} (by {who})", now)
        if not lock.active(now):
            raise ValueError(f"a manual lock must end after now ({now.isoformat()})")
        if self._store(lock, who=who):
            return lock
        log.info("protections.lock_kept", protection=MANUAL, symbol=symbol, side=side_value,
                 until=lock.until.isoformat(), reason=lock.reason, who=who)
        return None

    def unlock(self, protection: str, symbol: str, side: str, reason: str, who: str) -> bool:
        """Remove the active lock of ``protection`` on ``symbol`` and ``side`` (its field) by hand;
        True if there was one. Logged with who and why either way; ValueError for a blank reason
        or who."""
        if not (reason.strip() and who.strip()):
            raise ValueError("an unlock needs a reason and who")
        field = f"{protection}:{symbol}:{side}"
        with redis_errors("protections"), self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.protection_locks, field)
            pipe.hdel(self.keys.protection_locks, field)
            value, _ = pipe.execute()
        lock = ProtectionLock.decode(reply_text(value)) if value is not None else None
        context = {"protection": protection, "symbol": symbol, "side": side, "who": who, "reason": reason}
        if lock is None or not lock.active(self.clock.now()):  # an expired one was swept, no more
            log.info("protections.unlock_found_none", **context)
            return False
        log.warning("protections.unlocked", until=lock.until.isoformat(), lock_reason=lock.reason, **context)
        return True

    # -- the protections ------------------------------------------------------------------------

    def _stoploss_guard(self, trade: ClosedTrade, now: datetime, written: list[ProtectionLock]) -> None:
        s = self.settings
        symbol = trade.symbol if s.stoploss_guard_per_symbol else ANY
        side = trade.side.value if s.stoploss_guard_per_side else ANY
        stops = [t for t in self._trades(now, s.stoploss_guard_lookback_s)
                 if self.is_stop_out(t) and symbol in (ANY, t.symbol) and side in (ANY, t.side.value)]
        if len(stops) >= s.stoploss_guard_trade_limit:
            last = max(t.at for t in stops)
            self._lock(written, STOPLOSS_GUARD, symbol, side, last, s.stoploss_guard_duration_s,
                       f"{len(stops)} stop-outs within {s.stoploss_guard_lookback_s:g}s "
                       f"(limit {s.stoploss_guard_trade_limit})", now)

    def _low_profit(self, trade: ClosedTrade, now: datetime, written: list[ProtectionLock]) -> None:
        s = self.settings
        symbol = trade.symbol
        side = trade.side.value if s.low_profit_per_side else ANY
        trades = [t for t in self._trades(now, s.low_profit_lookback_s)
                  if t.symbol == symbol and side in (ANY, t.side.value)]
        if len(trades) < s.low_profit_trade_limit:
            return
        profit = sum((t.pnl for t in trades), Decimal(0))
        if profit < s.low_profit_required:
            last = max(t.at for t in trades)
            scope = symbol if side == ANY else f"{symbol} {side} entries"
            self._lock(written, LOW_PROFIT, symbol, side, last, s.low_profit_duration_s,
                       f"{scope} realised {profit} over {len(trades)} trades in "
                       f"{s.low_profit_lookback_s:g}s, below {s.low_profit_required}", now)

    # -- storage --------------------------------------------------------------------------------

    def _lock(self, written: list[ProtectionLock], protection: str, symbol: str, side: str, start: datetime,
              duration_s: float, reason: str, now: datetime) -> None:
        until = utc(start) + timedelta(seconds=duration_s)
        lock = ProtectionLock(protection, symbol, side, until, reason, now)
        if lock.active(now) and self._store(lock):
            written.append(lock)

    def _store(self, lock: ProtectionLock, **context: str) -> bool:
        """Write ``lock`` unless the lock on its field ends as late or later; True if written (logged)."""
        args = [lock.field, epoch_micros(lock.until), lock.encode(), "0"]  # a lock is never shortened
        if not self._run(HSET_IF_NEWER_SCRIPT, [self.keys.protection_locks], args):
            return False
        log.warning("protections.locked", protection=lock.protection, symbol=lock.symbol, side=lock.side,
                    until=lock.until.isoformat(), reason=lock.reason, **context)
        return True

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

