"""Tests for shared.clock: the simulated clock moves only when told, and only forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.clock import Clock, LiveClock, SimulatedClock, utc

START = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


class TestUtc:
    def test_converts_offset_to_utc(self) -> None:
        """An aware time at -05:00 becomes the same instant with tzinfo UTC."""
        value = utc(datetime(2026, 3, 2, 9, 30, 0, 7, tzinfo=timezone(timedelta(hours=-5))))
        assert value == datetime(2026, 3, 2, 14, 30, 0, 7, tzinfo=UTC)
        assert value.tzinfo is UTC

    def test_naive_refused(self) -> None:
        """A naive time is refused rather than assumed to be local or UTC."""
        with pytest.raises(ValueError, match="naive"):
            utc(datetime(2026, 3, 2, 14, 30))  # noqa: DTZ001

    def test_out_of_range_is_value_error(self) -> None:
        """A time with no UTC equivalent raises ValueError (so pydantic reports it), not OverflowError."""
        with pytest.raises(ValueError, match="out of range"):
            utc(datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-1))))


class TestSimulatedClock:
    def test_starts_where_told(self) -> None:
        """now() is the start time until the clock is moved, however often it is read."""
        clock = SimulatedClock(START)
        assert clock.now() == START
        assert clock.now() == START
        assert clock.monotonic() == 0.0

    def test_default_start_is_aware_utc(self) -> None:
        """Without a start the clock still reads an aware UTC time."""
        assert SimulatedClock().now().tzinfo is UTC

    def test_start_normalised_to_utc(self) -> None:
        """A start at +02:00 is held as the same instant in UTC."""
        clock = SimulatedClock(datetime(2026, 3, 2, 16, 30, tzinfo=timezone(timedelta(hours=2))))
        assert clock.now() == START and clock.now().tzinfo is UTC

    def test_naive_start_refused(self) -> None:
        """A naive start time is refused."""
        with pytest.raises(ValueError, match="naive"):
            SimulatedClock(datetime(2026, 3, 2))  # noqa: DTZ001

    def test_advance(self) -> None:
        """advance moves now() and monotonic() by exactly the delta, microseconds included."""
        clock = SimulatedClock(START)
        clock.advance(timedelta(seconds=90, microseconds=5))
        assert clock.now() == START + timedelta(seconds=90, microseconds=5)
        assert clock.monotonic() == pytest.approx(90.000005)

    def test_advance_backwards_refused(self) -> None:
        """A negative delta is refused and the clock does not move."""
        clock = SimulatedClock(START)
        with pytest.raises(ValueError, match="backwards"):
            clock.advance(timedelta(seconds=-1))
        assert clock.now() == START

    def test_set_forward(self) -> None:
        """set jumps to the given instant (converted to UTC); monotonic follows."""
        clock = SimulatedClock(START)
        clock.set(datetime(2026, 3, 2, 10, 31, tzinfo=timezone(timedelta(hours=-5))))
        assert clock.now() == START + timedelta(hours=1, minutes=1)
        assert clock.monotonic() == 3660.0

    def test_set_to_now_allowed(self) -> None:
        """Setting the current time again is not going back."""
        clock = SimulatedClock(START)
        clock.set(START)
        assert clock.now() == START

    def test_set_back_refused(self) -> None:
        """set refuses an earlier instant and leaves the clock where it was."""
        clock = SimulatedClock(START)
        with pytest.raises(ValueError, match="cannot go back"):
            clock.set(START - timedelta(microseconds=1))
        assert clock.now() == START

    def test_set_naive_refused(self) -> None:
        """set refuses a naive time."""
        with pytest.raises(ValueError, match="naive"):
            SimulatedClock(START).set(datetime(2027, 1, 1))  # noqa: DTZ001

    def test_sleep_advances_instead_of_waiting(self) -> None:
        """sleep(2.5) moves the clock 2.5 s forward at once."""
        clock = SimulatedClock(START)
        clock.sleep(2.5)
        assert clock.now() == START + timedelta(seconds=2.5)
        assert clock.monotonic() == 2.5

    @pytest.mark.parametrize("seconds", [0, -3])
    def test_sleep_zero_or_negative_is_a_no_op(self, seconds: float) -> None:
        """sleep of zero or a negative time does not move the clock (and does not raise)."""
        clock = SimulatedClock(START)
        clock.sleep(seconds)
        assert clock.now() == START

    def test_is_a_clock(self) -> None:
        """SimulatedClock and LiveClock satisfy the Clock protocol."""
        assert isinstance(SimulatedClock(), Clock)
        assert isinstance(LiveClock(), Clock)


class TestLiveClock:
    def test_now_is_aware_utc(self) -> None:
        """LiveClock.now() is timezone-aware with zero UTC offset."""
        now = LiveClock().now()
        assert now.tzinfo is not None and now.utcoffset() == timedelta(0)

    def test_now_is_close_to_the_host_clock(self) -> None:
        """LiveClock.now() agrees with the host's UTC time to within a minute."""
        host = datetime.now(UTC)  # noqa: TID251 (the test compares against the host on purpose)
        assert abs(LiveClock().now() - host) < timedelta(minutes=1)

    def test_monotonic_never_goes_back(self) -> None:
        """Two monotonic readings are non-decreasing."""
        clock = LiveClock()
        first = clock.monotonic()
        assert clock.monotonic() >= first

    def test_sleep_of_zero_returns(self) -> None:
        """sleep(0) and negative sleeps return at once without error."""
        clock = LiveClock()
        start = clock.monotonic()
        clock.sleep(0)
        clock.sleep(-1)
        assert clock.monotonic() - start < 1.0
