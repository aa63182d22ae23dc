"""``bastion kill-switch``, ``bastion locks`` and the safety sections of ``bastion status``, against a
real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import redis
from structlog.testing import capture_logs

from services.cli._context import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from services.cli.commands.kill_switch import who
from services.cli.service import main
from services.risk.service import RiskService
from shared.brokers import Account, BrokerCall, FakeBroker
from shared.bus import Delivery, codec
from shared.clock import LiveClock
from shared.config import Settings
from shared.keys import ALERTS, INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import ExitReason, Fill, Intent, Side
from shared.redis.connection import connect_url
from shared.safety.deferred import DeferredQueue
from shared.safety.protections import ANY, COOLDOWN, MANUAL, ClosedTrade, ProtectionLock, Protections
from shared.safety.trading_state import LEDGER, KillSwitch, TradingState
from tests.support.environment import clear_settings
from tests.support.factories import intent


@pytest.fixture
def client(real_redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """The CLI pointed at the real test server under the test's prefix; a client for the checks."""
    clear_settings(monkeypatch)
    monkeypatch.setenv("REDIS_URL", real_redis_url)
    monkeypatch.setenv("BASTION_KEY_PREFIX", keys.prefix)
    result = connect_url(real_redis_url)
    yield result
    for key in result.scan_iter(match=keys.pattern(), count=1000):
        result.delete(key)
    result.close()


def risk_service(client: redis.Redis, keys: Keys) -> RiskService:
    """A risk service on the same server, $10,000, holding 20 AAPL marked at $150 with fresh data."""
    def answer(call: BrokerCall) -> object:
        return Account(account_id="a", currency="USD", cash=Decimal(10000), buying_power=Decimal(10000),
                       equity=Decimal(10000), pattern_day_trader=False, trading_blocked=False)

    settings = Settings(portfolio={"starting_cash": "10000"}, key_prefix=keys.prefix)
    service = RiskService(client, keys, settings, LiveClock(), broker=FakeBroker(answer))
    service.portfolio.open()
    service.portfolio.reserve("h", "AAPL", Side.BUY, Decimal(20), Decimal(150))
    service.portfolio.apply_fill("h", Fill(fill_id="h:1", quantity=Decimal(20), price=Decimal(150),
                                           time=LiveClock().now()))
    client.hset(keys.last_price, "AAPL", "150")  # as the ingester writes it
    client.hset(keys.bar_arrival, "AAPL", LiveClock().now().isoformat())  # a bar just arrived
    return service


def send(service: RiskService, side: Side) -> Intent:
    """A manual intent for 10 AAPL, handed to risk as the bus would."""
    wish = intent(side, time=LiveClock().now())
    service.handle_intent(Delivery(INTENTS, "1-0", wish, 1))
    return wish


