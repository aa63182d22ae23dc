"""The :class:`Portfolio`: every mutation of an account under its lock, read fresh, written once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.clock import Clock, LiveClock
from shared.config import LockSettings, PortfolioSettings
from shared.errors import (
    LockError,
    PortfolioConflict,
    PortfolioError,
    RedisUnavailable,
    StaleFencingToken,
)
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Fill, Side
from shared.portfolio._scripts import (
    CONFLICT,
    HELD_READ_SCRIPT,
    READ_SCRIPT,
    RECORD_MOVED,
    STALE_FENCE,
    WRITE_SCRIPT,
)
from shared.portfolio._state import (
    Outcome,
    Position,
    Reservation,
    State,
    apply_entry,
    dec,
    fmt,
)
from shared.portfolio.locks import FencedLock, LockedRead
from shared.portfolio.reads import PARTS, read_state, state_from_held, state_from_read
from shared.redis.boundary import REDIS_DOWN, redis_errors, refusing_writes
from shared.redis.client import reply_text

__all__ = ["Held", "Portfolio", "RecordUpdate", "Snapshot", "lock_resource"]

log = get_logger(module="portfolio")


def lock_resource(account: str) -> str:
    """The lock resource of ``account`` (its hash tag keeps it on the account's cluster slot)."""
    return f"portfolio:{{{account}}}"


@dataclass(frozen=True)
class Snapshot:
    """A consistent read of one account (one script, without the lock)."""

    account: str
    opened: bool
    cash: Decimal
    reserved: Decimal
    realized_pnl: Decimal
    fees: Decimal
    version: int
    fence: int
    positions: dict[str, Position] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    @property
    def buying_power(self) -> Decimal:
        """Cash not held by a reservation."""
        return self.cash - self.reserved

    def equity(self, marks: Mapping[str, Decimal]) -> Decimal:
        """Cash plus positions at ``marks`` (a symbol without a mark counts at its average cost)."""
        return self.cash + sum((p.qty * marks.get(s, p.avg_cost) for s, p in self.positions.items()),
                               Decimal(0))


@dataclass(frozen=True)
class RecordUpdate:
    """Fields to write on another hash (``key``) in the same atomic step as a mutation, provided
    its field ``expect[0]`` still holds ``expect[1]`` ("" for absent): otherwise nothing is written
    and the mutation raises PortfolioConflict (re-read and retry). ``fields`` are made from the
    mutation's outcome, decided under the lock."""

    key: str
    expect: tuple[str, str]
    fields: Callable[[Outcome], Mapping[str, str]]


@dataclass
class Held:
    """The account lock, taken by a caller's batched read, and the state read right after it
    (:meth:`Portfolio.held_from`); spent by :meth:`Portfolio.reserve` or :meth:`Portfolio.let_go`."""

    lock: FencedLock
    token: int
    reservation_id: str
    raw: Any  # HELD_READ_SCRIPT's reply


class Portfolio:
    """A handle on one account. It holds no state: constructing it early is harmless."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        account: str,
        *,
        settings: PortfolioSettings | None = None,
        lock_settings: LockSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.account = account
        self.settings = settings or PortfolioSettings(account=account)
        self.lock_settings = lock_settings or LockSettings()
        self.clock = clock or LiveClock()
        self._keys = [keys.portfolio(account), *(keys.portfolio_part(account, p) for p in PARTS),
                      keys.ledger(account), keys.fence(lock_resource(account)),
                      keys.lock(lock_resource(account))]
        self._write = client.register_script(WRITE_SCRIPT)

    # -- mutations ------------------------------------------------------------------------------

    def open(self, cash: Decimal | None = None) -> Outcome:
        """Open the account with ``cash`` (default: settings' starting cash); a no-op if it is open."""
        amount = self.settings.starting_cash if cash is None else _positive(cash, "cash", allow_zero=True)
        return self._mutate({"op": "open", "cash": fmt(amount)},
                            precheck=lambda s: Outcome(changed=False, duplicate=True) if s.opened else None)

    def reserve(self, reservation_id: str, symbol: str, side: Side | str, quantity: Decimal,
                price: Decimal, *, then: Callable[[Pipeline], None] | None = None,
                held: Held | None = None) -> Outcome:
        """Hold cash for a buy (quantity x price + the fee buffer) or quantity for a sell.

        ``outcome.amount`` is what is held. InsufficientFunds / InsufficientPosition when it cannot
        be covered. Reserving an id again with the same terms returns the open reservation.

        ``then`` queues commands to send right behind the write, in its round trip (not in its
        transaction: they run even if the write is refused, so they must check for themselves
        that the reservation exists, in :attr:`reservations_key`); their replies are
        ``outcome.followed``, None when nothing was written (a refusal or the open reservation).

        ``held``: the lock taken for this reservation id by :meth:`queue_reads_holding`, and the
        state read under it: the reservation is decided on that state without locking again.
        """
        side = Side(side)
        entry = {"op": "reserve", "rid": _id(reservation_id), "side": side.value, "symbol": symbol,
                 "qty": fmt(_positive(quantity, "quantity")), "price": fmt(_positive(price, "price")),
                 "buffer_bps": fmt(self.settings.fee_buffer_bps)}

        def already(state: State) -> Outcome | None:
            existing = state.reservations.get(reservation_id)
            if existing is None:
                return None
            same = (existing.side, existing.symbol, existing.qty, existing.price) == (
                side.value, symbol, quantity, price)
            if not same:
                raise PortfolioError(self.account, f"reservation id {reservation_id!r} is already used")
            return Outcome(changed=False, symbol=symbol, reservation_id=reservation_id,
                           amount=existing.held, duplicate=True)

        return self._mutate(entry, rid=reservation_id, precheck=already, then=then, held=held)

    def release(self, reservation_id: str, reason: str = "released") -> Outcome:
        """Give back what a reservation still holds (cancel, reject, expiry); ``outcome.amount``."""
        return self._mutate({"op": "release", "rid": _id(reservation_id), "reason": reason or "released"},
                            rid=reservation_id)

    def apply_fill(self, reservation_id: str, fill: Fill, *, side: Side | str | None = None,
                   symbol: str | None = None, record: RecordUpdate | None = None) -> Outcome:
        """Book one execution of the reservation's order; a fill id seen before changes nothing.

        A fill is a fact: it is booked even beyond the reservation (an over-fill, a cost above
        what was held and free, a reservation already closed); ``outcome.beyond`` then says what
        it went beyond, for the caller to alert on. Returns the realized PnL and, when the order is
        complete, the unused part of the reservation given back (``outcome.amount``). ``record``
        is written in the same atomic step (the order's applied quantity, so the two never part).
        ``side`` and ``symbol`` say what was traded (needed when the reservation is closed; by
        default the reservation's).
        """
        entry = {"op": "fill", "rid": _id(reservation_id), "fill_id": _id(fill.fill_id),
                 "qty": fmt(_positive(fill.quantity, "quantity")),
                 "price": fmt(_positive(fill.price, "price")), "fee": fmt(fill.fee)}
        if side is not None and symbol is not None:
            entry |= {"side": Side(side).value, "symbol": symbol}
        return self._mutate(entry, rid=reservation_id, fill_id=fill.fill_id, record=record)

    # -- reads --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The account as it is now (a consistent read; decide nothing on it outside the lock)."""
        return self._snapshot(read_state(self.redis, self.keys, self.account))

    def queue_reads_holding(self, pipe: Pipeline, reservation_id: str) -> FencedLock:
        """Queue on ``pipe`` the snapshot read and the marks read, in that order (for a caller
        batching its reads; :meth:`held_from`, :meth:`marks_from`). The snapshot read first tries
        to take the account lock, in the same script, for the caller to make ``reservation_id``
        under it without locking again: :meth:`held_from` says whether it was taken."""
        lock = self._lock()
        lock.queue_try(pipe, LockedRead(HELD_READ_SCRIPT, self._keys[:4], [reservation_id]))
        pipe.hgetall(self.keys.last_price)
        return lock

    def held_from(self, lock: FencedLock, raw: Any, reservation_id: str) -> tuple[Snapshot, Held | None]:
        """The snapshot in the reply of :meth:`queue_reads_holding`'s read, and the lock if it was taken
        (then the snapshot was read under it; the caller must spend it: :meth:`reserve` or
        :meth:`let_go`)."""
        taken = lock.tried_from(raw)
        snapshot = self._snapshot(state_from_held(lock.reads, ""))
        if not taken or lock.fencing_token is None:
            return snapshot, None
        return snapshot, Held(lock, lock.fencing_token, reservation_id, lock.reads)

    def _lock(self) -> FencedLock:
        return FencedLock.from_settings(self.redis, self.keys, lock_resource(self.account),
                                        self.lock_settings, self.clock)

    def let_go(self, held: Held) -> None:
        """Release a lock :meth:`held_from` returned without writing anything under it."""
        self._release_quietly(held.lock)

    def queue_let_go(self, pipe: Pipeline, held: Held) -> None:
        """Queue :meth:`let_go` on ``pipe`` (for a caller batching its round trips);
        :meth:`let_go_from` reads the reply."""
        held.lock.queue_release(pipe)

    def let_go_from(self, held: Held, reply: Any) -> None:
        """Log a queued let-go that failed (nothing was written under the lock: it only expires)."""
        try:
            held.lock.released_from(reply)
        except LockError as exc:
            log.warning("portfolio.lock_release_failed", account=self.account, error=str(exc))

    def _snapshot(self, state: State) -> Snapshot:
        return Snapshot(account=self.account, opened=state.opened, cash=state.cash, reserved=state.reserved,
                        realized_pnl=state.realized_pnl, fees=state.fees, version=state.version,
                        fence=state.fence, positions=state.positions, reservations=state.reservations)

    def read(self) -> State:
        """The whole state, with every closed reservation and applied fill id."""
        return read_state(self.redis, self.keys, self.account, history=True)

    def marks(self) -> dict[str, Decimal]:
        """Last prices by symbol (for equity): the close of each symbol's newest bar, which the
        ingester writes to ``<prefix>:last-price`` as it publishes the bar (market data, shared
        by every account; not portfolio state)."""
        with redis_errors("reading marks"):
            return self.marks_from(self.redis.hgetall(self.keys.last_price))

    @staticmethod
    def marks_from(raw: Any) -> dict[str, Decimal]:
        """The marks in a reply of the marks read."""
        return {k.decode(): dec(v) for k, v in raw.items()}

    # -- the protocol -------------------------------------------------------------------------

    @property
    def reservations_key(self) -> str:
        """The hash of the open reservations, by reservation id."""
        return self._keys[2]

    def _mutate(self, entry: dict[str, str], *, rid: str | None = None, fill_id: str | None = None,
                precheck: Any = None, then: Callable[[Pipeline], None] | None = None,
                held: Held | None = None, record: RecordUpdate | None = None) -> Outcome:
        entry = {**entry, "account": self.account, "op_id": uuid.uuid4().hex}
        return self._locked(entry, rid, fill_id, precheck, then, held, record)

    def _locked(self, entry: dict[str, str], rid: str | None, fill_id: str | None, precheck: Any,
                then: Callable[[Pipeline], None] | None, held: Held | None = None,
                record: RecordUpdate | None = None) -> Outcome:
        """Lock (reading the state in the same round trip, after the lock is taken), decide, write;
        with ``held``, the lock is taken and the state read already."""
        if held is not None:
            lock, token = held.lock, held.token
        else:
            lock = self._lock()
            token = lock.acquire(reads=LockedRead(READ_SCRIPT, self._keys[:5], [rid or "", fill_id or ""]))
        try:
            if held is not None and held.reservation_id != rid:
                raise ValueError(f"the lock was taken for reservation {held.reservation_id!r}, not {rid!r}")
            state = (state_from_held(held.raw, rid or "") if held is not None
                     else state_from_read(lock.reads, rid, fill_id))
            outcome = precheck(state) if precheck is not None else None
            if outcome is None:
                outcome = apply_entry(state, entry, allow_short=self.settings.allow_short)
        except BaseException:
            self._release_quietly(lock)
            raise
        if not outcome.changed:
            self._release_quietly(lock)
            return outcome
        try:
            followed = self._commit(lock, token, state, entry, outcome, then, record)
        except PortfolioError:  # refused: nothing was written and the lock is still held
            self._release_quietly(lock)
            raise
        return outcome if then is None else replace(outcome, followed=followed)

    def _release_quietly(self, lock: FencedLock) -> None:
        try:
            lock.release()
        except (LockError, RedisUnavailable) as exc:  # nothing was written under it
            log.warning("portfolio.lock_release_failed", account=self.account, error=str(exc))

    def _commit(self, lock: FencedLock, token: int, state: State, entry: dict[str, str],
                outcome: Outcome, then: Callable[[Pipeline], None] | None = None,
                record: RecordUpdate | None = None) -> tuple[Any, ...]:
        """Write ``state``'s changed parts and ``entry`` atomically under ``token``, releasing the lock;
        the replies of what ``then`` queued behind the write.

        Raises StaleFencingToken / PortfolioConflict if the script refused (nothing written, the
        lock still held), or RedisUnavailable if the round trip failed (the write may or may not
        have landed; the lock then expires with its lease if it was not released).
        """
        keys = self._keys if record is None else [*self._keys, record.key]
        args: list[Any] = [token, state.version, entry["op_id"], lock.owner_token]
        if record is None:
            args += ["", "", 0]
        else:
            written = record.fields(outcome)
            args += [*record.expect, len(written), *(x for pair in written.items() for x in pair)]
        args += _group([("cash", fmt(state.cash)), ("reserved", fmt(state.reserved)),
                        ("realized_pnl", fmt(state.realized_pnl)), ("fees", fmt(state.fees))], [])
        symbol, rid = outcome.symbol, outcome.reservation_id
        fields = [f"{symbol}:qty", f"{symbol}:avg_cost", f"{symbol}:reserved"] if symbol else []
        position = state.positions.get(symbol) if symbol else None
        if position is not None:
            values = [fmt(position.qty), fmt(position.avg_cost), fmt(position.reserved)]
            args += _group(list(zip(fields, values, strict=True)), [])
        else:
            args += _group([], fields)
        reservation = state.reservations.get(rid) if rid else None
        args += _group([(rid, reservation.encode())] if rid and reservation else [],
                       [rid] if rid and reservation is None else [])
        args += _group([(rid, state.closed[rid])] if rid and outcome.completed else [], [])
        args += _group([(outcome.fill_id, rid)] if outcome.fill_id and rid else [], [])
        ledger = {**entry, "v": str(state.version + 1), "fence": str(token),
                  "at": self.clock.now().isoformat(), "amount": fmt(outcome.amount),
                  "cash_after": fmt(state.cash), "reserved_after": fmt(state.reserved)}
        if outcome.fill_id:
            ledger["realized"] = fmt(outcome.realized)
        if outcome.beyond:
            ledger["beyond"] = outcome.beyond
        args += [len(ledger), *(x for pair in ledger.items() for x in pair)]
        followed: tuple[Any, ...] = ()
        try:
            if then is None:
                result = self._write(keys=keys, args=args, client=self.redis)
            else:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.eval(WRITE_SCRIPT, len(keys), *keys, *args)  # EVAL: no SCRIPT EXISTS
                    then(pipe)
                    result, *rest = pipe.execute(raise_on_error=False)
                if isinstance(result, redis.ResponseError):
                    raise result
                followed = tuple(rest)
        except redis.ResponseError as exc:
            if refusing_writes(exc):  # refused before its first write: nothing written, the lock held
                self._release_quietly(lock)
                raise RedisUnavailable(f"portfolio {self.account!r}: Redis refuses writes ({exc}); nothing "
                                       f"of {entry['op']} was written, retry the same call") from exc
            raise PortfolioError(self.account, f"write refused: {exc}") from exc
        except REDIS_DOWN as exc:
            lock.released_by_store()
            raise RedisUnavailable(f"portfolio {self.account!r}: write of {entry['op']} failed, it may or "
                                   f"may not have been applied; retry the same call: {exc}") from exc
        verdict = reply_text(result[0])
        if verdict == RECORD_MOVED:  # refused: nothing written, the lock still held
            raise PortfolioConflict(self.account, f"{record.key if record else '?'}: "
                                                  f"{record.expect[0] if record else '?'} moved from "
                                                  f"{reply_text(result[1])!r} to {reply_text(result[2])!r}")
        if verdict in (STALE_FENCE, CONFLICT):  # refused: nothing written, the lock still held
            raise self._refusal(verdict, int(result[1]), int(result[2]))
        lock.released_by_store()
        if not int(result[3]):  # accepted, so the fence counter had not moved: nobody took the lock
            log.warning("portfolio.lease_expired_during_write", account=self.account, token=token)
        return followed

    def _refusal(self, verdict: str, sent: int, found: int) -> PortfolioError:
        """The typed error for the write script's refusal: ``verdict``, what the writer sent (its
        token or the version it read) and what the store has (the newest token or the version)."""
        if verdict == STALE_FENCE:
            log.warning("portfolio.stale_fence_refused", account=self.account, token=sent, newest=found)
            return StaleFencingToken(self.account, sent, found)
        return PortfolioConflict(self.account,
                                 f"state version moved from {sent} to {found} between read and write")


def _group(sets: list[tuple[str, str]], deletes: list[str]) -> list[Any]:
    return [len(sets), *(x for pair in sets for x in pair), len(deletes), *deletes]


def _positive(value: Decimal, name: str, *, allow_zero: bool = False) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0\
            or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} "
                         f"Decimal, got {value!r}")
    return value


def _id(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"ids must be non-empty and without spaces, got {value!r}")
    return value
