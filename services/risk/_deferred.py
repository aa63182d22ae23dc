"""Risk's deferred queue and its ticker: intents that cannot execute now, decided again later.

A strategy's intent that cannot execute now (the market is closed, its symbol has no price yet,
or only pending orders stand in its way) waits in the
:class:`~shared.safety.deferred.DeferredQueue`, one per symbol and side, until
``limits.deferred_max_age_s`` after it was first deferred. Every ``TICK_S`` the ticker samples
equity for MaxDrawdown (at most every ``EQUITY_SAMPLE_S``) and, if the queue is not empty,
revalidates each entry (the trading state and protections must still allow it) and decides it
again. A new intent of one side cancels the queued intent of the other side for its symbol and
source.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from decimal import Decimal

import redis

from services.risk._account import Reads
from shared.bus import publish
from shared.clock import Clock
from shared.config import Settings
from shared.keys import ALERTS, Keys
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity, Intent, Side
from shared.portfolio import Portfolio
from shared.redis.boundary import WaitOut, unavailable
from shared.safety.deferred import DeferredIntent, DeferredQueue
from shared.safety.limits import (
    is_reducing,
)
from shared.safety.protections import ProtectionLock, Protections
from shared.safety.trading_state import KillSwitch
from shared.stop import Stoppable

__all__ = ["EQUITY_SAMPLE_S", "TICK_S", "DeferredTicks"]

log = get_logger(component="risk")
EQUITY_SAMPLE_S = 60.0
TICK_S = 0.1  # how often the deferred queue is looked at (one HLEN) and equity sampling is due


class DeferredTicks:
    """The deferral and the ticker of :class:`~services.risk.service.RiskService`, which provides
    the attributes declared here and the two decision methods."""

    client: redis.Redis
    keys: Keys
    settings: Settings
    clock: Clock
    portfolio: Portfolio
    kill_switch: KillSwitch
    protections: Protections
    deferred: DeferredQueue
    _sample_lock: threading.Lock
    _last_equity_sample: datetime | None

    def _read_and_decide(self, intent: Intent, queued: DeferredIntent | None) -> None:
        raise NotImplementedError  # RiskService's

    def _reject(self, intent: Intent, reason: str) -> None:
        raise NotImplementedError  # RiskService's

    def _defer(self, intent: Intent, reason: str, queued: DeferredIntent | None) -> None:
        if queued is None:
            stored = self.deferred.defer(intent, reason)
        else:
            stored = self._defer_again(intent, reason, queued)
        if not stored:  # a newer intent for the symbol and side waits in its place
            self._reject(intent, f"{reason}; a newer {intent.side} {intent.symbol} intent is deferred")

    def _defer_again(self, intent: Intent, reason: str, queued: DeferredIntent) -> bool:
        """Queue a drained intent again with its first deferral's times (rejected once expired);
        False when a newer intent took its place meanwhile."""
        if self.clock.now() >= queued.expires_at:
            self._reject(intent, f"deferred since {queued.deferred_at.isoformat()} and expired: {reason}")
            return True
        again = DeferredIntent(intent, reason, queued.deferred_at, queued.expires_at, queued.score)
        log.info("risk.deferred_again", reason=reason, expires_at=queued.expires_at.isoformat())
        return self.deferred.put(again)

    def _dropped(self, entry: DeferredIntent, why: str) -> None:
        """A deferred intent that expired or was replaced is rejected (its strategy hears of it)."""
        self._reject(entry.intent, why)

    def _cancel_opposite(self, intent: Intent, reads: Reads) -> None:
        other = Side.SELL if intent.side is Side.BUY else Side.BUY
        queued = self.deferred.get(intent.symbol, other, reads.deferred)
        if queued is not None and queued.intent.source == intent.source and queued.intent.time <= intent.time:
            self.deferred.cancel(intent.symbol, other)
            log.info("risk.deferred_cancelled", intent_id=queued.intent.id, by_intent=intent.id)
            self._reject(queued.intent, f"cancelled while deferred: {intent.source} now signals "
                                        f"{intent.side}")

    def _revalidate(self, entry: DeferredIntent) -> str | None:
        intent = entry.intent
        held = self.portfolio.snapshot().positions.get(intent.symbol)
        position = held.qty if held is not None else Decimal(0)
        refusal = self.kill_switch.refusal(intent.side, position)
        if refusal is None and not is_reducing(intent.side, position):
            refusal = self.protections.refusal(intent.symbol, intent.side)
        if refusal is not None:
            self._reject(intent, f"cancelled while deferred: {refusal}")
            return str(refusal)
        return None

    def run_deferred(self) -> int:
        """Drain the deferred queue and decide each entry again; returns how many were drained."""
        ready = self.deferred.drain(self._revalidate)
        for entry in ready:
            self._read_and_decide(entry.intent, entry)
        return len(ready)

    def tick(self) -> int:
        """The periodic work: sample equity when due, and decide again the deferred intents if
        any wait (one HLEN when none do); returns how many were drained."""
        self.sample_equity()
        if not self.deferred.count():
            return 0
        return self.run_deferred()

    def run_ticks(self, stop: Stoppable) -> None:
        """:meth:`tick` every ``TICK_S`` until ``stop``. A failed tick is logged and retried after
        :class:`~shared.redis.boundary.WaitOut`'s back-off (Redis down: one warning line per try,
        no traceback)."""
        outage = WaitOut()
        delay = TICK_S
        while not stop.wait(delay):
            try:
                self.tick()
            except Exception as exc:
                delay = outage.next_delay()
                if unavailable(exc):  # down, or refusing writes
                    log.warning("risk.tick_redis_unavailable", error=str(exc), retry_in_s=delay)
                else:
                    log.exception("risk.tick_failed", retry_in_s=delay)
            else:
                outage.reset()
                delay = TICK_S

    def sample_equity(self, *, force: bool = False) -> list[ProtectionLock]:
        """Record portfolio equity at marks for MaxDrawdown and the equity history (the newest
        ``risk.equity_history_keep`` samples), at most every EQUITY_SAMPLE_S seconds."""
        now = self.clock.now()
        with self._sample_lock:
            last = self._last_equity_sample
            if not force and last is not None and now - last < timedelta(seconds=EQUITY_SAMPLE_S):
                return []
            self._last_equity_sample = now
        book = self.portfolio.snapshot()
        if not book.opened:
            return []
        equity = book.equity(self.portfolio.marks())
        self.client.xadd(self.keys.equity_history, {"time": now.isoformat(), "equity": str(equity),
                                                    "cash": str(book.cash)},
                         maxlen=self.settings.risk.equity_history_keep, approximate=False)
        locks = self.protections.record_equity(equity, now)
        self._alert_locks(locks)
        return locks

    def _alert_locks(self, locks: list[ProtectionLock]) -> None:
        for lock in locks:
            publish(self.client, self.keys, ALERTS, Alert(
                time=self.clock.now(), severity=AlertSeverity.WARNING, source="risk", kind="protection_lock",
                text=f"{lock.protection} locks {lock.symbol} {lock.side} entries until "
                     f"{lock.until.isoformat()}: {lock.reason}",
                details={"protection": lock.protection, "symbol": lock.symbol, "side": lock.side,
                         "until": lock.until.isoformat()}))
