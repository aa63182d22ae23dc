"""The executor against a FakeBroker, with a real portfolio on in-process fakeredis."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal

import fakeredis
import pytest
import redis
from structlog.testing import capture_logs

from services.executor.service import Executor
from shared.brokers import BrokerCall, BrokerOrder, FakeBroker
from shared.bus import Delivery, Publisher, codec
from shared.clock import SimulatedClock
from shared.config import LimitSettings, Settings
from shared.errors import BrokerUnavailable, InsufficientBuyingPower, OrderNotFound
from shared.keys import ALERTS, ORDER_EVENTS, ORDERS, Keys
from shared.models import ExitReason, Fill, Order, OrderEvent, OrderStatus, OrderType, Side
from shared.safety.account_activity import AccountActivity
from shared.safety.protections import Protections
from shared.safety.rate_limit import RateLimiter
from shared.safety.trading_state import KillSwitch
from tests.support.processes import wait_for

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
KEYS = Keys("t")


def broker_order(order: Order, status: OrderStatus = OrderStatus.NEW, filled: str = "0",
                 avg: str | None = None) -> BrokerOrder:
    """The broker's view of ``order``."""
    return BrokerOrder(broker_order_id="b-1", client_order_id=order.client_order_id, symbol=order.symbol,
                       side=order.side, order_type=OrderType.MARKET, time_in_force="day",
                       quantity=order.quantity, filled_quantity=Decimal(filled),
                       filled_avg_price=Decimal(avg) if avg else None, limit_price=None, stop_price=None,
                       status=status, broker_status=status.value, submitted_at=T0)


class World:
    """An executor, its fake broker and a $10,000 account with a reservation for 10 AAPL @ 150."""

    def __init__(self, handler: object = None, server: fakeredis.FakeServer | None = None) -> None:
        self.client: redis.Redis = fakeredis.FakeRedis(server=server)
        settings = Settings(portfolio={"starting_cash": "10000"}, bus={"max_deliveries": 3})
        self.calls: list[BrokerCall] = []
        self.broker = FakeBroker(handler or self.accept)  # type: ignore[arg-type]
        self.executor = Executor(self.client, KEYS, settings, SimulatedClock(T0), self.broker,
                                 Publisher(self.client, KEYS, settings.bus))
        self.executor.portfolio.open()
        self.executor.portfolio.reserve("i1", "AAPL", Side.BUY, Decimal(10), Decimal(150))
        self.order = Order(time=T0, intent_id="i1", client_order_id="bst-i1", account="paper", symbol="AAPL",
                           side=Side.BUY, quantity=Decimal(10), reservation_id="i1")

    def reorder(self, **update: object) -> None:
        """Replace the order with one changed by ``update``, paid for by a matching reservation."""
        self.executor.portfolio.release("i1")
        self.order = self.order.model_copy(update={**update, "intent_id": "i9", "client_order_id": "bst-i1",
                                                   "reservation_id": "i9"})
        price = self.order.limit_price or Decimal(150)
        self.executor.portfolio.reserve("i9", "AAPL", Side.BUY, self.order.quantity, price)

    def accept(self, call: BrokerCall) -> object:
        if call.method in ("submit", "get_order"):
            return broker_order(self.order)
        return []

    def deliver(self, deliveries: int = 1) -> None:
        self.executor.handle_order(Delivery(ORDERS, "1-0", self.order, deliveries))

    def event(self, status: OrderStatus, filled: str, avg: str | None = None,
              fill: tuple[str, str, str] | None = None) -> OrderEvent:
        execution = None
        if fill is not None:
            execution = Fill(fill_id=fill[0], quantity=Decimal(fill[1]), price=Decimal(fill[2]), time=T0)
        return OrderEvent(time=T0, client_order_id="bst-i1", symbol="AAPL", side=Side.BUY, status=status,
                          filled_quantity=Decimal(filled), filled_avg_price=Decimal(avg) if avg else None,
                          fill=execution)

    def stream(self, name: str) -> list[object]:
        return [codec.decode(f) for _, f in self.client.xrange(KEYS.stream(name))]

    def status(self) -> str:
        return (self.client.hget(KEYS.order("bst-i1"), "status") or b"").decode()


