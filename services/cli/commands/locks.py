"""``bastion locks``: list the protection locks, remove one, or lock entries by hand, recording who and why.

``locks [--json]`` lists the active locks (protection, symbol, side, until, reason), the one ending
last first; it only reads (an expired lock is hidden, not swept). ``locks unlock PROTECTION SYMBOL
SIDE --reason TEXT`` removes one lock: SIDE is ``buy``, ``sell`` or ``*`` (both), SYMBOL ``*`` for
a lock on every symbol (quote ``'*'`` in a shell); the protection's next trigger may lock again.
``locks add SYMBOL [--side buy|sell|*] --minutes N --reason TEXT`` locks entries under the
protection ``manual``, which risk refuses like any other lock; a manual lock already on that
symbol and side that ends later is kept. Who is the OS user running the command. Both changes go
through :class:`~shared.safety.protections.Protections`, which logs them with who and why.

Exit statuses: 0 listed, removed or locked; 1 no such active lock to remove; 2 bad usage (a
missing or empty reason, an unknown protection or side, a bad symbol or duration); 3 Redis
unreachable.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import timedelta
from typing import Any

from services.cli._context import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Context
from services.cli.commands.kill_switch import who
from shared.clock import LiveClock
from shared.redis.client import reply_text
from shared.safety.protections import ANY, MANUAL, PROTECTIONS, ProtectionLock, Protections

__all__ = ["active_locks", "register"]

SIDES = ("buy", "sell", ANY)
_SYMBOL = re.compile(r"^[A-Z0-9./-]{1,32}$")  # shared.models.Symbol
COLUMNS = ("protection", "symbol", "side", "until", "reason")


def _symbol(text: str) -> str:
    symbol = text.strip().upper()
    if symbol != ANY and not _SYMBOL.match(symbol):
        raise argparse.ArgumentTypeError(f"{text!r} is not a symbol (letters, digits, '.', '/', '-'; or '*')")
    return symbol


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of minutes")
    return value


def register(subparsers: Any) -> None:
    """Add the ``locks`` subcommand."""
    parser = subparsers.add_parser("locks", help="list protection locks, remove one, or lock entries by hand")
    parser.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    parser.set_defaults(func=run_list)
    actions = parser.add_subparsers(dest="action", metavar="unlock|add")
    unlock = actions.add_parser("unlock", help="remove one active lock")
    unlock.add_argument("protection", choices=PROTECTIONS)
    unlock.add_argument("symbol", type=_symbol, help="the lock's symbol ('*': a lock on every symbol)")
    unlock.add_argument("side", choices=SIDES, type=str.lower, help="the lock's side ('*': both)")
    unlock.add_argument("--reason", required=True, help="why (logged with who)")
    unlock.set_defaults(func=run_unlock)
    add = actions.add_parser("add", help=f"lock entries by hand (protection {MANUAL!r})")
    add.add_argument("symbol", type=_symbol, help="the symbol ('*': every symbol)")
    add.add_argument("--side", choices=SIDES, type=str.lower, default=ANY, help="the entry side ('*': both)")
    add.add_argument("--minutes", type=_minutes, required=True, help="how long from now")
    add.add_argument("--reason", required=True, help="why (risk's refusals quote it; logged with who)")
    add.set_defaults(func=run_add)


def active_locks(ctx: Context) -> list[ProtectionLock]:
    """The active locks, the one ending last first (read only: expired ones are left to risk)."""
    now = LiveClock().now()
    raw: Any = ctx.redis.hgetall(ctx.keys.protection_locks)
    stored = (ProtectionLock.decode(reply_text(value)) for value in raw.values())
    return sorted((lock for lock in stored if lock.active(now)), key=lambda lock: lock.until, reverse=True)


def run_list(args: argparse.Namespace) -> int:
    rows = [{"protection": lock.protection, "symbol": lock.symbol, "side": lock.side,
             "until": lock.until.isoformat(), "reason": lock.reason, "at": lock.at.isoformat()}
            for lock in active_locks(Context.load())]
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    if not rows:
        print("no active protection locks")
        return EXIT_OK
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COLUMNS[:-1]}
    for row in [{c: c.upper() for c in COLUMNS}, *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + row["reason"])
    return EXIT_OK


def _reason(args: argparse.Namespace) -> str | None:
    reason = str(args.reason).strip()
    if not reason:
        print(f"bastion: locks {args.action} needs a non-empty --reason", file=sys.stderr)
        return None
    return reason


def run_unlock(args: argparse.Namespace) -> int:
    reason = _reason(args)
    if reason is None:
        return EXIT_USAGE
    ctx = Context.load()
    by = who()
    protections = Protections(ctx.redis, ctx.keys, ctx.settings.protections)
    if not protections.unlock(args.protection, args.symbol, args.side, reason, by):
        print(f"bastion: no active {args.protection} lock on {args.symbol}/{args.side} "
              f"(`bastion locks` lists them)", file=sys.stderr)
        return EXIT_FAILED
    print(f"unlocked {args.protection} {args.symbol}/{args.side} by {by}: {reason}")
    return EXIT_OK


def run_add(args: argparse.Namespace) -> int:
    reason = _reason(args)
    if reason is None:
        return EXIT_USAGE
    clock = LiveClock()
    try:
        until = clock.now() + timedelta(minutes=args.minutes)
    except OverflowError:
        print(f"bastion: --minutes {args.minutes:g} reaches past the last date there is", file=sys.stderr)
        return EXIT_USAGE
    ctx = Context.load()
    by = who()
    protections = Protections(ctx.redis, ctx.keys, ctx.settings.protections, clock)
    try:
        lock = protections.lock(args.symbol, args.side, until, reason, by)
    except ValueError as exc:  # --minutes so small that the lock would end now
        print(f"bastion: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if lock is None:
        field = f"{MANUAL}:{args.symbol}:{args.side}"
        kept = next((lock for lock in active_locks(ctx) if lock.field == field), None)
        print(f"kept the {MANUAL} lock on {args.symbol}/{args.side}: it ends as late or later, at "
              f"{kept.until.isoformat() if kept else '?'}")
        return EXIT_OK
    print(f"locked {args.symbol}/{args.side} entries until {lock.until.isoformat()} ({MANUAL}) "
          f"by {by}: {reason}")
    return EXIT_OK
