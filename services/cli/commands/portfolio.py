"""``bastion portfolio [--account A] [--json]``: cash, reserved, buying power, positions, equity.

Equity is cash plus every position at its last price (``<prefix>:last-price``, symbol -> the
close of its newest bar, which the ingester writes as it publishes the bar); a position with no
mark is valued at its average cost and flagged ``"mark": null``. Read-only: it takes no lock.
:func:`report` is the JSON both this command and the HTTP API (services/api) show.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli._context import Context
from services.cli.commands.status import Source
from shared.portfolio import Portfolio

__all__ = ["register", "report"]


def register(subparsers: Any) -> None:
    """Add the ``portfolio`` subcommand."""
    parser = subparsers.add_parser("portfolio", help="show cash, reservations, positions and equity")
    parser.add_argument("--account", help="account to show (default: settings' portfolio.account)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.set_defaults(func=run)


def report(ctx: Source, account: str) -> dict[str, Any] | None:
    """The account's cash, reservations, equity and positions with their marks; None if not opened."""
    portfolio = Portfolio(ctx.redis, ctx.keys, account, settings=ctx.settings.portfolio)
    snap, marks = portfolio.snapshot(), portfolio.marks()
    if not snap.opened:
        return None
    positions = {
        symbol: {"quantity": str(p.qty), "avg_cost": str(p.avg_cost), "reserved_to_sell": str(p.reserved),
                 "mark": str(marks[symbol]) if symbol in marks else None,
                 "value": str(p.qty * marks.get(symbol, p.avg_cost))}
        for symbol, p in sorted(snap.positions.items())
    }
    return {"account": account, "cash": str(snap.cash), "reserved": str(snap.reserved),
            "buying_power": str(snap.buying_power), "equity": str(snap.equity(marks)),
            "realized_pnl": str(snap.realized_pnl), "fees": str(snap.fees), "version": snap.version,
            "open_reservations": len(snap.reservations), "positions": positions}


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    account = args.account or ctx.settings.portfolio.account
    shown = report(ctx, account)
    if shown is None:
        print(f"bastion: account {account!r} has not been opened")
        return 1
    if args.json:
        print(json.dumps(shown))
        return 0
    for name in ("account", "cash", "reserved", "buying_power", "equity", "realized_pnl", "fees",
                 "version", "open_reservations"):
        print(f"{name:<18} {shown[name]}")
    positions = shown["positions"]
    if positions:
        print(f"\n{'symbol':<10} {'quantity':>14} {'avg_cost':>16} {'mark':>12} {'value':>16}")
        for symbol, row in positions.items():
            mark = row["mark"] if row["mark"] is not None else "-"
            print(f"{symbol:<10} {row['quantity']:>14} {row['avg_cost']:>16} {mark:>12} {row['value']:>16}")
    return 0
