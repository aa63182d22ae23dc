"""The reconciliation rule: what broker state our state predicts, and which differences count.

Pure functions over two views, read separately: :class:`Ours` (the portfolio snapshot and the
executor's order records) and :class:`Theirs` (the broker's account, positions and orders).

The rule, per symbol and for cash::

    predicted broker position = our position + unapplied fills of our open orders
    predicted broker cash     = our cash     - cost of unapplied buy fills + proceeds of unapplied sells

An order's *unapplied* fill is what the broker reports filled (cumulative quantity x average
price) minus what the executor has applied (``applied_qty``/``applied_cost`` in its record). So a
normal in-flight order -- filled at the broker a moment ago, its update not yet applied here --
explains its own difference and is listed under ``in_flight``, not as a difference. Reserved cash
is ours only (the broker never sees a reservation): cash compares against the portfolio's
``cash``, not its buying power. When an unapplied fill has no average price, cash is not compared
on that pass (the report says so).

A position difference above ``quantity_tolerance``, or a cash difference above
``cash_tolerance``, *halts* (the caller engages the kill switch once it is confirmed). Order
differences (an order open at the broker we do not know, one open here that the broker does not
have, one terminal on one side and open on the other) are reported and alerted, never halted on:
the money they move shows up as a position or cash difference if it is real.

The two views are read one after the other, not atomically, so a fill landing between the reads
can produce a difference that is gone a moment later; the service confirms a difference by
looking again (see :mod:`services.reconciler.service`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.brokers import BrokerOrder
from shared.models import OrderStatus, Side

__all__ = ["Difference", "OurOrder", "Ours", "Outcome", "Theirs", "compare"]

ZERO = Decimal(0)
_NOT_YET_AT_BROKER = {OrderStatus.PENDING_SUBMIT, OrderStatus.UNKNOWN}


@dataclass(frozen=True)
class OurOrder:
    """The executor's record of one order (``<prefix>:order:<client_order_id>``)."""

    client_order_id: str
    symbol: str
    side: Side
    status: OrderStatus
    quantity: Decimal
    applied_qty: Decimal
    applied_cost: Decimal

    @classmethod
    def from_record(cls, cid: str, record: Mapping[str, str]) -> OurOrder:
        """Parse a record as the executor writes it."""
        return cls(client_order_id=cid, symbol=record.get("symbol", ""), side=Side(record.get("side", "buy")),
                   status=OrderStatus(record.get("status", OrderStatus.UNKNOWN.value)),
                   quantity=Decimal(record.get("quantity", "0")),
                   applied_qty=Decimal(record.get("applied_qty", "0")),
                   applied_cost=Decimal(record.get("applied_cost", "0")))


@dataclass(frozen=True)
class Ours:
    """Our side: portfolio cash and positions, and the orders the executor holds open.

    ``records`` also holds the record (open or not) of every order the broker reports open, so a
    broker order we closed here is told apart from one we never placed.
    """

    opened: bool
    cash: Decimal
    reserved: Decimal
    positions: Mapping[str, Decimal]
    open_orders: Mapping[str, OurOrder]
    records: Mapping[str, OurOrder] = field(default_factory=dict)


