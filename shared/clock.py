"""The only place Bastion reads wall-clock time.

Every service receives a :class:`Clock` and asks it for the time; nothing else calls
``datetime.now()``, ``utcnow()`` or ``time.time()`` (ruff's banned-API rule enforces it).
:class:`LiveClock` reads the host; :class:`SimulatedClock` is set and advanced by hand, so
tests and back-tests are deterministic.

Where processes on different hosts must agree on time (rate limits, lock leases), use
Redis's ``TIME`` instead: a host clock is only trusted for its own process.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "LiveClock", "SimulatedClock", "epoch_micros", "from_epoch_micros", "utc"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; a naive value is refused."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: Bastion only handles aware UTC times")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 at +01:00, year 9999 at -01:00: no such UTC datetime
        raise ValueError(f"datetime {value!r} is out of range in UTC") from None


def epoch_micros(when: datetime) -> int:
    """Microseconds since the Unix epoch, exact (for Redis scores and Lua comparisons)."""
    delta = utc(when) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_micros(value: int) -> datetime:
    """The aware UTC datetime ``value`` microseconds after the Unix epoch."""
    return EPOCH + timedelta(microseconds=value)


@runtime_checkable
class Clock(Protocol):
    """Where time comes from."""

    def now(self) -> datetime:
        """The current time, aware and in UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for deadlines)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a simulated clock advances instead)."""
        ...


class LiveClock:
    """The host's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimulatedClock:
    """A clock that only moves when told to: ``set``, ``advance`` or ``sleep``."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = utc(start) if start is not None else datetime(2026, 1, 2, 14, 30, tzinfo=UTC)
        self._origin = self._now
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return (self._now - self._origin).total_seconds()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(timedelta(seconds=seconds))

    def set(self, when: datetime) -> None:
        """Jump to ``when``; moving backwards is refused."""
        when = utc(when)
        with self._lock:
            if when < self._now:
                raise ValueError(f"simulated clock cannot go back from {self._now} to {when}")
            self._now = when

    def advance(self, delta: timedelta) -> None:
        """Move forward by ``delta``."""
        if delta < timedelta(0):
            raise ValueError("simulated clock cannot go backwards")
        with self._lock:
            self._now += delta
