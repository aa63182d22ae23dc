"""``python -m services.monitor.worker``: an rq worker for the monitor's queue, on Bastion's Redis.

Like ``rq worker --with-scheduler -u <url> <queue>``, except that jobs are JSON and only the
functions of :func:`~services.monitor._names.allowed_jobs` run (any other job, a pickled one
included, is refused: ``rq_job.refused``), and the URL is resolved the way every service
resolves it (``REDIS_URL``, else the embedded server's URL with its generated password:
:func:`shared.redis.client.resolve_url`), waiting for Redis to come up, and the queue is
``monitor.queue`` (default: the key prefix, ``bastion``). The scheduler runs alongside, so
retries with an interval (``monitor.webhook_retry_intervals_s``) are enqueued when due.

It beats a heartbeat like every service (``rq-worker:<name>``: ``bastion status`` lists it, and
a stopping paper exchange waits for it, since a job may call the broker). rq handles the
signals: the first SIGTERM lets the job in hand finish (warm shutdown), a second stops it now.
A job that fails is logged as one JSON line (``rq_job.failed``): a Bastion error (typed, with a
clear message: the broker unreachable, say) by its message, anything else with its traceback;
rq still records it in its failed registry and retries it as the job says.
``--burst`` runs every queued job and exits (scripts, tests). Jobs import from
:mod:`services.monitor.jobs`; the worker needs the same settings (environment, config file) as
the monitor, since :func:`~services.monitor.jobs.refresh_balance` builds the broker from them.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from rq import Queue, Worker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.serializers import JSONSerializer

from services.monitor._names import allowed_jobs, job_queue
from shared.clock import LiveClock
from shared.config import settings_or_exit
from shared.errors import BastionError, RedisUnavailable
from shared.heartbeat import Heartbeat
from shared.keys import Keys
from shared.logging import configure_logging, get_logger
from shared.redis.client import connect

__all__ = ["main"]

log = get_logger(component="rq_worker")


class _Worker(Worker):
    """rq's Worker on JSON jobs, running only ``allowed`` functions, and logging a failed job
    through structlog instead of rq's traceback text."""

    allowed: frozenset[str] = frozenset()

    def perform_job(self, job: Job, queue: Queue) -> bool:
        """Run ``job`` if it names an allowed function; else refuse it (logged ``rq_job.refused``,
        put in the failed registry, never run): a job that is not JSON (a pickle) cannot name one."""
        try:
            name: str | None = job.func_name
        except DeserializationError:
            name = None
        if name in self.allowed:
            return super().perform_job(job, queue)
        why = ("not a JSON job (pickled, or written by something else)" if name is None
               else f"{name} is not an allowed job (monitor.extra_jobs)")
        log.error("rq_job.refused", job_id=job.id, queue=job.origin, func=name or "<cannot be deserialized>",
                  reason=why)
        self.handle_job_failure(job, queue, exc_string=f"refused: {why}")
        return False

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        exc_type, exc, _ = exc_info
        fields: dict[str, Any] = {"job_id": job.id, "queue": job.origin,
                                  "error": f"{exc_type.__name__}: {exc}"}
        try:
            fields["func"] = job.func_name
        except DeserializationError:
            fields["func"] = "<cannot be deserialized>"
        if isinstance(exc, BastionError):
            log.error("rq_job.failed", **fields)
        else:
            log.error("rq_job.failed", exc_info=exc_info, **fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until stopped (or, with ``--burst``, until the queue is empty)."""
    parser = argparse.ArgumentParser(prog="python -m services.monitor.worker")
    parser.add_argument("--burst", action="store_true", help="run the queued jobs, then exit")
    parser.add_argument("--name", default=None, help="worker name (default: rq-<host>-<pid>)")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging("rq-worker", settings.log.level)
    try:
        client = connect(settings)
    except RedisUnavailable as exc:
        log.error("service.redis_unavailable", error=str(exc))
        return 1
    queue = job_queue(settings, client)
    name = args.name or f"rq-{socket.gethostname()}-{os.getpid()}"
    worker = _Worker([queue], connection=client, name=name, serializer=JSONSerializer)
    worker.allowed = allowed_jobs(settings)
    heartbeat = Heartbeat(client, Keys(settings.key_prefix), "rq-worker", name, LiveClock(),
                          settings.service.heartbeat_interval_s, settings.service.heartbeat_ttl_s)
    heartbeat.start()
    log.info("rq_worker.started", queue=queue.name, name=name, burst=args.burst)
    try:
        worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log.level)
    finally:
        heartbeat.stop()
        client.close()
    log.info("rq_worker.stopped", queue=queue.name, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
