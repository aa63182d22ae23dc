"""An oco order through alpaca-py's own TradingClient, against the paper exchange as an OS process."""

from __future__ import annotations

from typing import Any

import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, OrderStatus, OrderType, QueryOrderStatus, TimeInForce
from alpaca.trading.models import Order
from alpaca.trading.requests import (
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)

from tests.support.paper import KEY_ID, SECRET, PaperExchange
from tests.support.processes import wait_for

pytestmark = pytest.mark.multiprocess


def _order(client: TradingClient, order_id: Any) -> Order:
    found = client.get_order_by_id(order_id)
    assert isinstance(found, Order)
    return found


def _exit(**extra: Any) -> LimitOrderRequest:
    return LimitOrderRequest(symbol="AAPL", qty=5, side=OrderSide.SELL, time_in_force=TimeInForce.GTC,
                             order_class=OrderClass.OCO, take_profit=TakeProfitRequest(limit_price=110),
                             stop_loss=StopLossRequest(stop_price=95, limit_price=94.5), **extra)


def test_an_oco_round_trips_through_alpaca_py(exchange: PaperExchange) -> None:
    """alpaca-py's LimitOrderRequest with order_class oco (no limit_price of its own) places the
    take-profit with its stop-limit leg, both working; a nested listing parses with the leg under its
    parent; a limit_price other than the take-profit's is an APIError 422; a bar through the
    take-profit fills it and cancels the leg."""
    client = TradingClient(KEY_ID, SECRET, url_override=exchange.url)
    entry = client.submit_order(MarketOrderRequest(symbol="AAPL", qty=5, side=OrderSide.BUY,
                                                   time_in_force=TimeInForce.GTC))
    assert isinstance(entry, Order)
    exchange.bar("AAPL", "100", "100", "100", "100")
    wait_for(lambda: _order(client, entry.id).status == OrderStatus.FILLED, message="the entry to fill")

    with pytest.raises(APIError) as refused:
        client.submit_order(_exit(limit_price=109))
    assert refused.value.status_code == 422
    assert "limit_price of an oco order must equal take_profit.limit_price" in refused.value.message

    placed = client.submit_order(_exit(client_order_id="exit"))
    assert isinstance(placed, Order)
    (leg,) = placed.legs or []
    assert (placed.order_class, placed.type, placed.limit_price, placed.status) == (
        OrderClass.OCO, OrderType.LIMIT, "110", OrderStatus.NEW)
    assert (leg.type, leg.stop_price, leg.limit_price, leg.side, leg.status) == (
        OrderType.STOP_LIMIT, "95", "94.5", OrderSide.SELL, OrderStatus.NEW)
    assert placed.client_order_id == "exit" and leg.client_order_id != "exit"
    nested = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True))
    assert [(o.id, [child.id for child in o.legs or []]) for o in nested] == [  # type: ignore[union-attr]
        (placed.id, [leg.id])]

    exchange.bar("AAPL", "104", "111", "103", "110")

    def closed() -> Order | None:
        found = _order(client, placed.id)
        return found if found.status == OrderStatus.FILLED else None

    filled = wait_for(closed, message="the take-profit to fill")
    assert filled.filled_avg_price == "110"
    assert [child.status for child in filled.legs or []] == [OrderStatus.CANCELED]
    assert client.get_all_positions() == []
