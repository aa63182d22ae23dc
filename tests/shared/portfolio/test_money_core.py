"""Pinned cases of the money core: each exact figure or refusal a changed behaviour would break.

Portfolio arithmetic and refusals (shared.portfolio, shared.portfolio._state), a write resent by
the production client after its reply was lost, the fence, and the pre-trade rules at their
boundaries (shared.safety.limits, shared.safety.symbols).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from decimal import Decimal as D
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from shared.clock import SimulatedClock
from shared.config import LimitSettings, LockSettings, PortfolioSettings
from shared.errors import (
    InsufficientFunds,
    PortfolioConflict,
    PortfolioError,
    StaleFencingToken,
    UnknownReservation,
)
from shared.keys import Keys
from shared.models import Fill, Side
from shared.portfolio import Outcome, Portfolio, RecordUpdate, lock_resource, read_ledger, verify
from shared.portfolio._state import (
    Position,
    Reservation,
    State,
    apply_entry,
    invariant_violations,
    replay,
)
from shared.redis.connection import RECONNECT_RETRIES, connect_url
from shared.safety.limits import Rule, check_order, is_reducing
from shared.safety.symbols import PreparedOrder, SymbolProperties
from tests.conftest import SERVER_BACKENDS
from tests.shared.safety.test_limits import SETTINGS, buy, sell, snapshot
from tests.support.factories import T0, fill
from tests.support.portfolio import StallsBeforeWriting


def book_on(client: redis.Redis, keys: Keys, cash: str, *, account: str = "acct",
            cls: type[Portfolio] = Portfolio, **settings: Any) -> Portfolio:
    """An opened account (fee buffer 10 bps unless ``settings`` say otherwise)."""
    portfolio = cls(client, keys, account, settings=PortfolioSettings(account=account, **settings),
                    lock_settings=LockSettings(lease_ms=2000, wait_ms=2000), clock=SimulatedClock())
    portfolio.open(D(cash))
    return portfolio


def everything(client: redis.Redis, keys: Keys, account: str = "acct") -> dict[str, Any]:
    """Every portfolio hash, the ledger length and the lock key: equal means nothing changed (a
    refusal made under the lock still spends a fencing token: see :func:`fence`)."""
    parts = {name: client.hgetall(keys.portfolio_part(account, name))
             for name in ("positions", "reservations", "closed", "fills")}
    return {"state": client.hgetall(keys.portfolio(account)), **parts,
            "ledger": client.xlen(keys.ledger(account)),
            "lock": client.get(keys.lock(lock_resource(account)))}


def fence(client: redis.Redis, keys: Keys, account: str = "acct") -> int:
    """The account lock's fencing counter (how many times the lock was taken)."""
    return int(client.get(keys.fence(lock_resource(account))) or 0)


def last_entry(client: redis.Redis, keys: Keys) -> dict[str, str]:
    return list(read_ledger(client, keys, "acct"))[-1]


