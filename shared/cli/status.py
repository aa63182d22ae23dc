"""``bastion status [--json]``: the whole deployment at a glance.

Services and their heartbeats, the trading state (kill switch), the account (cash, reserved,
positions), open orders, and every stream's length with each consumer group's pending count
and lag. Read-only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.cli._context import Context
from shared.heartbeat import alive_instances
from shared.keys import Keys
from shared.portfolio import Portfolio

__all__ = ["collect", "register"]


def register(subparsers: Any) -> None:
    """Add the ``status`` subcommand."""
    parser = subparsers.add_parser("status", help="services, trading state, account, orders, streams")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(func=run)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _streams(ctx: Context) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for raw in sorted(ctx.redis.scan_iter(match=f"{ctx.keys.prefix}:stream:*", count=500, _type="stream")):
        key = _text(raw)
        groups = {}
        for group in ctx.redis.xinfo_groups(key):
            lag = group.get("lag")
            groups[_text(group["name"])] = {"pending": int(group["pending"]),
                                            "consumers": int(group["consumers"]),
                                            "lag": int(lag) if lag is not None else None}
        result[key.removeprefix(f"{ctx.keys.prefix}:stream:")] = {"length": int(ctx.redis.xlen(key)),
                                                                   "groups": groups}
    return result


def _open_orders(ctx: Context, keys: Keys) -> list[dict[str, str]]:
    orders = []
    members: Any = ctx.redis.smembers(keys.open_orders)
    for cid in sorted(_text(m) for m in members):
        raw: Any = ctx.redis.hgetall(keys.order(cid))
        record = {_text(k): _text(v) for k, v in raw.items()}
        orders.append({"client_order_id": cid, **{k: record.get(k, "") for k in
                                                  ("status", "side", "quantity", "symbol", "applied_qty")}})
    return orders


def collect(ctx: Context) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict."""
    keys = ctx.keys
    portfolio = Portfolio(ctx.redis, keys, ctx.settings.portfolio.account, settings=ctx.settings.portfolio)
    snap = portfolio.snapshot()
    raw_state: Any = ctx.redis.hgetall(keys.trading_state)
    state = {_text(k): _text(v) for k, v in raw_state.items()} or {"state": "ACTIVE"}
    return {
        "services": alive_instances(ctx.redis, keys),
        "trading_state": state,
        "account": {"account": snap.account, "opened": snap.opened, "cash": str(snap.cash),
                    "reserved": str(snap.reserved), "buying_power": str(snap.buying_power),
                    "equity": str(snap.equity(portfolio.marks())), "realized_pnl": str(snap.realized_pnl)},
        "positions": {s: {"quantity": str(p.qty), "avg_cost": str(p.avg_cost)}
                      for s, p in sorted(snap.positions.items()) if p.qty},
        "open_orders": _open_orders(ctx, keys),
        "streams": _streams(ctx),
    }


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    report = collect(ctx)
    if args.json:
        print(json.dumps(report))
        return 0
    print("services:")
    for name, beat in sorted(report["services"].items()):
        print(f"  {name:<40} alive (pid {beat.get('pid')}, beat {beat.get('at')})")
    if not report["services"]:
        print("  (none alive)")
    state = report["trading_state"]
    detail = f" (by {state.get('by')}: {state.get('reason')}, at {state.get('at')})" if "by" in state else ""
    print(f"\ntrading state: {state.get('state')}{detail}")
    print("\naccount:")
    for name, value in report["account"].items():
        print(f"  {name:<14} {value}")
    print("\npositions:" + ("" if report["positions"] else " none"))
    for symbol, pos in report["positions"].items():
        print(f"  {symbol:<8} {pos['quantity']:>12} @ {pos['avg_cost']}")
    print("\nopen orders:" + ("" if report["open_orders"] else " none"))
    for order in report["open_orders"]:
        print(f"  {order['client_order_id']:<40} {order['status']:<18} {order['side']} {order['quantity']} "
              f"{order['symbol']} (filled {order['applied_qty']})")
    print("\nstreams:")
    for name, info in report["streams"].items():
        groups = ", ".join(f"{g}: pending {v['pending']} lag {v['lag']}" for g, v in info["groups"].items())
        print(f"  {name:<24} length {info['length']:<8} {groups}")
    return 0
