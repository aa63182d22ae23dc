"""``bastion status [--json]``: the whole deployment at a glance.

Services and their heartbeats, the trading state (kill switch: who, why, when, and the last
changes), active protection locks with their expiry, the deferred-intent queue, the account
(cash, reserved, positions), open orders, the latest reconciliation report, the monitor's current
problems and alert deliveries (counters, failed deliveries, rq's failed registry), and every
stream's length with each consumer group's pending count and lag. Read-only (expired locks and
deferred entries are hidden, not swept), and nothing but the report on stdout. A section that
cannot be read (rq unreachable, a malformed report) shows its error instead of stopping.

:func:`collect` (and :func:`open_orders`, :func:`streams`) read from any :class:`Source`: the
CLI's context, or the HTTP API's (services/api), which serves the same report.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any, Protocol

import redis
from rq.registry import FailedJobRegistry

from services.cli._context import Context
from shared.clock import Clock, LiveClock
from shared.config import Settings
from shared.heartbeat import alive_instances
from shared.keys import Keys
from shared.portfolio import Portfolio
from shared.redis.client import reply_text
from shared.safety.deferred import DeferredIntent
from shared.safety.protections import ProtectionLock
from shared.safety.trading_state import KillSwitch

__all__ = ["Source", "collect", "open_orders", "register", "streams"]


class Source(Protocol):
    """Where the report is read from: settings, a Redis client and the key names."""

    @property
    def settings(self) -> Settings: ...

    @property
    def redis(self) -> redis.Redis: ...

    @property
    def keys(self) -> Keys: ...


def register(subparsers: Any) -> None:
    """Add the ``status`` subcommand."""
    parser = subparsers.add_parser("status", help="services, trading state, account, orders, streams")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(func=run)


def streams(ctx: Source) -> dict[str, Any]:
    """Every stream under the prefix (short name) -> its length and each group's pending, consumers, lag."""
    result: dict[str, Any] = {}
    for raw in sorted(ctx.redis.scan_iter(match=ctx.keys.stream("*"), count=500, _type="stream")):
        key = reply_text(raw)
        groups = {}
        for group in ctx.redis.xinfo_groups(key):
            lag = group.get("lag")
            groups[reply_text(group["name"])] = {"pending": int(group["pending"]),
                                            "consumers": int(group["consumers"]),
                                            "lag": int(lag) if lag is not None else None}
        result[key.removeprefix(ctx.keys.stream(""))] = {"length": int(ctx.redis.xlen(key)),
                                                                   "groups": groups}
    return result


def open_orders(ctx: Source) -> list[dict[str, str]]:
    """The executor's open orders, by client_order_id: status, side, quantity, symbol, applied_qty."""
    orders = []
    members: Any = ctx.redis.smembers(ctx.keys.open_orders)
    for cid in sorted(reply_text(m) for m in members):
        raw: Any = ctx.redis.hgetall(ctx.keys.order(cid))
        record = {reply_text(k): reply_text(v) for k, v in raw.items()}
        orders.append({"client_order_id": cid, **{k: record.get(k, "") for k in
                                                  ("status", "side", "quantity", "symbol", "applied_qty")}})
    return orders


def _trading_state(ctx: Source) -> dict[str, Any]:
    switch = KillSwitch(ctx.redis, ctx.keys)
    status = switch.current()
    return {"state": status.state.value, "by": status.by, "reason": status.reason,
            "at": status.at.isoformat() if status.at else None, "seq": status.seq,
            "previous": status.previous.value if status.previous else None,
            "cancel_open_orders": status.cancel_open_orders, "flatten_positions": status.flatten_positions,
            "history": switch.history(5)}


