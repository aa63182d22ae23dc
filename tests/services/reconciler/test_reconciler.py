"""The reconciler against a FakeBroker driven by a function, with a real portfolio on in-process fakeredis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import fakeredis
from structlog.testing import capture_logs

from services.reconciler._compare import OurOrder, Ours, Theirs, compare
from services.reconciler.service import HOLD_REASON, REPORT_STREAM, Reconciler, report_key
from shared.brokers import Account, BrokerCall, BrokerOrder, FakeBroker, Position
from shared.bus import Publisher, codec
from shared.clock import SimulatedClock
from shared.config import Settings
from shared.errors import BrokerUnavailable, OrderNotFound
from shared.keys import ALERTS, Keys
from shared.models import Alert, Fill, OrderStatus, OrderType, Side
from shared.safety.trading_state import KillSwitch, TradingState

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


def broker_order(cid: str, symbol: str = "AAPL", side: Side = Side.BUY, qty: str = "10", filled: str = "0",
                 avg: str | None = None, status: OrderStatus = OrderStatus.NEW) -> BrokerOrder:
    """An order as the broker reports it."""
    return BrokerOrder(broker_order_id=f"b-{cid}", client_order_id=cid, symbol=symbol, side=side,
                       order_type=OrderType.MARKET, time_in_force="day", quantity=Decimal(qty),
                       filled_quantity=Decimal(filled), filled_avg_price=Decimal(avg) if avg else None,
                       limit_price=None, stop_price=None, status=status, broker_status=status.value,
                       submitted_at=T0)


@dataclass
class BrokerState:
    """What the fake broker answers; ``down`` makes every call fail as an unreachable broker."""

    cash: Decimal = Decimal("10000")
    positions: dict[str, Decimal] = field(default_factory=dict)
    open_orders: list[BrokerOrder] = field(default_factory=list)
    orders: dict[str, BrokerOrder] = field(default_factory=dict)
    down: bool = False
    on_account: Callable[[int], None] | None = None
    account_calls: int = 0

    def handle(self, call: BrokerCall) -> Any:
        if self.down:
            raise BrokerUnavailable("connection refused")
        if call.method == "account":
            self.account_calls += 1
            if self.on_account is not None:
                self.on_account(self.account_calls)
            return Account(account_id="acct", currency="USD", cash=self.cash, buying_power=self.cash,
                           equity=self.cash, pattern_day_trader=False, trading_blocked=False)
        if call.method == "positions":
            return [Position(symbol=s, quantity=q, avg_entry_price=Decimal(150), market_value=None,
                             cost_basis=q * 150) for s, q in self.positions.items()]
        if call.method == "open_orders":
            return list(self.open_orders)
        if call.method == "get_order":
            if call.args[0] not in self.orders:
                raise OrderNotFound("no such order", client_order_id=call.args[0])
            return self.orders[call.args[0]]
        raise AssertionError(f"unexpected broker call {call.method}")


class World:
    """A $10,000 account, a broker that agrees with it, and a reconciler between them."""

    def __init__(self, server: fakeredis.FakeServer | None = None, **reconciler: Any) -> None:
        self.client = fakeredis.FakeRedis(server=server)
        self.keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
        self.clock = SimulatedClock(T0)
        self.settings = Settings(portfolio={"starting_cash": "10000"},
                                 reconciler={"recheck_delay_s": 2, "startup_retry_s": 5, **reconciler})
        self.broker_state = BrokerState()
        self.broker = FakeBroker(self.broker_state.handle)
        self.reconciler = Reconciler(self.client, self.keys, self.settings, self.clock, lambda: self.broker,
                                     Publisher(self.client, self.keys, self.settings.bus))
        self.portfolio = self.reconciler.portfolio
        self.kill_switch = KillSwitch(self.client, self.keys, self.clock)

    def open(self) -> World:
        self.portfolio.open()
        return self

    def buy(self, symbol: str, qty: str, price: str, rid: str = "r1") -> None:
        """A filled buy applied to our portfolio (and the same at the broker)."""
        self.portfolio.reserve(rid, symbol, Side.BUY, Decimal(qty), Decimal(price))
        self.portfolio.apply_fill(rid, Fill(fill_id=f"{rid}:f", quantity=Decimal(qty), price=Decimal(price),
                                            time=T0))
        held = self.broker_state.positions.get(symbol, Decimal(0))
        self.broker_state.positions[symbol] = held + Decimal(qty)
        self.broker_state.cash -= Decimal(qty) * Decimal(price)

    def record_order(self, cid: str, *, status: str = "new", qty: str = "10", applied: str = "0",
                     cost: str = "0", symbol: str = "AAPL", side: str = "buy", open_: bool = True) -> None:
        """An order record as the executor writes it."""
        self.client.hset(self.keys.order(cid), mapping={
            "status": status, "symbol": symbol, "side": side, "quantity": qty, "applied_qty": applied,
            "applied_cost": cost, "reservation_id": cid, "intent_id": cid})
        if open_:
            self.client.sadd(self.keys.open_orders, cid)

    def filled_there_not_here(self, cid: str) -> None:
        """An open buy of 10 AAPL @ 150, filled at the broker, its fill not applied here."""
        self.portfolio.reserve(cid, "AAPL", Side.BUY, Decimal(10), Decimal(150))
        self.record_order(cid)
        self.broker_state.orders[cid] = broker_order(cid, filled="10", avg="150", status=OrderStatus.FILLED)
        self.broker_state.positions["AAPL"] = Decimal(10)
        self.broker_state.cash -= Decimal(1500)

    def alerts(self) -> list[Alert]:
        entries: Any = self.client.xrange(self.keys.stream(ALERTS))
        return [m for _, fields in entries if isinstance(m := codec.decode(fields), Alert)]

    def report_hash(self) -> dict[str, str]:
        raw: Any = self.client.hgetall(report_key(self.keys))
        return {k.decode(): v.decode() for k, v in raw.items()}


class Stop:
    """A stop flag whose wait returns at once (counting the waits), so retry loops run without sleeping."""

    def __init__(self, on_wait: Callable[[int], None] | None = None) -> None:
        self.waits = 0
        self.on_wait = on_wait

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        self.waits += 1
        if self.on_wait is not None:
            self.on_wait(self.waits)
        return False


class TestCompare:
    def test_unapplied_fill_of_an_open_order_explains_position_and_cash(self) -> None:
        """A fill the broker has and the executor has not applied yet is in flight, not a difference."""
        ours = Ours(opened=True, cash=Decimal(10000), reserved=Decimal(1502), positions={},
                    open_orders={"c1": OurOrder("c1", "AAPL", Side.BUY, OrderStatus.NEW, Decimal(10),
                                                Decimal(0), Decimal(0))})
        theirs = Theirs(cash=Decimal(8500), positions={"AAPL": Decimal(10)},
                        open_orders={"c1": broker_order("c1", filled="10", avg="150",
                                                        status=OrderStatus.PARTIALLY_FILLED)})
        outcome = compare(ours, theirs, cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
        assert outcome.differences == []
        assert len(outcome.in_flight) == 1

    def test_unpriced_unapplied_fill_skips_the_cash_comparison(self) -> None:
        """Without an average price the unapplied cost is unknown, so cash is not compared on that pass."""
        ours = Ours(opened=True, cash=Decimal(10000), reserved=Decimal(0), positions={},
                    open_orders={"c1": OurOrder("c1", "AAPL", Side.BUY, OrderStatus.NEW, Decimal(10),
                                                Decimal(0), Decimal(0))})
        theirs = Theirs(cash=Decimal(8500), positions={"AAPL": Decimal(4)},
                        open_orders={"c1": broker_order("c1", filled="4")})
        outcome = compare(ours, theirs, cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
        assert not outcome.cash_compared
        assert outcome.differences == []


class TestReconcile:
    def test_matching_state_gives_a_clean_report(self) -> None:
        """Equal cash and positions and no open orders: status ok, report stored and streamed, no alert."""
        world = World().open()
        world.buy("AAPL", "10", "150")
        report = world.reconciler.reconcile()
        assert report.status == "ok" and report.differences == []
        stored = world.report_hash()
        assert stored["status"] == "ok" and json.loads(stored["differences"]) == []
        assert json.loads(stored["broker"])["positions"] == {"AAPL": "10"}
        assert "last_success" in stored
        assert world.client.xlen(world.keys.stream(REPORT_STREAM)) == 1
        assert world.alerts() == []
        assert world.kill_switch.current().state is TradingState.ACTIVE

    def test_position_mismatch_alerts_and_halts(self) -> None:
        """A broker position ours does not explain raises a critical alert and engages HALTED."""
        world = World().open()
        world.buy("AAPL", "10", "150")
        world.broker_state.positions["AAPL"] = Decimal(15)
        report = world.reconciler.reconcile()
        assert report.status == "halted"
        assert [(d.kind, d.subject, d.delta) for d in report.differences] == [("position", "AAPL", "5")]
        status = world.kill_switch.current()
        assert status.state is TradingState.HALTED and status.by == "reconciler"
        assert "AAPL" in status.reason
        mismatch = [a for a in world.alerts() if a.kind == "reconciliation_mismatch"]
        assert len(mismatch) == 1 and mismatch[0].severity == "critical"

    def test_cash_difference_within_tolerance_does_not_halt(self) -> None:
        """A cash difference below cash_tolerance is reported and alerted but leaves trading ACTIVE."""
        world = World(cash_tolerance="0.05").open()
        world.broker_state.cash += Decimal("0.03")
        report = world.reconciler.reconcile()
        assert [(d.kind, d.delta, d.halts) for d in report.differences] == [("cash", "0.03", False)]
        assert report.status == "differences"
        assert world.kill_switch.current().state is TradingState.ACTIVE
        assert [a.severity for a in world.alerts()] == ["warning"]

    def test_cash_difference_beyond_tolerance_halts(self) -> None:
        """A cash difference above cash_tolerance engages HALTED with a reason naming cash."""
        world = World(cash_tolerance="0.01").open()
        world.broker_state.cash -= Decimal("25")
        assert world.reconciler.reconcile().status == "halted"
        status = world.kill_switch.current()
        assert status.state is TradingState.HALTED and "cash" in status.reason

    def test_in_flight_fill_is_not_a_false_halt(self) -> None:
        """An order filled at the broker, not yet applied here, is listed in flight and does not halt."""
        world = World().open()
        world.portfolio.reserve("c1", "AAPL", Side.BUY, Decimal(10), Decimal(150))
        world.record_order("c1")
        filled = broker_order("c1", filled="10", avg="150", status=OrderStatus.FILLED)
        world.broker_state.orders["c1"] = filled  # no longer open at the broker: looked up by id
        world.broker_state.positions["AAPL"] = Decimal(10)
        world.broker_state.cash -= Decimal(1500)
        report = world.reconciler.reconcile()
        assert [d.kind for d in report.differences] == ["order_status"]  # filled there, open here
        assert not report.halting and report.in_flight
        assert world.kill_switch.current().state is TradingState.ACTIVE

    def test_a_lasting_in_flight_fill_is_repaired_then_halts_if_the_repair_is_not_done(self) -> None:
        """Filled at the broker and still not applied here after ``repair_after_s``: a repair
        request for the executor; still not done ``repair_wait_s`` after that: HALTED, naming it."""
        world = World(repair_after_s=30, repair_wait_s=30).open()
        world.filled_there_not_here("c1")
        world.reconciler.reconcile()
        assert not world.client.exists(world.keys.repair_requests)
        world.clock.advance(timedelta(seconds=30))
        assert not world.reconciler.reconcile().halting
        assert world.client.hexists(world.keys.repair_requests, "c1")
        world.clock.advance(timedelta(seconds=30))
        report = world.reconciler.reconcile()
        assert [d.kind for d in report.halting] == ["order_unrepaired"]
        status = world.kill_switch.current()
        assert status.state is TradingState.HALTED and "c1" in status.reason

    def test_a_repaired_in_flight_fill_clears_without_a_halt(self) -> None:
        """The executor carries out the repair (applies the fill, drops the request): the next
        pass is clean and nothing halts."""
        world = World(repair_after_s=0, repair_wait_s=30).open()
        world.filled_there_not_here("c1")
        world.reconciler.reconcile()
        assert world.client.hexists(world.keys.repair_requests, "c1")
        world.portfolio.apply_fill("c1", Fill(fill_id="c1:10", quantity=Decimal(10), price=Decimal(150),
                                              time=T0))
        world.client.hset(world.keys.order("c1"), mapping={"status": "filled", "applied_qty": "10"})
        world.client.srem(world.keys.open_orders, "c1")
        world.client.hdel(world.keys.repair_requests, "c1")
        world.clock.advance(timedelta(seconds=60))
        report = world.reconciler.reconcile()
        assert report.status == "ok" and not report.halting
        assert world.kill_switch.current().state is TradingState.ACTIVE

    def test_difference_gone_on_the_second_look_is_not_confirmed(self) -> None:
        """A difference seen once and gone on the recheck (a fill between reads) raises nothing."""
        world = World().open()
        world.broker_state.positions["AAPL"] = Decimal(10)

        def settle(calls: int) -> None:
            if calls == 2:  # the second look: the broker's position was a glitch between reads
                world.broker_state.positions.clear()

        world.broker_state.on_account = settle
        before = world.clock.now()
        report = world.reconciler.reconcile()
        assert report.status == "ok" and report.differences == []
        assert (world.clock.now() - before).total_seconds() == 2  # waited recheck_delay_s, simulated
        assert world.alerts() == []
        assert world.kill_switch.current().state is TradingState.ACTIVE

    def test_unknown_broker_order_alerts_without_halting(self) -> None:
        """An open broker order Bastion never placed is a warning-level difference, not a halt."""
        world = World().open()
        world.broker_state.open_orders.append(broker_order("manual-1"))
        report = world.reconciler.reconcile()
        assert [(d.kind, d.subject) for d in report.differences] == [("order_unknown_here", "manual-1")]
        assert world.kill_switch.current().state is TradingState.ACTIVE
        assert [a.kind for a in world.alerts()] == ["reconciliation_mismatch"]

    def test_the_same_difference_is_alerted_once(self) -> None:
        """A persisting difference alerts when it appears and an INFO when it clears, not on every pass."""
        world = World().open()
        world.broker_state.open_orders.append(broker_order("manual-1"))
        world.reconciler.reconcile()
        world.reconciler.reconcile()
        world.broker_state.open_orders.clear()
        world.reconciler.reconcile()
        assert [a.kind for a in world.alerts()] == ["reconciliation_mismatch", "reconciliation_clean"]

    def test_broker_down_on_a_later_pass_warns_without_halting(self) -> None:
        """An unreachable broker after start-up gives an error report and a warning alert, not a halt."""
        world = World().open()
        world.broker_state.down = True
        report = world.reconciler.reconcile()
        assert report.status == "error" and "unreachable" in report.error
        assert world.report_hash()["status"] == "error"
        assert world.kill_switch.current().state is TradingState.ACTIVE
        assert [a.kind for a in world.alerts()] == ["reconciliation_failed"]


    def test_a_pass_that_meets_a_redis_outage_is_skipped_and_the_next_one_runs(self) -> None:
        """Redis down for one pass: it is logged and skipped, the reconciler goes on, the next one reports."""
        server = fakeredis.FakeServer()
        world = World(server).open()

        def on_wait(waits: int) -> None:
            server.connected = waits != 1  # down for the pass after the start's

        with capture_logs() as logs:
            passes = world.reconciler.run(Stop(on_wait), max_passes=3)
        assert passes == 3
        assert [e["event"] for e in logs if e["event"] == "reconciler.redis_unavailable"] == [
            "reconciler.redis_unavailable"]
        assert world.client.xlen(world.keys.stream(REPORT_STREAM)) == 2


class TestStartup:
    def test_broker_down_at_start_fails_closed_until_a_pass_succeeds(self) -> None:
        """While the broker is unreachable trading stays HALTED; the first good pass lifts the hold."""
        world = World().open()
        world.broker_state.down = True
        seen: list[TradingState] = []

        def on_wait(waits: int) -> None:
            status = world.kill_switch.current()
            seen.append(status.state)
            assert status.refusal(Side.BUY, Decimal(0)) is not None
            if waits == 3:
                world.broker_state.down = False

        stop = Stop(on_wait)
        report = world.reconciler.start(stop)
        assert report is not None and report.status == "ok"
        assert stop.waits == 3 and seen == [TradingState.HALTED] * 3
        status = world.kill_switch.current()
        assert status.state is TradingState.ACTIVE and status.by == "reconciler"

    def test_start_holds_while_the_portfolio_is_not_opened(self) -> None:
        """Before the executor opens the account the start-up pass is 'waiting' and the hold stays."""
        world = World()

        def on_wait(waits: int) -> None:
            status = world.kill_switch.current()
            assert status.state is TradingState.HALTED and status.reason.startswith(HOLD_REASON)
            world.portfolio.open()

        assert world.reconciler.start(Stop(on_wait)) is not None
        assert world.kill_switch.current().state is TradingState.ACTIVE

    def test_mismatch_at_start_keeps_trading_halted(self) -> None:
        """A halting difference on the start-up pass replaces the hold with a halt only a human lifts."""
        world = World().open()
        world.broker_state.positions["MSFT"] = Decimal(3)
        report = world.reconciler.start(Stop())
        assert report is not None and report.status == "halted"
        status = world.kill_switch.current()
        assert status.state is TradingState.HALTED and "MSFT" in status.reason
        assert not world.reconciler.release_hold()

    def test_a_human_halt_is_never_lifted_by_the_start_up(self) -> None:
        """Trading HALTED by someone else before start stays HALTED after a clean start-up pass."""
        world = World().open()
        world.kill_switch.engage(TradingState.HALTED, "cli", "going to lunch")
        world.reconciler.start(Stop())
        status = world.kill_switch.current()
        assert status.state is TradingState.HALTED and status.by == "cli"

    def test_reducing_is_restored_after_the_hold(self) -> None:
        """A REDUCING state held for start-up comes back as REDUCING, not ACTIVE."""
        world = World().open()
        world.kill_switch.engage(TradingState.REDUCING, "cli", "wind down")
        world.reconciler.hold()
        assert world.kill_switch.current().state is TradingState.HALTED
        world.reconciler.start(Stop())
        assert world.kill_switch.current().state is TradingState.REDUCING

    def test_without_hold_setting_start_does_not_halt(self) -> None:
        """With hold_until_reconciled off, an unreachable broker at start leaves the trading state alone."""
        world = World(hold_until_reconciled=False).open()
        world.broker_state.down = True

        def on_wait(waits: int) -> None:
            assert world.kill_switch.current().state is TradingState.ACTIVE
            world.broker_state.down = False

        world.reconciler.start(Stop(on_wait))
        assert world.kill_switch.history() == []
