"""The risk service's decisions, on in-process fakeredis with a real portfolio."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import fakeredis
import pytest
import redis

from services.risk.service import RiskService, client_order_id
from shared import codec
from shared.bus import Delivery
from shared.clock import SimulatedClock
from shared.config import Settings
from shared.keys import INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import Bar, Intent, IntentRejected, Order, OrderType, Side

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


@pytest.fixture
def client() -> redis.Redis:
    """In-process fakeredis."""
    return fakeredis.FakeRedis()


@pytest.fixture
def risk(client: redis.Redis) -> RiskService:
    """A risk service on a $10,000 account with AAPL marked at $150."""
    settings = Settings(portfolio={"starting_cash": "10000"}, risk={"max_position_fraction": "1"})
    service = RiskService(client, Keys("t"), settings, SimulatedClock(T0))
    service.portfolio.open()
    bar = Bar(time=T0, symbol="AAPL", open=Decimal(150), high=Decimal(150), low=Decimal(150),
              close=Decimal(150), volume=Decimal(100))
    service.handle_bar(Delivery("bars", "1-0", bar, 1))
    return service


def intent(side: Side = Side.BUY, **fields: object) -> Intent:
    """A manual intent for AAPL."""
    values: dict[str, object] = {"quantity": Decimal(10), "symbol": "AAPL", "time": T0, "source": "test"}
    values.update(fields)
    return Intent(side=side, **values)  # type: ignore[arg-type]


def published(client: redis.Redis, stream: str) -> list[object]:
    """Decoded messages on ``stream``."""
    return [codec.decode(fields) for _, fields in client.xrange(Keys("t").stream(stream))]


def deliver(risk: RiskService, message: Intent) -> None:
    """Hand ``message`` to the service as the bus would."""
    risk.handle_intent(Delivery(INTENTS, "1-0", message, 1))


class TestApproval:
    def test_affordable_buy_becomes_an_order_with_its_reservation(self, risk: RiskService,
                                                                  client: redis.Redis) -> None:
        """A buy that cash covers is reserved and published as an order keyed by the intent id."""
        wish = intent()
        deliver(risk, wish)
        [order] = published(client, ORDERS)
        assert isinstance(order, Order)
        assert (order.client_order_id, order.reservation_id, order.quantity) == (
            client_order_id(wish.id), wish.id, Decimal(10))
        assert risk.portfolio.snapshot().reserved == Decimal("1501.5")  # 10 x 150 + 10 bps buffer

    def test_notional_is_sized_to_whole_shares(self, risk: RiskService, client: redis.Redis) -> None:
        """A notional intent buys the whole shares it affords at the last price."""
        deliver(risk, intent(quantity=None, notional=Decimal("1000")))
        [order] = published(client, ORDERS)
        assert isinstance(order, Order) and order.quantity == Decimal(6)

    def test_redelivered_intent_is_published_once(self, risk: RiskService, client: redis.Redis) -> None:
        """The same intent delivered twice yields one order and one reservation."""
        wish = intent()
        deliver(risk, wish)
        deliver(risk, wish)
        assert len(published(client, ORDERS)) == 1
        assert risk.portfolio.snapshot().reserved == Decimal("1501.5")


class TestRefusal:
    @pytest.mark.parametrize(
        ("wish", "reason"),
        [
            (intent(order_type=OrderType.LIMIT, limit_price=Decimal(9995), quantity=Decimal(1)),
             "insufficient funds"),
            (intent(quantity=Decimal(100)), "above max_position_fraction"),
            (intent(Side.SELL), "insufficient AAPL"),
            (intent(symbol="MSFT"), "no price for MSFT"),
            (intent(quantity=None, notional=Decimal("100")), "buys no whole share"),
            (intent(order_type=OrderType.LIMIT, limit_price=Decimal("0.01"), quantity=Decimal(1)),
             "below min_order_notional"),
        ],
    )
    def test_refused_intent_is_published_with_its_reason(self, risk: RiskService, client: redis.Redis,
                                                         wish: Intent, reason: str) -> None:
        """An intent risk refuses goes to the rejections stream with a reason, and nothing is reserved."""
        deliver(risk, wish)
        assert published(client, ORDERS) == []
        [rejection] = published(client, REJECTIONS)
        assert isinstance(rejection, IntentRejected) and reason in rejection.reason
        assert rejection.intent_id == wish.id
        assert risk.portfolio.snapshot().reserved == 0

    def test_second_buy_beyond_cash_is_refused(self, risk: RiskService, client: redis.Redis) -> None:
        """Two buys of 40 @ 150 on $10,000: the first is approved, the second refused."""
        deliver(risk, intent(quantity=Decimal(40)))
        deliver(risk, intent(quantity=Decimal(40)))
        assert len(published(client, ORDERS)) == 1
        assert len(published(client, REJECTIONS)) == 1

    def test_halted_refuses_everything(self, risk: RiskService, client: redis.Redis) -> None:
        """With the trading state HALTED no intent is approved."""
        client.hset(Keys("t").trading_state, "state", "HALTED")
        deliver(risk, intent())
        [rejection] = published(client, REJECTIONS)
        assert isinstance(rejection, IntentRejected) and "HALTED" in rejection.reason

    def test_position_limit(self, client: redis.Redis) -> None:
        """A buy that would take the position above max_position_fraction of equity is refused."""
        settings = Settings(portfolio={"starting_cash": "10000"}, risk={"max_position_fraction": "0.1"})
        service = RiskService(client, Keys("t"), settings, SimulatedClock(T0))
        service.portfolio.open()
        service.portfolio.set_mark("AAPL", Decimal(150))
        deliver(service, intent(quantity=Decimal(6)))  # 900 <= 1,000
        deliver(service, intent(quantity=Decimal(7)))  # 1,050 > 1,000
        assert len(published(client, ORDERS)) == 1
        [rejection] = published(client, REJECTIONS)
        assert isinstance(rejection, IntentRejected) and "max_position_fraction" in rejection.reason
