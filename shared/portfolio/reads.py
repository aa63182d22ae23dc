"""Reading an account's state without its lock, and decoding the state the scripts return."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import redis

from shared.keys import Keys
from shared.portfolio._scripts import FULL_READ_SCRIPT
from shared.portfolio._state import Reservation, State, dec
from shared.redis.boundary import redis_errors
from shared.redis.client import script

__all__ = ["PARTS", "read_ledger", "read_state", "state_from_full_read", "state_from_held",
           "state_from_read"]

PARTS = ("positions", "reservations", "closed", "fills")  # the account's keys beside its head hash


def read_state(client: redis.Redis, keys: Keys, account: str, *, history: bool = False) -> State:
    """Read all of ``account`` in one script (a consistent view, taken without the lock).

    With ``history`` also every closed reservation and applied fill id (for replay checks).
    """
    names = [keys.portfolio(account), *(keys.portfolio_part(account, name) for name in PARTS)]
    with redis_errors(f"reading portfolio {account!r}"):
        raw = script(client, FULL_READ_SCRIPT)(keys=names, args=["1" if history else "0"], client=client)
    return state_from_full_read(raw, history=history)


def state_from_full_read(raw: Any, *, history: bool) -> State:
    """The state in a reply of FULL_READ_SCRIPT."""
    head, positions, reservations, closed, fills = raw
    state = _base_state(_pairs(head), _pairs(positions))
    state.reservations = {k.decode(): Reservation.decode(v) for k, v in _pairs(reservations).items()}
    if history:
        state.closed = {k.decode(): v.decode() for k, v in _pairs(closed).items()}
        state.fills = {k.decode(): v.decode() for k, v in _pairs(fills).items()}
    return state


def _base_state(head: Mapping[bytes, bytes], positions: Mapping[bytes, bytes]) -> State:
    state = State(opened=b"cash" in head, cash=dec(head.get(b"cash")), reserved=dec(head.get(b"reserved")),
                  realized_pnl=dec(head.get(b"realized_pnl")), fees=dec(head.get(b"fees")),
                  version=int(head.get(b"version", 0)), fence=int(head.get(b"fence", 0)))
    for key, value in positions.items():
        symbol, _, attr = key.decode().rpartition(":")
        setattr(state.position(symbol), attr, dec(value))
    return state


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def state_from_held(raw: list[Any], rid: str) -> State:
    """The state HELD_READ_SCRIPT returned (see its contract), with ``rid``'s close reason if closed."""
    head, positions, reservations, closed = raw
    state = state_from_full_read([head, positions, reservations, 0, 0], history=False)
    if rid and closed:
        state.closed[rid] = closed.decode()
    return state


def state_from_read(raw: list[Any], rid: str | None, fill_id: str | None) -> State:
    """The state READ_SCRIPT returned (see its contract)."""
    head, positions, reservation, closed, fill = raw
    state = _base_state(_pairs(head), _pairs(positions))
    if rid and reservation:
        state.reservations[rid] = Reservation.decode(reservation)
    if rid and closed:
        state.closed[rid] = closed.decode()
    if fill_id and fill:
        state.fills[fill_id] = fill.decode()
    return state


def read_ledger(client: redis.Redis, keys: Keys, account: str, batch: int = 1000) -> Iterator[dict[str, str]]:
    """Every ledger entry of ``account``, oldest first, with its stream id under ``id``."""
    start = "-"
    while True:
        with redis_errors(f"reading the ledger of {account!r}"):
            chunk: Any = client.xrange(keys.ledger(account), start, "+", count=batch)
        for entry_id, fields in chunk:
            yield {"id": entry_id.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}
        if len(chunk) < batch:
            return
        start = "(" + chunk[-1][0].decode()
