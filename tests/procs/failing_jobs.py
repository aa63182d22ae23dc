"""Jobs for the rq worker's tests: one failing with a Bastion error, one with a bug, one that writes."""

from __future__ import annotations

from shared.errors import BrokerUnavailable


def broker_down() -> None:
    """Fail as a balance refresh does when the broker is gone."""
    raise BrokerUnavailable("account: broker unreachable (connection refused)")


def bug() -> None:
    """Fail with an error nobody expected."""
    raise ValueError("a bug in a job")


def write(key: str) -> None:
    """Set ``key``: a job that must never run unless allowed (the worker's allow-list test)."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    job.connection.set(key, "1")
