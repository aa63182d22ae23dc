"""The monitor: health checks, alert handling, the periodic schedule, and its rq jobs and worker.

Checks and alert handling run on in-process fakeredis. Everything that runs rq (jobs, workers,
rq's registries) uses the real redis-server backend only (the ``real_redis_url`` fixture):
rq cannot run on fakeredis's TCP server, which has no INFO/CONFIG.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakeredis
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from structlog.testing import capture_logs

from services.monitor._checks import expected_services
from services.monitor._names import job_id
from services.monitor.jobs import write_balance
from services.monitor.service import Monitor
from shared.brokers import Account, BrokerCall, FakeBroker
from shared.bus import Delivery, Publisher, codec
from shared.clock import LiveClock, SimulatedClock
from shared.config import Settings
from shared.heartbeat import Heartbeat
from shared.keys import ALERTS, Keys, MonitorKeys
from shared.models import Alert, AlertSeverity
from shared.redis.connection import connect_url
from tests.support.processes import spawn

FAILING_JOBS = ["tests.procs.failing_jobs.broker_down", "tests.procs.failing_jobs.bug"]  # monitor.extra_jobs

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
Real = tuple[redis.Redis, Keys]


def make_settings(keys: Keys, **monitor: Any) -> Settings:
    """Settings for one test: its own prefix (and so its own rq queue), no start-up grace."""
    monitor = {"startup_grace_s": 0, "require_worker": False, **monitor}
    return Settings(key_prefix=keys.prefix, monitor=monitor)


def make_monitor(client: redis.Redis, keys: Keys, clock: SimulatedClock | None = None,
                 **monitor: Any) -> Monitor:
    """A monitor on ``client`` with settings for this test."""
    settings = make_settings(keys, **monitor)
    return Monitor(client, keys, settings, clock or SimulatedClock(T0), Publisher(client, keys, settings.bus))


def alerts(client: redis.Redis, keys: Keys) -> list[Alert]:
    """Every alert on the ALERTS stream, oldest first."""
    entries: Any = client.xrange(keys.stream(ALERTS))
    return [m for _, fields in entries if isinstance(m := codec.decode(fields), Alert)]


def beat(client: redis.Redis, keys: Keys, service: str, instance: str = "i1") -> None:
    """A live heartbeat for ``service``, written as a service's Heartbeat writes it."""
    Heartbeat(client, keys, service, instance, LiveClock(), interval_s=1.0, ttl_s=60.0).beat()


def an_alert(text: str = "something happened") -> Alert:
    """An alert as a service would publish it."""
    return Alert(time=T0, severity=AlertSeverity.WARNING, source="test", kind="test_alert", text=text)


@pytest.fixture
def fake() -> redis.Redis:
    """In-process fakeredis."""
    return fakeredis.FakeRedis()


