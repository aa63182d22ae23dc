"""``bastion order buy|sell SYMBOL QTY [--limit PRICE] [--wait SECONDS] [--override-locks REASON]``.

A manual intent: it goes through risk like any strategy's (trading state, protections' locks,
limits, the portfolio lock); ``--override-locks`` lets an entry past the locks (only), logged by
risk with its reason.
With ``--wait`` the command waits for risk's decision: exit 0 when approved (the order is on
its way to the broker), 1 when refused (the reason is printed), 4 when no decision came in time.
"""

from __future__ import annotations

import argparse
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from services.cli._context import Context
from shared.bus import codec, publish
from shared.clock import LiveClock
from shared.keys import INTENTS, ORDERS, REJECTIONS
from shared.models import Intent, IntentRejected, Order, OrderType, Side

__all__ = ["register"]

EXIT_NO_DECISION = 4


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def register(subparsers: Any) -> None:
    """Add the ``order`` subcommand."""
    parser = subparsers.add_parser("order", help="send a manual buy or sell through risk")
    parser.add_argument("side", choices=["buy", "sell"])
    parser.add_argument("symbol", type=str.upper)
    parser.add_argument("quantity", type=_decimal)
    parser.add_argument("--limit", type=_decimal, help="limit price (default: market order)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait for risk's decision and report it")
    parser.add_argument("--override-locks", metavar="REASON",
                        help="enter even where a protection locks the symbol (logged with REASON); "
                             "limits and the trading state still apply")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    clock = LiveClock()
    intent = Intent(time=clock.now(), source="manual", symbol=args.symbol, side=Side(args.side),
                    quantity=args.quantity, order_type=OrderType.LIMIT if args.limit else OrderType.MARKET,
                    limit_price=args.limit, reason="bastion order", override_locks=args.override_locks)
    # read decisions from the streams' current ends, taken before the intent exists: none is missed
    cursors: Any = {}
    for key in (ctx.keys.stream(ORDERS), ctx.keys.stream(REJECTIONS)):
        newest: Any = ctx.redis.xrevrange(key, count=1)
        cursors[key] = newest[0][0] if newest else "0-0"
    publish(ctx.redis, ctx.keys, INTENTS, intent)
    print(f"intent {intent.id}: {args.side} {args.quantity} {args.symbol}"
          + (f" limit {args.limit}" if args.limit else ""))
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        reply: Any = ctx.redis.xread(cursors, block=200, count=200)
        for key, batch in reply or []:
            cursors[key.decode()] = batch[-1][0]
            decision = _find(batch, intent.id)
            if decision is not None:
                return _report(decision)
    print("no decision yet (is the risk service running?)")
    return EXIT_NO_DECISION


def _find(entries: Any, intent_id: str) -> Order | IntentRejected | None:
    for _, fields in entries:
        if fields.get(b"cid") != intent_id.encode():
            continue
        message = codec.decode(fields)
        if isinstance(message, Order | IntentRejected):
            return message
    return None


def _report(decision: Order | IntentRejected) -> int:
    if isinstance(decision, Order):
        print(f"approved: client_order_id {decision.client_order_id}")
        return 0
    print(f"refused: {decision.reason}")
    return 1
