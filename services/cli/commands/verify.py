"""``bastion verify [--account A] [--broker] [--json]``: replay the ledger from zero and check it.

Replays every entry of ``<prefix>:ledger:{<account>}``, checking after each one that the recorded
version and balances match and that the invariants hold (see
:func:`shared.portfolio._state.invariant_violations`: the pre-trade controls stop being checked
after a fill booked beyond its reservation), then compares the result with the state in Redis.
Exit 0 when all agree, 1 with the first difference.

With ``--broker`` it also compares our books with the broker's, once, under the reconciler's rule
(:mod:`services.reconciler._compare`, its tolerances from ``reconciler.*``): our cash, positions
and open orders against the broker's account cash, positions and open orders. Each difference is
printed on its own line, then each in-flight fill (filled at the broker, not yet applied here:
printed, not a failure). Exit 1 if there is any order difference, a cash or position difference
beyond ``reconciler.cash_tolerance`` / ``quantity_tolerance``, or the account is not opened (a
cash difference within tolerance is printed, not a failure: a fill learned from a look-up rather
than the trade-update stream is booked at the broker's average price, which it rounds); 3, with
the reason on stderr, if the broker cannot be reached (like Redis). One look, not confirmed by a
second: a fill landing between the two reads can show a difference that the next run no longer
finds. Nothing is written, nothing halts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.cli._context import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, Context
from services.reconciler._books import read_ours, read_theirs, with_records
from services.reconciler._compare import Difference, Outcome, compare
from shared.brokers import build_broker
from shared.clock import LiveClock
from shared.errors import BrokerError
from shared.portfolio import Portfolio, verify

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser("verify", help="replay the portfolio ledger and check the invariants")
    parser.add_argument("--account", help="account to verify (default: settings' portfolio.account)")
    parser.add_argument("--broker", action="store_true",
                        help="also compare cash, positions and open orders with the broker's")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    account = args.account or ctx.settings.portfolio.account
    report = verify(ctx.redis, ctx.keys, account, allow_short=ctx.settings.portfolio.allow_short)
    status = EXIT_OK if report.ok else EXIT_FAILED
    result: dict[str, Any] = {"account": account, "ok": report.ok, "entries": report.entries,
                              "first_difference": report.problems[0] if report.problems else None}
    lines = []
    if report.ok:
        lines.append(f"ok: account {account!r}: {report.entries} ledger entries replay to the current state")
    else:
        lines.append(f"FAILED: account {account!r}: {report.problems[0]}")
    broker_status = EXIT_OK
    if args.broker:
        broker_status, result["broker"], more = _against_broker(ctx, account)
        lines += more
    print(json.dumps(result) if args.json else "\n".join(lines))
    if broker_status == EXIT_UNAVAILABLE:
        print(f"bastion: {result['broker']['error']}", file=sys.stderr)
    return max(status, broker_status)


def _against_broker(ctx: Context, account: str) -> tuple[int, dict[str, Any], list[str]]:
    """Compare our books with the broker's: (exit status, the JSON part, the text lines). The JSON
    part's ``error`` says why nothing was compared (the account not opened, the broker unreachable)."""
    ours = read_ours(ctx.redis, ctx.keys, Portfolio(ctx.redis, ctx.keys, account,
                                                    settings=ctx.settings.portfolio))
    if not ours.opened:
        error = f"account {account!r} is not opened: nothing to compare with the broker"
        return EXIT_FAILED, {"ok": False, "error": error}, [f"FAILED: {error}"]
    broker = build_broker(ctx.settings, client=ctx.redis, clock=LiveClock())  # ConfigError: exit 2
    try:
        theirs = read_theirs(broker, ours)
    except BrokerError as exc:
        error = f"broker unreachable, nothing compared: {type(exc).__name__}: {exc}"
        return EXIT_UNAVAILABLE, {"ok": False, "error": error}, []
    ours = with_records(ctx.redis, ctx.keys, ours, theirs)
    tolerances = ctx.settings.reconciler
    outcome = compare(ours, theirs, cash_tolerance=tolerances.cash_tolerance,
                      quantity_tolerance=tolerances.quantity_tolerance)
    failing = _failing(outcome)
    agree = not failing
    part = {"ok": agree, "error": None, "differences": [d.as_dict() for d in outcome.differences],
            "in_flight": outcome.in_flight, "cash_compared": outcome.cash_compared}
    return (EXIT_OK if agree else EXIT_FAILED), part, _lines(account, outcome, len(theirs.positions))


def _failing(outcome: Outcome) -> list[Difference]:
    """The differences that fail the check: every one but money within tolerance."""
    return [d for d in outcome.differences if d.halts or d.kind not in ("cash", "position")]


def _lines(account: str, outcome: Outcome, positions: int) -> list[str]:
    lines = [f"difference: {d.text}" for d in outcome.differences]
    lines += [f"in flight: {text}" for text in outcome.in_flight]
    if not outcome.cash_compared:
        lines.append("note: cash not compared (an unapplied fill has no price yet)")
    failing = _failing(outcome)
    if failing:
        lines.append(f"FAILED: account {account!r} and the broker differ: {len(failing)} difference(s)")
    else:
        lines.append(f"ok: account {account!r} agrees with the broker ({positions} position(s), "
                     f"{len(outcome.in_flight)} in flight)")
    return lines