@pytest.fixture
def world() -> World:
    """A fresh executor world."""
    return World()


class TestSubmission:
    def test_order_is_recorded_and_submitted_once(self, world: World) -> None:
        """An order is submitted, recorded as new, and a redelivery does not submit it again."""
        world.deliver()
        world.deliver()
        assert [c.method for c in world.broker.calls] == ["submit"]
        assert world.status() == "new"
        assert world.client.sismember(KEYS.open_orders, "bst-i1")

    def test_order_left_pending_submit_is_looked_up_not_resubmitted(self, world: World) -> None:
        """A record still pending_submit (we died mid-submit) whose order the broker has is tracked
        from the broker's answer, not submitted again."""
        world.client.hset(KEYS.order("bst-i1"), mapping={"status": "pending_submit", "reservation_id": "i1",
                                                         "intent_id": "i1", "applied_qty": "0",
                                                         "applied_cost": "0"})
        world.deliver()
        assert [c.method for c in world.broker.calls] == ["get_order"]
        assert world.status() == "new"

    def test_order_left_pending_submit_not_at_the_broker_is_submitted_again(self, world: World) -> None:
        """A record still pending_submit whose order the broker does not have is submitted again,
        by the same client_order_id."""
        world.client.hset(KEYS.order("bst-i1"), mapping={"status": "pending_submit", "reservation_id": "i1",
                                                         "intent_id": "i1", "applied_qty": "0",
                                                         "applied_cost": "0"})

        def absent_then_accept(call: BrokerCall) -> object:
            if call.method == "get_order":
                raise OrderNotFound("no such order")
            return world.accept(call)

        world.broker.handler = absent_then_accept
        world.deliver()
        assert [c.method for c in world.broker.calls] == ["get_order", "submit"]
        assert world.broker.calls[1].args[0].client_order_id == "bst-i1"
        assert world.status() == "new"

    def test_rejected_order_releases_its_reservation(self) -> None:
        """A broker rejection closes the order, gives back the reserved cash and raises an alert."""
        def reject(call: BrokerCall) -> object:
            raise InsufficientBuyingPower("not enough", client_order_id="bst-i1")

        world = World(reject)
        world.deliver()
        assert world.status() == "rejected"
        assert world.executor.portfolio.snapshot().reserved == 0
        assert not world.client.sismember(KEYS.open_orders, "bst-i1")
        assert [type(m).__name__ for m in world.stream(ALERTS)] == ["Alert"]

    def test_unavailable_broker_keeps_the_order_even_on_its_last_delivery(self) -> None:
        """BrokerUnavailable goes up to the bus (which keeps the entry in hand) on every delivery,
        the last included: the order stays pending_submit and its cash stays reserved."""
        def down(call: BrokerCall) -> object:
            raise BrokerUnavailable("503")

        world = World(down)
        for deliveries in (1, 3):
            with pytest.raises(BrokerUnavailable):
                world.deliver(deliveries=deliveries)
        assert world.status() == "pending_submit"
        assert world.executor.portfolio.snapshot().reserved > 0


