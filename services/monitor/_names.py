"""The monitor's rq queue, the jobs it may run, and job ids (its Redis keys are
:class:`shared.keys.MonitorKeys`).

rq's queue of monitor jobs is ``rq:queue:<queue name>`` (``rq info -u URL <queue name>``). Jobs
are JSON (rq's ``JSONSerializer``: a job is data, never a pickle, so whoever can write to Redis
cannot make the worker run code by it), and the worker runs only the functions of
:func:`allowed_jobs`.
"""

from __future__ import annotations

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from shared.config import Settings
from shared.keys import Keys

__all__ = ["JOBS", "allowed_jobs", "job_id", "job_queue", "queue_name"]

JOBS = ("services.monitor.jobs.deliver_alert", "services.monitor.jobs.refresh_balance",
        "services.monitor.jobs.daily_summary")  # what the monitor enqueues


def allowed_jobs(settings: Settings) -> frozenset[str]:
    """The functions (``module.function``) the worker runs: the monitor's and ``monitor.extra_jobs``."""
    return frozenset((*JOBS, *settings.monitor.extra_jobs))


def job_queue(settings: Settings, client: redis.Redis) -> Queue:
    """The monitor's queue, its jobs serialised as JSON."""
    return Queue(queue_name(settings), connection=client, serializer=JSONSerializer)


def queue_name(settings: Settings) -> str:
    """The rq queue the monitor enqueues on and the worker listens to (default: the key prefix)."""
    return settings.monitor.queue or settings.key_prefix


def job_id(keys: Keys, *parts: str) -> str:
    """A deterministic rq job id (rq allows only letters, digits, ``_`` and ``-``)."""
    raw = "-".join((keys.prefix, *parts))
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)
