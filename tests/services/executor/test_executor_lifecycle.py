"""The order lifecycle under faults: the executor never gives up a possibly-live order, never drops
a fill, and closes every gap between its books and the broker's (FakeBroker, in-process fakeredis)."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from shared.brokers import BrokerCall
from shared.bus import Delivery
from shared.errors import AmbiguousSubmit, HandlerRejected, OrderNotFound, StaleFencingToken
from shared.keys import ALERTS, ORDERS
from shared.models import Order, OrderStatus, Side
from shared.portfolio import verify
from shared.safety.account_activity import AccountActivity
from shared.safety.trading_state import KillSwitch, TradingState
from tests.services.executor.test_executor import KEYS, T0, World, broker_order
from tests.support.processes import wait_for


def alerts(world: World) -> list[tuple[str, str]]:
    """(severity, kind) of every alert published."""
    return [(a.severity.value, a.kind) for a in world.stream(ALERTS)]  # type: ignore[attr-defined]


def ambiguous(call: BrokerCall) -> object:
    """A broker whose submits time out and whose look-ups find nothing."""
    if call.method == "submit":
        raise AmbiguousSubmit("reply lost", client_order_id=call.args[0].client_order_id)
    if call.method == "open_orders":
        return []
    raise OrderNotFound("no such order")


def due(world: World) -> None:
    """Make every unknown order due a look-up now."""
    for cid in world.client.smembers(KEYS.open_orders):
        world.client.hset(KEYS.order(cid.decode()), "next_lookup_at", T0.isoformat())


class TestUnknownOrders:
    def test_an_ambiguous_submit_is_unknown_and_keeps_its_reservation_on_every_delivery(self) -> None:
        """An ambiguous submit, even on the order's last delivery, marks it unknown: still open,
        its cash still reserved, no rejection (it was given up as rejected and released)."""
        world = World(ambiguous)
        world.deliver(deliveries=3)
        assert world.status() == "unknown"
        assert world.client.sismember(KEYS.open_orders, "bst-i1")
        assert world.executor.portfolio.snapshot().reserved == Decimal("1501.5")
        assert ("warning", "order_unknown") in alerts(world)

    def test_an_unknown_order_the_broker_shows_is_tracked_and_its_fill_booked(self) -> None:
        """Chased by client_order_id, an unknown order the broker shows filled is applied."""
        world = World(ambiguous)
        world.deliver()
        world.broker.handler = lambda call: ([] if call.method == "open_orders"
                                             else broker_order(world.order, OrderStatus.FILLED, "10", "150"))
        world.executor.poll_orders(full=False)
        assert world.status() == "filled"
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(10)

    def test_an_unknown_order_not_found_limit_times_was_never_placed(self) -> None:
        """Not found ``unknown_lookup_limit`` times in a row, with back-off between look-ups, the
        order was never placed: rejected, its reservation released."""
        world = World(ambiguous)
        world.deliver()
        limit = world.executor.settings.executor.unknown_lookup_limit
        for miss in range(1, limit):
            world.executor.poll_orders(full=False)
            assert world.status() == "unknown"
            assert world.client.hget(KEYS.order("bst-i1"), "lookups") == str(miss).encode()
            world.executor.poll_orders(full=False)  # not due yet: no look-up
            assert world.client.hget(KEYS.order("bst-i1"), "lookups") == str(miss).encode()
            due(world)
        world.executor.poll_orders(full=False)
        assert world.status() == "rejected"
        assert world.executor.portfolio.snapshot().reserved == 0
        assert not world.client.sismember(KEYS.open_orders, "bst-i1")

    def test_an_order_given_up_as_never_placed_that_fills_is_booked_and_alerted(self) -> None:
        """The broker later shows an order given up as never placed, filled: the fill is booked
        (as a fact, its reservation closed), the order tracked again, a CRITICAL alert raised."""
        world = World(ambiguous)
        world.deliver()
        for _ in range(world.executor.settings.executor.unknown_lookup_limit):
            due(world)
            world.executor.poll_orders(full=False)
        assert world.status() == "rejected"
        world.executor.apply_broker_order(broker_order(world.order, OrderStatus.FILLED, "10", "150"))
        assert world.status() == "filled"
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.cash) == (Decimal(10), Decimal(8500))
        expected = {("critical", "order_reappeared"), ("critical", "fill_beyond_reservation")}
        assert expected <= set(alerts(world))

    def test_a_redelivered_pending_order_under_halt_is_looked_up_not_given_up(self) -> None:
        """Trading HALTED and an order left pending_submit redelivered: the broker has it, so it is
        tracked (for the kill switch to cancel), not given up with its cash released."""
        world = World()
        world.client.hset(KEYS.order("bst-i1"), mapping={"status": "pending_submit", "reservation_id": "i1",
                                                         "intent_id": "i1", "symbol": "AAPL", "side": "buy",
                                                         "quantity": "10", "applied_qty": "0",
                                                         "applied_cost": "0"})
        world.client.sadd(KEYS.open_orders, "bst-i1")
        KillSwitch(world.client, KEYS).engage("HALTED", "ops", "halt")
        world.deliver(deliveries=2)
        assert world.status() == "new"
        assert world.executor.portfolio.snapshot().reserved == Decimal("1501.5")

    def test_a_redelivered_pending_order_under_halt_not_found_is_chased(self) -> None:
        """The same, the broker not showing it (yet): it is chased as unknown, its cash held."""
        world = World(ambiguous)
        world.client.hset(KEYS.order("bst-i1"), mapping={"status": "pending_submit", "reservation_id": "i1",
                                                         "intent_id": "i1", "symbol": "AAPL", "side": "buy",
                                                         "quantity": "10", "applied_qty": "0",
                                                         "applied_cost": "0"})
        KillSwitch(world.client, KEYS).engage("HALTED", "ops", "halt")
        world.deliver(deliveries=2)
        assert world.status() == "unknown"
        assert world.executor.portfolio.snapshot().reserved == Decimal("1501.5")

    def test_kill_switch_cancel_waits_for_an_unknown_order(self) -> None:
        """Cancel-all does not count an unknown order the broker does not show yet as done: the
        next pass cancels it once the broker shows it."""
        world = World(ambiguous)
        world.deliver()
        KillSwitch(world.client, KEYS).engage("HALTED", "ops", "stop", cancel_open_orders=True)
        assert world.executor.act_on_trading_state() is False
        cancelled: list[str] = []

        def shown(call: BrokerCall) -> object:
            if call.method == "cancel":
                cancelled.append(call.args[0])
                return None
            return broker_order(world.order)

        world.broker.handler = shown
        assert world.executor.act_on_trading_state() is True
        assert cancelled == ["bst-i1"]


class TestNoLeakedReservation:
    def test_an_order_failing_on_its_last_delivery_is_chased_not_leaked(self) -> None:
        """A handler error on the order's last delivery (the bus dead-letters it) leaves it unknown,
        chased, not pending_submit forever with its cash reserved."""
        def broken(call: BrokerCall) -> object:
            raise RuntimeError("adapter bug")

        world = World(broken)
        with pytest.raises(RuntimeError):
            world.deliver(deliveries=world.executor.settings.bus.max_deliveries)
        assert world.status() == "unknown"

    def test_a_stale_pending_submit_is_chased(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A record pending_submit for longer than ``stale_pending_s`` (its delivery dead-lettered
        without the handler running) is chased as unknown by the poll."""
        world = World(ambiguous)
        world.client.hset(KEYS.order("bst-i1"), mapping={
            "status": "pending_submit", "reservation_id": "i1", "intent_id": "i1", "symbol": "AAPL",
            "side": "buy", "quantity": "10", "applied_qty": "0", "applied_cost": "0",
            "created_at": T0.isoformat()})
        world.client.sadd(KEYS.open_orders, "bst-i1")
        world.executor.poll_orders()
        assert world.status() == "pending_submit"
        world.executor.clock.advance(timedelta(seconds=world.executor.settings.executor.stale_pending_s + 1))  # type: ignore[attr-defined]
        world.executor.poll_orders()
        assert world.status() == "unknown"

    def test_the_duplicate_id_look_up_failing_leaves_the_order_unknown(self) -> None:
        """The broker says the client_order_id is taken but cannot find it: the adapter calls that
        ambiguous, so the executor chases the order instead of dead-lettering it."""
        world = World(ambiguous)
        world.deliver()
        assert world.status() == "unknown"