class TestConcurrency:
    def test_submit_does_not_wait_for_events_being_applied(self, world: World) -> None:
        """While the order's symbol is busy applying another event, the order is still submitted;
        only the application of the submit's reply waits for it."""
        busy = world.executor._symbol_lock("AAPL")
        busy.acquire()
        try:
            worker = threading.Thread(target=world.deliver, daemon=True)
            worker.start()
            wait_for(lambda: [c.method for c in world.broker.calls] == ["submit"], timeout=10,
                     message="the submit, made while the symbol's lock is held")
            assert world.status() == "pending_submit"  # its reply waits for the lock
        finally:
            busy.release()
        worker.join(timeout=10)
        assert not worker.is_alive()
        assert world.status() == "new"

    def test_the_submit_slot_is_taken_with_the_record_and_given_back_when_unused(self, world: World) -> None:
        """With a shared rate limit, the submit's slot is taken in the round trip that records the
        order and the broker is told so; a redelivered order, not submitted, gives its slot back."""
        limiter = RateLimiter.from_settings(world.client, KEYS, LimitSettings())
        world.broker.limiter = limiter
        granted = limiter.bucket_key("account")
        world.deliver()
        [call] = world.broker.calls
        assert call.args[1] is True  # prepaid
        assert world.client.zcard(granted) == 1
        world.deliver()
        assert [c.method for c in world.broker.calls] == ["submit"]
        assert world.client.zcard(granted) == 1  # the duplicate's slot was refunded

    def test_events_of_one_symbol_share_a_lock_and_other_symbols_do_not(self, world: World) -> None:
        """A symbol's events are serialised on one lock; another symbol has its own."""
        executor = world.executor
        assert executor._symbol_lock("AAPL") is executor._symbol_lock("AAPL")
        assert executor._symbol_lock("AAPL") is not executor._symbol_lock("MSFT")


