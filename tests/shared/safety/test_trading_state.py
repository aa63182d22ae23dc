"""Tests for shared.safety.trading_state: states, the ledger and alert, escalation, Redis restarted
from AOF.
"""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import pytest
import redis

from shared.bus import codec
from shared.clock import SimulatedClock
from shared.keys import ALERTS, Keys
from shared.models import Alert, AlertSeverity, Side
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.limits import Rule
from shared.safety.trading_state import LEDGER, KillSwitch, TradingState, TradingStatus
from tests.support.processes import free_port


def switch(client: redis.Redis, keys: Keys) -> KillSwitch:
    return KillSwitch(client, keys, SimulatedClock())


class TestAllows:
    def test_active_allows_entries_and_exits(self) -> None:
        """ACTIVE lets a new long, a new short and an exit through."""
        status = TradingStatus(TradingState.ACTIVE)
        assert status.allows(Side.BUY, D(0)) and status.allows(Side.SELL, D(0))
        assert status.allows(Side.SELL, D(5))

    def test_reducing_allows_only_orders_that_shrink_the_position(self) -> None:
        """REDUCING passes a sell of a long and a buy of a short, refuses entries and adds."""
        status = TradingStatus(TradingState.REDUCING, by="ops", reason="drawdown")
        assert status.allows(Side.SELL, D(10))
        assert status.allows(Side.BUY, D(-10))
        assert not status.allows(Side.BUY, D(0))
        assert not status.allows(Side.BUY, D(10))
        assert not status.allows(Side.SELL, D(-10))
        refusal = status.refusal(Side.BUY, D(10))
        assert refusal is not None and refusal.rule is Rule.TRADING_REDUCING and "drawdown" in refusal.reason

    def test_reducing_refuses_a_sell_that_goes_through_zero(self) -> None:
        """Selling more than the long held would open a short: not a reducing order."""
        status = TradingStatus(TradingState.REDUCING)
        assert status.allows(Side.SELL, D(10), D(10))
        assert not status.allows(Side.SELL, D(10), D(11))

    def test_halted_refuses_everything(self) -> None:
        """HALTED refuses exits too, with a reason naming who halted and why."""
        status = TradingStatus(TradingState.HALTED, by="alice", reason="broker outage")
        assert not status.allows(Side.SELL, D(10))
        refusal = status.refusal(Side.SELL, D(10))
        assert refusal is not None and refusal.rule is Rule.TRADING_HALTED
        assert "alice" in str(refusal) and "broker outage" in str(refusal)


