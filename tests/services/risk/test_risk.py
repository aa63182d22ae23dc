"""The risk service's decisions, on in-process fakeredis with a real portfolio and a FakeBroker."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from structlog.testing import capture_logs

from services.ingester import BarGate
from services.risk.service import RiskService, client_order_id
from shared.brokers import Account, BrokerCall, FakeBroker
from shared.bus import Consumer, Delivery, codec, publish
from shared.clock import LiveClock, SimulatedClock
from shared.config import Settings
from shared.errors import BrokerUnavailable, PortfolioConflict, RedisUnavailable, StaleFencingToken
from shared.keys import BARS, INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import Bar, ExitReason, Fill, Intent, IntentRejected, Order, OrderType, Side
from shared.portfolio import lock_resource
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.account_activity import AccountActivity
from shared.safety.protections import ClosedTrade, Protections
from shared.safety.trading_state import KillSwitch
from tests.support import factories
from tests.support.processes import free_port, wait_for

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # a Monday, 10:00 in New York
KEYS = Keys("t")


def broker_account(equity: str = "10000") -> Account:
    """The broker's account with ``equity`` (cash the same)."""
    return Account(account_id="a1", currency="USD", cash=Decimal(equity), buying_power=Decimal(equity),
                   equity=Decimal(equity), pattern_day_trader=False, trading_blocked=False)


def record_fill(activity: AccountActivity, cid: str, symbol: str, signed_qty: Decimal, before: Decimal,
                at: datetime) -> None:
    """Count a fill as the executor does (its writes in one MULTI)."""
    with activity.client.pipeline(transaction=True) as pipe:
        activity.queue_fill(pipe, cid, symbol, signed_qty, before, at)
        pipe.execute()


class Desk:
    """A risk service on a $10,000 account, AAPL marked and fresh at $150, a FakeBroker for balances."""

    def __init__(self, equity: str = "10000", **limits: Any) -> None:
        self.client: redis.Redis = fakeredis.FakeRedis()
        self.clock = SimulatedClock(T0)
        self.equity = equity
        self.market_open = True
        self.broker = FakeBroker(self.answer)
        self.settings = Settings(portfolio={"starting_cash": "10000"},
                                 limits={"max_position_fraction": "1", **limits})
        self.risk = RiskService(self.client, KEYS, self.settings, self.clock, broker=self.broker)
        self.risk.portfolio.open()
        self.bar("AAPL", "150")

    def answer(self, call: BrokerCall) -> object:
        if call.method == "account":
            return broker_account(self.equity)
        if call.method == "market_open":
            return self.market_open
        return []

    def bar(self, symbol: str, price: str) -> None:
        """A bar's traces as the ingester leaves them (its time in last-bar, when it arrived in
        bar-arrival, its close in last-price), then a tick of risk's ticker."""
        self.client.hset(KEYS.last_bar, symbol, self.clock.now().isoformat())
        self.client.hset(KEYS.bar_arrival, symbol, self.clock.now().isoformat())
        self.client.hset(KEYS.last_price, symbol, price)
        self.risk.tick()

    def send(self, wish: Intent) -> None:
        """Hand ``wish`` to the service as the bus would."""
        self.risk.handle_intent(Delivery(INTENTS, "1-0", wish, 1))

    def stream(self, name: str) -> list[Any]:
        return [codec.decode(fields) for _, fields in self.client.xrange(KEYS.stream(name))]

    def orders(self) -> list[Order]:
        return self.stream(ORDERS)

    def reasons(self) -> list[str]:
        return [r.reason for r in self.stream(REJECTIONS)]

    def hold(self, symbol: str, quantity: str, price: str = "150") -> None:
        """Put a position in the book (a filled buy), as the executor would."""
        rid = f"hold-{symbol}-{quantity}"
        self.risk.portfolio.reserve(rid, symbol, Side.BUY, Decimal(quantity), Decimal(price))
        self.risk.portfolio.apply_fill(rid, Fill(fill_id=f"{rid}:f", quantity=Decimal(quantity),
                                                 price=Decimal(price), time=self.clock.now()))


def intent(side: Side = Side.BUY, **fields: Any) -> Intent:
    """A manual intent for 10 AAPL (factories.intent) at the desk's T0."""
    return factories.intent(side, **({"time": T0} | fields))


