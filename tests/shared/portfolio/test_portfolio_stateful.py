"""Hypothesis stateful tests: random portfolio operations against an independent reference model.

The model (:class:`Model`) shares no code with :mod:`shared.portfolio._state` and does not read
the ledger: it keeps cash, reserved cash, each symbol's quantity, average cost and quantity held
for sells, realized PnL, fees and every reservation in its own terms, and after every step the
machine checks that ``Portfolio.snapshot()`` (and ``Portfolio.read()`` for the closed
reservations and applied fills) equals it exactly. ``verify`` still runs at the end, but it replays
the ledger through the portfolio's own arithmetic, so only the model can catch an arithmetic bug.

How the model computes:

* **Exactly.** Every amount is computed in :data:`EXACT`, a 60-digit Decimal context that traps
  ``Inexact``: the model never rounds by accident (a rounding would raise).
* **Average cost, rounded like the portfolio.** The one rounding the portfolio makes on purpose:
  each time a position grows (or opens), its average cost is set to the exact cost basis over
  the quantity, rounded **half-even to 10 decimal places** (``quantize(Decimal("1E-10"))`` in
  the portfolio's ``MONEY_CONTEXT``). The model takes the exact quotient as a ``Fraction`` and
  rounds it with ``round(fraction, 10)`` (Python rounds a Fraction half-even). Realized PnL is
  then exact against that rounded average: ``(price - avg) x closed quantity`` for a long,
  ``(avg - price) x closed quantity`` for a short; the part of a fill beyond a flat position
  opens the other side at the fill price. Fees are totalled apart, never in the average.
* **Fills are facts.** A fill is booked even beyond its reservation: an over-fill (it closes the
  reservation), a buy costing more than its reservation holds plus free cash (cash may go
  negative), a fill of a closed or never-made reservation when its side and symbol are given, a
  sell through zero with shorting off. The model says when a fill goes beyond, and the outcome's
  ``beyond`` and the ledger entry's ``beyond`` field must say so too (and say nothing otherwise).
  Once one has, the control invariants (cash >= 0, reserved <= cash, no short without
  ``allow_short``) are no longer expected; the structural ones always are.

Two machines run: shorting off, and shorting on (sells beyond the position open shorts that
buys then close).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, localcontext
from fractions import Fraction

import fakeredis
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shared.clock import SimulatedClock
from shared.config import PortfolioSettings
from shared.errors import (
    FillRefused,
    InsufficientFunds,
    InsufficientPosition,
    PortfolioError,
    UnknownReservation,
)
from shared.keys import Keys
from shared.models import Fill
from shared.portfolio import Portfolio, read_ledger, verify

D = Decimal
EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
ZERO = D(0)
START_CASH = D(5000)
FEE_BUFFER_BPS = D(10)
SYMBOLS = ("AAA", "BBB")
symbols = st.sampled_from(SYMBOLS)
prices = st.integers(100, 5000).map(lambda cents: D(cents) / 100)
fees = st.integers(0, 200).map(lambda cents: D(cents) / 100)
T0 = datetime(2026, 1, 2, tzinfo=UTC)


def round_avg(value: Fraction) -> Decimal:
    """``value`` rounded half-even to 10 decimal places (the portfolio's average-cost rounding)."""
    rounded = round(value, 10)  # Fraction.__round__ rounds half to even
    return D(rounded.numerator) / D(rounded.denominator)  # exact: a multiple of 1E-10


@dataclass
class Order:
    """A reservation as the model sees it."""

    side: str
    symbol: str
    qty: Decimal
    price: Decimal
    held: Decimal
    filled: Decimal = ZERO


@dataclass
class Holding:
    """One symbol: signed quantity, average cost of the open side, quantity held for sells."""

    qty: Decimal = ZERO
    avg: Decimal = ZERO
    sell_held: Decimal = ZERO


@dataclass
class Booked:
    """What the model says one fill did."""

    realized: Decimal
    completed: bool
    returned: Decimal
    beyond: bool
    before: Decimal


@dataclass
class Model:
    """The reference account: textbook rules, exact arithmetic, no shared code."""

    allow_short: bool
    cash: Decimal = START_CASH
    reserved: Decimal = ZERO
    realized: Decimal = ZERO
    fees: Decimal = ZERO
    version: int = 1  # the open
    beyond_seen: bool = False
    holdings: dict[str, Holding] = field(default_factory=dict)
    open: dict[str, Order] = field(default_factory=dict)
    closed: dict[str, str] = field(default_factory=dict)
    closed_orders: dict[str, Order] = field(default_factory=dict)
    fills: dict[str, str] = field(default_factory=dict)

    def holding(self, symbol: str) -> Holding:
        return self.holdings.setdefault(symbol, Holding())

    def free(self) -> Decimal:
        with localcontext(EXACT):
            return self.cash - self.reserved

    # -- reservations -----------------------------------------------------------------------

    def buy_amount(self, qty: Decimal, price: Decimal) -> Decimal:
        """Cash a buy reservation holds: cost plus the fee buffer."""
        with localcontext(EXACT):
            return qty * price * (1 + FEE_BUFFER_BPS / 10_000)

    def refusal(self, side: str, symbol: str, qty: Decimal, price: Decimal) -> type[Exception] | None:
        """The error a new reservation meets, or None if it can be made."""
        with localcontext(EXACT):
            if side == "buy":
                return InsufficientFunds if self.buy_amount(qty, price) > self.free() else None
            holding = self.holdings.get(symbol, Holding())
            if not self.allow_short and qty > holding.qty - holding.sell_held:
                return InsufficientPosition
            return None

    def reserve(self, rid: str, side: str, symbol: str, qty: Decimal, price: Decimal) -> Decimal:
        with localcontext(EXACT):
            held = self.buy_amount(qty, price) if side == "buy" else qty
            if side == "buy":
                self.reserved += held
            else:
                self.holding(symbol).sell_held += held
        self.open[rid] = Order(side, symbol, qty, price, held)
        self.version += 1
        return held

    def close(self, rid: str, reason: str) -> Decimal:
        """Give back what ``rid`` still holds; it is closed with ``reason``."""
        order = self.open.pop(rid)
        with localcontext(EXACT):
            if order.side == "buy":
                self.reserved -= order.held
            else:
                self.holding(order.symbol).sell_held -= order.held
        self.closed[rid], self.closed_orders[rid] = reason, order
        self._forget_empty(order.symbol)
        return order.held

    def release(self, rid: str, reason: str) -> Decimal:
        self.version += 1
        return self.close(rid, reason)

    # -- fills ------------------------------------------------------------------------------

    def fill(self, rid: str, fill_id: str, side: str, symbol: str, qty: Decimal, price: Decimal,
             fee: Decimal) -> Booked:
        """Book a fill (the caller has checked it is neither refused nor a duplicate)."""
        order = self.open.get(rid)
        holding = self.holding(symbol)
        before = holding.qty
        with localcontext(EXACT):
            beyond = order is None or order.filled + qty > order.qty
            if side == "buy":
                cost = qty * price + fee
                covered = min(cost, order.held) if order is not None else ZERO
                beyond = beyond or cost - covered > self.free()
                self.cash -= cost
                self.reserved -= covered
            else:
                proceeds = qty * price - fee
                covered = min(qty, order.held) if order is not None else ZERO
                beyond = beyond or self.cash + proceeds < self.reserved
                self.cash += proceeds
                holding.sell_held -= covered
            realized = self._trade(holding, qty if side == "buy" else -qty, price)
            if side == "sell" and not self.allow_short and before >= 0 > holding.qty:
                beyond = True
            self.realized += realized
            self.fees += fee
        self.fills[fill_id] = rid
        self.version += 1
        self.beyond_seen = self.beyond_seen or beyond
        returned, completed = ZERO, False
        if order is not None:
            with localcontext(EXACT):
                order.held -= covered
                order.filled += qty
            if order.filled >= order.qty:
                returned, completed = self.close(rid, "filled"), True
        self._forget_empty(symbol)
        return Booked(realized, completed, returned, beyond, before)

    @staticmethod
    def _trade(holding: Holding, signed: Decimal, price: Decimal) -> Decimal:
        """Close what the fill closes (realizing PnL), then open or grow with the rest."""
        direction = 1 if holding.qty > 0 else -1
        opposite = holding.qty != 0 and (holding.qty > 0) != (signed > 0)
        closing = min(abs(signed), abs(holding.qty)) if opposite else ZERO
        realized = closing * (price - holding.avg) * direction
        holding.qty += direction * -closing
        opening = abs(signed) - closing
        if holding.qty == 0:
            holding.avg = ZERO
        if opening > 0:
            size = abs(holding.qty)
            basis = Fraction(size * holding.avg) + Fraction(opening * price)
            holding.avg = round_avg(basis / Fraction(size + opening))
            holding.qty += opening if signed > 0 else -opening
        return realized

    def _forget_empty(self, symbol: str) -> None:
        holding = self.holdings.get(symbol)
        if holding is not None and holding.qty == 0 and holding.sell_held == 0:
            del self.holdings[symbol]


class PortfolioMachine(RuleBasedStateMachine):
    """Random operations on one account, each checked against :class:`Model`."""

    ALLOW_SHORT = False

    def __init__(self) -> None:
        super().__init__()
        self.client = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7, 4)))
        self.keys = Keys("hyp")
        self.book = Portfolio(self.client, self.keys, "acct",
                              settings=PortfolioSettings(account="acct", fee_buffer_bps=FEE_BUFFER_BPS,
                                                         allow_short=self.ALLOW_SHORT),
                              clock=SimulatedClock())
        self.book.open(START_CASH)
        self.model = Model(allow_short=self.ALLOW_SHORT)
        self.n = 0
        self.applied: list[tuple[str, Fill]] = []

    def _id(self, prefix: str = "x") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _fill(self, qty: Decimal, price: Decimal, fee: Decimal) -> Fill:
        return Fill(fill_id=self._id("f"), quantity=qty, price=price, fee=fee, time=T0)

    def _last_ledger_entry(self) -> dict[str, str]:
        return list(read_ledger(self.client, self.keys, "acct"))[-1]

    def _book_fill(self, rid: str, side: str, symbol: str, qty: Decimal, price: Decimal, fee: Decimal,
                   *, name_trade: bool) -> None:
        """Apply a fill the model books, and check the outcome and ledger entry against the model."""
        fill = self._fill(qty, price, fee)
        if name_trade:
            outcome = self.book.apply_fill(rid, fill, side=side, symbol=symbol)
        else:
            outcome = self.book.apply_fill(rid, fill)
        expected = self.model.fill(rid, fill.fill_id, side, symbol, qty, price, fee)
        self.applied.append((rid, fill))
        assert outcome.changed and not outcome.duplicate
        assert outcome.realized == expected.realized, (outcome.realized, expected.realized)
        assert outcome.completed == expected.completed
        assert outcome.amount == expected.returned, (outcome.amount, expected.returned)
        assert outcome.position_before == expected.before
        assert bool(outcome.beyond) == expected.beyond, f"beyond={outcome.beyond!r}, model {expected}"
        event(f"fill beyond its reservation: {expected.beyond}")
        holding = self.model.holdings.get(symbol)
        if holding is not None and holding.qty < 0:
            event("a short is open")
        if expected.realized and expected.before < 0:
            event("a short closed with PnL")
        if holding is not None and holding.avg != holding.avg.quantize(D("0.0001")):
            event("the average cost was rounded")
        entry = self._last_ledger_entry()
        assert entry["fill_id"] == fill.fill_id
        assert entry.get("beyond", "") == outcome.beyond

    def _unchanged(self, version: int) -> None:
        assert self.book.snapshot().version == version, "a refused or repeated call wrote something"

    # -- reservations -----------------------------------------------------------------------

    @rule(symbol=symbols, qty=st.integers(1, 30), price=prices)
    def reserve_buy(self, symbol: str, qty: int, price: Decimal) -> None:
        """A buy holds cost plus the fee buffer, or is refused when buying power cannot cover it."""
        self._reserve("buy", symbol, D(qty), price)

    @rule(symbol=symbols, qty=st.integers(1, 12), price=prices)
    def reserve_sell(self, symbol: str, qty: int, price: Decimal) -> None:
        """A sell holds its quantity, or (shorting off) is refused beyond the unreserved position."""
        self._reserve("sell", symbol, D(qty), price)

    def _reserve(self, side: str, symbol: str, qty: Decimal, price: Decimal) -> None:
        """Reserve a new id; a refusal the model expects must change nothing."""
        rid = self._id("r")
        refusal = self.model.refusal(side, symbol, qty, price)
        if refusal is not None:
            version = self.model.version
            with pytest.raises(refusal):
                self.book.reserve(rid, symbol, side, qty, price)
            self._unchanged(version)
            return
        outcome = self.book.reserve(rid, symbol, side, qty, price)
        assert outcome.amount == self.model.reserve(rid, side, symbol, qty, price)

    @precondition(lambda self: self.model.open)
    @rule(data=st.data())
    def reserve_again(self, data: st.DataObject) -> None:
        """An open id with the same terms is returned as it is; with another price, refused."""
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        order = self.model.open[rid]
        again = self.book.reserve(rid, order.symbol, order.side, order.qty, order.price)
        assert again.duplicate and not again.changed and again.amount == order.held
        with pytest.raises(PortfolioError):
            self.book.reserve(rid, order.symbol, order.side, order.qty, order.price + D("0.01"))
        self._unchanged(self.model.version)

    @precondition(lambda self: self.model.closed)
    @rule(data=st.data())
    def reserve_closed_id(self, data: st.DataObject) -> None:
        """A closed reservation id is never reused, even with its old terms."""
        rid = data.draw(st.sampled_from(sorted(self.model.closed)))
        order = self.model.closed_orders[rid]
        with pytest.raises(PortfolioError, match="already used"):
            self.book.reserve(rid, order.symbol, order.side, order.qty, order.price)
        self._unchanged(self.model.version)

    @precondition(lambda self: self.model.open)
    @rule(data=st.data(), cancel=st.booleans())
    def release(self, data: st.DataObject, cancel: bool) -> None:
        """Releasing gives back what is still held and closes the id; a second release is a no-op."""
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        reason = "canceled" if cancel else "released"
        outcome = self.book.release(rid, reason)
        assert outcome.completed and outcome.amount == self.model.release(rid, reason)
        again = self.book.release(rid)
        assert again.duplicate and not again.changed
        self._unchanged(self.model.version)

    # -- fills ------------------------------------------------------------------------------

    @precondition(lambda self: self.model.open)
    @rule(data=st.data(), fee=fees, name_trade=st.booleans())
    def fill(self, data: st.DataObject, fee: Decimal, name_trade: bool) -> None:
        """A fill within the order's quantity, at its price or any other (a buy may cost more than
        it holds)."""
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        order = self.model.open[rid]
        price = data.draw(st.one_of(st.just(order.price), prices))
        qty = D(data.draw(st.integers(1, int(order.qty - order.filled))))
        self._book_fill(rid, order.side, order.symbol, qty, price, fee, name_trade=name_trade)

    @precondition(lambda self: self.model.open)
    @rule(data=st.data(), extra=st.integers(1, 5), price=prices, fee=fees)
    def over_fill(self, data: st.DataObject, extra: int, price: Decimal, fee: Decimal) -> None:
        """More than the order's quantity is filled: booked, beyond, and the reservation closes."""
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        order = self.model.open[rid]
        self._book_fill(rid, order.side, order.symbol, order.qty - order.filled + extra, price, fee,
                        name_trade=False)
        assert rid in self.model.closed

    @precondition(lambda self: self.model.closed)
    @rule(data=st.data(), qty=st.integers(1, 10), price=prices, fee=fees)
    def fill_of_closed(self, data: st.DataObject, qty: int, price: Decimal, fee: Decimal) -> None:
        """A closed reservation's fill is booked when it names side and symbol, else refused."""
        rid = data.draw(st.sampled_from(sorted(self.model.closed)))
        order = self.model.closed_orders[rid]
        with pytest.raises(UnknownReservation):
            self.book.apply_fill(rid, self._fill(D(qty), price, fee))
        self._unchanged(self.model.version)
        self._book_fill(rid, order.side, order.symbol, D(qty), price, fee, name_trade=True)

    @rule(side=st.sampled_from(["buy", "sell"]), symbol=symbols, qty=st.integers(1, 10), price=prices)
    def fill_never_reserved(self, side: str, symbol: str, qty: int, price: Decimal) -> None:
        """A fill of an order that was never reserved here, naming what it traded: booked, beyond."""
        self._book_fill(self._id("ghost"), side, symbol, D(qty), price, ZERO, name_trade=True)

    @rule()
    def fill_naming_nothing(self) -> None:
        """A fill of an unknown reservation that does not say what it traded cannot be booked."""
        with pytest.raises(UnknownReservation):
            self.book.apply_fill(self._id("ghost"), self._fill(D(1), D(10), ZERO))
        self._unchanged(self.model.version)

    @precondition(lambda self: self.model.open)
    @rule(data=st.data(), wrong_side=st.booleans())
    def fill_contradicting(self, data: st.DataObject, wrong_side: bool) -> None:
        """A fill whose side or symbol contradicts its open reservation is refused, nothing booked."""
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        order = self.model.open[rid]
        side = ({"buy": "sell", "sell": "buy"}[order.side]) if wrong_side else order.side
        symbol = order.symbol if wrong_side else next(s for s in SYMBOLS if s != order.symbol)
        with pytest.raises(FillRefused):
            self.book.apply_fill(rid, self._fill(D(1), order.price, ZERO), side=side, symbol=symbol)
        self._unchanged(self.model.version)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def duplicate_fill(self, data: st.DataObject) -> None:
        """A fill id applied before changes nothing, whatever happened since."""
        rid, fill = data.draw(st.sampled_from(self.applied))
        assert self.book.apply_fill(rid, fill).duplicate
        self._unchanged(self.model.version)

    # -- the comparison ---------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        """Every figure of the account, each reservation, closed id and applied fill equal the model's."""
        snap, m = self.book.snapshot(), self.model
        assert (snap.cash, snap.reserved, snap.realized_pnl, snap.fees, snap.version) == (
            m.cash, m.reserved, m.realized, m.fees, m.version)
        got = {s: (p.qty, p.avg_cost, p.reserved) for s, p in snap.positions.items()}
        assert got == {s: (h.qty, h.avg, h.sell_held) for s, h in m.holdings.items()}
        assert {rid: (r.side, r.symbol, r.qty, r.price, r.held, r.filled)
                for rid, r in snap.reservations.items()} == {
            rid: (o.side, o.symbol, o.qty, o.price, o.held, o.filled) for rid, o in m.open.items()}
        state = self.book.read()
        assert state.closed == m.closed and state.fills == m.fills

    @invariant()
    def invariants_hold(self) -> None:
        """Structural always; the controls until a fill went beyond its reservation."""
        snap, m = self.book.snapshot(), self.model
        held_cash = sum((r.held for r in snap.reservations.values() if r.side == "buy"), ZERO)
        assert snap.reserved == held_cash and snap.reserved >= 0
        for symbol, position in snap.positions.items():
            held = sum((r.held for r in snap.reservations.values()
                        if r.side == "sell" and r.symbol == symbol), ZERO)
            assert position.reserved == held
        if not m.beyond_seen:
            assert snap.cash >= 0 and snap.reserved <= snap.cash
            assert self.ALLOW_SHORT or all(p.qty >= 0 for p in snap.positions.values())

    def teardown(self) -> None:
        """The ledger replays to the state in Redis (a check of the writes, not of the arithmetic)."""
        report = verify(self.client, self.keys, "acct", allow_short=self.ALLOW_SHORT)
        assert report.ok, report.problems


class ShortingMachine(PortfolioMachine):
    """The same operations with shorting on: sells beyond the position open shorts."""

    ALLOW_SHORT = True


_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
PortfolioMachine.TestCase.settings = _SETTINGS
ShortingMachine.TestCase.settings = _SETTINGS
TestPortfolioStateful = PortfolioMachine.TestCase
TestPortfolioStateful.__doc__ = "Random operation sequences keep the portfolio equal to the model."
TestPortfolioStatefulShorting = ShortingMachine.TestCase
TestPortfolioStatefulShorting.__doc__ = ("With shorting on, random operation sequences (shorts opened "
                                         "and closed) keep the portfolio equal to the model.")