class TestEngage:
    def test_never_set_reads_active(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A fresh installation is ACTIVE with no history."""
        ks = switch(redis_client, keys)
        assert ks.current().state is TradingState.ACTIVE
        assert ks.history() == []

    def test_engage_records_who_why_when_in_hash_ledger_and_alert(self, redis_client: redis.Redis,
                                                                  keys: Keys) -> None:
        """engage writes the state, one ledger entry and one CRITICAL alert for HALTED."""
        clock = SimulatedClock()
        ks = KillSwitch(redis_client, keys, clock)
        change = ks.engage(TradingState.HALTED, by="cli:alice", reason="manual kill switch")
        assert change.outcome == "ok" and change.previous is TradingState.ACTIVE and change.seq == 1
        status = ks.current()
        assert (status.state, status.by, status.reason, status.at, status.seq) == (
            TradingState.HALTED, "cli:alice", "manual kill switch", clock.now(), 1)
        [entry] = ks.history()
        assert entry["state"] == "HALTED" and entry["previous"] == "ACTIVE" and entry["by"] == "cli:alice"
        assert entry["at"] == clock.now().isoformat()
        [(_, fields)] = redis_client.xrange(keys.stream(ALERTS))
        alert = codec.decode(fields)
        assert isinstance(alert, Alert) and alert.severity is AlertSeverity.CRITICAL
        assert alert.kind == "trading_state" and alert.details["state"] == "HALTED"

    def test_every_change_is_ledgered_in_order(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Three changes give three ledger entries, newest first in history, seq growing."""
        ks = switch(redis_client, keys)
        ks.engage("REDUCING", "protections", "max drawdown")
        ks.engage("HALTED", "reconciler", "position mismatch")
        ks.engage("ACTIVE", "cli:bob", "resolved")
        assert [e["state"] for e in ks.history()] == ["ACTIVE", "HALTED", "REDUCING"]
        assert [e["seq"] for e in ks.history()] == ["3", "2", "1"]
        assert redis_client.xlen(keys.stream(LEDGER)) == 3
        assert ks.current().previous is TradingState.HALTED

    def test_retry_with_same_change_id_is_not_recorded_twice(self, redis_client: redis.Redis,
                                                             keys: Keys) -> None:
        """A retried engage (same change id) answers "dup" and adds no ledger entry."""
        ks = switch(redis_client, keys)
        ks.engage("HALTED", "cli", "x", change_id="c1")
        again = ks.engage("HALTED", "cli", "x", change_id="c1")
        assert again.outcome == "dup" and again.seq == 1
        assert redis_client.xlen(keys.stream(LEDGER)) == 1

    def test_escalate_only_never_lowers_the_state(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An automatic REDUCING with escalate_only leaves a human's HALTED in place and records nothing."""
        ks = switch(redis_client, keys)
        ks.engage("HALTED", "cli:alice", "manual")
        kept = ks.engage("REDUCING", "protections", "drawdown", escalate_only=True)
        assert kept.outcome == "kept" and ks.current().state is TradingState.HALTED
        assert redis_client.xlen(keys.stream(LEDGER)) == 1
        raised = KillSwitch(redis_client, keys).engage("HALTED", "protections", "again", escalate_only=True)
        assert raised.outcome == "ok"

    def test_cancel_and_flatten_requests_are_recorded_off_by_default(self, redis_client: redis.Redis,
                                                                     keys: Keys) -> None:
        """The flags default off, are stored with the change when asked, and are refused with ACTIVE."""
        ks = switch(redis_client, keys)
        ks.engage("REDUCING", "cli", "wind down")
        assert not ks.current().cancel_open_orders and not ks.current().flatten_positions
        ks.engage("HALTED", "cli", "stop now", cancel_open_orders=True, flatten_positions=True)
        status = ks.current()
        assert status.cancel_open_orders and status.flatten_positions
        assert ks.history()[0]["flatten_positions"] == "1"
        with pytest.raises(ValueError):
            ks.engage("ACTIVE", "cli", "resume", flatten_positions=True)

    def test_engage_needs_who_and_why(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An engage without by or reason is refused before anything is written."""
        with pytest.raises(ValueError):
            switch(redis_client, keys).engage("HALTED", "", "why")
        assert not redis_client.exists(keys.trading_state)

    def test_a_new_kill_switch_object_sees_the_state(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A restarted service (a new object over the same Redis) reads the engaged state."""
        switch(redis_client, keys).engage("REDUCING", "cli", "x")
        fresh = switch(redis_client, keys)
        assert fresh.current().state is TradingState.REDUCING
        assert not fresh.allows(Side.BUY, D(0)) and fresh.allows(Side.SELL, D(3))


class TestSurvivesRedisRestart:
    def test_engaged_state_survives_redis_restart_from_aof(self, tmp_path: Path, keys: Keys) -> None:
        """Engage REDUCING, stop Redis (SIGTERM flushes the AOF), start a new server on the same data:
        still REDUCING; an entry is refused while a reducing order passes."""
        port = free_port()
        server = RedisServer(port, tmp_path / "redis", appendonly=True)
        server.start()
        try:
            client = connect_url(server.url)
            KillSwitch(client, keys, SimulatedClock()).engage("REDUCING", "cli:alice", "risk review")
            client.close()
        finally:
            server.stop()
        assert server.process is not None and server.process.returncode is not None
        assert any((tmp_path / "redis").glob("appendonly*")), "no AOF written"
        restarted = RedisServer(port, tmp_path / "redis", appendonly=True)
        restarted.start()
        try:
            client = connect_url(restarted.url)
            ks = KillSwitch(client, keys, SimulatedClock())
            status = ks.current()
            assert status.state is TradingState.REDUCING and status.by == "cli:alice"
            assert not ks.allows(Side.BUY, D(0))  # an entry
            assert ks.allows(Side.SELL, D(100), D(40))  # reduces a long of 100
            assert len(ks.history()) == 1
            client.close()
        finally:
            restarted.stop()