class TestChecks:
    def test_dead_service_is_detected_when_its_heartbeat_key_is_missing(self, fake: redis.Redis,
                                                                          keys: Keys) -> None:
        """An expected service without a heartbeat key raises a critical dead_service alert once."""
        monitor = make_monitor(fake, keys, expected_services=["risk", "executor"])
        beat(fake, keys, "risk")
        health = monitor.check()
        assert health.services == {"risk": 1, "executor": 0}
        assert [(p.kind, p.subject) for p in health.problems] == [("dead_service", "executor")]
        monitor.check()
        sent = alerts(fake, keys)
        assert [(a.kind, a.severity) for a in sent] == [("dead_service", "critical")]
        assert "executor" in sent[0].text

    def test_a_service_that_comes_back_sends_a_resolved_alert(self, fake: redis.Redis, keys: Keys) -> None:
        """When the missing heartbeat appears, the problem clears with an INFO alert."""
        monitor = make_monitor(fake, keys, expected_services=["executor"])
        monitor.check()
        beat(fake, keys, "executor")
        assert monitor.check().problems == []
        assert [a.kind for a in alerts(fake, keys)] == ["dead_service", "dead_service_resolved"]
        assert fake.hlen(MonitorKeys(keys).problems) == 0

    def test_no_dead_service_alert_during_start_up_grace(self, fake: redis.Redis, keys: Keys) -> None:
        """Dead services are not reported until startup_grace_s has passed on the monitor's clock."""
        clock = SimulatedClock(T0)
        monitor = make_monitor(fake, keys, clock, expected_services=["executor"], startup_grace_s=30)
        assert monitor.check().problems == []
        clock.advance(timedelta(seconds=31))
        assert [p.kind for p in monitor.check().problems] == ["dead_service"]

    def test_default_expected_services_include_the_paper_exchange_only_for_paper(self, keys: Keys) -> None:
        """The paper exchange is expected when the broker is the paper exchange, not with Alpaca."""
        assert "paper-exchange" in expected_services(make_settings(keys))
        alpaca = Settings(broker={"kind": "alpaca", "api_key": "k", "secret_key": "s"})
        assert expected_services(alpaca) == ["ingester", "strategy", "risk", "executor", "reconciler"]

    def test_lag_above_max_lag_alerts(self, fake: redis.Redis, keys: Keys) -> None:
        """A consumer group with more undelivered entries than max_lag raises a lag alert."""
        stream = keys.stream("orders")
        for n in range(6):
            fake.xadd(stream, {"n": str(n)})
        fake.xgroup_create(stream, "executor", id="0")
        monitor = make_monitor(fake, keys, expected_services=[], max_lag=5)
        health = monitor.check()
        assert health.groups["orders/executor"] == {"lag": 6, "pending": 0}
        assert [(p.kind, p.subject) for p in health.problems] == [("lag", "orders/executor")]
        assert [a.kind for a in alerts(fake, keys)] == ["lag"]

    def test_lag_within_max_lag_is_quiet(self, fake: redis.Redis, keys: Keys) -> None:
        """A group whose lag is at most max_lag raises nothing."""
        stream = keys.stream("orders")
        fake.xadd(stream, {"n": "1"})
        fake.xgroup_create(stream, "executor", id="0")
        assert make_monitor(fake, keys, expected_services=[], max_lag=5).check().problems == []

    def test_stale_data_alert_on_simulated_time(self, fake: redis.Redis, keys: Keys) -> None:
        """A symbol whose last bar has not moved for stale_after_s is stale; a new bar clears it."""
        clock = SimulatedClock(T0)
        monitor = make_monitor(fake, keys, clock, expected_services=[])
        stale_after = monitor.settings.ingester.stale_after_s
        fake.hset(keys.last_bar, mapping={"AAPL": "2026-03-02T14:59:00.000000+00:00",
                                          "MSFT": "2026-03-02T14:59:00.000000+00:00"})
        assert monitor.check().stale == []
        clock.advance(timedelta(seconds=stale_after / 2))
        fake.hset(keys.last_bar, "MSFT", "2026-03-02T15:00:00.000000+00:00")
        assert monitor.check().stale == []
        clock.advance(timedelta(seconds=stale_after / 2 + 1))
        health = monitor.check()
        assert health.stale == ["AAPL"]
        assert [(p.kind, p.subject) for p in health.problems] == [("stale_data", "AAPL")]
        fake.hset(keys.last_bar, "AAPL", "2026-03-02T15:02:00.000000+00:00")
        assert monitor.check().stale == []
        assert [a.kind for a in alerts(fake, keys)] == ["stale_data", "stale_data_resolved"]

    def test_a_restarted_monitor_does_not_alert_again(self, fake: redis.Redis, keys: Keys) -> None:
        """Problems already reported are read back at start, so a new monitor stays quiet about them."""
        make_monitor(fake, keys, expected_services=["executor"]).check()
        make_monitor(fake, keys, expected_services=["executor"]).check()
        assert [a.kind for a in alerts(fake, keys)] == ["dead_service"]

    def test_health_is_stored_for_status(self, fake: redis.Redis, keys: Keys) -> None:
        """Each pass writes its findings to the monitor's health key as JSON."""
        make_monitor(fake, keys, expected_services=["executor"]).check()
        health = json.loads(fake.get(MonitorKeys(keys).health) or b"{}")
        assert health["services"] == {"executor": 0}
        assert health["problems"][0]["kind"] == "dead_service"


