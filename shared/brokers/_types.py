"""What a broker is to Bastion: the Broker protocol and the plain values it trades in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from shared.models import Order, OrderEvent, OrderStatus, OrderType, Side, TimeInForce
from shared.safety.rate_limit import RateLimiter

__all__ = ["Account", "Broker", "BrokerOrder", "OrderRequest", "Position", "TradeUpdates"]


@dataclass(frozen=True)
class OrderRequest:
    """An order to place. ``take_profit``/``stop_loss`` make an entry a bracket (both) or OTO
    (one); with ``oco``, the order is an exit: a take-profit limit with a stop-loss leg."""

    client_order_id: str
    symbol: str
    side: Side
    quantity: Decimal
    order_type: OrderType = OrderType.MARKET
    time_in_force: TimeInForce = TimeInForce.DAY
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    take_profit: Decimal | None = None  # the exit leg's limit price
    stop_loss: Decimal | None = None  # the exit leg's stop price
    stop_loss_limit: Decimal | None = None  # makes the stop-loss leg a stop-limit
    oco: bool = False

    @classmethod
    def from_order(cls, order: Order) -> OrderRequest:
        """The request for an approved order: a protective exit with a take-profit is an OCO pair
        (an entry's own ``stop_loss``/``take_profit`` are placed by the executor once it fills)."""
        oco = order.protects is not None and order.take_profit is not None
        return cls(client_order_id=order.client_order_id, symbol=order.symbol, side=order.side,
                   quantity=order.quantity, order_type=order.order_type, time_in_force=order.time_in_force,
                   limit_price=order.limit_price, stop_price=order.stop_price,
                   take_profit=order.take_profit if oco else None, stop_loss=order.stop_loss if oco else None,
                   oco=oco)


@dataclass(frozen=True)
class BrokerOrder:
    """An order as the broker has it."""

    broker_order_id: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: str
    quantity: Decimal
    filled_quantity: Decimal
    filled_avg_price: Decimal | None
    limit_price: Decimal | None
    stop_price: Decimal | None
    status: OrderStatus
    broker_status: str  # Alpaca's own word, for logs (held, accepted, done_for_day...)
    submitted_at: datetime | None
    order_class: str = "simple"
    legs: tuple[BrokerOrder, ...] = field(default=())


@dataclass(frozen=True)
class Position:
    """A position; ``quantity`` is negative when short."""

    symbol: str
    quantity: Decimal
    avg_entry_price: Decimal
    market_value: Decimal | None
    cost_basis: Decimal


@dataclass(frozen=True)
class Account:
    """Balances and flags that gate trading."""

    account_id: str
    currency: str
    cash: Decimal
    buying_power: Decimal
    equity: Decimal
    pattern_day_trader: bool
    trading_blocked: bool


class TradeUpdates(Protocol):
    """A live subscription to the broker's order events (open it before submitting)."""

    def wait_ready(self, timeout: float) -> bool:
        """Block until the broker confirmed the subscription; False at the deadline."""
        ...

    @property
    def connections(self) -> int:
        """How many times the subscription was confirmed; a reconnect, which loses the updates
        sent meanwhile, adds one."""
        ...

    def get(self, timeout: float) -> OrderEvent | None:
        """The next order event, or None if none came within ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Stop listening and release the connection."""
        ...


SUBMIT_ENDPOINT = "submit"  # the name order submits take slots under in the shared rate limit


class Broker(Protocol):
    """Everything a service asks of a broker. Every failure is a :class:`~shared.errors.BrokerError`.

    ``submit`` is idempotent per ``client_order_id``: an ambiguous outcome is resolved by looking
    the order up, never by sending it again; an id already used for the same order returns that
    order. Updates may repeat or arrive out of order at the broker; the stream removes repeats.
    """

    limiter: RateLimiter | None  # the shared request rate limit the broker's requests take slots of

    def submit(self, request: OrderRequest, *, prepaid: bool = False) -> BrokerOrder:
        """Place ``request``; ``prepaid``: the caller took its ``submit`` slot of :attr:`limiter`
        already (batched into one of its own round trips), so the first attempt takes none."""
        ...

    def cancel(self, client_order_id: str) -> None: ...

    def get_order(self, client_order_id: str) -> BrokerOrder: ...

    def open_orders(self) -> list[BrokerOrder]: ...

    def positions(self) -> list[Position]: ...

    def account(self) -> Account: ...

    def market_open(self) -> bool: ...

    def trade_updates(self) -> TradeUpdates: ...