class TestFills:
    def test_partial_then_full_fill(self, world: World) -> None:
        """Fills move the position and cash; completion returns the unused reservation."""
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "149", ("x1", "4", "149")))
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "149.4", ("x2", "6", "149.666667")))
        snap = world.executor.portfolio.snapshot()
        assert snap.positions["AAPL"].qty == Decimal(10)
        assert snap.reserved == 0
        assert snap.cash == Decimal(10000) - Decimal(4) * 149 - Decimal(6) * Decimal("149.666667")
        assert world.status() == "filled"
        assert not world.client.sismember(KEYS.open_orders, "bst-i1")

    def test_only_a_reservation_left_open_is_released(self, world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """An order whose last fill closed its reservation asks no release of it; a canceled one does."""
        released: list[str] = []
        release = world.executor.portfolio.release
        monkeypatch.setattr(world.executor.portfolio, "release",
                            lambda rid, reason="released": released.append(rid) or release(rid, reason))
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
        assert world.status() == "filled" and released == []
        assert world.executor.portfolio.snapshot().reserved == 0
        world.order = world.order.model_copy(update={"intent_id": "i2", "client_order_id": "bst-i2",
                                                     "reservation_id": "i2"})
        world.executor.portfolio.reserve("i2", "AAPL", Side.BUY, Decimal(10), Decimal(150))
        world.executor.handle_order(Delivery(ORDERS, "2-0", world.order, 1))
        world.executor.apply_event(world.event(OrderStatus.CANCELED, "0").model_copy(
            update={"client_order_id": "bst-i2"}))
        assert released == ["i2"] and world.executor.portfolio.snapshot().reserved == 0

    def test_a_fill_takes_five_round_trips(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        """A full fill: the record read, the portfolio's lock-and-read and write, the day's opened
        quantity, then record, counts, open set and event in one MULTI (it took nine)."""
        world.deliver()
        pool = world.client.connection_pool
        taken: list[object] = []
        get_connection = pool.get_connection
        monkeypatch.setattr(pool, "get_connection",
                            lambda *a, **k: taken.append(a) or get_connection(*a, **k))  # one per round trip
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
        assert len(taken) == 5
        assert world.status() == "filled" and not world.client.sismember(KEYS.open_orders, "bst-i1")
        assert world.client.hget(KEYS.order("bst-i1"), "applied_qty") == b"10"
        assert AccountActivity(world.client, KEYS, "paper").balance().fills_since == 1
        assert [e.status for e in world.stream(ORDER_EVENTS)][-1] == OrderStatus.FILLED

    def test_repeated_and_out_of_order_updates_apply_once(self, world: World) -> None:
        """A repeated update and an older one arriving late change nothing the second time."""
        world.deliver()
        first = world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150"))
        second = world.event(OrderStatus.PARTIALLY_FILLED, "7", "150", ("x2", "3", "150"))
        for event in (first, second, second, first):
            world.executor.apply_event(event)
        snap = world.executor.portfolio.snapshot()
        assert snap.positions["AAPL"].qty == Decimal(7)
        assert snap.cash == Decimal(10000) - Decimal(7) * 150
        assert world.status() == "partially_filled"

    def test_cancel_after_partial_fill_releases_the_rest(self, world: World) -> None:
        """A canceled order keeps its fills and gives back what the rest had reserved."""
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        world.executor.apply_event(world.event(OrderStatus.CANCELED, "4", "150"))
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.reserved, snap.cash) == (Decimal(4), 0, Decimal(9400))
        assert world.status() == "canceled"

    def test_poll_catches_a_missed_fill(self, world: World) -> None:
        """Polling open orders applies a fill whose trade update was never received."""
        world.deliver()
        world.broker.handler = lambda call: (broker_order(world.order, OrderStatus.FILLED, "10", "150")
                                             if call.method == "get_order" else [])
        assert world.executor.poll_orders() == 1
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(10)
        assert world.status() == "filled"

    def test_poll_of_an_order_the_broker_lost(self, world: World) -> None:
        """An open order the broker does not know is logged and left open for the next poll."""
        world.deliver()

        def lost(call: BrokerCall) -> object:
            if call.method == "open_orders":
                return []
            raise OrderNotFound("no such order")

        world.broker.handler = lost
        assert world.executor.poll_orders() == 1
        assert world.client.sismember(KEYS.open_orders, "bst-i1")

    def test_events_are_published(self, world: World) -> None:
        """Each change of an order is published on order-events with its intent id."""
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
        events = world.stream(ORDER_EVENTS)
        assert [e.status for e in events] == [OrderStatus.NEW, OrderStatus.FILLED]  # type: ignore[attr-defined]
        assert {e.intent_id for e in events} == {"i1"}  # type: ignore[attr-defined]


def filled(order: Order, price: str) -> OrderEvent:
    """The broker's update that ``order`` filled completely at ``price``."""
    return OrderEvent(time=T0, client_order_id=order.client_order_id, symbol=order.symbol, side=order.side,
                      status=OrderStatus.FILLED, filled_quantity=order.quantity,
                      filled_avg_price=Decimal(price),
                      fill=Fill(fill_id=f"{order.client_order_id}-x", quantity=order.quantity,
                                price=Decimal(price), time=T0))


class TestRounding:
    def test_quantity_and_limit_are_rounded_before_submit(self) -> None:
        """An order for 10.5 shares at a buy limit of 150.129 goes to the broker as 10 @ 150.12."""
        world = World()
        world.reorder(quantity=Decimal("10.5"), order_type=OrderType.LIMIT, limit_price=Decimal("150.129"))
        world.deliver()
        [call] = world.broker.calls
        assert (call.args[0].quantity, call.args[0].limit_price) == (Decimal(10), Decimal("150.12"))

    def test_order_rounding_to_zero_is_given_up(self) -> None:
        """An order for 0.5 shares is not submitted: its reservation is released and the reason kept."""
        world = World()
        world.reorder(quantity=Decimal("0.5"))
        world.deliver()
        assert world.broker.calls == []
        assert world.status() == "rejected"
        assert world.executor.portfolio.snapshot().reserved == 0


class TestKillSwitch:
    def test_halted_order_is_not_submitted(self, world: World) -> None:
        """An order approved before a HALT is given up, not submitted, and its cash released."""
        KillSwitch(world.client, KEYS).engage("HALTED", "ops", "halt")
        world.deliver()
        assert world.broker.calls == []
        assert world.status() == "rejected"
        assert world.executor.portfolio.snapshot().reserved == 0

    def test_cancel_and_flatten_once_per_change(self, world: World) -> None:
        """Engaged with cancel and flatten, the executor cancels every open order and sends one closing
        order per position, once: a second pass and a restarted executor do nothing more."""
        world.executor.portfolio.reserve("h", "MSFT", Side.BUY, Decimal(5), Decimal(100))
        world.executor.portfolio.apply_fill("h", Fill(fill_id="h:1", quantity=Decimal(5), price=Decimal(100),
                                                      time=T0))
        world.deliver()  # bst-i1 open at the broker
        world.broker.calls.clear()
        change = KillSwitch(world.client, KEYS).engage("HALTED", "ops", "flatten", cancel_open_orders=True,
                                                       flatten_positions=True)

        def closing(call: BrokerCall) -> object:
            if call.method == "submit":
                request = call.args[0]
                return BrokerOrder(broker_order_id="b-2", client_order_id=request.client_order_id,
                                   symbol=request.symbol, side=request.side, order_type=OrderType.MARKET,
                                   time_in_force="day", quantity=request.quantity, filled_quantity=Decimal(0),
                                   filled_avg_price=None, limit_price=None, stop_price=None,
                                   status=OrderStatus.NEW, broker_status="new", submitted_at=T0)
            return None

        world.broker.handler = closing
        assert world.executor.act_on_trading_state()
        assert not world.executor.act_on_trading_state()
        restarted = Executor(world.client, KEYS, world.executor.settings, SimulatedClock(T0), world.broker,
                             world.executor.publisher)
        assert not restarted.act_on_trading_state()
        calls = [(c.method, c.args[0] if c.method == "cancel" else c.args[0].client_order_id)
                 for c in world.broker.calls]
        assert calls == [("cancel", "bst-i1"), ("submit", f"bst-flat-{change.seq}-MSFT")]
        [submit] = [c for c in world.broker.calls if c.method == "submit"]
        assert (submit.args[0].side, submit.args[0].quantity) == (Side.SELL, Decimal(5))


class TestBackgroundThreads:
    """The trade-update reader and the trading-state watcher outlive a Redis outage."""

    def test_the_trading_state_watcher_acts_once_redis_is_back(self) -> None:
        """Passes failing while Redis is down are logged; the kill switch's cancel is carried out after."""
        server = fakeredis.FakeServer()
        world = World(server=server)
        world.deliver()  # bst-i1 open at the broker
        KillSwitch(world.client, KEYS).engage("HALTED", "ops", "outage drill", cancel_open_orders=True)
        world.broker.calls.clear()
        with capture_logs() as logs:
            server.connected = False
            stop = threading.Event()
            watcher = threading.Thread(target=world.executor.watch_trading_state, args=(stop, 0.01),
                                       daemon=True)
            watcher.start()
            wait_for(lambda: sum(e["event"] == "executor.trading_state_redis_unavailable" for e in logs) >= 2,
                     timeout=10, message="two failed passes logged")
            server.connected = True
            wait_for(lambda: [c.method for c in world.broker.calls] == ["cancel"], timeout=10,
                     message="the open order cancelled once Redis is back")
            stop.set()
            watcher.join(10)
        assert watcher.is_alive() is False

    def test_a_fill_lost_to_an_outage_is_applied_from_the_poll_after_it(self) -> None:
        """An update that arrives while Redis is down is not lost: the reader asks for a poll, made
        once Redis is back."""
        server = fakeredis.FakeServer()
        world = World(server=server)
        world.deliver()
        filled = broker_order(world.order, OrderStatus.FILLED, "10", "150")
        world.broker.handler = lambda call: filled if call.method == "get_order" else []
        stop = threading.Event()
        with capture_logs() as logs:
            reader = threading.Thread(target=world.executor.follow_trade_updates, args=(stop,), daemon=True)
            watcher = threading.Thread(target=world.executor.watch_orders, args=(stop, 0.01), daemon=True)
            reader.start()
            watcher.start()
            wait_for(lambda: world.broker._subscriptions, timeout=10, message="the reader listening")
            server.connected = False
            world.broker.emit(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
            wait_for(lambda: any(e["event"] == "executor.trade_updates_redis_unavailable" for e in logs),
                     timeout=10, message="the failed update logged")
            server.connected = True
            wait_for(lambda: world.status() == "filled", timeout=10, message="the fill applied from the poll")
            stop.set()
            reader.join(10)
            watcher.join(10)
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(10)


class TestSafetyInputs:
    def test_fills_are_counted_for_the_balance_refresh(self, world: World) -> None:
        """Each fill applied increases the fill count risk's stale-balance check reads."""
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x2", "6", "150")))
        assert AccountActivity(world.client, KEYS, "paper").balance().fills_since == 2

    def test_same_day_round_trip_is_a_day_trade(self, world: World) -> None:
        """A sell filling against shares bought the same day is recorded as one day trade."""
        world.deliver()
        world.executor.apply_event(filled(world.order, "150"))
        sell = Order(time=T0, intent_id="i2", client_order_id="bst-i2", account="paper", symbol="AAPL",
                     side=Side.SELL, quantity=Decimal(10), reservation_id="i2")
        world.executor.portfolio.reserve("i2", "AAPL", Side.SELL, Decimal(10), Decimal(150))
        world.broker.handler = lambda call: broker_order(sell)
        world.executor.handle_order(Delivery(ORDERS, "2-0", sell, 1))
        world.executor.apply_event(filled(sell, "151"))
        assert AccountActivity(world.client, KEYS, "paper").day_trades(T0) == [T0.date()]

    def test_three_stop_outs_lock_the_symbol(self) -> None:
        """Three round trips closed by stop-loss exits lock new AAPL buys (StoplossGuard, limit 3)."""
        settings = Settings(portfolio={"starting_cash": "10000"},
                            protections={"stoploss_guard_trade_limit": 3, "stoploss_guard_per_symbol": True,
                                         "cooldown_enabled": False, "low_profit_enabled": False})
        world = World()
        world.executor = Executor(world.client, KEYS, settings, SimulatedClock(T0), world.broker,
                                  world.executor.publisher)
        protections = Protections(world.client, KEYS, settings.protections, SimulatedClock(T0))
        world.executor.portfolio.release("i1")
        for n in range(3):
            assert protections.check("AAPL", Side.BUY) is None
            entry = Order(time=T0, intent_id=f"e{n}", client_order_id=f"bst-e{n}", account="paper",
                          symbol="AAPL", side=Side.BUY, quantity=Decimal(3), reservation_id=f"e{n}")
            stop = Order(time=T0, intent_id=f"s{n}", client_order_id=f"bst-s{n}", account="paper",
                         symbol="AAPL", side=Side.SELL, quantity=Decimal(3), order_type=OrderType.STOP,
                         stop_price=Decimal(140), reservation_id=f"s{n}", exit_reason=ExitReason.STOP_LOSS)
            for order, price in ((entry, "150"), (stop, "140")):
                world.executor.portfolio.reserve(order.reservation_id, "AAPL", order.side, Decimal(3),
                                                 Decimal(price))
                world.broker.handler = lambda call, order=order: broker_order(order)  # type: ignore[misc]
                world.executor.handle_order(Delivery(ORDERS, f"{n}-{price}", order, 1))
                world.executor.apply_event(filled(order, price))
        lock = protections.check("AAPL", Side.BUY)
        assert lock is not None and lock.protection == "stoploss_guard"
        assert any(getattr(a, "kind", "") == "protection_lock" for a in world.stream(ALERTS))