class TestAlertHandling:
    def test_without_webhook_alerts_are_logged_once(self, fake: redis.Redis, keys: Keys) -> None:
        """With no webhook_url an alert is logged, kept in recent alerts and counted once per id."""
        monitor = make_monitor(fake, keys)
        alert = an_alert()
        with capture_logs() as logs:
            monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 1))
            monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 2))  # redelivered
        assert [e["text"] for e in logs if e["event"] == "monitor.alert"] == [alert.text, alert.text]
        names = MonitorKeys(keys)
        assert fake.hget(names.deliveries, "logged") == b"1"
        assert fake.llen(names.recent_alerts) == 1


def test_balance_refresh_writes_the_broker_account(keys: Keys) -> None:
    """The balance job's work stores the broker's cash, buying power and equity as exact decimals."""
    client = fakeredis.FakeRedis()

    def handler(call: BrokerCall) -> Account:
        assert call.method == "account"
        return Account(account_id="a1", currency="USD", cash=Decimal("1234.56"),
                       buying_power=Decimal("2469.12"), equity=Decimal("1300.01"),
                       pattern_day_trader=False, trading_blocked=False)

    write_balance(client, keys, FakeBroker(handler), SimulatedClock(T0))
    raw: Any = client.hgetall(MonitorKeys(keys).balance)
    stored = {k.decode(): v.decode() for k, v in raw.items()}
    assert stored["cash"] == "1234.56" and stored["equity"] == "1300.01"
    assert stored["at"] == T0.isoformat()


# -- rq: real redis-server only (rq cannot run on fakeredis's TCP server: no INFO/CONFIG) ---------


class Webhook:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first ``fail_first`` posts (None: all)."""

    def __init__(self, fail_first: int | None) -> None:
        self.fail_first = fail_first
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                failing = hook.fail_first is None or len(hook.bodies) < hook.fail_first
                hook.bodies.append(body)
                status = 500 if failing else 200
                hook.answers.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def real(real_redis_url: str) -> Iterator[tuple[redis.Redis, Keys]]:
    """A real redis-server client and a fresh prefix; the prefix's keys and rq keys are deleted after."""
    client = connect_url(real_redis_url)
    keys = Keys(prefix=f"t-{uuid.uuid4().hex[:12]}")
    yield client, keys
    for pattern in (keys.pattern(), f"rq:*{keys.prefix}*"):
        doomed = list(client.scan_iter(match=pattern, count=1000))
        if doomed:
            client.delete(*doomed)
    client.close()


def run_worker(client: redis.Redis, queue: Queue) -> None:
    """Run every queued job in this process (rq's SimpleWorker in burst mode)."""
    SimpleWorker([queue], connection=client, serializer=queue.serializer).work(burst=True)


class TestWebhookDelivery:
    def test_webhook_that_fails_twice_is_retried_until_delivered(self, real: Real) -> None:
        """A delivery job retries through rq's Retry after two 500s and succeeds on the third post."""
        client, keys = real
        hook = Webhook(fail_first=2)
        try:
            monitor = make_monitor(client, keys, webhook_url=hook.url, webhook_retries=3,
                                   webhook_retry_intervals_s=[0])
            alert = an_alert()
            monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 1))
            run_worker(client, monitor.queue)
        finally:
            hook.close()
        assert hook.answers == [500, 500, 200]
        assert {body["id"] for body in hook.bodies} == {alert.id}
        job = Job.fetch(job_id(keys, "alert", alert.id), connection=client)
        assert job.get_status() == JobStatus.FINISHED
        counters = client.hgetall(MonitorKeys(keys).deliveries)
        assert counters == {b"enqueued": b"1", b"attempt_failed": b"2", b"delivered": b"1"}
        assert FailedJobRegistry(queue=monitor.queue).count == 0

    def test_webhook_that_always_fails_ends_in_the_failed_registry_and_is_counted(
            self, real: Real) -> None:
        """After its last retry the job is in rq's failed registry and in the failed-deliveries list."""
        client, keys = real
        hook = Webhook(fail_first=None)
        try:
            monitor = make_monitor(client, keys, webhook_url=hook.url, webhook_retries=2,
                                   webhook_retry_intervals_s=[0])
            alert = an_alert("the webhook is down")
            monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 1))
            run_worker(client, monitor.queue)
        finally:
            hook.close()
        assert hook.answers == [500, 500, 500]
        jid = job_id(keys, "alert", alert.id)
        assert FailedJobRegistry(queue=monitor.queue).get_job_ids() == [jid]
        names = MonitorKeys(keys)
        assert client.hget(names.deliveries, "failed") == b"1"
        assert client.hget(names.deliveries, "attempt_failed") == b"3"
        failed = [json.loads(raw) for raw in client.lrange(names.failed_deliveries, 0, -1)]
        assert [(f["alert"]["id"], f["job_id"]) for f in failed] == [(alert.id, jid)]
        assert "500" in failed[0]["error"]

    def test_a_redelivered_alert_is_enqueued_once(self, real: Real) -> None:
        """The job id comes from the alert id, so a redelivered alert does not enqueue a second job."""
        client, keys = real
        monitor = make_monitor(client, keys, webhook_url="http://127.0.0.1:9/never")
        alert = an_alert()
        monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 1))
        monitor.handle_alert(Delivery(ALERTS, "1-0", alert, 2))
        assert monitor.queue.count == 1
        assert client.hget(MonitorKeys(keys).deliveries, "enqueued") == b"1"


