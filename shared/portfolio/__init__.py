"""An account's cash, reservations and positions, kept in Redis and changed only under its lock.

Guarantee: every mutation (``open``, ``reserve``, ``release``, ``apply_fill``) is
**lock -> read fresh -> decide -> one atomic write**:

1. take the account's :class:`~shared.portfolio.locks.FencedLock` (resource ``portfolio:{<account>}``),
   which hands out a fencing token;
2. read the state from Redis *after* the lock is held -- in the acquire script itself
   (:class:`~shared.portfolio.locks.LockedRead`), so the read is atomic with taking the lock; a
   :class:`Portfolio` object keeps no copy, so nothing loaded before the lock is decided on;
3. decide in Python with ``Decimal`` (:mod:`shared.portfolio._state`), refusing with a typed
   :class:`~shared.errors.PortfolioError` before anything is written;
4. run :data:`~shared.portfolio._scripts.WRITE_SCRIPT`, which refuses a token below the newest
   accepted or below the fence counter (a holder that stalled past its lease:
   :class:`~shared.errors.StaleFencingToken`) or a moved version
   (:class:`~shared.errors.PortfolioConflict`), and otherwise writes the new values *and* appends
   the ledger entry in one step.

A refusal changes nothing, in Redis or in any object the caller holds. Every operation is
idempotent, so after :class:`~shared.errors.RedisUnavailable` (a dropped connection: the write may
or may not have landed) the caller retries *the same call*: a reservation id already open with the
same terms is returned as it is, a fill id already applied is ignored, a closed reservation's
release is a no-op. Left to the caller: choose unique reservation and fill ids, and retry.

Keys (all share the hash tag ``{<account>}``; ``redis-cli`` reads them as they are)::

    <prefix>:portfolio:{acct}                 cash reserved realized_pnl fees version fence recent_ops
    <prefix>:portfolio:{acct}:positions       <SYM>:qty <SYM>:avg_cost <SYM>:reserved (sell qty held)
    <prefix>:portfolio:{acct}:reservations    <rid> -> "side=buy symbol=AAPL qty=40 price=150 held=6006
                                              filled=0" (open reservations only)
    <prefix>:portfolio:{acct}:closed          <rid> -> why it closed (filled, canceled...)
    <prefix>:portfolio:{acct}:fills           <fill_id> -> <rid> (applied fills: a repeat is ignored)
    <prefix>:ledger:{acct}                    one entry per mutation, never trimmed
    <prefix>:lock:portfolio:{acct}            the lock's owner token, expires with the lease
    <prefix>:fence:portfolio:{acct}           the fencing counter

A ledger entry holds the operation's inputs (enough to replay it) and, for a reader, its result::

    op=reserve account=paper op_id=... rid=r1 side=buy symbol=AAPL qty=40 price=150
    buffer_bps=10 v=2 fence=2 at=2026-01-02T14:30:00+00:00 amount=6006.000
    cash_after=10000 reserved_after=6006.000

``op`` is ``open`` (``cash``), ``reserve`` (``rid side symbol qty price buffer_bps``), ``release``
(``rid reason``) or ``fill`` (``rid fill_id qty price fee``). :func:`verify` replays them.
"""

from __future__ import annotations

from shared.portfolio._state import Outcome, Position, Reservation
from shared.portfolio.portfolio import Held, Portfolio, RecordUpdate, Snapshot, lock_resource
from shared.portfolio.reads import read_ledger, read_state
from shared.portfolio.verify import VerifyReport, verify

__all__ = [
    "Held",
    "Outcome",
    "Portfolio",
    "Position",
    "RecordUpdate",
    "Reservation",
    "Snapshot",
    "VerifyReport",
    "lock_resource",
    "read_ledger",
    "read_state",
    "verify",
]