class TestBackDoor:
    def test_an_order_without_a_reservation_is_dead_lettered(self) -> None:
        """An order on the stream that no reservation pays for is refused with the reason and
        leaves no record behind; the broker never sees it."""
        world = World()
        rogue = Order(time=T0, intent_id="x", client_order_id="bst-x", account="paper", symbol="AAPL",
                      side=Side.BUY, quantity=Decimal(100), reservation_id="nope")
        with pytest.raises(HandlerRejected, match="not open"):
            world.executor.handle_order(Delivery(ORDERS, "9-0", rogue, 1))
        assert world.broker.calls == []
        assert not world.client.exists(KEYS.order("bst-x"))
        assert not world.client.sismember(KEYS.open_orders, "bst-x")

    def test_an_order_larger_than_its_reservation_is_dead_lettered(self) -> None:
        """An order for 100 shares against the reservation for 10 is refused, naming both."""
        world = World()
        world.order = world.order.model_copy(update={"quantity": Decimal(100)})
        with pytest.raises(HandlerRejected, match="holds buy 10 AAPL, not buy 100 AAPL"):
            world.deliver()
        assert world.broker.calls == []


class TestFillsAreFacts:
    def test_a_market_buy_filling_above_its_reservation_is_booked(self) -> None:
        """A buy filling far above its reservation and the free cash is booked: CRITICAL alert,
        cash negative, trading moves to REDUCING."""
        world = World()
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "1100", ("x1", "10", "1100")))
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.cash) == (Decimal(10), Decimal(-1000))
        assert world.status() == "filled"
        assert ("critical", "fill_beyond_reservation") in alerts(world)
        assert KillSwitch(world.client, KEYS).current().state is TradingState.REDUCING

    def test_the_ledger_replays_after_a_fill_beyond_its_reservation(self) -> None:
        """An over-fill at ten times the reserved price is booked, and the ledger still replays to
        the state (``bastion verify``)."""
        world = World()
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "12", "1000"))
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(12)
        assert verify(world.client, KEYS, "paper", allow_short=False).ok

    def test_a_retryable_refusal_of_a_fill_is_retried_not_dropped(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A stale fencing token on the write of a fill that ends the order is retried: the shares
        are booked, not dropped while the terminal status releases the reservation."""
        world = World()
        world.deliver()
        apply_fill = world.executor.portfolio.apply_fill
        failures = [StaleFencingToken("paper", 1, 2)]

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return apply_fill(*args, **kwargs)

        monkeypatch.setattr(world.executor.portfolio, "apply_fill", flaky)
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.reserved, snap.cash) == (Decimal(10), 0, Decimal(8500))
        assert world.status() == "filled"

    def test_a_crash_after_the_fill_before_the_rest_books_the_next_update_once(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The executor dies after a partial fill's write and before its counts and event: the
        order's record moved with the fill, so the next cumulative update books only the rest, and
        the fill count is caught up."""
        world = World()
        world.deliver()
        execute = world.executor.client.pipeline

        class Dies(Exception):
            pass

        def dying_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = execute(*args, **kwargs)
            pipe.execute = lambda *a, **k: (_ for _ in ()).throw(Dies())  # type: ignore[method-assign]
            return pipe

        monkeypatch.setattr(world.executor.client, "pipeline", dying_pipeline)
        partial = world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150"))
        with pytest.raises(Dies):
            world.executor.apply_event(partial)
        monkeypatch.undo()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x2", "6", "150")))
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.cash, snap.reserved) == (Decimal(10), Decimal(8500), 0)
        assert world.status() == "filled"
        assert AccountActivity(world.client, KEYS, "paper").balance().fills_since == 2

    def test_two_reports_racing_for_one_order_book_each_share_once(self) -> None:
        """A report decided on a record another report has moved since is refused by the
        compare-and-set and applied again from the fresh record: 10 shares, not 14."""
        world = World()
        world.deliver()
        stale = world.executor._record("bst-i1")
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        reads = iter([stale])
        record = world.executor._record
        world.executor._record = lambda cid: next(reads, None) or record(cid)  # type: ignore[method-assign]
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150"))
        snap = world.executor.portfolio.snapshot()
        assert (snap.positions["AAPL"].qty, snap.cash) == (Decimal(10), Decimal(8500))