class TestKillSwitchCommand:
    def test_on_records_halted_with_who_and_why(self, client: redis.Redis, keys: Keys,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """`kill-switch on --reason` sets HALTED with the OS user and the reason, in the ledger and alerts."""
        assert main(["kill-switch", "on", "--reason", "fat finger"]) == EXIT_OK
        status = KillSwitch(client, keys).current()
        assert (status.state, status.by, status.reason) == (TradingState.HALTED, who(), "fat finger")
        assert "ACTIVE -> HALTED" in capsys.readouterr().out
        [entry] = client.xrange(keys.stream(LEDGER))
        assert entry[1][b"by"].decode() == who()
        assert client.xlen(keys.stream(ALERTS)) == 1

    def test_on_reducing_with_requests_then_off(self, client: redis.Redis, keys: Keys) -> None:
        """REDUCING with --cancel-orders --flatten records both requests; `off` returns to ACTIVE."""
        assert main(["kill-switch", "on", "--state", "reducing", "--reason", "wind down", "--cancel-orders",
                     "--flatten"]) == EXIT_OK
        status = KillSwitch(client, keys).current()
        assert (status.state, status.cancel_open_orders, status.flatten_positions) == (
            TradingState.REDUCING, True, True)
        assert main(["kill-switch", "off", "--reason", "all clear"]) == EXIT_OK
        status = KillSwitch(client, keys).current()
        assert (status.state, status.reason, status.flatten_positions) == (
            TradingState.ACTIVE, "all clear", False)

    def test_blank_reason_is_a_usage_error(self, client: redis.Redis, keys: Keys,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """A blank reason exits 2 and changes nothing; a missing one is an argparse usage error."""
        assert main(["kill-switch", "on", "--reason", "  "]) == EXIT_USAGE
        assert "non-empty --reason" in capsys.readouterr().err
        with pytest.raises(SystemExit) as info:
            main(["kill-switch", "off"])
        assert info.value.code == EXIT_USAGE
        assert KillSwitch(client, keys).current().seq == 0

    def test_entry_refused_and_reduction_approved_in_reducing(self, client: redis.Redis, keys: Keys) -> None:
        """After `kill-switch on --state REDUCING` risk refuses a buy and approves a sell of the position;
        after HALTED it refuses the sell too."""
        service = risk_service(client, keys)
        assert main(["kill-switch", "on", "--state", "REDUCING", "--reason", "drill"]) == EXIT_OK
        buy = send(service, Side.BUY)
        sell = send(service, Side.SELL)
        orders = [fields[b"cid"].decode() for _, fields in client.xrange(keys.stream(ORDERS))]
        rejections = {fields[b"cid"].decode(): fields for _, fields in client.xrange(keys.stream(REJECTIONS))}
        assert orders == [sell.id] and list(rejections) == [buy.id]
        assert main(["kill-switch", "on", "--reason", "stop all"]) == EXIT_OK
        late = send(service, Side.SELL)
        assert late.id in {fields[b"cid"].decode() for _, fields in client.xrange(keys.stream(REJECTIONS))}


class TestStatusSafetySections:
    def fill_in(self, client: redis.Redis, keys: Keys) -> datetime:
        """A trading state, a lock, a deferred intent, a reconciliation report and monitor records;
        returns when the trade that caused the lock closed."""
        KillSwitch(client, keys).engage("REDUCING", "alice", "drill")
        closed_at = LiveClock().now()
        Protections(client, keys, Settings().protections).record_trade_closed(
            ClosedTrade("t1", "AAPL", Side.BUY, Decimal(-5), exit_reason=ExitReason.STOP_LOSS, at=closed_at))
        wish = Intent(time=LiveClock().now(), source="strategy:sma", symbol="MSFT", side=Side.BUY,
                      quantity=Decimal(1))
        DeferredQueue(client, keys).defer(wish, "cash is reserved by pending orders")
        client.hset(f"{keys.prefix}:reconciliation", mapping={
            "status": "differences", "time": "2026-03-02T15:00:00+00:00", "error": "",
            "differences": json.dumps([{"kind": "position", "symbol": "AAPL"}])})
        client.hset(f"{keys.prefix}:monitor:problems", "dead:risk", json.dumps({"text": "risk is dead"}))
        client.hset(f"{keys.prefix}:monitor:deliveries", mapping={"enqueued": 3, "failed": 1})
        client.lpush(f"{keys.prefix}:monitor:failed-deliveries", json.dumps({"alert": "x", "error": "500"}))
        return closed_at

    def test_json_has_every_safety_section(self, client: redis.Redis, keys: Keys,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """`status --json` shows the trading state with who/why/when, locks with expiry, the deferred
        queue, the reconciliation report, monitor problems, deliveries and rq's failed count."""
        closed_at = self.fill_in(client, keys)
        capsys.readouterr()  # the setup's own log lines
        assert main(["status", "--json"]) == EXIT_OK
        report = json.loads(capsys.readouterr().out)
        state = report["trading_state"]
        assert (state["state"], state["by"], state["reason"]) == ("REDUCING", "alice", "drill")
        assert state["at"] and state["history"][0]["state"] == "REDUCING"
        [lock] = report["protection_locks"]
        assert lock["protection"] == "cooldown" and lock["symbol"] == "AAPL"
        cooldown = timedelta(seconds=Settings().protections.cooldown_duration_s)
        assert datetime.fromisoformat(lock["until"]) == closed_at + cooldown
        [entry] = report["deferred"]
        assert (entry["symbol"], entry["side"], entry["source"]) == ("MSFT", "buy", "strategy:sma")
        assert report["reconciliation"]["status"] == "differences"
        assert report["reconciliation"]["differences"] == [{"kind": "position", "symbol": "AAPL"}]
        monitor = report["monitor"]
        assert monitor["problems"] == {"dead:risk": {"text": "risk is dead"}}
        assert monitor["deliveries"] == {"enqueued": 3, "failed": 1}
        assert monitor["failed_deliveries"]["count"] == 1
        assert monitor["rq_failed_jobs"]["count"] == 0

    def test_text_shows_the_sections(self, client: redis.Redis, keys: Keys,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """Plain `status` prints the trading state, locks, deferred intents, reconciliation and monitor."""
        self.fill_in(client, keys)
        assert main(["status"]) == EXIT_OK
        out = capsys.readouterr().out
        assert "trading state: REDUCING (by alice: drill" in out
        assert "protection locks:\n  cooldown" in out
        assert "deferred intents:\n  MSFT" in out
        assert "reconciliation: differences" in out
        assert "dead:risk: risk is dead" in out
        assert "failed deliveries kept 1" in out

    def test_empty_sections_read_none(self, client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """On a fresh installation the safety sections read ACTIVE, none, and no report yet."""
        assert main(["status"]) == EXIT_OK
        out = capsys.readouterr().out
        assert "trading state: ACTIVE" in out and "protection locks: none" in out
        assert "deferred intents: none" in out and "reconciliation: no report yet" in out


def status_of(argv: list[str]) -> int:
    """``bastion ARGV``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


class TestLocksCommand:
    def cooldown(self, client: redis.Redis, keys: Keys) -> ProtectionLock:
        """A cooldown lock on AAPL, both sides, as risk writes it after an exit."""
        [lock] = Protections(client, keys, Settings().protections).record_trade_closed(
            ClosedTrade("t1", "AAPL", Side.BUY, Decimal(-5), ExitReason.SIGNAL, LiveClock().now()))
        return lock

    def test_lists_active_locks_as_a_table_or_json(self, client: redis.Redis, keys: Keys,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """`locks` prints a header and one row per lock, the one ending last first; `--json` the same
        locks with protection, symbol, side, until and reason."""
        cooldown = self.cooldown(client, keys)
        manual = Protections(client, keys, Settings().protections).lock(
            "MSFT", Side.SELL, LiveClock().now() + timedelta(hours=2), "borrow recalled", "alice")
        assert manual is not None
        capsys.readouterr()
        assert main(["locks"]) == EXIT_OK
        header, first, second = capsys.readouterr().out.splitlines()
        assert header.split() == ["PROTECTION", "SYMBOL", "SIDE", "UNTIL", "REASON"]
        assert first.split()[:4] == [MANUAL, "MSFT", "sell", manual.until.isoformat()]
        assert first.endswith("borrow recalled (by alice)")
        assert second.split()[:4] == [COOLDOWN, "AAPL", ANY, cooldown.until.isoformat()]
        assert main(["locks", "--json"]) == EXIT_OK
        rows = json.loads(capsys.readouterr().out)
        assert [(r["protection"], r["symbol"], r["side"], r["until"], r["reason"]) for r in rows] == [
            (lock.protection, lock.symbol, lock.side, lock.until.isoformat(), lock.reason)
            for lock in (manual, cooldown)]

    def test_no_locks(self, client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """With no lock, `locks` says so and `locks --json` prints an empty list."""
        assert main(["locks"]) == EXIT_OK
        assert capsys.readouterr().out == "no active protection locks\n"
        assert main(["locks", "--json"]) == EXIT_OK
        assert json.loads(capsys.readouterr().out) == []

    def test_unlock_removes_one_lock_logging_who_and_why(self, client: redis.Redis, keys: Keys,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """`locks unlock cooldown AAPL '*' --reason` removes the lock and logs the OS user and the
        reason; a second unlock finds none and exits 1 saying so."""
        self.cooldown(client, keys)
        capsys.readouterr()
        with capture_logs() as logs:
            status = main(["locks", "unlock", "cooldown", "aapl", "*", "--reason", "checked the fill"])
        assert status == EXIT_OK
        assert not client.hlen(keys.protection_locks)
        [event] = [e for e in logs if e["event"] == "protections.unlocked"]
        assert (event["protection"], event["symbol"], event["side"], event["who"], event["reason"]) == (
            COOLDOWN, "AAPL", ANY, who(), "checked the fill")
        assert f"unlocked cooldown AAPL/* by {who()}: checked the fill" in capsys.readouterr().out
        assert main(["locks", "unlock", "cooldown", "AAPL", "*", "--reason", "again"]) == EXIT_FAILED
        assert "no active cooldown lock on AAPL/*" in capsys.readouterr().err

    def test_unlock_needs_a_reason(self, client: redis.Redis, keys: Keys,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        """A missing --reason is a usage error, a blank one exits 2 saying why; the lock stays."""
        lock = self.cooldown(client, keys)
        capsys.readouterr()
        assert status_of(["locks", "unlock", "cooldown", "AAPL", "*"]) == EXIT_USAGE
        assert "--reason" in capsys.readouterr().err
        assert main(["locks", "unlock", "cooldown", "AAPL", "*", "--reason", " "]) == EXIT_USAGE
        assert "locks unlock needs a non-empty --reason" in capsys.readouterr().err
        assert Protections(client, keys, Settings().protections).active_locks() == [lock]

    def test_add_locks_entries_that_risk_refuses(self, client: redis.Redis, keys: Keys,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """`locks add AAPL --side buy --minutes 30` writes a manual lock for 30 minutes, logged with who
        and why; risk refuses an AAPL buy quoting it and lets the sell of the position through."""
        service = risk_service(client, keys)
        before = LiveClock().now()
        with capture_logs() as logs:
            assert main(["locks", "add", "aapl", "--side", "buy", "--minutes", "30", "--reason",
                         "earnings"]) == EXIT_OK
        after = LiveClock().now()
        [lock] = Protections(client, keys, Settings().protections).active_locks()
        assert (lock.protection, lock.symbol, lock.side, lock.reason) == (
            MANUAL, "AAPL", "buy", f"earnings (by {who()})")
        assert before + timedelta(minutes=30) <= lock.until <= after + timedelta(minutes=30)
        [event] = [e for e in logs if e["event"] == "protections.locked"]
        assert (event["protection"], event["who"]) == (MANUAL, who())
        assert "locked AAPL/buy entries until" in capsys.readouterr().out
        buy = send(service, Side.BUY)
        sell = send(service, Side.SELL)
        orders = [fields[b"cid"].decode() for _, fields in client.xrange(keys.stream(ORDERS))]
        [rejection] = [codec.decode(fields) for _, fields in client.xrange(keys.stream(REJECTIONS))]
        assert orders == [sell.id] and rejection.intent_id == buy.id
        assert "manual locks AAPL buy entries" in rejection.reason and "earnings" in rejection.reason

    def test_add_keeps_a_manual_lock_that_ends_later(self, client: redis.Redis, keys: Keys,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
        """A shorter `locks add` on the same symbol and side keeps the longer manual lock and says so."""
        assert main(["locks", "add", "AAPL", "--minutes", "120", "--reason", "halted news"]) == EXIT_OK
        [longer] = Protections(client, keys, Settings().protections).active_locks()
        capsys.readouterr()
        assert main(["locks", "add", "AAPL", "--minutes", "30", "--reason", "shorter"]) == EXIT_OK
        assert f"kept the manual lock on AAPL/*: it ends as late or later, at {longer.until.isoformat()}" in (
            capsys.readouterr().out)
        assert Protections(client, keys, Settings().protections).active_locks() == [longer]

    @pytest.mark.parametrize(("argv", "message"), [
        (["locks", "add", "AAPL", "--reason", "x"], "--minutes"),
        (["locks", "add", "AAPL", "--minutes", "30"], "--reason"),
        (["locks", "add", "AAPL", "--minutes", "30", "--reason", ""], "needs a non-empty --reason"),
        (["locks", "add", "AAPL", "--minutes", "0", "--reason", "x"], "must be a positive number"),
        (["locks", "add", "AAPL", "--minutes", "-5", "--reason", "x"], "must be a positive number"),
        (["locks", "add", "AAPL", "--minutes", "soon", "--reason", "x"], "is not a number"),
        (["locks", "add", "AAPL", "--minutes", "inf", "--reason", "x"], "must be a positive number"),
        (["locks", "add", "AAPL", "--minutes", "1e300", "--reason", "x"], "past the last date"),
        (["locks", "add", "AAPL", "--minutes", "1e-12", "--reason", "x"], "must end after now"),
        (["locks", "add", "AAPL", "--side", "long", "--minutes", "5", "--reason", "x"], "invalid choice"),
        (["locks", "add", "AA PL", "--minutes", "5", "--reason", "x"], "is not a symbol"),
        (["locks", "unlock", "stoploss", "AAPL", "*", "--reason", "x"], "invalid choice"),
        (["locks", "unlock", "cooldown", "AAPL", "both", "--reason", "x"], "invalid choice"),
        (["locks", "unlock", "cooldown", "AAPL", "--reason", "x"], "required"),
        (["locks", "remove"], "invalid choice"),
    ])
    def test_bad_arguments_exit_2_with_a_message(self, client: redis.Redis, keys: Keys, argv: list[str],
                                                 message: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Each bad argument exits 2 naming the problem on stderr, with no traceback and nothing written."""
        assert status_of(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not client.hlen(keys.protection_locks)
