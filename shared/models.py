"""The messages Bastion's pipeline carries, as validated pydantic models.

Money and quantities are ``Decimal`` (never float, exact on the wire through :mod:`shared.bus.codec`);
times are aware UTC datetimes from the injected Clock. Every message has a ``TYPE`` and a schema
``VERSION``; bump the version when a change is not backward compatible, and teach the codec to
read the old one.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.clock import utc

__all__ = [
    "CLIENT_ORDER_PREFIX",
    "Alert",
    "AlertSeverity",
    "Bar",
    "ExitReason",
    "Fill",
    "Intent",
    "IntentRejected",
    "Message",
    "Order",
    "OrderEvent",
    "OrderStatus",
    "OrderType",
    "Quantity",
    "Side",
    "TimeInForce",
    "new_id",
]


CLIENT_ORDER_PREFIX = "bst-"  # every client_order_id Bastion gives the broker starts with it


def new_id() -> str:
    """A fresh message id (uuid4, hex)."""
    return uuid.uuid4().hex


# pydantic refuses NaN and infinities in a Decimal field (allow_inf_nan is off by default for
# Decimal), in its Rust validator: no Python check per field is needed.
Price = Annotated[Decimal, Field(gt=0)]
Quantity = Annotated[Decimal, Field(gt=0)]
NonNegative = Annotated[Decimal, Field(ge=0)]
Symbol = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Z0-9./-]+$")]


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"
    STOP = "stop"
    STOP_LIMIT = "stop_limit"


class TimeInForce(StrEnum):
    DAY = "day"
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"


class OrderStatus(StrEnum):
    """Our order states; Alpaca's statuses map onto these."""

    PENDING_SUBMIT = "pending_submit"  # recorded, not yet acknowledged by the broker
    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    PENDING_CANCEL = "pending_cancel"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    REPLACED = "replaced"
    PENDING_REPLACE = "pending_replace"
    UNKNOWN = "unknown"  # ambiguous submit, being resolved by client_order_id

    @property
    def is_terminal(self) -> bool:
        """No further fill can arrive for an order in this state."""
        return self in {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED,
                        OrderStatus.REJECTED, OrderStatus.REPLACED}


class ExitReason(StrEnum):
    """Why a position was reduced: what protections (StoplossGuard) and reports count by."""

    SIGNAL = "signal"  # a strategy's or an operator's exit
    STOP_LOSS = "stop_loss"  # a protective stop filled, or a strategy's own stop-loss exit
    TAKE_PROFIT = "take_profit"  # a protective take-profit filled, or a strategy's exit at its target
    TRAILING_STOP = "trailing_stop"
    PROTECTION_FAILED = "protection_failed"  # flattened because no protective stop could be placed
    FLATTEN = "flatten"  # the kill switch flattened the position

    @property
    def is_stop(self) -> bool:
        """An exit StoplossGuard counts (when its profit is below the required profit)."""
        return self in {ExitReason.STOP_LOSS, ExitReason.TRAILING_STOP, ExitReason.PROTECTION_FAILED}


class AlertSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Message(BaseModel):
    """Base of every message: an id, a time, and the type and version the codec writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    id: str = Field(default_factory=new_id, min_length=1)
    time: datetime

    @field_validator("time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return utc(value)

    @property
    def symbol_field(self) -> str | None:
        """The symbol this message concerns, if any (an envelope field)."""
        value = getattr(self, "symbol", None)
        return value if isinstance(value, str) else None

    @property
    def correlation_id(self) -> str | None:
        """The id that ties this message to one trade across services."""
        return None


class Bar(Message):
    """One OHLCV bar for a symbol; ``time`` is the bar's start."""

    TYPE: ClassVar[str] = "bar"

    symbol: Symbol
    open: Price
    high: Price
    low: Price
    close: Price
    volume: NonNegative
    vwap: Price | None = None
    trade_count: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _ohlc(self) -> Bar:
        if self.low > min(self.open, self.close) or self.high < max(self.open, self.close):
            raise ValueError(f"inconsistent bar: low={self.low} high={self.high} "
                             f"open={self.open} close={self.close}")
        return self


