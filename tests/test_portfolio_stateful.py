"""Hypothesis stateful test: random portfolio operations against a simple reference model."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D

import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shared.clock import SimulatedClock
from shared.config import PortfolioSettings
from shared.errors import FillRefused, InsufficientFunds, InsufficientPosition, UnknownReservation
from shared.keys import Keys
from shared.models import Fill
from shared.portfolio import Portfolio, verify

BUFFER = D("1.001")  # 10 bps
SYMBOLS = st.sampled_from(["AAA", "BBB"])
PRICES = st.integers(100, 5000).map(lambda cents: D(cents) / 100)


class Model:
    """The reference: plain dicts and the textbook rules, no shared code with the portfolio."""

    def __init__(self, cash: D) -> None:
        self.cash, self.reserved, self.fees = cash, D(0), D(0)
        self.qty: dict[str, D] = {}
        self.sell_held: dict[str, D] = {}
        self.open: dict[str, dict[str, object]] = {}

    def free(self) -> D:
        return self.cash - self.reserved


class PortfolioMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7, 4)))
        self.keys = Keys("hyp")
        self.client = client
        self.book = Portfolio(client, self.keys, "acct", settings=PortfolioSettings(account="acct"),
                              clock=SimulatedClock())
        self.book.open(D(5000))
        self.model = Model(D(5000))
        self.n = 0
        self.applied: list[tuple[str, Fill]] = []

    def _id(self) -> str:
        self.n += 1
        return f"x{self.n}"

    def _fill(self, qty: D, price: D, fee: D) -> Fill:
        return Fill(fill_id=self._id(), quantity=qty, price=price, fee=fee,
                    time=datetime(2026, 1, 2, tzinfo=UTC))

    @rule(symbol=SYMBOLS, qty=st.integers(1, 30), price=PRICES)
    def reserve_buy(self, symbol: str, qty: int, price: D) -> None:
        rid, amount = self._id(), D(qty) * price * BUFFER
        if amount > self.model.free():
            with pytest.raises(InsufficientFunds):
                self.book.reserve(rid, symbol, "buy", D(qty), price)
            return
        assert self.book.reserve(rid, symbol, "buy", D(qty), price).amount == amount
        self.model.reserved += amount
        self.model.open[rid] = {"side": "buy", "symbol": symbol, "left": D(qty), "held": amount}

    @rule(symbol=SYMBOLS, qty=st.integers(1, 10), price=PRICES)
    def reserve_sell(self, symbol: str, qty: int, price: D) -> None:
        rid = self._id()
        available = self.model.qty.get(symbol, D(0)) - self.model.sell_held.get(symbol, D(0))
        if qty > available:
            with pytest.raises(InsufficientPosition):
                self.book.reserve(rid, symbol, "sell", D(qty), price)
            return
        self.book.reserve(rid, symbol, "sell", D(qty), price)
        self.model.sell_held[symbol] = self.model.sell_held.get(symbol, D(0)) + qty
        self.model.open[rid] = {"side": "sell", "symbol": symbol, "left": D(qty), "held": D(qty)}

    @precondition(lambda self: self.model.open)
    @rule(data=st.data(), price=PRICES, fee=st.integers(0, 200).map(lambda c: D(c) / 100))
    def fill(self, data: st.DataObject, price: D, fee: D) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        order = self.model.open[rid]
        left = order["left"]
        assert isinstance(left, D)
        qty = D(data.draw(st.integers(1, int(left))))
        fill = self._fill(qty, price, fee)
        m, symbol, held = self.model, str(order["symbol"]), order["held"]
        assert isinstance(held, D)
        if order["side"] == "buy":
            spend = qty * price + fee
            take = min(spend, held)
            if spend - take > m.free():
                with pytest.raises(FillRefused):
                    self.book.apply_fill(rid, fill)
                return
            m.cash -= spend
            m.reserved -= take
            held -= take
            m.qty[symbol] = m.qty.get(symbol, D(0)) + qty
        else:
            proceeds = qty * price - fee
            if m.cash + proceeds < m.reserved:
                with pytest.raises(FillRefused):
                    self.book.apply_fill(rid, fill)
                return
            m.cash += proceeds
            m.sell_held[symbol] -= qty
            held -= qty
            m.qty[symbol] -= qty
        m.fees += fee
        outcome = self.book.apply_fill(rid, fill)
        self.applied.append((rid, fill))
        order["left"], order["held"] = left - qty, held
        if left - qty == 0:
            assert outcome.completed and outcome.amount == held
            self._close(rid)

    def _close(self, rid: str) -> None:
        order = self.model.open.pop(rid)
        held = order["held"]
        assert isinstance(held, D)
        if order["side"] == "buy":
            self.model.reserved -= held
        else:
            self.model.sell_held[str(order["symbol"])] -= held

    @precondition(lambda self: self.model.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        assert self.book.release(rid).amount == self.model.open[rid]["held"]
        self._close(rid)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def duplicate_fill(self, data: st.DataObject) -> None:
        rid, fill = data.draw(st.sampled_from(self.applied))
        version = self.book.snapshot().version
        assert self.book.apply_fill(rid, fill).duplicate
        assert self.book.snapshot().version == version

    @precondition(lambda self: self.model.open)
    @rule(data=st.data())
    def over_fill(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.open)))
        left = self.model.open[rid]["left"]
        assert isinstance(left, D)
        with pytest.raises(FillRefused):
            self.book.apply_fill(rid, self._fill(left + 1, D(10), D(0)))

    @rule()
    def unknown_fill(self) -> None:
        with pytest.raises(UnknownReservation):
            self.book.apply_fill("ghost", self._fill(D(1), D(10), D(0)))

    @invariant()
    def matches_model(self) -> None:
        snap = self.book.snapshot()
        m = self.model
        assert (snap.cash, snap.reserved, snap.fees) == (m.cash, m.reserved, m.fees)
        assert snap.cash >= 0 and 0 <= snap.reserved <= snap.cash
        for symbol in ("AAA", "BBB"):
            position = snap.positions.get(symbol)
            assert (position.qty if position else D(0)) == m.qty.get(symbol, D(0))
            assert (position.reserved if position else D(0)) == m.sell_held.get(symbol, D(0))
        assert set(snap.reservations) == set(m.open)

    def teardown(self) -> None:
        report = verify(self.client, self.keys, "acct", allow_short=False)
        assert report.ok, report.problems


PortfolioMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestPortfolioStateful = PortfolioMachine.TestCase
TestPortfolioStateful.__doc__ = "Random operation sequences keep the portfolio equal to the model."