class TestGaps:
    def test_a_stream_reconnect_triggers_a_poll_that_applies_the_missed_fill(self) -> None:
        """The trade-update stream reconnects by itself (updates meanwhile lost): the executor
        polls the open orders and books the fill it missed."""
        world = World()
        world.deliver()
        stop = threading.Event()
        reader = threading.Thread(target=world.executor.follow_trade_updates, args=(stop,), daemon=True)
        watcher = threading.Thread(target=world.executor.watch_orders, args=(stop, 0.01), daemon=True)
        reader.start()
        wait_for(lambda: world.broker._subscriptions, timeout=10, message="the reader listening")
        world.broker.handler = lambda call: ([] if call.method == "open_orders"
                                             else broker_order(world.order, OrderStatus.FILLED, "10", "150"))
        world.broker.reconnect()
        watcher.start()
        try:
            wait_for(lambda: world.status() == "filled", timeout=10, message="the missed fill booked")
        finally:
            stop.set()
            reader.join(10)
            watcher.join(10)
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(10)

    def test_an_untracked_broker_order_with_our_prefix_is_adopted(self) -> None:
        """An open broker order with our prefix and no record here is tracked and its fill booked."""
        world = World()
        orphan = world.order.model_copy(update={"client_order_id": "bst-lost", "quantity": Decimal(2)})
        world.broker.handler = lambda call: ([broker_order(orphan, OrderStatus.PARTIALLY_FILLED, "1", "150")]
                                             if call.method == "open_orders" else [])
        world.executor.poll_orders()
        assert world.client.sismember(KEYS.open_orders, "bst-lost")
        assert world.executor.portfolio.snapshot().positions["AAPL"].qty == Decimal(1)
        assert ("critical", "order_adopted") in alerts(world)

    @pytest.mark.parametrize("cancel", [False, True])
    def test_a_foreign_open_order_is_alerted_once_and_cancelled_with_the_setting(self, cancel: bool) -> None:
        """An open broker order without our prefix is alerted once, cancelled only when
        ``executor.cancel_foreign_orders`` is set, and never booked."""
        world = World()
        executor = world.executor.settings.executor.model_copy(update={"cancel_foreign_orders": cancel})
        world.executor.settings = world.executor.settings.model_copy(update={"executor": executor})
        theirs = world.order.model_copy(update={"client_order_id": "manual-1"})
        world.broker.handler = lambda call: [broker_order(theirs)] if call.method == "open_orders" else None
        world.executor.poll_orders()
        world.executor.poll_orders()
        assert alerts(world).count(("warning", "foreign_order")) == 1
        cancels = [c.args[0] for c in world.broker.calls if c.method == "cancel"]
        assert cancels == (["manual-1"] if cancel else [])
        assert not world.client.exists(KEYS.order("manual-1"))

    def test_a_repair_request_applies_what_the_broker_reports(self) -> None:
        """An order the reconciler asks about is looked up and its fill booked; the request goes."""
        world = World()
        world.deliver()
        world.client.hset(KEYS.repair_requests, "bst-i1", T0.isoformat())
        world.broker.handler = lambda call: broker_order(world.order, OrderStatus.FILLED, "10", "150")
        assert world.executor.run_repairs() == 1
        assert world.status() == "filled"
        assert not world.client.exists(KEYS.repair_requests)
