"""What the monitor checks on every pass; each check returns the problems it sees right now.

* **Dead service**: an expected service with no live heartbeat key
  (``<prefix>:heartbeat:<service>:*``; a key expires ``heartbeat_ttl_s`` after the last beat).
  Expected: ``monitor.expected_services``, or by default ingester, strategy, risk, executor,
  reconciler, and paper-exchange when ``broker.kind`` is paper.
* **Lag**: a consumer group of any ``<prefix>:stream:*`` whose lag (entries not yet delivered,
  XINFO GROUPS) or pending count (delivered, not acknowledged) is above ``monitor.max_lag``.
* **Stale data**: a symbol of ``<prefix>:last-bar`` whose newest bar time has not moved for
  ``ingester.stale_after_s``, measured on the monitor's own monotonic clock from when it saw the
  value change. Measuring the *change* rather than comparing bar time with wall-clock time keeps
  it right for CSV replays (old bar times) and across hosts whose clocks differ.
* **No rq worker**: nobody listens on the monitor's rq queue (alert delivery, balance refresh and
  the daily summary would silently wait), when ``monitor.require_worker``.

Dead-service and stale-data problems are not reported during ``startup_grace_s`` after the
monitor starts (services started together need a moment to beat their first heartbeat).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue, Worker

from shared.clock import Clock
from shared.config import Settings
from shared.heartbeat import alive_instances
from shared.keys import Keys
from shared.models import AlertSeverity
from shared.redis.client import reply_text

__all__ = ["Checker", "Health", "Problem", "expected_services"]

CORE_SERVICES = ("ingester", "strategy", "risk", "executor", "reconciler")


@dataclass(frozen=True)
class Problem:
    """Something wrong right now; ``key`` identifies it across passes."""

    kind: str  # dead_service | lag | stale_data | no_worker
    subject: str
    severity: AlertSeverity
    text: str
    details: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


@dataclass
class Health:
    """One pass: what was seen, and the problems in it."""

    at: str
    services: dict[str, int] = field(default_factory=dict)  # expected service -> live instances
    groups: dict[str, dict[str, int | None]] = field(default_factory=dict)  # stream/group -> lag, pending
    stale: list[str] = field(default_factory=list)
    workers: int | None = None
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``<prefix>:monitor:health``)."""
        return {"at": self.at, "services": self.services, "groups": self.groups, "stale": self.stale,
                "workers": self.workers,
                "problems": [{"kind": p.kind, "subject": p.subject, "severity": p.severity.value,
                              "text": p.text} for p in self.problems]}


def expected_services(settings: Settings) -> list[str]:
    """The services that must have a live instance."""
    if settings.monitor.expected_services is not None:
        return list(settings.monitor.expected_services)
    names = list(CORE_SERVICES)
    if settings.broker.kind == "paper":
        names.append("paper-exchange")
    return names


class Checker:
    """Runs the checks; remembers when each symbol's last bar last moved (monotonic clock)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock, queue: str) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.queue = queue
        self.started = clock.monotonic()
        self._bars: dict[str, tuple[bytes, float]] = {}  # symbol -> (last value, monotonic when it changed)

    def run(self) -> Health:
        """Every check, once."""
        health = Health(at=self.clock.now().isoformat())
        in_grace = self.clock.monotonic() - self.started < self.settings.monitor.startup_grace_s
        self._services(health, report=not in_grace)
        self._lag(health)
        self._stale(health, report=not in_grace)
        if self.settings.monitor.require_worker:
            self._workers(health)
        return health

    def _services(self, health: Health, *, report: bool) -> None:
        alive: dict[str, int] = {}
        for name in alive_instances(self.client, self.keys):
            service = name.split(":", 1)[0]
            alive[service] = alive.get(service, 0) + 1
        for service in expected_services(self.settings):
            count = alive.get(service, 0)
            health.services[service] = count
            if count == 0 and report:
                health.problems.append(Problem(
                    "dead_service", service, AlertSeverity.CRITICAL,
                    f"{service}: no live instance (no heartbeat key {self.keys.heartbeat(service, '*')})"))

    def _lag(self, health: Health) -> None:
        limit = self.settings.monitor.max_lag
        for raw in sorted(self.client.scan_iter(match=self.keys.stream("*"), count=500, _type="stream")):
            stream = reply_text(raw)
            for group in self.client.xinfo_groups(stream):
                name = f"{stream.removeprefix(self.keys.stream(''))}/{reply_text(group['name'])}"
                lag = None if group.get("lag") is None else int(group["lag"])
                pending = int(group["pending"])
                health.groups[name] = {"lag": lag, "pending": pending}
                if (lag is not None and lag > limit) or pending > limit:
                    health.problems.append(Problem(
                        "lag", name, AlertSeverity.WARNING,
                        f"{name}: lag {lag}, pending {pending} (max_lag {limit})",
                        {"lag": str(lag), "pending": str(pending), "max_lag": str(limit)}))

    def _stale(self, health: Health, *, report: bool) -> None:
        now = self.clock.monotonic()
        stale_after = self.settings.ingester.stale_after_s
        raw: Any = self.client.hgetall(self.keys.last_bar)
        for key, value in sorted(raw.items()):
            symbol = reply_text(key)
            seen = self._bars.get(symbol)
            if seen is None or seen[0] != value:
                self._bars[symbol] = (value, now)
                continue
            unchanged = now - seen[1]
            if unchanged > stale_after:
                health.stale.append(symbol)
                if report:
                    health.problems.append(Problem(
                        "stale_data", symbol, AlertSeverity.WARNING,
                        f"{symbol}: no new bar for {unchanged:.0f}s (last bar {reply_text(value)}, "
                        f"stale after {stale_after:g}s)",
                        {"last_bar": reply_text(value), "stale_after_s": f"{stale_after:g}"}))

    def _workers(self, health: Health) -> None:
        workers = _count(Worker.all(queue=Queue(self.queue, connection=self.client)))
        health.workers = workers
        if workers == 0:
            health.problems.append(Problem(
                "no_worker", self.queue, AlertSeverity.WARNING,
                f"no rq worker listens on queue {self.queue!r}: alert delivery and periodic jobs wait "
                f"(start python -m services.monitor.worker)"))


def _count(items: Iterable[Any]) -> int:
    return sum(1 for _ in items)