class TestReserve:
    def test_an_account_never_opened_refuses_every_change(self, redis_client: redis.Redis,
                                                          keys: Keys) -> None:
        """Before open, a reservation (buy or sell), a release and a fill naming its trade are all
        refused as "not open", and nothing is written."""
        book = Portfolio(redis_client, keys, "acct", settings=PortfolioSettings(account="acct",
                                                                                allow_short=True),
                         clock=SimulatedClock())
        changes: list[Callable[[], Outcome]] = [
            lambda: book.reserve("r1", "AAPL", "buy", D(1), D(10)),
            lambda: book.reserve("r2", "AAPL", "sell", D(1), D(10)),
            lambda: book.release("r1"),
            lambda: book.apply_fill("r1", fill("f1", "1", "10"), side="buy", symbol="AAPL")]
        for change in changes:
            with pytest.raises(PortfolioError, match="not open"):
                change()
        assert redis_client.xlen(keys.ledger("acct")) == 0 and not book.snapshot().opened

    def test_buying_power_exactly_equal_to_the_cost_is_enough(self, redis_client: redis.Redis,
                                                              keys: Keys) -> None:
        """A buy costing exactly the buying power (with its fee buffer) is reserved, leaving 0; a cent
        less cash refuses it."""
        book = book_on(redis_client, keys, "1001")
        assert book.reserve("r1", "AAPL", "buy", D(10), D(100)).amount == D("1001.000")
        assert book.snapshot().buying_power == 0
        with pytest.raises(InsufficientFunds) as caught:
            book.reserve("r2", "AAPL", "buy", D(1), D("0.01"))
        assert (caught.value.needed, caught.value.available) == (D("0.01001"), D(0))
        filled = book.apply_fill("r1", fill("f1", "10", "100"))  # within what it holds: no free cash needed
        assert filled.beyond == "" and filled.completed and filled.amount == D(1)
        short = book_on(redis_client, keys, "1000.99", account="other")
        with pytest.raises(InsufficientFunds):
            short.reserve("r1", "AAPL", "buy", D(10), D(100))

    def test_a_closed_reservation_id_is_never_reused(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Released or filled, a reservation id is refused when reserved again, even with its old
        terms, and nothing is written."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("released", "AAPL", "buy", D(1), D(10))
        book.release("released")
        book.reserve("filled", "AAPL", "buy", D(1), D(10))
        book.apply_fill("filled", fill("f1", "1", "10"))
        before = everything(redis_client, keys)
        for rid in ("released", "filled"):
            with pytest.raises(PortfolioError, match="already used"):
                book.reserve(rid, "AAPL", "buy", D(1), D(10))
        assert everything(redis_client, keys) == before

    def test_an_open_id_with_other_terms_is_refused_with_the_same_returned_as_is(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """Re-reserving an open id at another price (or size, side, symbol) is refused; with the same
        terms the open reservation comes back unchanged and nothing is written."""
        book = book_on(redis_client, keys, "1000")
        first = book.reserve("r1", "AAPL", "buy", D(4), D(10))
        before = everything(redis_client, keys)
        for terms in [("AAPL", "buy", D(4), D("10.01")), ("AAPL", "buy", D(5), D(10)),
                      ("MSFT", "buy", D(4), D(10)), ("AAPL", "sell", D(4), D(10))]:
            with pytest.raises(PortfolioError, match="already used"):
                book.reserve("r1", *terms)
        again = book.reserve("r1", "AAPL", "buy", D("4.0"), D("10.00"))
        assert again.duplicate and not again.changed
        assert (again.amount, again.reservation_id) == (first.amount, "r1") == (D("40.040"), "r1")
        assert everything(redis_client, keys) == before

    @pytest.mark.parametrize(("qty", "price"), [("0", "10"), ("10", "0"), ("-1", "10"), ("1", "-10")])
    def test_zero_or_negative_quantity_or_price_is_refused(self, redis_client: redis.Redis, keys: Keys,
                                                           qty: str, price: str) -> None:
        """A reservation of no quantity or at no price raises ValueError before the lock: nothing
        written, no fencing token spent."""
        book = book_on(redis_client, keys, "1000")
        before, tokens = everything(redis_client, keys), fence(redis_client, keys)
        for side in ("buy", "sell"):
            with pytest.raises(ValueError, match=r"quantity|price"):
                book.reserve("r1", "AAPL", side, D(qty), D(price))
        assert everything(redis_client, keys) == before and fence(redis_client, keys) == tokens


class TestFills:
    @pytest.mark.parametrize(("qty", "price"), [("0", "10"), ("1", "0")])
    def test_zero_quantity_or_price_fill_is_refused(self, redis_client: redis.Redis, keys: Keys,
                                                    qty: str, price: str) -> None:
        """A fill of no quantity or at no price raises ValueError even when the Fill skipped its own
        validation; nothing is written."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("r1", "AAPL", "buy", D(1), D(10))
        before, tokens = everything(redis_client, keys), fence(redis_client, keys)
        unchecked = Fill.model_construct(fill_id="f1", quantity=D(qty), price=D(price), fee=D(0), time=T0)
        with pytest.raises(ValueError, match=r"quantity|price"):
            book.apply_fill("r1", unchecked)
        with pytest.raises(ValueError, match=r"quantity|price"):
            book.apply_fill("r1", unchecked, side="buy", symbol="AAPL")
        assert everything(redis_client, keys) == before and fence(redis_client, keys) == tokens

    def test_a_side_without_a_symbol_is_ignored(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Side and symbol name the trade only together: a side alone books an open reservation's fill
        as the reservation says, and cannot book a closed one's."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("r1", "AAPL", "buy", D(2), D(10))
        outcome = book.apply_fill("r1", fill("f1", "1", "10"), side="buy")
        assert outcome.changed and outcome.beyond == "" and outcome.symbol == "AAPL"
        book.release("r1")
        before = everything(redis_client, keys)
        with pytest.raises(UnknownReservation):
            book.apply_fill("r1", fill("f2", "1", "10"), side="buy")
        assert everything(redis_client, keys) == before

    def test_sell_whose_fee_overdraws_the_cash_left_is_booked_beyond(self, redis_client: redis.Redis,
                                                                    keys: Keys) -> None:
        """A sell fee that leaves cash exactly at what is reserved is ordinary; one that leaves less
        is booked anyway, with ``beyond`` set in the outcome and the ledger (verify still passes)."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("b", "AAPL", "buy", D(10), D(50))
        book.apply_fill("b", fill("f1", "10", "50"))
        book.reserve("r2", "MSFT", "buy", D(1), D(499))  # holds 499.499 of the 500 left
        book.reserve("s1", "AAPL", "sell", D(1), D(1))
        exact = book.apply_fill("s1", fill("f2", "1", "1", "1.501"))
        assert exact.beyond == "" and book.snapshot().cash == D("499.499")
        assert "beyond" not in last_entry(redis_client, keys)
        book.reserve("s2", "AAPL", "sell", D(1), D(1))
        over = book.apply_fill("s2", fill("f3", "1", "1", "2"))
        assert over.changed and over.beyond == "fee 2 overdraws the cash left"
        assert last_entry(redis_client, keys)["beyond"] == over.beyond
        assert over.realized == D(-49)
        snap = book.snapshot()
        assert (snap.cash, snap.reserved, snap.fees, snap.realized_pnl) == (
            D("498.499"), D("499.499"), D("3.501"), D(-98))
        assert (snap.positions["AAPL"].qty, snap.positions["AAPL"].avg_cost) == (D(8), D(50))
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_average_cost_is_rounded_half_even_to_ten_places_across_partial_fills(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """Partial fills at 10.00, 10.01, 10.01 average 30.02/3, kept as 10.0066666667, and selling at 11
        realizes 2.9799999999 against it (not 2.98)."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("b", "AAPL", "buy", D(3), D("10.01"))
        averages = []
        for fill_id, price in (("f1", "10.00"), ("f2", "10.01"), ("f3", "10.01")):
            book.apply_fill("b", fill(fill_id, "1", price))
            averages.append(book.snapshot().positions["AAPL"].avg_cost)
        assert averages == [D("10.00"), D("10.005"), D("10.0066666667")]
        book.reserve("s", "AAPL", "sell", D(3), D(11))
        assert book.apply_fill("s", fill("f4", "3", "11")).realized == D("2.9799999999")
        assert book.snapshot().realized_pnl == D("2.9799999999")

    @pytest.mark.parametrize(("second", "average"), [("1.0000000001", "1.0000000000"),
                                                     ("1.0000000003", "1.0000000002")])
    def test_average_cost_tie_rounds_to_even(self, redis_client: redis.Redis, keys: Keys, second: str,
                                             average: str) -> None:
        """An average exactly halfway between two 1E-10 steps rounds to the even one (half-even, not
        half-up)."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("b", "AAPL", "buy", D(2), D(2))
        book.apply_fill("b", fill("f1", "1", "1"))
        book.apply_fill("b", fill("f2", "1", second))
        assert book.snapshot().positions["AAPL"].avg_cost == D(average)

    def test_a_sell_through_zero_with_shorting_off_is_booked_beyond(self, redis_client: redis.Redis,
                                                                    keys: Keys) -> None:
        """Shorting off, a sell that goes through zero is booked (the position goes short) and
        ``beyond`` says so, next to any other reason (an over-fill, a closed reservation)."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("b", "AAPL", "buy", D(5), D(10))
        book.apply_fill("b", fill("f1", "5", "10"))
        book.reserve("s1", "AAPL", "sell", D(5), D(10))
        through = book.apply_fill("s1", fill("f2", "8", "10"))
        assert through.beyond.startswith("over-fill") and "shorting is off" in through.beyond
        assert book.snapshot().positions["AAPL"].qty == D(-3)
        book.reserve("b2", "AAPL", "buy", D(4), D(10))
        book.apply_fill("b2", fill("f3", "4", "10"))  # long 1
        book.reserve("s2", "AAPL", "sell", D(1), D(10))
        book.apply_fill("s2", fill("f4", "1", "10"))  # flat again; s2 closed
        from_flat = book.apply_fill("s2", fill("f5", "2", "10"), side="sell", symbol="AAPL")
        assert "'s2' is filled, not open" in from_flat.beyond and "shorting is off" in from_flat.beyond
        assert book.snapshot().positions["AAPL"].qty == D(-2)
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_closing_a_short_realizes_entry_minus_exit(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Short 10 at 50 (shorting on), cover 4 at 45 (+20) and 6 at 55 (-30): realized -10, fees apart,
        the average cost of what is left stays 50, and the position closes."""
        book = book_on(redis_client, keys, "1000", allow_short=True)
        book.reserve("s", "TSLA", "sell", D(10), D(50))
        opened = book.apply_fill("s", fill("f1", "10", "50", "0.5"))
        assert opened.realized == 0 and opened.beyond == ""
        assert (book.snapshot().positions["TSLA"].qty, book.snapshot().positions["TSLA"].avg_cost) == (
            D(-10), D(50))
        book.reserve("b1", "TSLA", "buy", D(4), D(45))
        assert book.apply_fill("b1", fill("f2", "4", "45")).realized == D(20)
        assert book.snapshot().positions["TSLA"].avg_cost == D(50)
        book.reserve("b2", "TSLA", "buy", D(6), D(55))
        assert book.apply_fill("b2", fill("f3", "6", "55", "0.5")).realized == D(-30)
        snap = book.snapshot()
        assert (snap.realized_pnl, snap.fees, snap.cash) == (D(-10), D(1), D(989))
        assert "TSLA" not in snap.positions
        assert verify(redis_client, keys, "acct", allow_short=True).ok

    def test_closing_a_long_at_a_loss_realizes_the_price_loss(self, redis_client: redis.Redis,
                                                              keys: Keys) -> None:
        """Long 10 at 50 sold at 40 with a fee of 1: realized -100 (the fee is counted in fees, not PnL)."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("b", "AAPL", "buy", D(10), D(50))
        book.apply_fill("b", fill("f1", "10", "50"))
        book.reserve("s", "AAPL", "sell", D(10), D(40))
        outcome = book.apply_fill("s", fill("f2", "10", "40", "1"))
        assert (outcome.realized, outcome.position_before) == (D(-100), D(10))
        snap = book.snapshot()
        assert (snap.realized_pnl, snap.fees, snap.cash, snap.positions) == (D(-100), D(1), D(899), {})


class TestRecordUpdate:
    def test_a_record_is_written_with_its_fill_or_neither_is(self, redis_client: redis.Redis,
                                                             keys: Keys) -> None:
        """A fill's record update (fields made from its outcome) lands in the same write as the fill;
        once the record's expected field has moved, PortfolioConflict and neither is written."""
        book = book_on(redis_client, keys, "1000")
        book.reserve("r1", "AAPL", "buy", D(10), D(10))
        key = keys.order("c1")
        redis_client.hset(key, mapping={"applied_qty": "0", "symbol": "AAPL"})
        update = RecordUpdate(key, ("applied_qty", "0"), lambda o: {
            "applied_qty": "4", "realized": str(o.realized), "completed": str(o.completed)})
        book.apply_fill("r1", fill("f1", "4", "10"), record=update)
        assert redis_client.hgetall(key) == {b"applied_qty": b"4", b"symbol": b"AAPL", b"realized": b"0",
                                             b"completed": b"False"}
        snap = book.snapshot()
        assert (snap.cash, snap.reserved, snap.positions["AAPL"].qty) == (D(960), D("60.100"), D(4))
        before, record = everything(redis_client, keys), redis_client.hgetall(key)
        with pytest.raises(PortfolioConflict, match="applied_qty"):
            book.apply_fill("r1", fill("f2", "6", "10"), record=update)
        assert everything(redis_client, keys) == before and redis_client.hgetall(key) == record
        assert verify(redis_client, keys, "acct", allow_short=False).ok


def _account() -> State:
    """A consistent state: 10 cash held by a buy reservation, 2 of 5 AAPL held by a sell."""
    return State(opened=True, cash=D(100), reserved=D(10),
                 positions={"AAPL": Position(qty=D(5), avg_cost=D(10), reserved=D(2))},
                 reservations={"b": Reservation("buy", "MSFT", D(1), D(10), held=D(10)),
                               "s": Reservation("sell", "AAPL", D(2), D(10), held=D(2))})


class TestInvariants:
    @pytest.mark.parametrize(("field", "value", "problem"), [
        ("reserved", D(11), "reserved 11 != sum of buy reservations 10"),
        ("AAPL.reserved", D(3), "position AAPL reserved 3 != sum of sell reservations 2"),
        ("reserved", D(-1), "reserved -1 < 0"),
        ("AAPL.reserved", D(-1), "position AAPL reserved -1 < 0"),
    ])
    def test_structural_invariants_hold_even_with_the_controls_off(self, field: str, value: D,
                                                                   problem: str) -> None:
        """What is reserved must be what the open reservations hold, and never negative: reported
        with the controls on and off (after a fill went beyond its reservation)."""
        assert invariant_violations(_account(), allow_short=False) == []
        state = _account()
        if field == "reserved":
            state.reserved = value
        else:
            state.positions["AAPL"].reserved = value
        for controls in (True, False):
            assert problem in invariant_violations(state, allow_short=True, controls=controls)

    @pytest.mark.parametrize(("position", "problems"), [
        (Position(qty=D(2), avg_cost=D(10), reserved=D(2)), []),
        (Position(qty=D("0.5"), avg_cost=D(10)), []),
        (Position(qty=D(0), reserved=D(2)), ["position AAPL reserved 2 > quantity 0"]),
    ])
    def test_a_position_at_its_limits(self, position: Position, problems: list[str]) -> None:
        """Holding everything for sells, or a fraction of a share, is consistent; a flat position with
        a sell reservation (shorting off) breaks exactly the one control."""
        held = ({"s": Reservation("sell", "AAPL", D(2), D(10), held=position.reserved)}
                if position.reserved else {})
        state = State(opened=True, cash=D(100), positions={"AAPL": position}, reservations=held)
        assert invariant_violations(state, allow_short=False) == problems

    @pytest.mark.parametrize(("change", "problem"), [
        ({"cash": D(-1), "reserved": D(0),
          "reservations": {"s": Reservation("sell", "AAPL", D(2), D(10), held=D(2))}}, "cash -1 < 0"),
        ({"cash": D(9)}, "reserved 10 > cash 9"),
        ({"positions": {"AAPL": Position(qty=D(-1), avg_cost=D(10), reserved=D(2))}},
         "position AAPL -1 < 0 (shorting is off)"),
        ({"positions": {"AAPL": Position(qty=D(1), avg_cost=D(10), reserved=D(2))}},
         "position AAPL reserved 2 > quantity 1"),
    ])
    def test_control_invariants_only_while_the_controls_are_on(self, change: dict[str, Any],
                                                               problem: str) -> None:
        """Cash below zero or below what is reserved, a short or a sell reservation beyond the position
        without shorting: reported with the controls on, not once a fill went beyond them."""
        state = _account()
        for name, value in change.items():
            setattr(state, name, value)
        assert problem in invariant_violations(state, allow_short=False)
        assert invariant_violations(state, allow_short=False, controls=False) == []
        if "position" in problem:
            assert invariant_violations(state, allow_short=True) == []


class TestApplyEntry:
    """The pure arithmetic, for what the Portfolio never sends it but a replayed ledger could."""

    @pytest.mark.parametrize("named", [{"side": "buy"}, {"symbol": "AAPL"}])
    def test_a_fill_that_names_half_the_trade_is_refused(self, named: dict[str, str]) -> None:
        """A fill of a closed reservation naming a side but no symbol (or the reverse) is refused:
        UnknownReservation, the state untouched."""
        state = _account()
        state.closed["gone"] = "filled"
        before = state.copy()
        entry = {"op": "fill", "account": "acct", "rid": "gone", "fill_id": "f9", "qty": "1",
                 "price": "10", "fee": "0", **named}
        with pytest.raises(UnknownReservation):
            apply_entry(state, entry, allow_short=True)
        assert state == before

    def test_opening_twice_and_reusing_an_open_id_are_refused(self) -> None:
        """An open entry for an open account, and a reserve entry for an open reservation id, are
        refused with the state untouched."""
        state = _account()
        before = state.copy()
        with pytest.raises(PortfolioError, match="already open"):
            apply_entry(state, {"op": "open", "cash": "5"}, allow_short=False)
        reserve = {"op": "reserve", "rid": "b", "side": "buy", "symbol": "MSFT", "qty": "1", "price": "10",
                   "buffer_bps": "10"}
        with pytest.raises(PortfolioError, match="already used"):
            apply_entry(state, reserve, allow_short=False)
        with pytest.raises(ValueError, match="unknown ledger op"):
            apply_entry(state, {"op": "transfer"}, allow_short=False)
        assert state == before

    def test_replaying_a_ledger_gives_the_state_it_wrote(self, redis_client: redis.Redis,
                                                         keys: Keys) -> None:
        """replay() of an account's ledger (reserves, fills beyond, releases) equals the state in Redis;
        an entry it refuses is named in a ValueError."""
        book = book_on(redis_client, keys, "1000", allow_short=True)
        book.reserve("b", "AAPL", "buy", D(3), D("10.01"))
        for n, price in enumerate(("10.00", "10.01", "10.02")):
            book.apply_fill("b", fill(f"f{n}", "1", price))
        book.reserve("s", "AAPL", "sell", D(5), D(11))
        book.apply_fill("s", fill("f3", "5", "11", "1"))
        book.reserve("r", "MSFT", "buy", D(1), D(5))
        book.release("r", "canceled")
        ledger = list(read_ledger(redis_client, keys, "acct"))
        assert replay(ledger, allow_short=True) == book.read()
        with pytest.raises(ValueError, match=r"ledger entry 1 \("):
            replay([ledger[0], ledger[0]], allow_short=True)

    def test_a_release_without_a_reason_is_closed_as_released(self) -> None:
        """A release entry with no reason closes its reservation as "released", giving back its hold."""
        state = _account()
        outcome = apply_entry(state, {"op": "release", "rid": "b"}, allow_short=False)
        assert outcome.completed and outcome.amount == D(10)
        assert state.closed == {"b": "released"} and state.reserved == 0


class _LoseReply:
    """A TCP proxy to Redis that forwards everything, except that the reply to the first command
    containing ``trigger`` is thrown away and both connections are closed (the write landed, the
    client never hears)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trigger: bytes | None = None
        self.sent = 0  # commands containing the trigger seen going to the server
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            lose = threading.Event()
            threading.Thread(target=self._up, args=(client, server, lose), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, lose), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, lose: threading.Event) -> None:
        while data := _recv(client):
            if self.trigger is not None and self.trigger in data:
                self.sent += 1
                if not self.dropped.is_set():
                    lose.set()
            try:
                server.sendall(data)
            except OSError:
                break
        _hang_up(client, server)

    def _down(self, server: socket.socket, client: socket.socket, lose: threading.Event) -> None:
        while data := _recv(server):
            if lose.is_set():
                self.dropped.set()
                break
            try:
                client.sendall(data)
            except OSError:
                break
        _hang_up(client, server)  # a side that hung up (fakeredis's server does after an error) ends both

    def close(self) -> None:
        self.listener.close()


def _hang_up(*socks: socket.socket) -> None:
    for sock in socks:  # shutdown first: a close alone leaves the other pump's recv blocked
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
class TestLostReply:
    def test_a_write_resent_by_the_production_client_applies_once(self, server_url: str,
                                                                   client: redis.Redis, keys: Keys) -> None:
        """The write script lands but its reply is lost; the client made by connect_url (the services'
        retry settings) resends it, the script answers "dup", and the caller gets its outcome with
        the reservation and the fill each applied once."""
        assert RECONNECT_RETRIES >= 1
        parts = urlsplit(server_url)
        proxy = _LoseReply((parts.hostname or "127.0.0.1", parts.port or 6379))
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        via = connect_url(urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}")))
        try:
            book = book_on(via, keys, "10000")
            proxy.trigger = book._write.sha.encode()  # the EVALSHA of WRITE_SCRIPT
            reserved = book.reserve("r1", "AAPL", "buy", D(40), D(150))
            assert proxy.dropped.is_set() and proxy.sent == 2, "the write was not resent after a lost reply"
            assert reserved.changed and reserved.amount == D("6006")
            proxy.sent, proxy.dropped = 0, threading.Event()
            filled = book.apply_fill("r1", fill("f1", "40", "150", "1"))
            assert proxy.dropped.is_set() and proxy.sent == 2, "the write was not resent after a lost reply"
            assert filled.completed
            snap = Portfolio(client, keys, "acct").snapshot()
            assert (snap.cash, snap.reserved, snap.version) == (D(3999), D(0), 3)
            assert snap.positions["AAPL"].qty == 40
            assert [e["op"] for e in read_ledger(client, keys, "acct")] == ["open", "reserve", "fill"]
            assert not client.exists(keys.lock(lock_resource("acct")))
            assert verify(client, keys, "acct", allow_short=False).ok
        finally:
            proxy.close()
            via.close()


class TestResentWrite:
    @pytest.mark.parametrize("others", [1, 15])
    def test_a_resent_write_overtaken_by_other_writers_is_a_duplicate(
            self, redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
            others: int) -> None:
        """A write lands, its reply is lost, other holders take the freed lock and write (up to 15
        times), then the client's retry resends it: answered as a duplicate, so the caller gets its
        outcome and the write is applied once (not refused as stale)."""
        book, entries = self._resend_after(redis_client, keys, monkeypatch, others)
        outcome = book.reserve("a1", "AAPL", "buy", D(1), D(10))
        assert outcome.changed and outcome.amount == D("10.010")
        assert len(entries()) == 1

    def test_a_write_resent_after_sixteen_others_is_refused_and_applied_once(
            self, redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past the last 16 operations remembered, the resend is refused as stale -- and still not
        applied a second time."""
        book, entries = self._resend_after(redis_client, keys, monkeypatch, 16)
        with pytest.raises(StaleFencingToken):
            book.reserve("a1", "AAPL", "buy", D(1), D(10))
        assert len(entries()) == 1 and "a1" in book.snapshot().reservations

    @staticmethod
    def _resend_after(client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
                      others: int) -> tuple[Portfolio, Any]:
        """An account whose next write is sent, then ``others`` writes by another holder, then resent
        (as redis-py's retry does after a lost reply); and a reader of a1's ledger entries."""
        book = book_on(client, keys, "10000")
        other = Portfolio(client, keys, "acct", settings=PortfolioSettings(account="acct"),
                          lock_settings=LockSettings(lease_ms=2000, wait_ms=2000), clock=SimulatedClock())
        write = book._write

        def lost_then_resent(**kwargs: Any) -> Any:
            write(**kwargs)  # lands; its reply is lost
            for n in range(others):  # another holder takes the lock the write released
                other.reserve(f"b{n}", "MSFT", "buy", D(1), D(10))
            return write(**kwargs)  # the retry sends the same EVALSHA again

        monkeypatch.setattr(book, "_write", lost_then_resent)
        return book, lambda: [e for e in read_ledger(client, keys, "acct") if e.get("rid") == "a1"]


class TestFence:
    def test_a_write_under_a_token_older_than_the_newest_is_refused_and_changes_nothing(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """A holds token t and stalls; its lease expires; B takes t+1 and writes; A's write under t is
        refused (StaleFencingToken naming both tokens) and leaves B's state exactly as it was."""
        stalled = book_on(redis_client, keys, "10000", cls=StallsBeforeWriting)
        other = Portfolio(redis_client, keys, "acct", settings=PortfolioSettings(account="acct"),
                          lock_settings=LockSettings(lease_ms=2000, wait_ms=2000), clock=SimulatedClock())
        after_b: dict[str, Any] = {}

        def lease_expires_and_b_writes() -> None:
            redis_client.delete(keys.lock(lock_resource("acct")))  # what the lease expiring does
            other.reserve("b1", "MSFT", "buy", D(1), D(100))
            after_b.update(everything(redis_client, keys))

        stalled.stall = lease_expires_and_b_writes  # type: ignore[attr-defined]
        with pytest.raises(StaleFencingToken) as caught:
            stalled.reserve("a1", "AAPL", "buy", D(1), D(10))
        newest = fence(redis_client, keys)
        assert (caught.value.token, caught.value.highest) == (newest - 1, newest)
        assert everything(redis_client, keys) == after_b
        assert set(stalled.snapshot().reservations) == {"b1"}
        assert verify(redis_client, keys, "acct", allow_short=False).ok


class TestPreTrade:
    @pytest.mark.parametrize("pending", [D(200), D(-200)])
    def test_pending_orders_count_in_gross_exposure(self, pending: D) -> None:
        """$80,000 pending elsewhere (long or short) plus a $20,000 buy is exactly 1x equity: allowed;
        $20,100 is refused, though it would pass with nothing pending."""
        snap = snapshot(pending={"MSFT": pending}, prices={"MSFT": D(400)})
        assert check_order(buy("200"), snap, SETTINGS) == []
        assert [r.rule for r in check_order(buy("201"), snap, SETTINGS)] == [
            Rule.MAX_GROSS_EXPOSURE]
        assert check_order(buy("201"), snapshot(), SETTINGS) == []

    def test_an_order_through_zero_is_an_entry(self) -> None:
        """Selling 11 of a 10 long (or buying 11 against a 10 short) is not reducing, so the entry
        rules apply (stale data refuses it); exactly 10 is an exit and passes."""
        assert is_reducing(Side.SELL, D(10), D(10)) and not is_reducing(Side.SELL, D(10), D(11))
        assert is_reducing(Side.BUY, D(-10), D(10)) and not is_reducing(Side.BUY, D(-10), D(11))
        stale = snapshot(positions={"AAPL": D(10)}, bar_arrivals={})
        assert check_order(sell("10"), stale, SETTINGS) == []
        assert [r.rule for r in check_order(sell("11"), stale, SETTINGS)] == [Rule.STALE_DATA]
        short = snapshot(positions={"AAPL": D(-10)}, bar_arrivals={})
        assert check_order(buy("10"), short, SETTINGS) == []
        assert [r.rule for r in check_order(buy("11"), short, SETTINGS)] == [Rule.STALE_DATA]

    def test_minimum_notional_exactly_allowed_a_cent_below_refused(self) -> None:
        """With a $100 minimum, an entry of 1 @ 100.00 passes and 1 @ 99.99 is refused, in the
        pre-trade check and in the symbol's own rounding."""
        settings = LimitSettings(min_order_notional=D(100))
        assert check_order(buy("1", "100.00"), snapshot(), settings) == []
        assert [r.rule for r in check_order(buy("1", "99.99"), snapshot(), settings)] == [
            Rule.MIN_ORDER_NOTIONAL]
        props = SymbolProperties("AAPL", min_notional=D(100))
        assert props.prepare(Side.BUY, D(1), D("100.00")) == PreparedOrder(D(1), D("100.00"))
        refused = props.prepare(Side.BUY, D(1), D("99.99"))
        assert not isinstance(refused, PreparedOrder) and refused.rule is Rule.BELOW_MIN_NOTIONAL