class TestSchedule:
    def test_periodic_jobs_are_enqueued_when_due_and_not_before(self, real: Real) -> None:
        """Balance refresh is due at once, then every balance_refresh_s; the summary after daily_summary_s."""
        client, keys = real
        clock = SimulatedClock(T0)
        monitor = make_monitor(client, keys, clock, balance_refresh_s=300, daily_summary_s=3600)
        first = monitor.tick()
        assert [j.split("-")[2] for j in first] == ["refresh_balance"]
        assert monitor.tick() == []
        clock.advance(timedelta(seconds=300))
        assert len(monitor.tick()) == 1
        clock.advance(timedelta(seconds=3300))
        due = monitor.tick()
        assert sorted(j.split("-")[2] for j in due) == ["daily_summary", "refresh_balance"]
        again = make_monitor(client, keys, clock, balance_refresh_s=300, daily_summary_s=3600)
        assert again.tick() == []  # the schedule is in Redis: a restarted monitor does not repeat

    def test_daily_summary_job_stores_and_publishes_the_summary(self, real: Real) -> None:
        """The daily summary job, run by an rq worker, writes its hash and publishes an INFO alert."""
        client, keys = real
        clock = SimulatedClock(T0)
        monitor = make_monitor(client, keys, clock, daily_summary_s=60)
        monitor.tick()
        for job in monitor.queue.get_jobs():
            job.cancel()  # the balance refresh needs a broker: test_balance_refresh_writes_the_broker_account
        clock.advance(timedelta(seconds=60))
        assert [j.split("-")[2] for j in monitor.tick()] == ["daily_summary"]
        run_worker(client, monitor.queue)
        summary = client.hgetall(MonitorKeys(keys).daily_summary)
        assert summary[b"account"] == b"paper" and summary[b"trading_state"] == b"ACTIVE"
        assert [a.kind for a in alerts(client, keys)] == ["daily_summary"]


