"""The account a strategy sees (``self.account``): read by the worker once per pass, frozen."""

from __future__ import annotations

import dataclasses
import threading
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import redis
from pydantic import BaseModel
from redis.client import Pipeline

from services.strategy import AccountView, OpenOrder, Strategy, StrategyWorker, register
from shared.keys import Keys
from shared.models import Bar, Intent, OrderStatus, OrderType, Side
from shared.portfolio import Portfolio
from shared.safety.trading_state import KillSwitch, TradingState
from tests.services.strategy.test_strategy import bar, publish, settings, worker
from tests.support import factories


class NoParams(BaseModel):
    pass


class Seen(BaseModel):
    bars: int = 0


@register
class AccountSpy(Strategy[NoParams, Seen]):
    """Records the view it is given on every bar (the class keeps them: tests reset it)."""

    name = "account_spy"
    params_model = NoParams
    state_model = Seen
    seen: ClassVar[list[tuple[int, AccountView]]] = []

    def on_bar(self, bar: Bar) -> list[Intent]:
        self.state.bars += 1
        type(self).seen.append((bar.trade_count or 0, self.account))
        return []


@register
class GreedySpy(AccountSpy):
    """Tries to change its view on the bar with trade_count 0."""

    name = "greedy_spy"

    def on_bar(self, bar: Bar) -> list[Intent]:
        if bar.trade_count == 0:
            self.account.__setattr__("equity", Decimal(10**9))
        return super().on_bar(bar)


@pytest.fixture(autouse=True)
def _reset_spy() -> None:
    AccountSpy.seen = []


def order_record(client: redis.Redis, keys: Keys, cid: str, symbol: str, status: str = "new",
                 **fields: str) -> None:
    """An order as the executor records it: its hash, and its id in the open-order set."""
    record = {"status": status, "symbol": symbol, "side": "buy", "quantity": "5", "order_type": "limit",
              "applied_qty": "0", "applied_cost": "0", "reservation_id": f"r-{cid}", **fields}
    client.hset(keys.order(cid), mapping=record)  # type: ignore[arg-type]
    client.sadd(keys.open_orders, cid)


def book(client: redis.Redis, keys: Keys) -> Portfolio:
    """Account ``paper`` with 10,000: 10 AAPL bought at 100, and 5 more reserved at 100 (10 bps buffer)."""
    portfolio = Portfolio(client, keys, "paper")
    portfolio.open(Decimal("10000"))
    portfolio.reserve("r-1", "AAPL", Side.BUY, Decimal(10), Decimal(100))
    portfolio.apply_fill("r-1", factories.fill("f-1", "10", "100"))
    portfolio.reserve("r-2", "AAPL", Side.BUY, Decimal(5), Decimal(100))
    return portfolio


def spy_worker(client: redis.Redis, keys: Keys) -> StrategyWorker:
    return worker(client, keys, settings("account_spy", warmup="none"))