@pytest.fixture
def desk() -> Desk:
    """A fresh desk with default limits (position fraction 1)."""
    return Desk()


class TestApproval:
    def test_affordable_buy_becomes_an_order_with_its_reservation(self, desk: Desk) -> None:
        """A buy that cash covers is reserved and published as an order keyed by the intent id."""
        wish = intent()
        desk.send(wish)
        [order] = desk.orders()
        assert (order.client_order_id, order.reservation_id, order.quantity) == (
            client_order_id(wish.id), wish.id, Decimal(10))
        assert desk.risk.portfolio.snapshot().reserved == Decimal("1501.5")  # 10 x 150 + 10 bps buffer

    def test_notional_is_sized_to_whole_shares(self, desk: Desk) -> None:
        """A notional intent buys the whole shares it affords at the last price."""
        desk.send(intent(quantity=None, notional=Decimal("1000")))
        [order] = desk.orders()
        assert order.quantity == Decimal(6)

    def test_redelivered_intent_is_published_once(self, desk: Desk) -> None:
        """The same intent delivered twice yields one order and one reservation."""
        wish = intent()
        desk.send(wish)
        desk.send(wish)
        assert len(desk.orders()) == 1
        assert desk.risk.portfolio.snapshot().reserved == Decimal("1501.5")

    def test_intent_reserved_but_never_published_is_published_on_redelivery(self, desk: Desk) -> None:
        """A delivery that died after the reservation's write but before its order went out (the
        reservation is there, no order, no marker) publishes the order on the next delivery."""
        wish = intent()
        desk.risk.portfolio.reserve(wish.id, "AAPL", Side.BUY, Decimal(10), Decimal(150))
        desk.send(wish)
        [order] = desk.orders()
        assert order.reservation_id == wish.id
        assert desk.risk.portfolio.snapshot().reserved == Decimal("1501.5")

    def test_an_entry_republished_keeps_its_protective_exits(self, desk: Desk) -> None:
        """An entry whose publish was lost goes out on redelivery with its stop-loss and take-profit
        (the executor protects it once it fills); a take-profit under the price is refused."""
        wish = intent(stop_loss="140", take_profit="170")
        desk.risk.portfolio.reserve(wish.id, "AAPL", Side.BUY, Decimal(10), Decimal(150))
        desk.send(wish)
        [order] = desk.orders()
        assert (order.stop_loss, order.take_profit) == (Decimal(140), Decimal(170))
        desk.send(intent(stop_loss="140", take_profit="149"))
        assert any("take_profit 149 is not above" in reason for reason in desk.reasons())

    def test_redelivery_at_a_moved_mark_publishes_the_recorded_decision(self, desk: Desk) -> None:
        """A market buy reserved at $150 whose publish was lost, delivered again after the mark moved
        to $170: the order its reservation records goes out; no rejection, nothing leaked."""
        wish = intent()
        desk.risk.portfolio.reserve(wish.id, "AAPL", Side.BUY, Decimal(10), Decimal(150))
        desk.bar("AAPL", "170")
        desk.send(wish)
        [order] = desk.orders()
        assert (order.quantity, order.reservation_id) == (Decimal(10), wish.id)
        assert desk.reasons() == []
        assert desk.risk.portfolio.snapshot().reserved == Decimal("1501.5")

    @pytest.mark.parametrize("error", ["stale", "conflict"])
    def test_a_reservation_refused_by_another_writer_is_decided_again(
            self, desk: Desk, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
        """A stale fencing token or a version conflict on the reservation is not a rejection: the
        intent is read and decided again, and becomes one order."""
        reserve = desk.risk.portfolio.reserve
        failures = [StaleFencingToken("paper", 1, 2) if error == "stale"
                    else PortfolioConflict("paper", "moved")]

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if failures:
                held = kwargs.get("held")
                if held is not None:
                    desk.risk.portfolio.let_go(held)
                raise failures.pop()
            return reserve(*args, **kwargs)

        monkeypatch.setattr(desk.risk.portfolio, "reserve", flaky)
        desk.send(intent())
        assert len(desk.orders()) == 1 and desk.reasons() == []

    def test_a_decision_takes_the_account_lock_once_and_leaves_it_free(
            self, desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
        """An approval reads, decides and reserves under one lock taken with its reads; a refusal
        lets it go as well."""
        fence_key = KEYS.fence(lock_resource(desk.risk.portfolio.account))
        lock_key = KEYS.lock(lock_resource(desk.risk.portfolio.account))
        desk.send(intent())  # the first decision also refreshes the balance (the lock is let go for that)
        before = int(desk.client.get(fence_key))
        locked_while_deciding: list[bool] = []
        decide = desk.risk.decide
        monkeypatch.setattr(desk.risk, "decide", lambda *a: locked_while_deciding.append(
            bool(desk.client.exists(lock_key))) or decide(*a))
        desk.send(intent(quantity=Decimal(2)))
        assert len(desk.orders()) == 2 and locked_while_deciding == [True]
        assert int(desk.client.get(fence_key)) == before + 1 and not desk.client.exists(lock_key)
        desk.send(intent(quantity=Decimal(1_000_000)))
        assert len(desk.reasons()) == 1
        assert not desk.client.exists(lock_key)

    def test_limit_price_is_rounded_never_worse(self, desk: Desk) -> None:
        """A buy limit of 150.129 goes out at 150.12 (a tick down), a sub-dollar one to $0.0001."""
        desk.send(intent(order_type=OrderType.LIMIT, limit_price=Decimal("150.129")))
        desk.bar("SIRI", "0.5")
        desk.send(intent(symbol="SIRI", quantity=Decimal(100), order_type=OrderType.LIMIT,
                         limit_price=Decimal("0.51237")))
        assert [o.limit_price for o in desk.orders()] == [Decimal("150.12"), Decimal("0.5123")]


class TestRefusal:
    @pytest.mark.parametrize(
        ("wish", "reason"),
        [
            (intent(order_type=OrderType.LIMIT, limit_price=Decimal(9995), quantity=Decimal(1)),
             "insufficient funds"),
            (intent(quantity=Decimal(100)), "max_position_fraction"),
            (intent(Side.SELL), "insufficient AAPL"),
            (intent(symbol="MSFT"), "no price for MSFT"),
            (intent(quantity=None, notional=Decimal("100")), "buys no whole share"),
            (intent(order_type=OrderType.LIMIT, limit_price=Decimal("0.01"), quantity=Decimal(1)),
             "min_order_notional"),
            (intent(quantity=Decimal("0.4")), "quantity_rounds_to_zero"),
        ],
    )
    def test_refused_intent_is_published_with_its_reason(self, desk: Desk, wish: Intent, reason: str) -> None:
        """An intent risk refuses goes to the rejections stream with a reason, and nothing is reserved."""
        desk.send(wish)
        assert desk.orders() == []
        [rejection] = desk.stream(REJECTIONS)
        assert isinstance(rejection, IntentRejected) and reason in rejection.reason
        assert rejection.intent_id == wish.id
        assert desk.risk.portfolio.snapshot().reserved == 0

    def test_second_buy_beyond_cash_is_refused(self, desk: Desk) -> None:
        """Two buys of 40 @ 150 on $10,000: the first is approved, the second refused."""
        desk.send(intent(quantity=Decimal(40)))
        desk.send(intent(quantity=Decimal(40)))
        assert len(desk.orders()) == 1
        assert len(desk.reasons()) == 1

    def test_position_limit(self) -> None:
        """A buy that would take the position above max_position_fraction of equity is refused."""
        desk = Desk(max_position_fraction="0.1")
        desk.send(intent(quantity=Decimal(6)))  # 900 <= 1,000
        desk.send(intent(quantity=Decimal(7)))  # 900 pending + 1,050 > 1,000
        assert len(desk.orders()) == 1
        [reason] = desk.reasons()
        assert reason.startswith("max_position_fraction")

    @pytest.mark.parametrize(("limits", "wish", "rule"), [
        ({"max_order_notional": "1000"}, intent(), "max_order_notional"),
        ({"max_position_quantity": "5"}, intent(), "max_position_quantity"),
        ({"max_gross_leverage": "0.5"}, intent(quantity=Decimal(40)), "max_gross_exposure"),
    ])
    def test_each_limit_refuses_with_its_rule(self, limits: dict[str, str], wish: Intent, rule: str) -> None:
        """Each pre-trade limit refuses an order that breaks it, naming the rule."""
        desk = Desk(**limits)
        desk.send(wish)
        assert desk.orders() == []
        assert desk.reasons()[0].startswith(rule)

    def test_max_open_orders(self) -> None:
        """With one order open and max_open_orders 1, a manual second order is refused."""
        desk = Desk(max_open_orders="1")
        desk.send(intent(quantity=Decimal(1)))
        desk.send(intent(quantity=Decimal(1)))
        assert len(desk.orders()) == 1
        [reason] = desk.reasons()
        assert reason.startswith("max_open_orders") and "not deferred" in reason

    def test_a_notional_is_sized_at_the_close_the_ingester_published(self) -> None:
        """The bar the ingester publishes prices the symbol for risk: $3,000 of MSFT at 300 is 10 shares."""
        desk = Desk()
        msft = Bar(time=desk.clock.now(), symbol="MSFT", open=Decimal(290), high=Decimal(301),
                   low=Decimal(289), close=Decimal(300), volume=Decimal(100))
        BarGate(desk.client, KEYS).admit_and_publish([msft], KEYS.stream(BARS), [KEYS.stream("p0")], [0],
                                                     arrived=desk.clock.now())
        desk.send(intent(symbol="MSFT", quantity=None, notional=Decimal(3000)))
        [order] = desk.orders()
        assert (order.symbol, order.quantity) == ("MSFT", Decimal(10))
        assert desk.risk.portfolio.marks()["MSFT"] == Decimal(300)

    def test_open_orders_count_each_order_once(self) -> None:
        """An order the executor tracks counts once with its open reservation; one whose reservation
        is not open (a flatten order) counts on its own."""
        desk = Desk(max_open_orders="2")
        desk.send(intent(quantity=Decimal(1)))
        [first] = desk.orders()
        desk.client.sadd(KEYS.open_orders, first.client_order_id)
        desk.client.hset(KEYS.order(first.client_order_id), "reservation_id", first.reservation_id)
        desk.send(intent(quantity=Decimal(1)))
        assert len(desk.orders()) == 2 and desk.reasons() == []  # one open before it, not two

        other = Desk(max_open_orders="2")
        other.client.sadd(KEYS.open_orders, "bst-flat-1-AAPL")
        other.client.hset(KEYS.order("bst-flat-1-AAPL"), "reservation_id", "bst-flat-1-AAPL")
        other.send(intent(quantity=Decimal(1)))
        other.send(intent(quantity=Decimal(1)))
        assert len(other.orders()) == 1
        [reason] = other.reasons()
        assert reason.startswith("max_open_orders")

    def test_a_refused_or_duplicate_intent_uses_no_submission(self) -> None:
        """With 2 orders per minute, a refused sell and a repeated intent leave room for two buys."""
        desk = Desk(max_orders_per_minute="2")
        desk.send(intent(Side.SELL))  # nothing held: refused
        first = intent(quantity=Decimal(1))
        desk.send(first)
        desk.send(first)  # a redelivery: decided already
        desk.send(intent(quantity=Decimal(1)))
        assert len(desk.orders()) == 2
        assert [r.split(":")[0] for r in desk.reasons()] == ["insufficient AAPL"]

    def test_a_refusal_settles_in_one_round_trip_after_its_reads(
            self, desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
        """A refused intent costs two round trips: its reads (which take the lock and count the
        submission), then one that lets the lock go, uncounts the submission and publishes the
        rejection; a redelivered one, its reads and one that lets go and uncounts."""
        desk.send(intent(quantity=Decimal(1)))  # the first decision also refreshes the balance
        submissions = desk.client.zcard(desk.risk.submissions._limiter.bucket_key("account"))
        trips: list[str] = []
        execute, command = redis.client.Pipeline.execute, desk.client.execute_command
        monkeypatch.setattr(redis.client.Pipeline, "execute",
                            lambda pipe, *a, **k: trips.append("pipeline") or execute(pipe, *a, **k))
        monkeypatch.setattr(desk.client, "execute_command",
                            lambda *a, **k: trips.append(str(a[0])) or command(*a, **k))
        refused = intent(quantity=Decimal(100))
        desk.send(refused)
        assert trips == ["pipeline", "pipeline"]
        trips.clear()
        desk.send(refused)
        assert trips == ["pipeline", "pipeline"]
        monkeypatch.undo()
        assert [r.split(":")[0] for r in desk.reasons()] == ["max_position_fraction"]
        assert not desk.client.exists(KEYS.lock(lock_resource(desk.risk.portfolio.account)))
        assert desk.client.zcard(desk.risk.submissions._limiter.bucket_key("account")) == submissions

    def test_max_orders_per_minute(self) -> None:
        """The third order within a minute, with a limit of 2 per minute, is refused."""
        desk = Desk(max_orders_per_minute="2")
        for _ in range(3):
            desk.send(intent(quantity=Decimal(1)))
        assert len(desk.orders()) == 2
        assert [r.split(":")[0] for r in desk.reasons()] == ["max_orders_per_minute"]


class TestTradingState:
    def test_halted_refuses_everything(self, desk: Desk) -> None:
        """With the kill switch HALTED neither an entry nor an exit is approved."""
        desk.hold("AAPL", "20")
        KillSwitch(desk.client, KEYS, desk.clock).engage("HALTED", "ops", "test halt")
        desk.send(intent())
        desk.send(intent(Side.SELL))
        assert desk.orders() == []
        assert all("HALTED" in r and "test halt" in r for r in desk.reasons()) and len(desk.reasons()) == 2

    def test_reducing_lets_only_reducing_orders_through(self, desk: Desk) -> None:
        """REDUCING refuses a buy and a sell through zero, and approves a sell of part of the position."""
        desk.hold("AAPL", "20")
        KillSwitch(desk.client, KEYS, desk.clock).engage("REDUCING", "ops", "wind down")
        desk.send(intent())
        desk.send(intent(Side.SELL, quantity=Decimal(30)))
        desk.send(intent(Side.SELL, quantity=Decimal(10)))
        assert [(o.side, o.quantity) for o in desk.orders()] == [(Side.SELL, Decimal(10))]
        assert [r.split(":")[0] for r in desk.reasons()] == ["trading_reducing", "trading_reducing"]


class TestProtections:
    def test_lock_refuses_entries_not_exits(self, desk: Desk) -> None:
        """A cooldown lock after an exit refuses a new buy of the symbol but lets a sell through."""
        desk.hold("AAPL", "20")
        Protections(desk.client, KEYS, desk.settings.protections, desk.clock).record_trade_closed(
            ClosedTrade("t1", "AAPL", Side.BUY, Decimal(5), exit_reason=ExitReason.SIGNAL, at=T0))
        desk.send(intent())
        desk.send(intent(Side.SELL))
        assert [o.side for o in desk.orders()] == [Side.SELL]
        [reason] = desk.reasons()
        assert reason.startswith("protection_lock") and "cooldown" in reason

    def test_equity_samples_trigger_max_drawdown(self, desk: Desk) -> None:
        """Equity sampled on the ticker falling 10% from its peak locks every entry."""
        desk.hold("AAPL", "20")  # cash 7,000 + 20 x 150 = 10,000
        desk.risk.sample_equity(force=True)
        desk.clock.advance(timedelta(seconds=61))
        desk.bar("AAPL", "100")  # 7,000 + 2,000 = 9,000: a 10% drawdown, sampled on the tick
        desk.send(intent(symbol="AAPL", quantity=Decimal(1)))
        [reason] = desk.reasons()
        assert reason.startswith("protection_lock") and "max_drawdown" in reason

    def test_equity_is_sampled_at_most_once_a_minute(self, desk: Desk) -> None:
        """Ticks within a minute of the last sample record no new equity sample."""
        protections = Protections(desk.client, KEYS, desk.settings.protections, desk.clock)
        before = desk.client.zcard(protections.equity_key)
        desk.bar("AAPL", "151")
        desk.clock.advance(timedelta(seconds=61))
        desk.bar("AAPL", "152")
        assert desk.client.zcard(protections.equity_key) == before + 1


class TestStaleness:
    def test_stale_data_refused_then_accepted_after_a_fresh_bar(self, desk: Desk) -> None:
        """An entry on a symbol whose last bar arrived 121 s ago is refused; after a new bar, approved."""
        desk.clock.advance(timedelta(seconds=121))
        desk.send(intent())
        assert desk.reasons()[0].startswith("stale_data")
        desk.bar("AAPL", "150")
        desk.send(intent())
        assert len(desk.orders()) == 1

    def test_stale_data_is_measured_by_arrival_not_by_bar_time(self, desk: Desk) -> None:
        """A bar six hours ahead of the clock (a synthetic market) published through the ingester's
        gate: fresh for 120 s after it arrived, then refused although its own time is still ahead."""
        ahead = Bar(time=desk.clock.now() + timedelta(hours=6), symbol="MSFT", open=Decimal(300),
                    high=Decimal(300), low=Decimal(300), close=Decimal(300), volume=Decimal(100))
        BarGate(desk.client, KEYS).admit_and_publish([ahead], KEYS.stream(BARS), [KEYS.stream("p0")], [0],
                                                     arrived=desk.clock.now())
        desk.clock.advance(timedelta(seconds=120))
        desk.bar("AAPL", "150")  # AAPL fresh: only MSFT's data ages
        desk.send(intent(symbol="MSFT", quantity=Decimal(1)))
        assert len(desk.orders()) == 1 and desk.reasons() == []
        desk.clock.advance(timedelta(seconds=1))
        desk.send(intent(symbol="MSFT", quantity=Decimal(1)))
        assert desk.reasons() == ["stale_data: no bar for MSFT accepted for 121s, the limit is 120s"]

    def test_stale_data_does_not_trap_an_exit(self, desk: Desk) -> None:
        """A sell of a held position goes through even when the symbol's data is stale."""
        desk.hold("AAPL", "20")
        desk.clock.advance(timedelta(seconds=121))
        desk.send(intent(Side.SELL))
        assert len(desk.orders()) == 1

    def test_stale_balance_refused_while_broker_down_then_accepted_after_refresh(self, desk: Desk) -> None:
        """With the balance 301 s old and the broker unreachable an entry is refused; once the broker
        answers the balance is refreshed (and logged) and the entry approved."""
        desk.clock.advance(timedelta(seconds=301))
        desk.bar("AAPL", "150")

        def down(call: BrokerCall) -> object:
            raise BrokerUnavailable("connection refused")

        desk.broker.handler = down
        desk.send(intent())
        [reason] = desk.reasons()
        assert reason.startswith("stale_balance") and "connection refused" in reason
        desk.broker.handler = desk.answer
        with capture_logs() as logs:
            desk.send(intent())
        assert len(desk.orders()) == 1
        assert sum(1 for e in logs if e["event"] == "risk.balance_refreshed") == 1

    def test_balance_is_refreshed_after_k_fills(self) -> None:
        """After balance_refresh_after_fills fills the next intent reads the balance from the broker again."""
        desk = Desk(balance_refresh_after_fills="2")
        desk.send(intent(quantity=Decimal(1)))
        activity = AccountActivity(desk.client, KEYS, "paper")
        for n in range(2):
            record_fill(activity, f"x{n}", "MSFT", Decimal(1), Decimal(n), T0)
        desk.send(intent(quantity=Decimal(1)))
        assert [c.method for c in desk.broker.calls if c.method == "account"] == ["account", "account"]
        assert activity.balance().fills_since == 0


class TestPatternDayTrading:
    def setup_day_trades(self, desk: Desk) -> None:
        """Three completed day trades this week, and 10 AAPL bought today."""
        activity = AccountActivity(desk.client, KEYS, "paper")
        for n in range(3):
            day = T0 - timedelta(days=(0, 3, 4)[n])  # Monday, last Friday, last Thursday
            record_fill(activity, f"b{n}", "MSFT", Decimal(1), Decimal(0), day)
            record_fill(activity, f"s{n}", "MSFT", Decimal(-1), Decimal(1), day)
        desk.hold("AAPL", "10")
        record_fill(activity, "b-aapl", "AAPL", Decimal(10), Decimal(0), T0)

    def test_fourth_day_trade_refused_below_threshold(self, desk: Desk) -> None:
        """With 3 day trades in 5 business days and equity below $25,000 the 4th is refused."""
        self.setup_day_trades(desk)
        desk.send(intent(Side.SELL))
        assert desk.orders() == []
        assert desk.reasons()[0].startswith("pattern_day_trading")

    def test_fourth_day_trade_allowed_above_threshold(self) -> None:
        """The same day trade is approved when the broker's equity is $25,000 or more."""
        desk = Desk(equity="25000")
        self.setup_day_trades(desk)
        desk.send(intent(Side.SELL))
        assert len(desk.orders()) == 1


class TestDeferred:
    def strategy_intent(self, side: Side = Side.BUY, quantity: str = "40") -> Intent:
        return intent(side, quantity=Decimal(quantity), source="strategy:sma_crossover", time=T0)

    def test_strategy_intent_waits_for_cash_and_runs_once_when_it_frees_up(self, desk: Desk) -> None:
        """A strategy buy blocked by a pending order's reservation is deferred, then approved once on
        the first tick after the reservation is released."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        wish = self.strategy_intent()
        desk.send(wish)
        assert desk.orders() == [] and desk.reasons() == []
        [queued] = desk.risk.deferred.entries()
        assert queued.intent.id == wish.id and "pending" in queued.reason
        desk.bar("AAPL", "150")  # still reserved: deferred again
        assert desk.orders() == [] and len(desk.risk.deferred.entries()) == 1
        desk.risk.portfolio.release("p1", "canceled")
        desk.bar("AAPL", "150")
        desk.bar("AAPL", "150")
        assert [o.intent_id for o in desk.orders()] == [wish.id]
        assert desk.risk.deferred.entries() == []

    def test_strategy_intent_without_a_mark_waits_for_its_bar(self, desk: Desk) -> None:
        """A strategy market buy of a symbol with no price yet is deferred, and approved once its bar
        has priced it."""
        wish = intent(symbol="MSFT", quantity=Decimal(1), source="strategy:sma_crossover", time=T0)
        desk.send(wish)
        [queued] = desk.risk.deferred.entries()
        assert desk.orders() == [] and queued.reason == "waiting: no price for MSFT yet (no bar seen)"
        desk.bar("MSFT", "300")
        assert [o.intent_id for o in desk.orders()] == [wish.id]

    def test_strategy_intent_waits_for_the_market_to_open(self) -> None:
        """While the broker's clock says closed a strategy buy is deferred; once open it is approved."""
        desk = Desk()
        desk.market_open = False
        wish = self.strategy_intent(quantity="10")
        desk.send(wish)
        [queued] = desk.risk.deferred.entries()
        assert desk.orders() == [] and queued.reason == "waiting: the market is closed"
        desk.market_open = True
        desk.clock.advance(timedelta(seconds=31))  # the clock's answer is trusted for 30 s
        desk.bar("AAPL", "150")
        assert [o.intent_id for o in desk.orders()] == [wish.id]
        assert desk.risk.deferred.entries() == []

    def test_manual_intent_is_refused_while_the_market_is_closed(self) -> None:
        """A manual intent while the market is closed is refused at once, with the reason."""
        desk = Desk()
        desk.market_open = False
        desk.send(intent())
        assert desk.reasons() == ["the market is closed (not now; a manual intent is not deferred)"]

    def test_manual_intent_is_refused_not_deferred(self, desk: Desk) -> None:
        """The same situation for a manual intent is a refusal the user sees at once."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        desk.send(intent(quantity=Decimal(40)))
        assert "not deferred" in desk.reasons()[0]
        assert desk.risk.deferred.entries() == []

    def test_deferred_intent_expires(self, desk: Desk) -> None:
        """A deferred intent still waiting after deferred_max_age_s is never executed."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        desk.send(self.strategy_intent())
        desk.risk.portfolio.release("p1", "canceled")
        desk.clock.advance(timedelta(seconds=901))
        desk.bar("AAPL", "150")
        assert desk.orders() == [] and desk.risk.deferred.entries() == []

    def test_opposite_signal_cancels_the_deferred_intent(self, desk: Desk) -> None:
        """A sell from the same strategy cancels its deferred buy, which is reported as a rejection."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        wish = self.strategy_intent()
        desk.send(wish)
        desk.send(self.strategy_intent(Side.SELL, "1"))
        assert desk.risk.deferred.get("AAPL", Side.BUY) is None
        cancelled = [r for r in desk.stream(REJECTIONS) if r.intent_id == wish.id]
        assert len(cancelled) == 1 and "now signals sell" in cancelled[0].reason

    def test_kill_switch_cancels_a_deferred_entry_on_revalidation(self, desk: Desk) -> None:
        """A deferred buy is cancelled when it is revalidated under HALTED."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        desk.send(self.strategy_intent())
        KillSwitch(desk.client, KEYS, desk.clock).engage("HALTED", "ops", "halt")
        desk.risk.portfolio.release("p1", "canceled")
        desk.bar("AAPL", "150")
        assert desk.orders() == [] and desk.risk.deferred.entries() == []
        assert "HALTED" in desk.reasons()[0]


class TestTicker:
    @pytest.mark.parametrize(("error", "event"), [
        (RedisUnavailable("deferred: connection reset"), "risk.tick_redis_unavailable"),
        (RuntimeError("a bug"), "risk.tick_failed"),
    ])
    def test_failed_ticks_back_off_and_a_later_one_drains_the_queue(self, desk: Desk, error: Exception,
                                                                    event: str) -> None:
        """The ticker survives failing ticks, waiting twice as long after each, and then decides the
        deferred intent."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, Decimal(40), Decimal(150))
        wish = intent(quantity=Decimal(40), source="strategy:sma_crossover")
        desk.send(wish)
        desk.risk.portfolio.release("p1", "canceled")
        real_count, calls = desk.risk.deferred.count, []

        def count_failing_thrice() -> int:
            calls.append(1)
            if len(calls) <= 3:
                raise error
            return real_count()

        desk.risk.deferred.count = count_failing_thrice  # type: ignore[method-assign]
        stop = threading.Event()
        ticker = threading.Thread(target=desk.risk.run_ticks, args=(stop,))
        with capture_logs() as logs:
            ticker.start()
            try:
                wait_for(lambda: desk.orders() != [], timeout=30, message="the deferred intent's order")
            finally:
                stop.set()
                ticker.join(30)
        assert [o.intent_id for o in desk.orders()] == [wish.id]
        assert [(e["event"], e["retry_in_s"]) for e in logs if "retry_in_s" in e] == [
            (event, 0.1), (event, 0.2), (event, 0.4)]

class TestRedisRefusingWrites:
    """Risk on a real redis-server whose memory is full (maxmemory 1 under noeviction) for a moment."""

    def test_a_reservation_refused_by_a_full_redis_is_decided_again_not_rejected(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Redis refusing writes just while the reservation is written: no rejection is published for
        it (writes are back by then); the intent stays in hand and is approved on the next try."""
        server = RedisServer(free_port(), tmp_path / "redis", appendonly=False)
        server.start()
        client = connect_url(server.url)
        clock = LiveClock()
        settings = Settings(portfolio={"starting_cash": "10000"}, limits={"max_position_fraction": "1"},
                            bus={"block_ms": 100})
        broker = FakeBroker(lambda call: broker_account() if call.method == "account"
                            else call.method == "market_open")
        risk = RiskService(client, KEYS, settings, clock, broker=broker)
        snapshot, settle = risk.account.snapshot, risk._settle

        def full_after_the_reads(reads: Any) -> Any:
            monkeypatch.setattr(risk.account, "snapshot", snapshot)
            client.config_set("maxmemory", 1)
            return snapshot(reads)

        def writes_back_before_settling(*args: Any) -> None:
            monkeypatch.setattr(risk, "_settle", settle)
            client.config_set("maxmemory", 0)
            settle(*args)

        monkeypatch.setattr(risk.account, "snapshot", full_after_the_reads)
        monkeypatch.setattr(risk, "_settle", writes_back_before_settling)
        consumer = Consumer(client, KEYS, stream=INTENTS, group="risk", handler=risk.handle_intent,
                            settings=settings.bus, clock=clock, name="risk-1")
        stop = threading.Event()
        runner = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        try:
            risk.portfolio.open()
            client.hset(KEYS.bar_arrival, "AAPL", clock.now().isoformat())
            client.hset(KEYS.last_price, "AAPL", "150")
            publish(client, KEYS, INTENTS, intent(quantity=Decimal(1), time=clock.now()))
            with capture_logs() as logs:
                runner.start()
                wait_for(lambda: client.xlen(KEYS.stream(ORDERS)) == 1, timeout=30, message="the order")
                stop.set()
                runner.join(30)
            assert client.xlen(KEYS.stream(REJECTIONS)) == 0
            assert list(risk.portfolio.snapshot().reservations) == [codec.decode(
                client.xrange(KEYS.stream(ORDERS))[0][1]).intent_id]
            failures = ("bus.redis", "bus.handler", "bus.dead")
            assert [e["event"] for e in logs if e["event"].startswith(failures)] == ["bus.redis_unavailable"]
        finally:
            stop.set()
            client.close()
            server.stop()
