"""The reconciler: the broker's truth against ours, at start and every ``interval_s``.

Each pass reads our side (portfolio snapshot, the executor's open orders) and the broker's
(account cash, positions, open orders, and a look-up of each of our open orders it no longer
lists), then compares them under the rule in :mod:`services.reconciler._compare`: unapplied
fills of open orders explain in-flight differences. A difference found is **confirmed** by a
second look ``recheck_delay_s`` later, which must find the same difference (same kind, subject
and amount) -- a fill applied between two reads is gone on the second look::

    time 0.000  reconciler reads our AAPL position: 0, order bst-1 applied_qty 0
    time 0.001  the broker fills bst-1 (10 AAPL); the executor applies it: position 10, applied 10
    time 0.002  reconciler reads the broker: AAPL 10, bst-1 filled 10 -> predicts 0 + 10 = 10: equal
                (had the executor applied the position but not yet applied_qty, the pass would
                predict 20 and see -10; the second look at time 2 finds it equal: not confirmed)

An order in flight (its broker fill not yet applied here, or not yet shown by the broker) for
``repair_after_s`` is a repair request: its client_order_id goes into ``<prefix>:repair-requests``
and the executor looks it up and applies what the broker reports. A request not carried out
within ``repair_wait_s`` becomes a halting difference (``order_unrepaired``).

Every pass publishes a report: the latest in the hash ``<prefix>:reconciliation`` (for
``bastion status``), and an entry on the stream ``<prefix>:stream:reconciliation``. A confirmed
difference raises an Alert on ALERTS when the set of differences changes (not on every pass);
a confirmed position or cash difference beyond tolerance engages the kill switch (HALTED,
by "reconciler", the reason naming the difference; escalate-only, so it never lowers a state).
Only a human lifts that halt (``bastion kill-switch off``).

Startup fails closed: before the first pass the reconciler engages HALTED with the reason
``startup reconciliation pending`` (unless trading is already HALTED), and retries every
``startup_retry_s`` until a pass succeeds -- the broker unreachable, or our portfolio not yet
opened, keeps the hold. A successful pass with no halting difference lifts the hold, restoring
the state it replaced (ACTIVE or REDUCING), but only while the hold is still the current state:
a halt anyone else engaged meanwhile stays. Risk refuses every intent while HALTED, so no order
is placed against an unreconciled account.

A later pass that cannot reach the broker raises a warning alert and keeps the last report's
differences; it does not halt (the executor cannot trade through an unreachable broker either).
A pass that cannot reach Redis is logged and skipped: the next one tries again (at start, the
hold stays until one succeeds).

Concurrency model: one thread, one pass at a time. Run one reconciler per account.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from services.reconciler._books import read_ours, read_theirs, with_records
from services.reconciler._compare import Difference, Ours, Theirs, compare
from shared.brokers import Broker, build_broker
from shared.bus import Publisher
from shared.clock import Clock
from shared.config import Settings
from shared.errors import BrokerError, ConfigError, RedisUnavailable
from shared.keys import ALERTS, Keys
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity
from shared.portfolio import Portfolio
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text
from shared.safety.trading_state import KillSwitch, TradingState
from shared.service import ServiceContext
from shared.stop import Stoppable

__all__ = ["HOLD_REASON", "REPORT_STREAM", "Reconciler", "Report", "main", "report_key"]

log = get_logger(component="reconciler")
SERVICE = "reconciler"
REPORT_STREAM = "reconciliation"  # Keys.stream(REPORT_STREAM)
HOLD_REASON = "startup reconciliation pending"


def report_key(keys: Keys) -> str:
    """The hash holding the latest reconciliation report."""
    return keys.reconciliation


@dataclass
class Report:
    """One reconciliation: ``status`` is ok, differences, halted, error or waiting."""

    at: datetime
    status: str
    differences: list[Difference] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    in_flight_orders: set[str] = field(default_factory=set)
    error: str = ""
    ours: dict[str, Any] = field(default_factory=dict)
    broker: dict[str, Any] = field(default_factory=dict)
    cash_compared: bool = True

    @property
    def succeeded(self) -> bool:
        """Both sides were read and compared."""
        return self.status in ("ok", "differences", "halted")

    @property
    def halting(self) -> list[Difference]:
        """Differences beyond tolerance on positions or cash."""
        return [d for d in self.differences if d.halts]

    def fields(self) -> dict[str, str]:
        """The report as flat string fields (the hash and the stream entry)."""
        return {"type": "reconciliation_report", "time": self.at.isoformat(), "status": self.status,
                "differences": json.dumps([d.as_dict() for d in self.differences]),
                "in_flight": json.dumps(self.in_flight), "error": self.error,
                "cash_compared": "1" if self.cash_compared else "0",
                "ours": json.dumps(self.ours), "broker": json.dumps(self.broker)}


class Reconciler:
    """Compares, reports, alerts and halts; holds no state that matters across restarts."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock,
                 broker_factory: Callable[[], Broker], publisher: Publisher) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self._broker_factory = broker_factory
        self._broker: Broker | None = None
        self.publisher = publisher
        self.portfolio = Portfolio(client, keys, settings.portfolio.account, settings=settings.portfolio,
                                   lock_settings=settings.lock, clock=clock)
        self.kill_switch = KillSwitch(client, keys, clock)
        self._alerted: frozenset[tuple[str, str, str]] = frozenset()
        self._in_flight_since: dict[str, datetime] = {}  # client_order_id -> first pass it was in flight

    # -- one pass -------------------------------------------------------------------------------

    def reconcile(self) -> Report:
        """Compare, confirm by a second look, publish the report, alert and halt as needed."""
        report = self._look()
        if report.differences:
            self.clock.sleep(self.settings.reconciler.recheck_delay_s)
            second = self._look()
            if second.succeeded:
                first = {d.signature for d in report.differences}
                confirmed = [d for d in second.differences if d.signature in first]
                second.differences = confirmed
                second.status = "differences" if confirmed else "ok"
            report = second
        if report.succeeded:
            report.differences += self._repairs(report)
        if report.halting:
            self._halt(report)
            report.status = "halted"
        self._publish(report)
        self._alert(report)
        return report

    def _look(self) -> Report:
        at = self.clock.now()
        ours = self._read_ours()
        if not ours.opened:
            return Report(at, "waiting",
                          error=f"portfolio account {self.portfolio.account!r} is not opened yet")
        try:
            theirs = self._read_theirs(ours)
            ours = self._records_of(theirs, ours)
        except (BrokerError, ConfigError) as exc:
            return Report(at, "error", error=f"broker unreachable: {type(exc).__name__}: {exc}",
                          ours=_summary_ours(ours))
        tolerances = self.settings.reconciler
        outcome = compare(ours, theirs, cash_tolerance=tolerances.cash_tolerance,
                          quantity_tolerance=tolerances.quantity_tolerance)
        return Report(at, "differences" if outcome.differences else "ok", outcome.differences,
                      outcome.in_flight, outcome.in_flight_orders, ours=_summary_ours(ours),
                      broker=_summary_theirs(theirs), cash_compared=outcome.cash_compared)

    def _read_ours(self) -> Ours:
        with redis_errors("reading our books"):
            return read_ours(self.client, self.keys, self.portfolio)

    def _read_theirs(self, ours: Ours) -> Theirs:
        return read_theirs(self.broker(), ours)

    def _records_of(self, theirs: Theirs, ours: Ours) -> Ours:
        with redis_errors("reading order records"):
            return with_records(self.client, self.keys, ours, theirs)

    def broker(self) -> Broker:
        """The broker, built on first use (a paper exchange not yet up is a failed pass, not a crash)."""
        if self._broker is None:
            self._broker = self._broker_factory()
        return self._broker

    # -- repairs --------------------------------------------------------------------------------

    def _repairs(self, report: Report) -> list[Difference]:
        """Ask the executor to look up each order in flight for ``repair_after_s`` (its fill not
        applied, or not yet shown by the broker); a request not carried out within
        ``repair_wait_s`` is a halting difference."""
        now, settings = report.at, self.settings.reconciler
        self._in_flight_since = {cid: self._in_flight_since.get(cid, now) for cid in report.in_flight_orders}
        overdue = sorted(cid for cid, since in self._in_flight_since.items()
                         if (now - since).total_seconds() >= settings.repair_after_s)
        if not overdue:
            return []
        with redis_errors("repair requests"):
            requested = {reply_text(k): _parse_time(reply_text(v))
                         for k, v in self.client.hgetall(self.keys.repair_requests).items()}
            failed = []
            for cid in overdue:
                asked = requested.get(cid)
                if asked is None:
                    self.client.hset(self.keys.repair_requests, cid, now.isoformat())
                    log.warning("reconciler.repair_requested", client_order_id=cid,
                                in_flight_s=round((now - self._in_flight_since[cid]).total_seconds(), 1))
                elif (now - asked).total_seconds() >= settings.repair_wait_s:
                    failed.append(cid)
        return [Difference("order_unrepaired", cid, "in flight", "not applied", "", True,
                           f"order {cid}: in flight since {self._in_flight_since[cid].isoformat()}, and "
                           f"the executor has not applied the broker's report within "
                           f"{settings.repair_wait_s:g}s of being asked") for cid in failed]

    # -- effects --------------------------------------------------------------------------------

    def _halt(self, report: Report) -> None:
        reason = "reconciliation: " + "; ".join(d.text for d in report.halting)
        status = self.kill_switch.current()
        if status.state is TradingState.HALTED and status.by == SERVICE and status.reason == reason:
            return  # already halted for exactly this
        self.kill_switch.engage(TradingState.HALTED, SERVICE, reason, escalate_only=True)
        log.error("reconciler.halted", reason=reason)

    def _publish(self, report: Report) -> None:
        fields = report.fields()
        with redis_errors("publishing the reconciliation report"), \
                self.client.pipeline(transaction=True) as pipe:
            if report.succeeded:
                fields["last_success"] = report.at.isoformat()
            pipe.hset(report_key(self.keys), mapping=fields)  # type: ignore[arg-type]
            pipe.xadd(self.keys.stream(REPORT_STREAM), fields,  # type: ignore[arg-type]
                      maxlen=self.settings.reconciler.report_maxlen, approximate=True)
            pipe.execute()
        log.info("reconciler.report", status=report.status, differences=len(report.differences),
                 in_flight=len(report.in_flight), error=report.error or None)

    def _alert(self, report: Report) -> None:
        if not report.succeeded:
            if report.status == "error":
                self._send(AlertSeverity.WARNING, "reconciliation_failed", report.error, {})
            return
        current = frozenset(d.signature for d in report.differences)
        if current == self._alerted:
            return
        if current:
            severity = AlertSeverity.CRITICAL if report.halting else AlertSeverity.WARNING
            text = "; ".join(d.text for d in report.differences)
            self._send(severity, "reconciliation_mismatch", text,
                       {"differences": str(len(current)), "halted": "1" if report.halting else "0"})
        else:
            self._send(AlertSeverity.INFO, "reconciliation_clean", "broker and Bastion agree again", {})
        self._alerted = current

    def _send(self, severity: AlertSeverity, kind: str, text: str, details: dict[str, str]) -> None:
        alert = Alert(time=self.clock.now(), severity=severity, source=SERVICE, kind=kind, text=text,
                      details=details)
        self.publisher.publish(ALERTS, alert)

    # -- start-up hold --------------------------------------------------------------------------

    def hold(self, why: str = "") -> None:
        """Engage HALTED until the first successful pass, unless trading is already HALTED."""
        status = self.kill_switch.current()
        if status.state is TradingState.HALTED:
            if status.by == SERVICE and status.reason.startswith(HOLD_REASON):
                return
            log.info("reconciler.already_halted", by=status.by, reason=status.reason)
            return
        self.kill_switch.engage(TradingState.HALTED, SERVICE, HOLD_REASON + (f": {why}" if why else ""),
                                escalate_only=True)

    def release_hold(self) -> bool:
        """Lift the start-up hold if it is still the current state; restore what it replaced."""
        status = self.kill_switch.current()
        if not (status.state is TradingState.HALTED and status.by == SERVICE
                and status.reason.startswith(HOLD_REASON)):
            return False
        restore = status.previous if status.previous in (TradingState.ACTIVE, TradingState.REDUCING) else None
        self.kill_switch.engage(restore or TradingState.ACTIVE, SERVICE, "startup reconciliation passed")
        return True

    def start(self, stop: Stoppable) -> Report | None:
        """The fail-closed start: hold, then pass until one succeeds; None if stopped first."""
        if self.settings.reconciler.hold_until_reconciled:
            self.hold()
        while not stop.is_set():
            report = self._pass()
            if report is not None and report.succeeded:
                if not report.halting and self.settings.reconciler.hold_until_reconciled:
                    self.release_hold()
                return report
            if report is not None:
                log.warning("reconciler.startup_blocked", status=report.status, error=report.error,
                            retry_in_s=self.settings.reconciler.startup_retry_s)
            stop.wait(self.settings.reconciler.startup_retry_s)
        return None

    def run(self, stop: Stoppable, *, max_passes: int | None = None) -> int:
        """Start (fail closed), then reconcile every ``interval_s`` until ``stop``; returns passes run."""
        passes = 0
        if self.start(stop) is None:
            return passes
        passes += 1
        while not stop.is_set() and (max_passes is None or passes < max_passes):
            if stop.wait(self.settings.reconciler.interval_s):
                break
            self._pass()
            passes += 1
        return passes

    def _pass(self) -> Report | None:
        """One :meth:`reconcile`; None when Redis was unavailable (logged; the next pass tries
        again, and at start the hold stays)."""
        try:
            with redis_errors("reconciliation pass"):
                return self.reconcile()
        except RedisUnavailable as exc:  # down, or refusing writes
            log.warning("reconciler.redis_unavailable", error=str(exc))
            return None


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _summary_ours(ours: Ours) -> dict[str, Any]:
    return {"cash": str(ours.cash), "reserved": str(ours.reserved),
            "positions": {s: str(q) for s, q in sorted(ours.positions.items())},
            "open_orders": sorted(ours.open_orders)}


def _summary_theirs(theirs: Theirs) -> dict[str, Any]:
    return {"cash": str(theirs.cash), "positions": {s: str(q) for s, q in sorted(theirs.positions.items())},
            "open_orders": sorted(theirs.open_orders)}



def main(ctx: ServiceContext) -> None:
    """Run the reconciler until stopped."""
    reconciler = Reconciler(ctx.redis, ctx.keys, ctx.settings, ctx.clock,
                            lambda: build_broker(ctx.settings, client=ctx.redis, clock=ctx.clock),
                            ctx.publisher())
    reconciler.run(ctx.stop)
