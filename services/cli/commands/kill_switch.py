"""``bastion kill-switch on|off``: engage or release the kill switch, recording who and why.

``on --reason TEXT [--state HALTED|REDUCING] [--cancel-orders] [--flatten]`` sets the trading
state (HALTED by default); ``--cancel-orders`` and ``--flatten`` ask the executor to cancel every
open order and to close every position, once. ``off --reason TEXT`` returns to ACTIVE. Who is the
OS user running the command. The change goes through :class:`~shared.safety.trading_state.KillSwitch`:
the state hash and the ledger entry are one script, and an alert follows.

Exit statuses: 0 recorded, 2 bad usage (a missing or empty reason), 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from services.cli._context import Context
from shared.safety.trading_state import KillSwitch, TradingState

__all__ = ["register", "who"]

EXIT_OK, EXIT_USAGE = 0, 2


def who() -> str:
    """The OS user running the command (``unknown`` when the system cannot tell)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME/USER
        return "unknown"


def register(subparsers: Any) -> None:
    """Add the ``kill-switch`` subcommand."""
    parser = subparsers.add_parser("kill-switch", help="halt or reduce trading, or resume it")
    actions = parser.add_subparsers(dest="action", required=True, metavar="on|off")
    on = actions.add_parser("on", help="engage: HALTED (default) or REDUCING")
    on.add_argument("--reason", required=True, help="why (recorded in the ledger and the alert)")
    on.add_argument("--state", choices=[TradingState.HALTED.value, TradingState.REDUCING.value],
                    default=TradingState.HALTED.value, type=str.upper)
    on.add_argument("--cancel-orders", action="store_true", help="the executor cancels every open order")
    on.add_argument("--flatten", action="store_true", help="the executor closes every position")
    on.set_defaults(func=run)
    off = actions.add_parser("off", help="release: back to ACTIVE")
    off.add_argument("--reason", required=True, help="why (recorded in the ledger and the alert)")
    off.set_defaults(func=run, state=TradingState.ACTIVE.value, cancel_orders=False, flatten=False)


def run(args: argparse.Namespace) -> int:
    reason = args.reason.strip()
    if not reason:
        print("bastion: kill-switch needs a non-empty --reason", file=sys.stderr)
        return EXIT_USAGE
    ctx = Context.load()
    switch = KillSwitch(ctx.redis, ctx.keys)
    by = who()
    change = switch.engage(args.state, by, reason, cancel_open_orders=args.cancel_orders,
                           flatten_positions=args.flatten)
    requests = [name for name, asked in (("cancel open orders", args.cancel_orders),
                                         ("flatten positions", args.flatten)) if asked]
    print(f"trading state {change.previous} -> {change.state} (seq {change.seq}) by {by}: {reason}"
          + (f"; executor asked to {' and '.join(requests)}" if requests else ""))
    return EXIT_OK
