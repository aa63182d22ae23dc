"""Jobs that fail, for the rq worker's tests: one with a Bastion error, one with a bug."""

from __future__ import annotations

from shared.errors import BrokerUnavailable


def broker_down() -> None:
    """Fail as a balance refresh does when the broker is gone."""
    raise BrokerUnavailable("account: broker unreachable (connection refused)")


def bug() -> None:
    """Fail with an error nobody expected."""
    raise ValueError("a bug in a job")
