"""``bastion order buy|sell SYMBOL QTY [--limit PRICE] [--wait SECONDS] [--override-locks REASON]``.

A manual intent: it goes through risk like any strategy's (trading state, protections' locks,
limits, the portfolio lock); ``--override-locks`` lets an entry past the locks (only), logged by
risk with its reason.
With ``--wait`` the command waits for risk's decision: exit 0 when approved (the order is on
its way to the broker), 1 when refused (the reason is printed), 4 when no decision came in time.
:func:`manual_intent`, :func:`send` and :func:`decision` are that path, which the HTTP API's
``POST /api/v1/orders`` (services/api) takes too.
"""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import Any

import redis

from services.cli._context import Context
from shared.bus import codec, publish
from shared.clock import Clock, LiveClock
from shared.keys import INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import Intent, IntentRejected, Order, OrderType, Side

__all__ = ["decision", "manual_intent", "register", "send"]

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


def manual_intent(clock: Clock, side: Side, symbol: str, quantity: Decimal, *, limit: Decimal | None = None,
                  override_locks: str | None = None, reason: str = "bastion order") -> Intent:
    """A manual intent: at market, or limit ``limit`` (pydantic's ValidationError if malformed)."""
    return Intent(time=clock.now(), source="manual", symbol=symbol, side=side, quantity=quantity,
                  order_type=OrderType.LIMIT if limit else OrderType.MARKET, limit_price=limit, reason=reason,
                  override_locks=override_locks)


def send(client: redis.Redis, keys: Keys, intent: Intent) -> dict[Any, Any]:
    """Publish ``intent`` for risk; return the cursors :func:`decision` reads the decision after
    (the decision streams' ends, taken before the intent exists: no decision is missed)."""
    cursors: dict[Any, Any] = {}
    for key in (keys.stream(ORDERS), keys.stream(REJECTIONS)):
        newest: Any = client.xrevrange(key, count=1)
        cursors[key] = newest[0][0] if newest else "0-0"
    publish(client, keys, INTENTS, intent)
    return cursors


def decision(client: redis.Redis, cursors: dict[Any, Any], intent_id: str, wait_s: float,
             clock: Clock) -> Order | IntentRejected | None:
    """Risk's decision on intent ``intent_id`` (the approved order or the refusal), waiting at most
    ``wait_s``; None if none came in that time."""
    deadline = clock.monotonic() + wait_s
    while clock.monotonic() < deadline:
        reply: Any = client.xread(cursors, block=200, count=200)
        for key, batch in reply or []:
            cursors[key.decode()] = batch[-1][0]
            found = _find(batch, intent_id)
            if found is not None:
                return found
    return None


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    clock = LiveClock()
    intent = manual_intent(clock, Side(args.side), args.symbol, args.quantity, limit=args.limit,
                           override_locks=args.override_locks)
    cursors = send(ctx.redis, ctx.keys, intent)
    print(f"intent {intent.id}: {args.side} {args.quantity} {args.symbol}"
          + (f" limit {args.limit}" if args.limit else ""))
    if args.wait <= 0:
        return 0
    found = decision(ctx.redis, cursors, intent.id, args.wait, clock)
    if found is not None:
        return _report(found)
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