def _locks(ctx: Source, clock: Clock) -> list[dict[str, str]]:
    """Active protection locks, longest first (read as they are: expired ones are left to risk)."""
    now = clock.now()
    raw: Any = ctx.redis.hgetall(ctx.keys.protection_locks)
    stored = (ProtectionLock.decode(reply_text(v)) for v in raw.values())
    locks = [lock for lock in stored if lock.active(now)]
    return [{"protection": lock.protection, "symbol": lock.symbol, "side": lock.side,
             "until": lock.until.isoformat(), "reason": lock.reason, "at": lock.at.isoformat()}
            for lock in sorted(locks, key=lambda lock: lock.until, reverse=True)]


def _deferred(ctx: Source, clock: Clock) -> list[dict[str, Any]]:
    """Live deferred intents, oldest deferral first (expired ones are left to risk's sweep)."""
    now = clock.now()
    raw: Any = ctx.redis.hgetall(ctx.keys.deferred)
    live = [e for e in (DeferredIntent.decode(reply_text(v)) for v in raw.values()) if now < e.expires_at]
    return [{"symbol": e.intent.symbol, "side": e.intent.side.value, "intent_id": e.intent.id,
             "source": e.intent.source, "reason": e.reason, "deferred_at": e.deferred_at.isoformat(),
             "expires_at": e.expires_at.isoformat()} for e in sorted(live, key=lambda e: e.deferred_at)]


def _reconciliation(ctx: Source) -> dict[str, Any] | None:
    raw: Any = ctx.redis.hgetall(ctx.keys.reconciliation)
    fields = {reply_text(k): reply_text(v) for k, v in raw.items()}
    if not fields:
        return None
    try:
        differences = json.loads(fields.get("differences") or "[]")
    except ValueError:
        differences = fields.get("differences")
    return {"status": fields.get("status"), "time": fields.get("time"), "error": fields.get("error", ""),
            "differences": differences}


def _monitor(ctx: Source) -> dict[str, Any]:
    raw_problems: Any = ctx.redis.hgetall(ctx.keys.monitor("problems"))
    problems = {}
    for name, value in sorted(raw_problems.items()):
        try:
            problems[reply_text(name)] = json.loads(reply_text(value))
        except ValueError:
            problems[reply_text(name)] = reply_text(value)
    raw_counts: Any = ctx.redis.hgetall(ctx.keys.monitor("deliveries"))
    failed_key = ctx.keys.monitor("failed-deliveries")
    latest: Any = ctx.redis.lrange(failed_key, 0, 2)
    failed = []
    for item in latest:
        try:
            failed.append(json.loads(reply_text(item)))
        except ValueError:
            failed.append(reply_text(item))
    return {"problems": problems,
            "deliveries": {reply_text(k): int(v) for k, v in raw_counts.items()},
            "failed_deliveries": {"count": int(ctx.redis.llen(failed_key)), "latest": failed},
            "rq_failed_jobs": _rq_failed(ctx)}


def _rq_failed(ctx: Source) -> dict[str, Any]:
    """rq's failed registry of the monitor's queue (same name rule as the monitor: its setting,
    else the key prefix); an error is reported, never raised."""
    queue = ctx.settings.monitor.queue or ctx.settings.key_prefix
    try:
        return {"queue": queue, "count": FailedJobRegistry(queue, connection=ctx.redis).count}
    except Exception as exc:  # rq or Redis trouble must never stop status
        return {"queue": queue, "error": f"{type(exc).__name__}: {exc}"}


def _section(read: Any, ctx: Source) -> Any:
    try:
        return read(ctx)
    except (ValueError, KeyError, TypeError) as exc:  # a malformed record: show it, keep going
        return {"error": f"{type(exc).__name__}: {exc}"}