class Intent(Message):
    """A wish to trade, from a strategy or a manual ``bastion order``; ``id`` is the intent id.

    Size: ``quantity`` (shares), ``notional`` (money), or neither: risk sizes it (docs/RISK.md,
    "Sizing"). ``stop_loss`` is the price a protective stop guards an entry at once it fills, and
    ``take_profit`` the limit price of the profit target placed with it (one OCO pair; docs/RISK.md,
    "Protective exits"); ``exit_reason`` says why an exit is made.
    ``override_locks``: an operator's reason to enter past the protections' locks (a manual
    intent only; logged with the locks it passed).
    """

    TYPE: ClassVar[str] = "intent"

    source: str = Field(min_length=1)
    symbol: Symbol
    side: Side
    quantity: Quantity | None = None
    notional: Annotated[Decimal, Field(gt=0)] | None = None
    order_type: OrderType = OrderType.MARKET
    limit_price: Price | None = None
    stop_price: Price | None = None
    time_in_force: TimeInForce = TimeInForce.DAY
    stop_loss: Price | None = None
    take_profit: Price | None = None
    exit_reason: ExitReason = ExitReason.SIGNAL
    reason: str = ""
    override_locks: Annotated[str, Field(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Intent:
        if self.quantity is not None and self.notional is not None:
            raise ValueError("give quantity or notional, not both")
        if self.take_profit is not None and self.stop_loss is None:
            raise ValueError("a take_profit needs a stop_loss: the two are placed as one OCO pair")
        if self.override_locks is not None and self.source != "manual":
            raise ValueError("only a manual intent may override the protections' locks")
        _check_prices(self.order_type, self.limit_price, self.stop_price)
        return self

    @property
    def correlation_id(self) -> str | None:
        return self.id


class IntentRejected(Message):
    """Risk refused an intent; ``reason`` says why."""

    TYPE: ClassVar[str] = "intent_rejected"

    intent_id: str
    symbol: Symbol
    reason: str

    @property
    def correlation_id(self) -> str | None:
        return self.intent_id


class Order(Message):
    """An order approved by risk, with the reservation that pays for it.

    On an entry, ``stop_loss`` and ``take_profit`` are the exits the executor places once it fills.
    On a protective exit (``protects`` names the entry), a limit order with both is an OCO pair:
    the take-profit at ``limit_price`` with a stop-loss leg at ``stop_loss``."""

    TYPE: ClassVar[str] = "order"

    intent_id: str = Field(min_length=1)
    client_order_id: str = Field(min_length=1, max_length=128)
    account: str
    symbol: Symbol
    side: Side
    quantity: Quantity
    order_type: OrderType = OrderType.MARKET
    limit_price: Price | None = None
    stop_price: Price | None = None
    time_in_force: TimeInForce = TimeInForce.DAY
    reservation_id: str = Field(min_length=1)
    stop_loss: Price | None = None
    take_profit: Price | None = None
    exit_reason: ExitReason = ExitReason.SIGNAL
    protects: str | None = None  # a protective exit: the client_order_id of the entry it protects
    source: str = ""  # the intent's source ("strategy:<name>", "manual"): where its events are routed

    @model_validator(mode="after")
    def _shape(self) -> Order:
        _check_prices(self.order_type, self.limit_price, self.stop_price)
        return self

    @property
    def correlation_id(self) -> str | None:
        return self.intent_id


class Fill(BaseModel):
    """One execution: ``fill_id`` is unique per broker, so a repeat is recognised and ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fill_id: str = Field(min_length=1)
    quantity: Quantity
    price: Price
    fee: NonNegative = Decimal("0")
    time: datetime

    @field_validator("time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return utc(value)


class OrderEvent(Message):
    """A change in an order's life (new, partial fill, fill, cancel...), with the fill if any."""

    TYPE: ClassVar[str] = "order_event"

    client_order_id: str = Field(min_length=1)
    intent_id: str | None = None
    broker_order_id: str | None = None
    symbol: Symbol
    side: Side
    status: OrderStatus
    filled_quantity: NonNegative = Decimal("0")
    filled_avg_price: Price | None = None
    fill: Fill | None = None
    reason: str = ""

    @property
    def correlation_id(self) -> str | None:
        return self.client_order_id


class Alert(Message):
    """Something a human should know about."""

    TYPE: ClassVar[str] = "alert"

    severity: AlertSeverity
    source: str
    kind: str
    text: str
    details: dict[str, str] = Field(default_factory=dict)


def _check_prices(order_type: OrderType, limit: Decimal | None, stop: Decimal | None) -> None:
    needs_limit = order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
    needs_stop = order_type in (OrderType.STOP, OrderType.STOP_LIMIT)
    if needs_limit != (limit is not None):
        raise ValueError(f"{order_type} order {'needs' if needs_limit else 'takes no'} limit_price")
    if needs_stop != (stop is not None):
        raise ValueError(f"{order_type} order {'needs' if needs_stop else 'takes no'} stop_price")


MESSAGE_TYPES: tuple[type[Message], ...] = (Bar, Intent, IntentRejected, Order, OrderEvent, Alert)


def model_fields_for_log(message: Message) -> dict[str, Any]:
    """The correlation fields of ``message`` worth binding to log lines."""
    fields: dict[str, Any] = {"message_type": message.TYPE, "message_id": message.id}
    present = type(message).model_fields
    for name in ("intent_id", "client_order_id", "symbol"):
        if name in present:
            value = getattr(message, name)
            if value is not None:
                fields[name] = value
    if isinstance(message, Intent):
        fields["intent_id"] = message.id
    return fields
