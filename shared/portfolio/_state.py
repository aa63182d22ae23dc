"""The portfolio's arithmetic, with no I/O: one function applies one ledger entry to a state.

The live store (:mod:`shared.portfolio`) builds a ledger entry from the caller's request, applies
it with :func:`apply_entry` to the state it just read under the lock, and writes the result
together with the entry; :func:`replay` applies every entry of a ledger from zero. Both go through
the same code, so a ledger replays to the state it produced, and a refusal here (a typed
:class:`~shared.errors.PortfolioError`) happens before anything is written.

All arithmetic runs in :data:`MONEY_CONTEXT`; amounts are exact except the average cost, which is
rounded to :data:`AVG_COST_EXP` (half-even). Realized PnL is price PnL; fees are totalled apart.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from typing import Any

from shared.errors import (
    FillRefused,
    InsufficientFunds,
    InsufficientPosition,
    PortfolioError,
    UnknownReservation,
)

__all__ = [
    "AVG_COST_EXP",
    "MONEY_CONTEXT",
    "Outcome",
    "Position",
    "Reservation",
    "State",
    "apply_entry",
    "dec",
    "fmt",
    "invariant_violations",
    "replay",
]

MONEY_CONTEXT = Context(prec=40, rounding=ROUND_HALF_EVEN)
AVG_COST_EXP = Decimal("1E-10")
ZERO = Decimal(0)
BPS = Decimal(10_000)


def fmt(value: Decimal) -> str:
    """A Decimal as plain text (no exponent), the way Redis stores it."""
    return f"{value:f}"


def dec(text: str | bytes | None, default: Decimal = ZERO) -> Decimal:
    """Parse a stored decimal (``None`` gives ``default``)."""
    if text is None:
        return default
    raw = text.decode() if isinstance(text, bytes) else text
    try:
        return Decimal(raw)
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal: {raw!r}") from exc


@dataclass
class Position:
    """A holding: quantity (negative only when shorting), average cost, quantity reserved to sell."""

    qty: Decimal = ZERO
    avg_cost: Decimal = ZERO
    reserved: Decimal = ZERO

    @property
    def empty(self) -> bool:
        return self.qty == 0 and self.reserved == 0


@dataclass
class Reservation:
    """Cash (buy) or quantity (sell) held for one order until it fills or is released."""

    side: str
    symbol: str
    qty: Decimal
    price: Decimal
    held: Decimal
    filled: Decimal = ZERO

    def encode(self) -> str:
        """The hash value: ``side=buy symbol=AAPL qty=40 price=150 held=6006.000 filled=0``."""
        return (f"side={self.side} symbol={self.symbol} qty={fmt(self.qty)} price={fmt(self.price)} "
                f"held={fmt(self.held)} filled={fmt(self.filled)}")

    @classmethod
    def decode(cls, text: str | bytes) -> Reservation:
        raw = text.decode() if isinstance(text, bytes) else text
        parts = dict(item.split("=", 1) for item in raw.split())
        return cls(side=parts["side"], symbol=parts["symbol"], qty=dec(parts["qty"]),
                   price=dec(parts["price"]), held=dec(parts["held"]), filled=dec(parts["filled"]))


@dataclass
class State:
    """One account. Live reads fill ``closed``/``fills`` only with the ids an operation names."""

    opened: bool = False
    cash: Decimal = ZERO
    reserved: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    version: int = 0
    fence: int = 0
    positions: dict[str, Position] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    closed: dict[str, str] = field(default_factory=dict)
    fills: dict[str, str] = field(default_factory=dict)

    def copy(self) -> State:
        return copy.deepcopy(self)

    def position(self, symbol: str) -> Position:
        return self.positions.setdefault(symbol, Position())


@dataclass(frozen=True)
class Outcome:
    """What one entry did: which parts of the state changed, and the figures for the caller."""

    changed: bool
    symbol: str | None = None
    reservation_id: str | None = None
    fill_id: str | None = None
    amount: Decimal = ZERO          # cash/quantity reserved, or released when a reservation closes
    realized: Decimal = ZERO        # realized PnL of a fill
    completed: bool = False         # the reservation closed (filled or released)
    duplicate: bool = False         # a fill id already applied, or a release of a closed reservation
    followed: tuple[Any, ...] | None = None  # replies of the commands queued after the write (None: none ran)
    position_before: Decimal = ZERO  # a fill's symbol's position quantity before it (signed)
    beyond: str = ""                # a fill booked beyond its reservation's pre-trade control: why


def apply_entry(state: State, entry: Mapping[str, str], *, allow_short: bool) -> Outcome:
    """Apply one ledger entry to ``state`` in place, or raise a PortfolioError leaving it untouched.

    Every check comes before the first change. Entries: ``open``, ``reserve``, ``release``, ``fill``.
    """
    op = entry["op"]
    with localcontext(MONEY_CONTEXT):
        if op == "open":
            return _open(state, entry)
        if op == "reserve":
            return _reserve(state, entry, allow_short)
        if op == "release":
            return _release(state, entry)
        if op == "fill":
            return _fill(state, entry, allow_short)
    raise ValueError(f"unknown ledger op {op!r}")


def _account(entry: Mapping[str, str]) -> str:
    return entry.get("account", "?")


def _open(state: State, entry: Mapping[str, str]) -> Outcome:
    if state.opened:
        raise PortfolioError(_account(entry), "account is already open")
    state.opened = True
    state.cash = dec(entry["cash"])
    return Outcome(changed=True, amount=state.cash)


def _reserve(state: State, entry: Mapping[str, str], allow_short: bool) -> Outcome:
    account, rid = _account(entry), entry["rid"]
    _require_open(state, account)
    if rid in state.reservations or rid in state.closed:
        raise PortfolioError(account, f"reservation id {rid!r} is already used")
    side, symbol, qty, price = entry["side"], entry["symbol"], dec(entry["qty"]), dec(entry["price"])
    if side == "buy":
        amount = qty * price * (1 + dec(entry["buffer_bps"]) / BPS)
        free = state.cash - state.reserved
        if amount > free:
            raise InsufficientFunds(account, amount, free)
        state.reserved += amount
    elif side == "sell":
        amount = qty
        position = state.positions.get(symbol, Position())
        available = position.qty - position.reserved
        if not allow_short and qty > available:
            raise InsufficientPosition(account, symbol, qty, max(available, ZERO))
        state.position(symbol).reserved += qty
    else:
        raise ValueError(f"unknown side {side!r}")
    state.reservations[rid] = Reservation(side=side, symbol=symbol, qty=qty, price=price, held=amount)
    return Outcome(changed=True, symbol=symbol, reservation_id=rid, amount=amount)


def _close(state: State, rid: str, reason: str) -> Decimal:
    """Give back what ``rid`` still holds and close it; return the amount given back."""
    reservation = state.reservations.pop(rid)
    if reservation.side == "buy":
        state.reserved -= reservation.held
    else:
        state.position(reservation.symbol).reserved -= reservation.held
    _tidy(state, reservation.symbol)
    state.closed[rid] = reason
    return reservation.held


def _release(state: State, entry: Mapping[str, str]) -> Outcome:
    account, rid = _account(entry), entry["rid"]
    _require_open(state, account)
    if rid not in state.reservations:
        if rid in state.closed:
            return Outcome(changed=False, reservation_id=rid, duplicate=True)
        raise UnknownReservation(account, rid)
    symbol = state.reservations[rid].symbol
    returned = _close(state, rid, entry.get("reason") or "released")
    return Outcome(changed=True, symbol=symbol, reservation_id=rid, amount=returned, completed=True)


def _fill(state: State, entry: Mapping[str, str], allow_short: bool) -> Outcome:
    """Book one execution. A fill is a fact: it is never refused for going beyond its reservation
    (an over-fill, a cost above what was held and free, a closed or unknown reservation, a sell
    through zero); what it went beyond is said in ``outcome.beyond`` and the ledger entry."""
    account, rid, fill_id = _account(entry), entry["rid"], entry["fill_id"]
    _require_open(state, account)
    if fill_id in state.fills:
        return Outcome(changed=False, reservation_id=rid, fill_id=fill_id, duplicate=True)
    reservation = state.reservations.get(rid)
    side = entry.get("side") or (reservation.side if reservation is not None else "")
    symbol = entry.get("symbol") or (reservation.symbol if reservation is not None else "")
    if not side or not symbol:
        raise UnknownReservation(account, rid)  # nothing says what was bought or sold
    if reservation is not None and (reservation.side, reservation.symbol) != (side, symbol):
        raise FillRefused(account, fill_id, f"{side} {symbol} does not match reservation {rid!r} "
                                            f"({reservation.side} {reservation.symbol})")
    qty, price, fee = dec(entry["qty"]), dec(entry["price"]), dec(entry["fee"])
    position = state.position(symbol)
    before = position.qty
    beyond: list[str] = []
    if reservation is None:
        beyond.append(f"reservation {rid!r} is {state.closed.get(rid, 'unknown')}, not open")
    elif reservation.filled + qty > reservation.qty:
        beyond.append(f"over-fill: {fmt(reservation.filled)} filled before + {fmt(qty)} > order "
                      f"quantity {fmt(reservation.qty)}")
    take = ZERO
    if side == "buy":
        spend = qty * price + fee
        if reservation is not None:
            take = min(spend, reservation.held)
        free = state.cash - state.reserved
        if spend - take > free:
            beyond.append(f"costs {fmt(spend)}: {fmt(spend - take)} more than the reservation held, "
                          f"with {fmt(free)} free")
        state.cash -= spend
        state.reserved -= take
        realized = _trade(position, qty, price)
    elif side == "sell":
        proceeds = qty * price - fee
        if reservation is not None:
            take = min(qty, reservation.held)
        if state.cash + proceeds < state.reserved:
            beyond.append(f"fee {fmt(fee)} overdraws the cash left")
        state.cash += proceeds
        position.reserved -= take
        realized = _trade(position, -qty, price)
        if position.qty < 0 <= before and not allow_short:
            beyond.append(f"sells {fmt(qty)} with {fmt(before)} held: short {fmt(-position.qty)}, "
                          "and shorting is off")
    else:
        raise ValueError(f"unknown side {side!r}")
    state.fees += fee
    state.realized_pnl += realized
    state.fills[fill_id] = rid
    returned, completed = ZERO, False
    if reservation is not None:
        reservation.held -= take
        reservation.filled += qty
        if reservation.filled >= reservation.qty:
            returned, completed = _close(state, rid, "filled"), True
    _tidy(state, symbol)
    return Outcome(changed=True, symbol=symbol, reservation_id=rid, fill_id=fill_id, amount=returned,
                   realized=realized, completed=completed, position_before=before,
                   beyond="; ".join(beyond))


def _trade(position: Position, signed_qty: Decimal, price: Decimal) -> Decimal:
    """Move ``position`` by ``signed_qty`` at ``price``; return the realized PnL."""
    held = position.qty
    if held == 0 or (held > 0) == (signed_qty > 0):
        new_qty = held + signed_qty
        cost = abs(held) * position.avg_cost + abs(signed_qty) * price
        position.qty, position.avg_cost = new_qty, (cost / abs(new_qty)).quantize(AVG_COST_EXP)
        return ZERO
    closing = min(abs(signed_qty), abs(held))
    direction = 1 if held > 0 else -1
    realized = closing * (price - position.avg_cost) * direction
    new_qty = held + signed_qty
    if new_qty == 0:
        position.avg_cost = ZERO
    elif (new_qty > 0) != (held > 0):
        position.avg_cost = price
    position.qty = new_qty
    return realized


def _tidy(state: State, symbol: str) -> None:
    position = state.positions.get(symbol)
    if position is not None and position.empty:
        del state.positions[symbol]


def _require_open(state: State, account: str) -> None:
    if not state.opened:
        raise PortfolioError(account, "account is not open")


def replay(entries: Iterable[Mapping[str, str]], *, allow_short: bool) -> State:
    """The state a ledger's entries produce from zero; ValueError naming the first bad entry."""
    state = State()
    for index, entry in enumerate(entries):
        try:
            outcome = apply_entry(state, entry, allow_short=allow_short)
        except PortfolioError as exc:
            where = f"ledger entry {index} ({entry.get('id', '?')})"
            raise ValueError(f"{where} is refused on replay: {exc}") from exc
        if outcome.changed:
            state.version += 1
            state.fence = max(state.fence, int(entry.get("fence", "0")))
    return state