@dataclass(frozen=True)
class Theirs:
    """The broker's side. ``looked_up``: our open orders absent from its open list (None: not found)."""

    cash: Decimal
    positions: Mapping[str, Decimal]
    open_orders: Mapping[str, BrokerOrder]
    looked_up: Mapping[str, BrokerOrder | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Difference:
    """One way the two sides disagree. ``halts``: beyond tolerance on money or positions."""

    kind: str  # position | cash | order_unknown_here | order_missing_at_broker | order_status
    subject: str  # the symbol, "cash", or the client_order_id
    ours: str
    broker: str
    delta: str
    halts: bool
    text: str

    @property
    def signature(self) -> tuple[str, str, str]:
        """What must match for a second look to confirm this difference."""
        return self.kind, self.subject, self.delta

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the report."""
        return {"kind": self.kind, "subject": self.subject, "ours": self.ours, "broker": self.broker,
                "delta": self.delta, "halts": self.halts, "text": self.text}


@dataclass
class Outcome:
    """What one comparison found."""

    differences: list[Difference] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # differences explained by unapplied fills
    in_flight_orders: set[str] = field(default_factory=set)  # the client_order_ids behind them
    cash_compared: bool = True


def compare(ours: Ours, theirs: Theirs, *, cash_tolerance: Decimal, quantity_tolerance: Decimal) -> Outcome:
    """Compare the two views under the module's rule."""
    outcome = Outcome()
    unapplied_qty: dict[str, Decimal] = {}
    unapplied_cash = ZERO
    for cid, order in sorted(ours.open_orders.items()):
        broker = theirs.open_orders.get(cid)
        if broker is None:
            broker = theirs.looked_up.get(cid)
        if broker is None:
            if order.status in _NOT_YET_AT_BROKER:
                outcome.in_flight.append(f"{cid}: {order.status.value}, not yet at the broker")
                outcome.in_flight_orders.add(cid)
            else:
                outcome.differences.append(Difference(
                    "order_missing_at_broker", cid, order.status.value, "not found", "", False,
                    f"order {cid} ({order.side.value} {order.quantity} {order.symbol}) is "
                    f"{order.status.value} here but the broker does not have it"))
            continue
        if broker.status.is_terminal:
            outcome.differences.append(Difference(
                "order_status", cid, order.status.value, broker.status.value, "", False,
                f"order {cid} is {broker.status.value} at the broker but still {order.status.value} here"))
        filled = broker.filled_quantity
        if filled == order.applied_qty:
            continue
        if filled < order.applied_qty:
            outcome.differences.append(Difference(
                "order_status", cid, f"applied {order.applied_qty}", f"filled {filled}",
                str(filled - order.applied_qty), False,
                f"order {cid}: {order.applied_qty} applied here but only {filled} filled at the broker"))
            continue
        sign = Decimal(1) if order.side is Side.BUY else Decimal(-1)
        extra = filled - order.applied_qty
        outcome.in_flight_orders.add(cid)
        unapplied_qty[order.symbol] = unapplied_qty.get(order.symbol, ZERO) + sign * extra
        if broker.filled_avg_price is None:
            outcome.cash_compared = False
            outcome.in_flight.append(f"{cid}: {extra} filled at the broker, not yet applied (no price yet)")
            continue
        cost = broker.filled_avg_price * filled - order.applied_cost
        unapplied_cash -= sign * cost
        outcome.in_flight.append(f"{cid}: {order.side.value} {extra} {order.symbol} filled at the broker "
                                 f"for {cost}, not yet applied")
    for cid, broker in sorted(theirs.open_orders.items()):
        if cid in ours.open_orders:
            continue
        record = ours.records.get(cid)
        if record is None:
            outcome.differences.append(Difference(
                "order_unknown_here", cid, "none", broker.status.value, "", False,
                f"the broker has an open order {cid} ({broker.side.value} {broker.quantity} {broker.symbol}) "
                f"that Bastion did not place or no longer tracks"))
        else:
            outcome.differences.append(Difference(
                "order_status", cid, record.status.value, broker.status.value, "", False,
                f"order {cid} is {record.status.value} here but {broker.status.value} at the broker"))
    for symbol in sorted(set(ours.positions) | set(theirs.positions) | set(unapplied_qty)):
        held = ours.positions.get(symbol, ZERO)
        predicted = held + unapplied_qty.get(symbol, ZERO)
        actual = theirs.positions.get(symbol, ZERO)
        delta = actual - predicted
        if delta == 0:
            continue
        beyond = abs(delta) > quantity_tolerance
        explained = f" (+{unapplied_qty[symbol]} unapplied)" if symbol in unapplied_qty else ""
        outcome.differences.append(Difference(
            "position", symbol, f"{held}{explained}", str(actual), str(delta), beyond,
            f"position {symbol}: broker {actual}, ours {held}{explained}, difference {delta}"
            + (f" beyond tolerance {quantity_tolerance}" if beyond else " within tolerance")))
    if outcome.cash_compared:
        predicted_cash = ours.cash + unapplied_cash
        delta = theirs.cash - predicted_cash
        if delta != 0:
            beyond = abs(delta) > cash_tolerance
            explained = f" ({unapplied_cash:+} unapplied)" if unapplied_cash else ""
            outcome.differences.append(Difference(
                "cash", "cash", f"{ours.cash}{explained}", str(theirs.cash), str(delta), beyond,
                f"cash: broker {theirs.cash}, ours {ours.cash}{explained}, difference {delta}"
                + (f" beyond tolerance {cash_tolerance}" if beyond else " within tolerance")))
    return outcome
