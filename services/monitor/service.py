"""The monitor: health checks, alert delivery, and the schedule of periodic rq jobs.

Every ``interval_s`` it runs the checks of :mod:`services.monitor._checks` (dead services, lag,
stale data, no rq worker), writes the result to ``<prefix>:monitor:health`` and the current
problems to ``<prefix>:monitor:problems``, and publishes an Alert when a problem appears and an
INFO alert when it clears -- on the transition, not on every pass. The problems hash is read back
at start, so a restarted monitor does not alert again on what it already reported.

It consumes ``alerts`` (group ``monitor``): with ``monitor.webhook_url`` set, each alert becomes
one rq job (:func:`services.monitor.jobs.deliver_alert`) with rq's ``Retry``; the job id is
derived from the alert id, so a redelivered alert does not enqueue a second delivery. Without a
webhook the alert is written to the log. Either way it is kept in ``recent-alerts`` and counted,
once per alert id.

The schedule: each periodic job (balance refresh every ``balance_refresh_s``, daily summary every
``daily_summary_s``) has its next due time in ``<prefix>:monitor:schedule`` (so a restart neither
skips nor repeats one); when due, it is enqueued under an id derived from that due time (a crash
between enqueue and the schedule update does not enqueue it twice). rq workers
(``python -m services.monitor.worker``) run the jobs. Run one monitor per installation.

Concurrency model: two threads -- the alert consumer, and the check/schedule loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.client import Pipeline
from rq import Retry
from rq.job import Job

import services.monitor.jobs as jobs
from services.monitor._checks import Checker, Health, Problem
from services.monitor._names import job_id, job_queue
from shared.bus import Delivery, Idempotency, Publisher
from shared.clock import Clock
from shared.config import Settings
from shared.errors import RedisUnavailable
from shared.keys import ALERTS, Keys, MonitorKeys
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text
from shared.service import ServiceContext
from shared.stop import Stoppable

__all__ = ["GROUP", "Monitor", "main"]

log = get_logger(component="monitor")
GROUP = "monitor"
SERVICE = "monitor"
RECENT_ALERTS = 200
JOB_RESULT_TTL_S = 86_400
JOB_FAILURE_TTL_S = 30 * 86_400


class Monitor:
    """Checks, alert handling and scheduling; the loop is :meth:`run`."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock,
                 publisher: Publisher) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.publisher = publisher
        self.names = MonitorKeys(keys)
        self.queue = job_queue(settings, client)
        self.checker = Checker(client, keys, settings, clock, self.queue.name)
        self.once = Idempotency(client, keys, GROUP, settings.bus.idempotency_ttl_s)
        self.active: dict[str, Problem] = self._load_problems()

    # -- checks ---------------------------------------------------------------------------------

    def check(self) -> Health:
        """One pass of every check; alert on problems that appeared or cleared."""
        with redis_errors("monitor check"):
            health = self.checker.run()
            current = {p.key: p for p in health.problems}
            for key, problem in current.items():
                if key not in self.active:
                    log.warning("monitor.problem", kind=problem.kind, subject=problem.subject,
                                text=problem.text)
                    self._alert(problem.severity, problem.kind, problem.text,
                                {"subject": problem.subject, **problem.details})
            for key, problem in self.active.items():
                if key not in current:
                    log.info("monitor.resolved", kind=problem.kind, subject=problem.subject)
                    self._alert(AlertSeverity.INFO, f"{problem.kind}_resolved",
                                f"resolved: {problem.text}", {"subject": problem.subject})
            self.active = current
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.names.health, json.dumps(health.as_dict()))
                pipe.delete(self.names.problems)
                if current:
                    pipe.hset(self.names.problems, mapping={
                        key: json.dumps({"kind": p.kind, "subject": p.subject, "severity": p.severity.value,
                                         "text": p.text}) for key, p in current.items()})
                pipe.execute()
        return health

    def _load_problems(self) -> dict[str, Problem]:
        raw: Any = self.client.hgetall(self.names.problems)
        problems = {}
        for key, value in raw.items():
            try:
                data = json.loads(value)
                problems[reply_text(key)] = Problem(data["kind"], data["subject"],
                                                    AlertSeverity(data["severity"]), data["text"])
            except (ValueError, KeyError):
                continue
        return problems

    def _alert(self, severity: AlertSeverity, kind: str, text: str, details: dict[str, str]) -> None:
        self.publisher.publish(ALERTS, Alert(time=self.clock.now(), severity=severity, source=SERVICE,
                                             kind=kind, text=text, details=details))

    # -- alerts ---------------------------------------------------------------------------------

    def handle_alert(self, delivery: Delivery) -> None:
        """Deliver one alert: an rq job per alert to the webhook, or the log (a bus handler)."""
        alert = delivery.message
        if not isinstance(alert, Alert):
            return
        payload = alert.model_dump(mode="json")
        url = self.settings.monitor.webhook_url
        if url:
            self._enqueue_delivery(url, alert, payload)
        else:
            level = {"critical": "error", "warning": "warning"}.get(alert.severity.value, "info")
            getattr(log, level)("monitor.alert", severity=alert.severity.value, source=alert.source,
                                kind=alert.kind, text=alert.text, details=alert.details)
        counter = "enqueued" if url else "logged"

        def record(pipe: Pipeline) -> None:
            pipe.lpush(self.names.recent_alerts, json.dumps(payload))
            pipe.ltrim(self.names.recent_alerts, 0, RECENT_ALERTS - 1)
            pipe.hincrby(self.names.deliveries, counter, 1)

        self.once.apply_once(alert.id, record)

    def _enqueue_delivery(self, url: str, alert: Alert, payload: dict[str, Any]) -> None:
        settings = self.settings.monitor
        jid = job_id(self.keys, "alert", alert.id)
        if Job.exists(jid, connection=self.client):
            log.info("monitor.delivery_already_enqueued", job_id=jid)
            return
        retry = (Retry(max=settings.webhook_retries, interval=list(settings.webhook_retry_intervals_s))
                 if settings.webhook_retries > 0 else None)
        self.queue.enqueue(jobs.deliver_alert, url, payload, self.keys.prefix, settings.webhook_timeout_s,
                           settings.failed_keep, job_id=jid, retry=retry, result_ttl=JOB_RESULT_TTL_S,
                           failure_ttl=JOB_FAILURE_TTL_S,
                           description=f"deliver alert {alert.id} ({alert.severity.value} {alert.kind})")

    # -- schedule -------------------------------------------------------------------------------

    def periodic_jobs(self) -> list[tuple[str, float, float, Callable[..., Any], tuple[Any, ...]]]:
        """(name, every seconds, first run after seconds, function, args) of each periodic job."""
        monitor = self.settings.monitor
        return [
            ("refresh_balance", monitor.balance_refresh_s, 0.0, jobs.refresh_balance, (self.keys.prefix,)),
            ("daily_summary", monitor.daily_summary_s, monitor.daily_summary_s, jobs.daily_summary,
             (self.keys.prefix, self.settings.portfolio.account)),
        ]

    def tick(self) -> list[str]:
        """Enqueue every periodic job that is due; return the ids enqueued."""
        now = self.clock.now()
        with redis_errors("monitor schedule"):
            raw: Any = self.client.hgetall(self.names.schedule)
            stored = {reply_text(k): datetime.fromisoformat(reply_text(v)) for k, v in raw.items()}
            enqueued = []
            for name, every, first, func, args in self.periodic_jobs():
                due = stored.get(name)
                if due is None:
                    due = now + timedelta(seconds=first)
                    self.client.hset(self.names.schedule, name, due.isoformat())
                if now < due:
                    continue
                jid = job_id(self.keys, name, str(int(due.timestamp())))
                if not Job.exists(jid, connection=self.client):
                    self.queue.enqueue(func, *args, job_id=jid, result_ttl=JOB_RESULT_TTL_S,
                                       failure_ttl=JOB_FAILURE_TTL_S, description=f"periodic {name}")
                    enqueued.append(jid)
                    log.info("monitor.job_enqueued", job=name, job_id=jid)
                self.client.hset(self.names.schedule, name, (now + timedelta(seconds=every)).isoformat())
        return enqueued

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: Stoppable, consume: Callable[[], Any] | None = None,
            on_pass: Callable[[Health], None] | None = None) -> None:
        """Check and schedule every ``interval_s`` until ``stop``; ``consume`` runs in its own thread."""
        consumer = threading.Thread(target=consume, name="alerts", daemon=True) if consume else None
        if consumer is not None:
            consumer.start()
        while not stop.is_set():
            try:
                with redis_errors("monitor pass"):
                    health = self.check()
                    self.tick()
                if on_pass is not None:
                    on_pass(health)
            except RedisUnavailable as exc:
                log.warning("monitor.redis_unavailable", error=str(exc))
            stop.wait(self.settings.monitor.interval_s)
        if consumer is not None:
            consumer.join(self.settings.bus.grace_seconds)



def main(ctx: ServiceContext) -> None:
    """Run the monitor until stopped."""
    monitor = Monitor(ctx.redis, ctx.keys, ctx.settings, ctx.clock, ctx.publisher())
    consumer = ctx.consumer(ALERTS, GROUP, monitor.handle_alert)

    def on_pass(health: Health) -> None:
        ctx.heartbeat.status["problems"] = len(health.problems)

    monitor.run(ctx.stop, consume=lambda: consumer.run(ctx.stop), on_pass=on_pass)