class TestAccountView:
    def test_on_bar_sees_position_equity_buying_power_orders_and_state(self, redis_client: redis.Redis,
                                                                       keys: Keys) -> None:
        """The view holds the symbol's position and average cost, equity at the last marks, cash
        less reservations, the symbol's open orders (not other symbols', not terminal ones, not a
        set member without a record) and the trading state."""
        book(redis_client, keys)
        order_record(redis_client, keys, "c-open", "AAPL", applied_qty="2", status="partially_filled")
        order_record(redis_client, keys, "c-msft", "MSFT")
        order_record(redis_client, keys, "c-done", "AAPL", status="filled")
        redis_client.sadd(keys.open_orders, "c-gone")
        KillSwitch(redis_client, keys).engage(TradingState.REDUCING, by="test", reason="drill")
        publish(redis_client, keys, [bar("AAPL", 0, "104"), bar("MSFT", 0, "50"), bar("AAPL", 1, "105")])
        spy_worker(redis_client, keys).run(threading.Event(), burst=True)
        aapl = [view for _, view in AccountSpy.seen if view.symbol == "AAPL"]
        assert len(aapl) == 2 and aapl[0] is aapl[1]  # one read for the pass
        # cash 9000 + 10 AAPL at 105 (its newest close: marks are read after the bars are published)
        assert aapl[0] == AccountView(
            symbol="AAPL", position_qty=Decimal(10), avg_cost=Decimal(100), equity=Decimal("10050"),
            buying_power=Decimal("8499.5"),  # 9000 - 5 x 100 x 1.001 held for r-2
            open_orders=(OpenOrder("c-open", Side.BUY, Decimal(5), Decimal(2), OrderStatus.PARTIALLY_FILLED,
                                   OrderType.LIMIT),),
            trading_state=TradingState.REDUCING)
        [msft] = [view for _, view in AccountSpy.seen if view.symbol == "MSFT"]
        assert (msft.position_qty, msft.avg_cost, msft.equity) == (Decimal(0), Decimal(0), Decimal("10050"))
        assert [o.client_order_id for o in msft.open_orders] == ["c-msft"]

    def test_each_pass_reads_the_account_afresh(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A fill booked between two passes is in the second pass's view, and a flat account's
        view is all zeros and ACTIVE."""
        spy = spy_worker(redis_client, keys)
        spy.upkeep()
        publish(redis_client, keys, [bar("AAPL", 0, "100")])
        assert spy.step() == 1
        book(redis_client, keys)
        publish(redis_client, keys, [bar("AAPL", 1, "110")])
        assert spy.step() == 1
        (_, before), (_, after) = AccountSpy.seen
        assert before == AccountView("AAPL")
        assert (after.position_qty, after.equity) == (Decimal(10), Decimal("10100"))

    def test_an_open_orders_record_is_read_only_while_it_may_be_of_the_pass(
            self, redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        """An order's symbol never changes: once a worker has read a record of another symbol, it
        reads it no more; the records of the pass's symbol are read every pass."""
        order_record(redis_client, keys, "c-aapl", "AAPL")
        order_record(redis_client, keys, "c-other", "MSFT")
        read: list[str] = []
        real = Pipeline.hgetall

        def hgetall(pipe: Pipeline, name: str) -> Any:
            read.append(name)
            return real(pipe, name)

        monkeypatch.setattr(Pipeline, "hgetall", hgetall)
        spy = spy_worker(redis_client, keys)
        spy.upkeep()
        publish(redis_client, keys, [bar("AAPL", 0, "100")])
        assert spy.step() == 1
        assert {keys.order("c-aapl"), keys.order("c-other")} <= set(read)
        read.clear()
        publish(redis_client, keys, [bar("AAPL", 1, "100")])
        assert spy.step() == 1
        assert keys.order("c-aapl") in read and keys.order("c-other") not in read
        assert [o.client_order_id for o in AccountSpy.seen[-1][1].open_orders] == ["c-aapl"]


class TestFrozen:
    def test_the_view_and_its_orders_cannot_be_changed(self) -> None:
        """Assigning a field of the view or of an order raises, and the orders are a tuple."""
        order = OpenOrder("c-1", Side.BUY, Decimal(1), Decimal(0), OrderStatus.NEW, OrderType.MARKET)
        view = AccountView("AAPL", position_qty=Decimal(3), open_orders=(order,))
        with pytest.raises(dataclasses.FrozenInstanceError):
            view.position_qty = Decimal(100)  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            order.status = OrderStatus.CANCELED  # type: ignore[misc]
        with pytest.raises(AttributeError):
            view.open_orders.append(order)  # type: ignore[attr-defined]
        assert view == AccountView("AAPL", position_qty=Decimal(3), open_orders=(order,))

    def test_a_strategy_cannot_replace_its_view(self) -> None:
        """``self.account`` has no setter; a strategy built outside a worker sees a flat account."""
        spy = AccountSpy("AAPL", NoParams(), Seen())
        assert spy.account == AccountView("AAPL", trading_state=TradingState.ACTIVE)
        with pytest.raises(AttributeError):
            spy.account = AccountView("AAPL", equity=Decimal(10**9))  # type: ignore[misc]

    def test_a_strategy_changing_its_view_fails_that_bar_only(self, redis_client: redis.Redis,
                                                            keys: Keys) -> None:
        """A strategy that tries to change the view raises; the bar is dead-lettered and the next
        bar sees the view unchanged."""
        publish(redis_client, keys, [bar("AAPL", 0, "100"), bar("AAPL", 1, "100")])
        stats = worker(redis_client, keys, settings("greedy_spy", warmup="none")).run(threading.Event(),
                                                                                     burst=True)
        assert stats.dead_lettered == 1
        assert [(seq, view.equity) for seq, view in AccountSpy.seen] == [(1, Decimal(0))]