def invariant_violations(state: State, *, allow_short: bool, controls: bool = True) -> list[str]:
    """Every broken invariant of ``state``, as text (empty when all hold).

    The structural ones always hold: what is reserved is what the open reservations hold.
    ``controls``: also the ones the pre-trade checks keep (cash covers what is reserved, no
    short without ``allow_short``) -- a fill booked beyond its reservation may break those, as
    a fact the account now has to be brought back from.
    """
    problems = []
    if state.reserved < 0:
        problems.append(f"reserved {fmt(state.reserved)} < 0")
    if controls and state.cash < 0:
        problems.append(f"cash {fmt(state.cash)} < 0")
    if controls and state.reserved > state.cash:
        problems.append(f"reserved {fmt(state.reserved)} > cash {fmt(state.cash)}")
    held_cash = sum((r.held for r in state.reservations.values() if r.side == "buy"), ZERO)
    if held_cash != state.reserved:
        problems.append(f"reserved {fmt(state.reserved)} != sum of buy reservations {fmt(held_cash)}")
    for symbol, position in sorted(state.positions.items()):
        if controls and position.qty < 0 and not allow_short:
            problems.append(f"position {symbol} {fmt(position.qty)} < 0 (shorting is off)")
        if position.reserved < 0:
            problems.append(f"position {symbol} reserved {fmt(position.reserved)} < 0")
        if controls and position.reserved > position.qty and not allow_short:
            problems.append(f"position {symbol} reserved {fmt(position.reserved)} > "
                            f"quantity {fmt(position.qty)}")
        held = sum((r.held for r in state.reservations.values()
                    if r.side == "sell" and r.symbol == symbol), ZERO)
        if held != position.reserved:
            problems.append(f"position {symbol} reserved {fmt(position.reserved)} != sum of sell "
                            f"reservations {fmt(held)}")
    return problems
