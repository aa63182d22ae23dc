"""The monitor's Redis keys (each :meth:`shared.keys.Keys.monitor`) and its rq queue name.

With the default prefix ``bastion``:

===========================================  ======================================================
``bastion:monitor:health``                   the latest check, JSON (services, lag, stale, problems)
``bastion:monitor:problems``                 current problems: ``<kind>:<subject>`` -> JSON (hash)
``bastion:monitor:schedule``                 periodic job -> next due time, ISO UTC (hash)
``bastion:monitor:balance``                  the broker account's latest balances (hash)
``bastion:monitor:daily-summary``            the latest daily summary (hash)
``bastion:monitor:deliveries``               alert delivery counters (hash, see below)
``bastion:monitor:failed-deliveries``        alerts whose webhook delivery gave up, newest first
``bastion:monitor:recent-alerts``            the newest alerts the monitor consumed, JSON (list)
``rq:queue:bastion``                         rq's queue of monitor jobs (``rq info -u URL bastion``)
===========================================  ======================================================

Delivery counters: ``enqueued`` (a job per alert), ``delivered``, ``attempt_failed`` (one per
failed try, retried or not), ``failed`` (gave up: the job is in rq's failed registry and in
``failed-deliveries``), ``logged`` (no webhook configured: written to the log only).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import Settings
from shared.keys import Keys

__all__ = ["MonitorKeys", "job_id", "queue_name"]


@dataclass(frozen=True)
class MonitorKeys:
    """Key names of the monitor and its jobs under one prefix."""

    keys: Keys

    def _key(self, name: str) -> str:
        return self.keys.monitor(name)

    @property
    def health(self) -> str:
        return self._key("health")

    @property
    def problems(self) -> str:
        return self._key("problems")

    @property
    def schedule(self) -> str:
        return self._key("schedule")

    @property
    def balance(self) -> str:
        return self._key("balance")

    @property
    def daily_summary(self) -> str:
        return self._key("daily-summary")

    @property
    def deliveries(self) -> str:
        return self._key("deliveries")

    @property
    def failed_deliveries(self) -> str:
        return self._key("failed-deliveries")

    @property
    def recent_alerts(self) -> str:
        return self._key("recent-alerts")


def queue_name(settings: Settings) -> str:
    """The rq queue the monitor enqueues on and the worker listens to (default: the key prefix)."""
    return settings.monitor.queue or settings.key_prefix


def job_id(keys: Keys, *parts: str) -> str:
    """A deterministic rq job id (rq allows only letters, digits, ``_`` and ``-``)."""
    raw = "-".join((keys.prefix, *parts))
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)