class TestWorker:

    def test_failed_jobs_are_logged_as_one_line_a_bastion_error_without_traceback(
            self, real: Real, real_redis_url: str) -> None:
        """A job failing with a Bastion error is logged as rq_job.failed with its message only; one
        failing with anything else, with its traceback; both end in rq's failed registry."""
        client, keys = real
        queue = Queue(keys.prefix, connection=client, serializer=JSONSerializer)
        queue.enqueue("tests.procs.failing_jobs.broker_down", job_id=f"{keys.prefix}-down")
        queue.enqueue("tests.procs.failing_jobs.bug", job_id=f"{keys.prefix}-bug")
        proc = spawn("services.monitor.worker", "--burst",
                     env={"REDIS_URL": real_redis_url, "BASTION_KEY_PREFIX": keys.prefix,
                          "BASTION_MONITOR__EXTRA_JOBS": json.dumps(FAILING_JOBS)})
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        failed = [json.loads(line) for line in out.decode().splitlines()
                  if line.startswith("{") and '"rq_job.failed"' in line]
        assert [(f["job_id"], f["error"]) for f in failed] == [
            (f"{keys.prefix}-down", "BrokerUnavailable: account: broker unreachable (connection refused)"),
            (f"{keys.prefix}-bug", "ValueError: a bug in a job")]
        assert "exception" not in failed[0] and "Traceback" not in out.decode()
        assert "ValueError" in str(failed[1]["exception"])
        assert sorted(FailedJobRegistry(queue=queue).get_job_ids()) == sorted(
            [f"{keys.prefix}-down", f"{keys.prefix}-bug"])

    def test_a_pickled_or_unknown_job_is_refused_never_run(self, real: Real, real_redis_url: str) -> None:
        """A pickled job (rq's default serializer: whoever writes to Redis could run code by it) and
        a JSON job naming a function off the allow-list are refused: logged rq_job.refused with why,
        put in the failed registry, and the function never runs; an allowed job beside them runs."""
        client, keys = real
        marker = f"{keys.prefix}:ran"
        Queue(keys.prefix, connection=client).enqueue("tests.procs.failing_jobs.write", marker,
                                                      job_id=f"{keys.prefix}-pickled")
        queue = Queue(keys.prefix, connection=client, serializer=JSONSerializer)
        queue.enqueue("tests.procs.failing_jobs.write", marker, job_id=f"{keys.prefix}-unknown")
        queue.enqueue("services.monitor.jobs.daily_summary", keys.prefix, "paper", job_id=f"{keys.prefix}-ok")
        proc = spawn("services.monitor.worker", "--burst",
                     env={"REDIS_URL": real_redis_url, "BASTION_KEY_PREFIX": keys.prefix})
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        refused = [json.loads(line) for line in out.decode().splitlines()
                   if line.startswith("{") and '"rq_job.refused"' in line]
        assert [(r["job_id"], r["func"]) for r in refused] == [
            (f"{keys.prefix}-pickled", "<cannot be deserialized>"),
            (f"{keys.prefix}-unknown", "tests.procs.failing_jobs.write")]
        assert "not a JSON job" in refused[0]["reason"] and "not an allowed job" in refused[1]["reason"]
        assert not client.exists(marker)
        assert sorted(FailedJobRegistry(queue=queue).get_job_ids()) == [f"{keys.prefix}-pickled",
                                                                         f"{keys.prefix}-unknown"]
        assert Job.fetch(f"{keys.prefix}-ok", connection=client,
                         serializer=JSONSerializer).get_status() == JobStatus.FINISHED

    def test_no_worker_on_the_queue_is_a_problem(self, real: Real) -> None:
        """With require_worker, an rq queue nobody listens on is reported; a registered worker clears it."""
        client, keys = real
        monitor = make_monitor(client, keys, expected_services=[], require_worker=True)
        assert [p.kind for p in monitor.check().problems] == ["no_worker"]
        worker = SimpleWorker([monitor.queue], connection=client)
        worker.register_birth()  # type: ignore[no-untyped-call]
        try:
            health = monitor.check()
            assert health.workers == 1 and health.problems == []
        finally:
            worker.register_death()  # type: ignore[no-untyped-call]

    def test_worker_module_runs_jobs_with_the_configured_url(self, real: Real,
                                                             real_redis_url: str) -> None:
        """``python -m services.monitor.worker --burst`` uses REDIS_URL, runs the queued job, exits 0."""
        client, keys = real
        monitor = make_monitor(client, keys, daily_summary_s=1)
        monitor.queue.enqueue("services.monitor.jobs.daily_summary", keys.prefix, "paper",
                              job_id=job_id(keys, "manual"))
        proc = spawn("services.monitor.worker", "--burst",
                     env={"REDIS_URL": real_redis_url, "BASTION_KEY_PREFIX": keys.prefix})
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
        assert Job.fetch(job_id(keys, "manual"), connection=client).get_status() == JobStatus.FINISHED
        assert client.hget(MonitorKeys(keys).daily_summary, "account") == b"paper"
