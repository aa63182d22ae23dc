"""The monitor's rq queue name and job ids (its Redis keys are :class:`shared.keys.MonitorKeys`).

rq's queue of monitor jobs is ``rq:queue:<queue name>`` (``rq info -u URL <queue name>``).
"""

from __future__ import annotations

from shared.config import Settings
from shared.keys import Keys

__all__ = ["job_id", "queue_name"]


def queue_name(settings: Settings) -> str:
    """The rq queue the monitor enqueues on and the worker listens to (default: the key prefix)."""
    return settings.monitor.queue or settings.key_prefix


def job_id(keys: Keys, *parts: str) -> str:
    """A deterministic rq job id (rq allows only letters, digits, ``_`` and ``-``)."""
    raw = "-".join((keys.prefix, *parts))
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)
