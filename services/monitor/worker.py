"""``python -m services.monitor.worker``: an rq worker for the monitor's queue, on Bastion's Redis.

The same as ``rq worker --with-scheduler -u <url> <queue>``, except that the URL is resolved the
way every service resolves it (``REDIS_URL``, else the embedded server's URL with its generated
password: :func:`shared.redis_client.resolve_url`), waiting for Redis to come up, and the queue
is ``monitor.queue`` (default: the key prefix, ``bastion``). The scheduler runs alongside, so
retries with an interval (``monitor.webhook_retry_intervals_s``) are enqueued when due.

rq handles the signals: the first SIGTERM lets the job in hand finish (warm shutdown), a second
stops it now. ``--burst`` runs every queued job and exits (scripts, tests). Jobs import from
:mod:`services.monitor.jobs`; the worker needs the same settings (environment, config file) as
the monitor, since :func:`~services.monitor.jobs.refresh_balance` builds the broker from them.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from rq import Queue, Worker

from services.monitor._names import queue_name
from shared.config import settings_or_exit
from shared.errors import RedisUnavailable
from shared.logging import configure_logging, get_logger
from shared.redis_client import connect

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until stopped (or, with ``--burst``, until the queue is empty)."""
    parser = argparse.ArgumentParser(prog="python -m services.monitor.worker")
    parser.add_argument("--burst", action="store_true", help="run the queued jobs, then exit")
    parser.add_argument("--name", default=None, help="worker name (default: rq-<host>-<pid>)")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging("rq-worker", settings.log.level)
    log = get_logger()
    try:
        client = connect(settings)
    except RedisUnavailable as exc:
        log.error("service.redis_unavailable", error=str(exc))
        return 1
    queue = Queue(queue_name(settings), connection=client)
    name = args.name or f"rq-{socket.gethostname()}-{os.getpid()}"
    worker = Worker([queue], connection=client, name=name)
    log.info("rq_worker.started", queue=queue.name, name=name, burst=args.burst)
    try:
        worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log.level)
    finally:
        client.close()
    log.info("rq_worker.stopped", queue=queue.name, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
