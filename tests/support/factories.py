"""Model factories: one builder per message the tests make, valid unless a test says otherwise.

Each builder fills in what a test does not care about; a keyword names any other field of the
model and is passed on as given (a string stays a string), so a test building an invalid message
meets the model's own validation. Times default to :data:`T0`, where ``SimulatedClock()`` starts.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from shared.brokers import OrderRequest
from shared.models import Bar, Fill, Intent, Order, OrderType, Side, TimeInForce

T0 = datetime(2026, 1, 2, 14, 30, tzinfo=UTC)  # SimulatedClock()'s start: 9:30 in New York


def bar(symbol: str = "AAPL", minute: int = 0, price: Decimal | str | None = None, **fields: Any) -> Bar:
    """A bar of ``symbol`` starting ``minute`` minutes after T0, volume 1000: flat at ``price`` (open,
    high, low and close alike) when given, else open 10, high 12, low 9, close 11."""
    if price is None:
        prices: dict[str, Any] = {"open": Decimal(10), "high": Decimal(12), "low": Decimal(9),
                                  "close": Decimal(11)}
    else:
        prices = dict.fromkeys(("open", "high", "low", "close"), price)
    values = {"time": T0 + timedelta(minutes=minute), "symbol": symbol, **prices, "volume": Decimal(1000)}
    return Bar(**(values | fields))


def intent(side: Side | str = Side.BUY, **fields: Any) -> Intent:
    """A manual market intent for 10 AAPL at T0."""
    values: dict[str, Any] = {"time": T0, "source": "manual", "symbol": "AAPL", "quantity": Decimal(10)}
    return Intent(side=side, **(values | fields))


def order(**fields: Any) -> Order:
    """Risk's market order for 5 AAPL on account ``paper``: intent ``i-1``, client order id ``c-1``,
    reservation ``r-1``."""
    values: dict[str, Any] = {"time": T0, "intent_id": "i-1", "client_order_id": "c-1", "account": "paper",
                              "symbol": "AAPL", "side": Side.BUY, "quantity": Decimal(5),
                              "reservation_id": "r-1"}
    return Order(**(values | fields))


def fill(fill_id: str, qty: str, price: str, fee: str = "0", **fields: Any) -> Fill:
    """A fill of ``qty`` at ``price`` (and ``fee``) at T0."""
    return Fill(fill_id=fill_id, quantity=Decimal(qty), price=Decimal(price), fee=Decimal(fee),
                **({"time": T0} | fields))


def market_request(cid: str, qty: str = "10", side: Side = Side.BUY, symbol: str = "AAPL") -> OrderRequest:
    """What the executor asks a broker for: a market order, client order id ``cid``."""
    return OrderRequest(client_order_id=cid, symbol=symbol, side=side, quantity=Decimal(qty))


def resting_request(cid: str) -> OrderRequest:
    """A buy limit far below the market (1 AAPL at $1, good till cancelled): it never fills."""
    return OrderRequest(client_order_id=cid, symbol="AAPL", side=Side.BUY, quantity=Decimal(1),
                        order_type=OrderType.LIMIT, limit_price=Decimal("1"), time_in_force=TimeInForce.GTC)
