"""Protective stops: placed as an entry fills, retried, replaced, and a flatten when none can be placed."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import fakeredis
import redis

from services.executor.service import Executor
from shared.brokers import BrokerCall, BrokerOrder, FakeBroker, OrderRequest
from shared.bus import Delivery, Publisher, codec
from shared.clock import SimulatedClock
from shared.config import Settings
from shared.errors import BrokerUnavailable, OrderNotFound, OrderRejected
from shared.keys import ALERTS, ORDERS, Keys
from shared.models import (
    Alert,
    AlertSeverity,
    Fill,
    Order,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
)
from shared.safety.protections import Protections
from shared.safety.trading_state import KillSwitch, TradingState
from tests.support.factories import T0

KEYS = Keys("t")
D = Decimal


class Desk:
    """An executor over a FakeBroker that accepts orders (stops refused while ``refuse_stops`` > 0),
    a $10,000 account, and an approved entry: buy 10 AAPL with a stop-loss at 140."""

    def __init__(self, **executor: Any) -> None:
        self.client: redis.Redis = fakeredis.FakeRedis()
        self.clock = SimulatedClock(T0)
        self.settings = Settings(portfolio={"starting_cash": "10000"},
                                 executor={"protect_attempts": 3, "protect_backoff_s": 1.0, **executor},
                                 protections={"cooldown_enabled": False, "low_profit_enabled": False,
                                              "stoploss_guard_trade_limit": 1})
        self.refuse_stops = 0
        self.broker_down = False
        self.broker = FakeBroker(self.answer)
        self.executor = Executor(self.client, KEYS, self.settings, self.clock, self.broker,
                                 Publisher(self.client, KEYS, self.settings.bus))
        self.executor.portfolio.open()
        self.entry = Order(time=T0, intent_id="i1", client_order_id="bst-i1", account="paper", symbol="AAPL",
                           side=Side.BUY, quantity=D(10), reservation_id="i1", stop_loss=D("140.004"))
        self.executor.portfolio.reserve("i1", "AAPL", Side.BUY, D(10), D(150))
        self.client.hset(KEYS.last_price, "AAPL", "150")

    def answer(self, call: BrokerCall) -> object:
        if call.method == "submit":
            request: OrderRequest = call.args[0]
            if request.order_type is OrderType.STOP and self.broker_down:
                raise BrokerUnavailable("connection refused", client_order_id=request.client_order_id)
            if request.order_type is OrderType.STOP and self.refuse_stops > 0:
                self.refuse_stops -= 1
                raise OrderRejected("stop price too close to the market",
                                    client_order_id=request.client_order_id)
            return placed(request)
        if call.method == "get_order":
            raise OrderNotFound("no such order", client_order_id=call.args[0])
        return []

    def submit_entry(self) -> None:
        self.executor.handle_order(Delivery(ORDERS, "1-0", self.entry, 1))

    def report(self, cid: str, side: Side, status: OrderStatus, filled: str, price: str = "150") -> None:
        """The broker's update that order ``cid`` is ``status`` with ``filled`` shares done."""
        new = D(filled) - self.applied(cid)
        fill = None
        if new:
            fill = Fill(fill_id=f"{cid}:{filled}", quantity=new, price=D(price), time=self.clock.now())
        self.executor.apply_event(OrderEvent(time=self.clock.now(), client_order_id=cid, symbol="AAPL",
                                             side=side, status=status, filled_quantity=D(filled),
                                             filled_avg_price=D(price) if fill else None, fill=fill))

    def applied(self, cid: str) -> Decimal:
        value: Any = self.client.hget(KEYS.order(cid), "applied_qty")
        return D(value.decode()) if value is not None else D(0)

    def record(self, cid: str) -> dict[str, str]:
        raw: Any = self.client.hgetall(KEYS.order(cid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def stops(self) -> list[OrderRequest]:
        """Every stop order submitted, in order."""
        return [c.args[0] for c in self.broker.calls
                if c.method == "submit" and c.args[0].order_type is OrderType.STOP]

    def alerts(self) -> list[Alert]:
        return [a for a in (codec.decode(f) for _, f in self.client.xrange(KEYS.stream(ALERTS)))
                if isinstance(a, Alert)]


def placed(request: OrderRequest) -> BrokerOrder:
    """The broker's acknowledgement of ``request`` (new, nothing filled); an OCO's stop-loss leg is
    named ``<client_order_id>-leg`` (a broker-made id in life)."""
    cid = request.client_order_id
    leg = replace(request, client_order_id=f"{cid}-leg", oco=False)
    legs = (replace(placed(leg), order_type=OrderType.STOP, limit_price=None, stop_price=request.stop_loss),
            ) if request.oco else ()
    return BrokerOrder(broker_order_id=f"b-{cid}", client_order_id=cid, symbol=request.symbol,
                       side=request.side, order_type=request.order_type,
                       time_in_force=request.time_in_force.value, quantity=request.quantity,
                       filled_quantity=D(0), filled_avg_price=None, limit_price=request.limit_price,
                       stop_price=request.stop_price, status=OrderStatus.NEW, broker_status="new",
                       submitted_at=T0, order_class="oco" if request.oco else "simple", legs=legs)


class TestOcoPair:
    """An entry with a take-profit is covered by one OCO pair whose leg the broker names."""

    TP, LEG = "bst-i1-tp1", "bst-i1-tp1-leg"

    def protected(self) -> Desk:
        desk = Desk()
        desk.entry = desk.entry.model_copy(update={"take_profit": D("160.004")})
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        return desk

    def reserved(self, desk: Desk) -> Decimal:
        return desk.executor.portfolio.snapshot().positions["AAPL"].reserved

    def test_one_pair_covers_the_fill_and_its_leg_is_recorded(self) -> None:
        """The fill places one OCO sell: a GTC limit at the target and a stop leg at the stop-loss
        (both rounded up to the tick); the leg is recorded from the reply with the pair's
        reservation, which holds the 10 shares once; a pass finds the entry covered."""
        desk = self.protected()
        [pair] = [c.args[0] for c in desk.broker.calls if c.method == "submit" and c.args[0].oco]
        assert (pair.client_order_id, pair.order_type, pair.limit_price, pair.take_profit, pair.stop_loss,
                pair.time_in_force.value) == (self.TP, OrderType.LIMIT, D("160.01"), D("160.01"), D("140.01"),
                                              "gtc")
        assert desk.stops() == []
        leg = desk.record(self.LEG)
        assert (leg["oco_parent"], leg["protects"], leg["reservation_id"], leg["exit_reason"],
                leg["status"]) == (self.TP, "bst-i1", self.TP, "stop_loss", "new")
        assert desk.record(self.TP)["legs"] == self.LEG
        assert self.reserved(desk) == D(10)
        desk.executor.protect_pending()
        assert len([c for c in desk.broker.calls if c.method == "submit"]) == 2  # the entry and the pair

    def test_the_target_cancelled_before_the_legs_fill_is_heard_keeps_the_shares_held(self) -> None:
        """The broker cancels the take-profit because its stop leg filled, and that cancel is heard
        first: the pair's reservation stays (its leg is open), nothing is placed again; the leg's
        fill then books against it -- flat, nothing reserved, no fill beyond a reservation, the
        round trip a stop_loss exit."""
        desk = self.protected()
        desk.report(self.TP, Side.SELL, OrderStatus.CANCELED, "0")
        assert self.reserved(desk) == D(10)
        desk.executor.protect_pending()
        assert len([c for c in desk.broker.calls if c.method == "submit"]) == 2
        desk.report(self.LEG, Side.SELL, OrderStatus.FILLED, "10", "139")
        snap = desk.executor.portfolio.snapshot()
        assert "AAPL" not in snap.positions or snap.positions["AAPL"].empty
        assert not snap.reservations and snap.reserved == 0
        assert [a.kind for a in desk.alerts()] == ["protection_lock"]  # StoplossGuard's, at 1 stop-out
        [member] = desk.client.zrange(KEYS.closed_trades, 0, -1)
        assert b'"exit_reason": "stop_loss"' in member and b'"pnl": "-110' in member

    def test_a_pair_cancelled_on_both_sides_gives_its_shares_back_once_both_ended(self) -> None:
        """Both orders of the pair cancelled, not by a fill: the reservation is given back when the
        second ends, not the first, and the entry is covered again by a new pair."""
        desk = self.protected()
        desk.report(self.LEG, Side.SELL, OrderStatus.CANCELED, "0")
        assert self.reserved(desk) == D(10)
        desk.report(self.TP, Side.SELL, OrderStatus.CANCELED, "0")
        desk.executor.protect_pending()
        assert desk.record("bst-i1-tp2")["status"] == "new"  # replaced: the shares were free again
        assert self.reserved(desk) == D(10)


class TestPlacement:
    def test_filled_entry_is_protected_at_once(self) -> None:
        """The fill of 10 shares places a GTC sell stop for 10 at the stop-loss rounded to the tick
        (140.004 -> 140.01: a sell stop never triggers later than asked), its reservation holding them."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        [stop] = desk.stops()
        assert (stop.side, stop.quantity, stop.stop_price, stop.time_in_force.value) == (
            Side.SELL, D(10), D("140.01"), "gtc")
        assert stop.client_order_id == "bst-i1-sl1"
        record = desk.record(stop.client_order_id)
        assert (record["protects"], record["exit_reason"], record["status"]) == ("bst-i1", "stop_loss", "new")
        assert desk.executor.portfolio.snapshot().positions["AAPL"].reserved == D(10)
        assert not desk.client.smembers(KEYS.unprotected)

    def test_partial_fills_protected_as_they_come(self) -> None:
        """4 filled: a stop for 4; then all 10: a second stop for the other 6."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.PARTIALLY_FILLED, "4")
        assert [s.quantity for s in desk.stops()] == [D(4)]
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        assert [(s.client_order_id, s.quantity) for s in desk.stops()] == [("bst-i1-sl1", D(4)),
                                                                           ("bst-i1-sl2", D(6))]

    def test_entry_without_stop_loss_is_not_protected(self) -> None:
        """No stop_loss on the entry: no protective order."""
        desk = Desk()
        desk.entry = desk.entry.model_copy(update={"stop_loss": None})
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        assert desk.stops() == []

    def test_repeated_report_places_no_second_stop(self) -> None:
        """The same fill reported twice (stream and poll) protects once."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.executor.protect_pending()
        assert len(desk.stops()) == 1


class TestFailures:
    def test_refused_stop_retried_after_back_off(self) -> None:
        """A refused stop is tried again only after protect_backoff_s, then placed."""
        desk = Desk()
        desk.refuse_stops = 1
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        assert [s.client_order_id for s in desk.stops()] == ["bst-i1-sl1"]
        assert desk.client.smembers(KEYS.unprotected) == {b"bst-i1"}
        desk.clock.advance(timedelta(seconds=0.5))
        desk.executor.protect_pending()
        assert len(desk.stops()) == 1  # not yet: the back-off is 1 s
        desk.clock.advance(timedelta(seconds=0.6))
        desk.executor.protect_pending()
        assert [s.client_order_id for s in desk.stops()] == ["bst-i1-sl1", "bst-i1-sl2"]
        assert desk.record("bst-i1-sl2")["status"] == "new"
        assert desk.record("bst-i1-sl1")["status"] == "rejected"  # its reservation released
        assert desk.executor.portfolio.snapshot().positions["AAPL"].reserved == D(10)
        assert not desk.client.smembers(KEYS.unprotected)

    def test_stop_never_placed_flattens_and_alerts_critical(self) -> None:
        """Refused protect_attempts times (back-off 1 s, then 2 s): the 10 shares are sold at market
        (exit reason protection_failed) and a CRITICAL alert names the symbol and the cause."""
        desk = Desk()
        desk.refuse_stops = 99
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        for wait in (1.0, 2.0):
            desk.clock.advance(timedelta(seconds=wait))
            desk.executor.protect_pending()
        assert len(desk.stops()) == 3
        flatten = desk.record("bst-i1-flat3")
        assert (flatten["side"], flatten["quantity"], flatten["order_type"], flatten["exit_reason"]) == (
            "sell", "10", "market", "protection_failed")
        [alert] = [a for a in desk.alerts() if a.kind == "protection_failed"]
        assert alert.severity is AlertSeverity.CRITICAL
        assert alert.details["symbol"] == "AAPL"
        assert "stop price too close to the market" in alert.text and "flattened at market" in alert.text
        assert not desk.client.smembers(KEYS.unprotected)
        desk.executor.protect_pending()
        assert len(desk.stops()) == 3  # the flatten covers the shares: nothing more is tried

    def test_broker_down_counts_as_a_failed_try(self) -> None:
        """The broker unreachable when the stop is placed: tried again after the back-off."""
        desk = Desk()
        desk.broker_down = True
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        assert desk.record("bst-i1")["protect_attempts"] == "1"
        desk.broker_down = False
        desk.clock.advance(timedelta(seconds=1))
        desk.executor.protect_pending()
        assert desk.record(desk.stops()[-1].client_order_id)["status"] == "new"

    def test_stop_the_broker_cancels_is_replaced(self) -> None:
        """The broker cancels the resting stop (not us): the position is protected again."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.report("bst-i1-sl1", Side.SELL, OrderStatus.CANCELED, "0")
        desk.executor.protect_pending()
        assert [s.client_order_id for s in desk.stops()] == ["bst-i1-sl1", "bst-i1-sl2"]
        assert desk.executor.portfolio.snapshot().positions["AAPL"].reserved == D(10)

    def test_shares_an_exit_holds_are_not_covered_twice(self) -> None:
        """With the position already held by an exit in flight, no stop is placed."""
        desk = Desk()
        desk.submit_entry()
        desk.refuse_stops = 99
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.executor.portfolio.reserve("exit", "AAPL", Side.SELL, D(10), D(150))
        desk.clock.advance(timedelta(seconds=1))
        desk.executor.protect_pending()
        assert len(desk.stops()) == 1
        assert not desk.client.smembers(KEYS.unprotected)


class TestStopOut:
    def test_stop_fill_closes_the_round_trip_as_a_stop_loss(self) -> None:
        """The stop fills: the position is flat, the round trip (loss 100) reaches the protections as a
        stop-loss exit, and StoplossGuard (limit 1) locks AAPL entries."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.report("bst-i1-sl1", Side.SELL, OrderStatus.FILLED, "10", price="140")
        assert "AAPL" not in desk.executor.portfolio.snapshot().positions
        lock = Protections(desk.client, KEYS, desk.settings.protections, desk.clock).check("AAPL", Side.BUY)
        assert lock is not None and lock.protection == "stoploss_guard"
        [member] = desk.client.zrange(KEYS.closed_trades, 0, -1)
        assert b'"exit_reason": "stop_loss"' in member and b'"pnl": "-100' in member

    def test_scaling_out_is_one_round_trip(self) -> None:
        """Two exits of 5 shares: the protections see one closed trade, with both exits' PnL."""
        desk = Desk()
        desk.entry = desk.entry.model_copy(update={"stop_loss": None})
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        for n, price in ((1, "155"), (2, "145")):
            cid = f"bst-x{n}"
            desk.executor.portfolio.reserve(cid, "AAPL", Side.SELL, D(5), D(price))
            order = Order(time=T0, intent_id=cid, client_order_id=cid, account="paper", symbol="AAPL",
                          side=Side.SELL, quantity=D(5), reservation_id=cid)
            desk.executor.handle_order(Delivery(ORDERS, f"{n}-1", order, 1))
            desk.report(cid, Side.SELL, OrderStatus.FILLED, "5", price=price)
        [member] = desk.client.zrange(KEYS.closed_trades, 0, -1)
        assert b'"id": "bst-x2"' in member and b'"pnl": "0' in member and b'"exit_reason": "signal"' in member


class TestKillSwitch:
    def test_halt_without_flatten_keeps_the_stop(self) -> None:
        """HALTED with cancel-orders but no flatten: the protective stop stays at the broker."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        KillSwitch(desk.client, KEYS, desk.clock).engage(TradingState.HALTED, "test", "drill",
                                                         cancel_open_orders=True)
        assert desk.executor.act_on_trading_state()
        assert [c for c in desk.broker.calls if c.method == "cancel"] == []

    def test_flatten_cancels_the_stop_then_sells_the_whole_position(self) -> None:
        """A flatten first cancels the stop holding the shares (on purpose: not replaced), and sells
        all 10 once the broker confirms the cancel; until then the change is not done."""
        desk = Desk()
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        KillSwitch(desk.client, KEYS, desk.clock).engage(TradingState.HALTED, "test", "drill",
                                                         cancel_open_orders=True, flatten_positions=True)
        assert not desk.executor.act_on_trading_state()
        assert ("bst-i1-sl1",) in [c.args for c in desk.broker.calls if c.method == "cancel"]
        assert desk.record("bst-i1-sl1")["cancel_reason"] == "kill switch 1"
        desk.report("bst-i1-sl1", Side.SELL, OrderStatus.CANCELED, "0")
        desk.executor.protect_pending()
        assert len(desk.stops()) == 1  # not replaced
        assert desk.executor.act_on_trading_state()
        flatten = desk.record("bst-flat-1-AAPL")
        assert (flatten["side"], flatten["quantity"], flatten["exit_reason"]) == ("sell", "10", "flatten")