def collect(ctx: Source, clock: Clock | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict (``clock``: what hides expired locks and
    deferred intents; the host's by default)."""
    keys = ctx.keys
    clock = clock or LiveClock()
    portfolio = Portfolio(ctx.redis, keys, ctx.settings.portfolio.account, settings=ctx.settings.portfolio)
    snap = portfolio.snapshot()
    return {
        "services": alive_instances(ctx.redis, keys),
        "trading_state": _section(_trading_state, ctx),
        "protection_locks": _section(partial(_locks, clock=clock), ctx),
        "deferred": _section(partial(_deferred, clock=clock), ctx),
        "reconciliation": _section(_reconciliation, ctx),
        "monitor": _section(_monitor, ctx),
        "account": {"account": snap.account, "opened": snap.opened, "cash": str(snap.cash),
                    "reserved": str(snap.reserved), "buying_power": str(snap.buying_power),
                    "equity": str(snap.equity(portfolio.marks())), "realized_pnl": str(snap.realized_pnl)},
        "positions": {s: {"quantity": str(p.qty), "avg_cost": str(p.avg_cost)}
                      for s, p in sorted(snap.positions.items()) if p.qty},
        "open_orders": open_orders(ctx),
        "streams": streams(ctx),
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
    _print_safety(report)
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
    _print_operations(report)
    print("\nstreams:")
    for name, info in report["streams"].items():
        groups = ", ".join(f"{g}: pending {v['pending']} lag {v['lag']}" for g, v in info["groups"].items())
        print(f"  {name:<24} length {info['length']:<8} {groups}")
    return 0


def _print_safety(report: dict[str, Any]) -> None:
    state = report["trading_state"]
    detail = f" (by {state.get('by')}: {state.get('reason')}, at {state.get('at')})" \
        if state.get("by") else ""
    print(f"\ntrading state: {state.get('state')}{detail}")
    if state.get("cancel_open_orders") or state.get("flatten_positions"):
        print(f"  requested: cancel open orders {state.get('cancel_open_orders')}, "
              f"flatten positions {state.get('flatten_positions')}")
    locks = report["protection_locks"]
    print("\nprotection locks:" + ("" if locks else " none"))
    for lock in locks if isinstance(locks, list) else [locks]:
        print(f"  {lock.get('protection', '?'):<16} {lock.get('symbol', '')}/{lock.get('side', '')} until "
              f"{lock.get('until', '')}: {lock.get('reason', lock.get('error', ''))}")
    queue = report["deferred"]
    print("\ndeferred intents:" + ("" if queue else " none"))
    for entry in queue if isinstance(queue, list) else [queue]:
        print(f"  {entry.get('symbol', '?'):<8} {entry.get('side', ''):<5} from {entry.get('source', '')} "
              f"expires {entry.get('expires_at', '')}: {entry.get('reason', entry.get('error', ''))}")


def _print_operations(report: dict[str, Any]) -> None:
    recon = report["reconciliation"]
    if recon is None:
        print("\nreconciliation: no report yet")
    else:
        differences = recon.get("differences")
        count = len(differences) if isinstance(differences, list) else differences
        print(f"\nreconciliation: {recon.get('status')} at {recon.get('time')} ({count} differences)"
              + (f": {recon['error']}" if recon.get("error") else ""))
        for difference in differences if isinstance(differences, list) else []:
            print(f"  {json.dumps(difference)}")
    monitor = report["monitor"]
    problems = monitor.get("problems", {})
    print("\nmonitor problems:" + ("" if problems else " none"))
    for name, problem in problems.items():
        print(f"  {name}: {problem.get('text', problem) if isinstance(problem, dict) else problem}")
    deliveries = monitor.get("deliveries", {})
    failed = monitor.get("failed_deliveries", {})
    rq_failed = monitor.get("rq_failed_jobs", {})
    counts = ", ".join(f"{k} {v}" for k, v in sorted(deliveries.items())) or "none"
    rq_text = rq_failed.get("count", rq_failed.get("error"))
    print(f"\nalert deliveries: {counts}; failed deliveries kept {failed.get('count', 0)}; "
          f"rq failed jobs ({rq_failed.get('queue')}): {rq_text}")
    for item in failed.get("latest", []):
        print(f"  failed: {json.dumps(item)[:200]}")
