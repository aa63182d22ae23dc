"""``bastion verify [--account A] [--json]``: replay the ledger from zero and check it.

Replays every entry of ``<prefix>:ledger:{<account>}``, checking after each one that the recorded
version and balances match and that the invariants hold (cash >= 0, reserved >= 0, reserved <=
cash, reservations add up, no negative position unless ``portfolio.allow_short``), then compares
the result with the state in Redis. Exit 0 when all agree, 1 with the first difference.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.cli._context import Context
from shared.portfolio import verify

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser("verify", help="replay the portfolio ledger and check the invariants")
    parser.add_argument("--account", help="account to verify (default: settings' portfolio.account)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    account = args.account or ctx.settings.portfolio.account
    report = verify(ctx.redis, ctx.keys, account, allow_short=ctx.settings.portfolio.allow_short)
    if args.json:
        print(json.dumps({"account": account, "ok": report.ok, "entries": report.entries,
                          "first_difference": report.problems[0] if report.problems else None}))
    elif report.ok:
        print(f"ok: account {account!r}: {report.entries} ledger entries replay to the current state")
    else:
        print(f"FAILED: account {account!r}: {report.problems[0]}")
    return 0 if report.ok else 1
