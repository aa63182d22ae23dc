"""The order lifecycle drill: the desk as real OS processes through a seeded storm of exchange faults
and process kills, then wound down until every order is terminal at the broker and here, and the
two sets of books compared.

``DRILL_SECONDS`` sets the storm's length (25 s by default, so CI stays short; the manual
drill is 60) and ``DRILL_SEED`` its seed; ``DRILL_KILL_SIGNAL=ABRT`` kills with a
stack dump in the victim's log (see :mod:`tests.support.drill`). Each run leaves in its tmp_path
the services' logs, ``drill-summary.txt`` and ``drill-state.json`` (both sides' books)::

    DRILL_SECONDS=60 DRILL_SEED=7 .venv/bin/pytest tests/system/test_lifecycle_drill.py \\
        -k "not fakeredis" -s
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from services.reconciler.service import REPORT_STREAM
from shared.bus import codec
from shared.keys import ALERTS, INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import Alert, Intent, IntentRejected, Order, OrderStatus
from shared.portfolio import Portfolio, verify
from shared.redis.client import reply_text
from shared.safety.trading_state import KillSwitch, TradingState
from tests.conftest import SERVER_BACKENDS
from tests.support.drill import (
    CASH,
    SERVICES,
    Desk,
    Driver,
    Storm,
    broker_get,
    cli,
    drill_env,
    drill_kill_signal,
    drill_seconds,
    drill_seed,
    lift_reconciler_halts,
    run_storm,
    set_faults,
)
from tests.support.paper import HEADERS, PaperExchange, running_exchange
from tests.support.processes import wait_for

pytestmark = pytest.mark.multiprocess
# a fill learned from a look-up is booked at the broker's average price, which it rounds to 6
# places: a few millionths of a dollar per such fill (reconciler.cash_tolerance's default)
CASH_TOLERANCE = Decimal("0.01")
QUIET_WITHIN_S = 60.0  # after the storm: every order terminal at the broker and here
OPEN_HERE = {OrderStatus.PENDING_SUBMIT.value, OrderStatus.UNKNOWN.value}
WATCHED = (
    "broker.submit_ambiguous", "broker.resolved", "executor.submitted", "executor.order_unknown",
    "executor.unknown_resolved", "executor.order_failed", "executor.found_at_broker",
    "executor.order_adopted", "executor.fill_applied", "executor.fill_beyond_reservation",
    "executor.trade_updates_reconnected", "executor.repaired", "executor.duplicate_order",
    "risk.duplicate_intent", "reconciler.repair_requested", "reconciler.halted", "fault.refusing",
)


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_the_order_lifecycle_survives_a_storm_of_faults_and_kills(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path) -> None:
    """Through lost and delayed replies, hidden orders, failing look-ups, duplicate, reordered and
    partial fills, refused connections and SIGKILLed services, every intent is decided, every
    client_order_id is one order at the broker and one record here, and at quiescence positions,
    cash and the ledger agree with the broker with no reservation left (a reconciler halt in the
    storm is allowed: the drill lifts it once the books agree again)."""
    storm, kill_with = Storm.draw(drill_seed(), drill_seconds()), drill_kill_signal()
    with running_exchange(server_url, keys, tmp_path, BASTION_PAPER_EXCHANGE__STARTING_CASH=CASH) as exchange:
        desk = Desk(drill_env(server_url, keys, exchange), tmp_path, kill_with=kill_with)
        try:
            drill(storm, desk, exchange, server_url, client, keys, tmp_path)
        finally:
            desk.stop()


def drill(storm: Storm, desk: Desk, exchange: PaperExchange, url: str, client: redis.Redis, keys: Keys,
          tmp_path: Path) -> None:
    """Start the desk, run the storm, wind down, and compare the books."""
    began = time.monotonic()
    driver = Driver(url, keys, storm.driver_seed)
    driver.bar_round(client)  # every symbol priced before the first intent
    for name in SERVICES:
        desk.start(name)
    kill_switch = KillSwitch(client, keys)
    wait_for(lambda: (kill_switch.current().state, kill_switch.current().by)
             == (TradingState.ACTIVE, "reconciler"), timeout=60, message="the start-up reconciliation")

    bars_stop, storm_stop = threading.Event(), threading.Event()
    threads = {"bars": threading.Thread(target=driver.run_bars, args=(bars_stop,), daemon=True),
               "intents": threading.Thread(target=driver.run_intents, args=(storm_stop,), daemon=True),
               "storm": threading.Thread(target=run_storm, args=(storm, desk, exchange, storm_stop),
                                         daemon=True),
               "operator": threading.Thread(target=lift_reconciler_halts, args=(url, keys, desk, storm_stop),
                                            daemon=True)}
    for thread in threads.values():
        thread.start()
    stormed = time.monotonic()
    threading.Event().wait(storm.seconds)  # the storm's length: nothing to wait for but time

    storm_stop.set()
    for name in ("intents", "storm", "operator"):
        threads[name].join(30)
    set_faults(exchange, (), seed=0)
    desk.ensure_running(time.monotonic() - stormed)
    wound = time.monotonic()
    left: list[str] = []

    def quiet() -> bool:
        left[:] = outstanding(client, keys, exchange)
        return not left

    try:
        wait_for(quiet, timeout=QUIET_WITHIN_S, interval=0.25, message="quiescence")
    except AssertionError:
        left.insert(0, f"not quiet {QUIET_WITHIN_S:g}s after the storm")
    bars_stop.set()
    threads["bars"].join(10)
    quiet_after = time.monotonic() - wound

    problems = list(left)
    if not left:
        problems += book_differences(client, keys, exchange)
        for args in (("verify",), ("verify", "--broker")):
            run = cli(desk.env, *args)
            if run.returncode != 0:
                problems.append(f"bastion {' '.join(args)} exited {run.returncode}: {run.stdout}{run.stderr}")
    dump_state(client, keys, exchange, tmp_path / "drill-state.json")
    decided = decisions(client, keys)
    problems += undecided(driver.intents, decided, int(client.xlen(keys.dead_letter)))
    problems += [f"driver: {error}" for error in driver.errors[:5]]
    problems += [event for event in desk.events if "by itself" in event]

    timings = {"start_s": stormed - began, "storm_s": wound - stormed, "quiet_s": quiet_after,
               "total_s": time.monotonic() - began}
    text = summary(storm, desk, driver, decided, client, keys, timings, kill_switch)
    (tmp_path / "drill-summary.txt").write_text(text + "\n")
    print(text)
    assert not problems, "\n".join(["DRILL FAILED:", *problems, "", text, "", desk.tails()])


def summary(storm: Storm, desk: Desk, driver: Driver, decided: dict[str, list[str]], client: redis.Redis,
            keys: Keys, timings: dict[str, float], kill_switch: KillSwitch) -> str:
    """What the drill did and what the desk made of it, for the report and a failure's message."""
    outcomes = Counter("order" if d[0].startswith("order") else d[0].split(":")[1].strip()
                       for d in decided.values())
    statuses = Counter(r.get("status") for r in records(client, keys).values())
    raw: Any = client.xrange(keys.stream(ALERTS))
    alerts = Counter(m.kind for m in (codec.decode(f) for _, f in raw) if isinstance(m, Alert))
    state = kill_switch.current()
    return "\n".join([
        f"storm: {storm.describe()}",
        "timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        f"driver: {len(driver.intents)} intents, {driver.bars} bar rounds",
        f"decisions: {dict(outcomes)}",
        f"records: {dict(statuses)}",
        f"alerts: {dict(sorted(alerts.items()))}",
        f"log events: {desk.event_counts(WATCHED)}",
        f"trading state at the end: {state.state.value} by {state.by}: {state.reason[:300]}",
        "desk events:", *(f"  {event}" for event in desk.events),
    ])


# -- the books at quiescence ----------------------------------------------------------------------


def records(client: redis.Redis, keys: Keys) -> dict[str, dict[str, str]]:
    """Every order record the executor keeps, by client_order_id."""
    prefix = keys.order("")
    found: dict[str, dict[str, str]] = {}
    for key in client.scan_iter(match=keys.order("*"), count=1000):
        raw: Any = client.hgetall(key)
        found[reply_text(key)[len(prefix):]] = {reply_text(k): reply_text(v) for k, v in raw.items()}
    return found


def group_backlog(client: redis.Redis, stream_key: str, group: str) -> str:
    """What ``group`` has not finished on ``stream_key`` ("" when nothing)."""
    if not client.exists(stream_key):
        return ""
    newest: Any = client.xrevrange(stream_key, count=1)
    last = reply_text(newest[0][0]) if newest else "0-0"
    for info in client.xinfo_groups(stream_key):
        if reply_text(info["name"]) == group:
            delivered = reply_text(info["last-delivered-id"])
            pending = int(info["pending"])
            if pending or delivered != last:
                return f"{stream_key} group {group}: {pending} pending, delivered {delivered} of {last}"
            return ""
    return f"{stream_key}: no group {group}"


def outstanding(client: redis.Redis, keys: Keys, exchange: PaperExchange) -> list[str]:
    """What is not yet terminal or consumed: the broker's open orders, ours, unfinished intents and
    orders on the bus, repair requests. Empty at quiescence."""
    left = []
    open_at_broker = broker_get(exchange, "/v2/orders", status="open", limit=500)
    if open_at_broker is None:
        left.append("the exchange does not answer")
    elif open_at_broker:
        left.append(f"open at the broker: {sorted(o['client_order_id'] for o in open_at_broker)}")
    members: Any = client.smembers(keys.open_orders)
    if members:
        left.append(f"open here: {sorted(reply_text(m) for m in members)}")
    pending = {cid: r.get("status") for cid, r in records(client, keys).items()
               if r.get("status") in OPEN_HERE}
    if pending:
        left.append(f"pending_submit/unknown here: {pending}")
    left += [b for b in (group_backlog(client, keys.stream(INTENTS), "risk"),
                         group_backlog(client, keys.stream(ORDERS), "executor")) if b]
    repairs: Any = client.hgetall(keys.repair_requests)
    if repairs:
        left.append(f"repair requests: {sorted(reply_text(k) for k in repairs)}")
    return left


def decisions(client: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Risk's decisions by intent id: "order <cid>" or "refused: <reason>", in stream order."""
    found: dict[str, list[str]] = {}
    for stream in (ORDERS, REJECTIONS):
        for _, fields in _entries(client, keys.stream(stream)):
            message = codec.decode(fields)
            if isinstance(message, Order):
                found.setdefault(message.intent_id, []).append(f"order {message.client_order_id}")
            elif isinstance(message, IntentRejected):
                found.setdefault(message.intent_id, []).append(f"refused: {message.reason}")
    return found


def _entries(client: redis.Redis, key: str) -> Iterator[tuple[Any, Any]]:
    start = "-"
    while True:
        batch: Any = client.xrange(key, min=start, count=1000)
        if not batch:
            return
        yield from batch
        if len(batch) < 1000:
            return
        start = "(" + reply_text(batch[-1][0])


def broker_orders(exchange: PaperExchange, ours: dict[str, dict[str, str]]) -> list[dict[str, Any]] | None:
    """Every order at the broker (None if it does not answer): the listing, and each of ``ours``
    it leaves out looked up by client_order_id (an order placed under ``hide_new_orders`` stays out
    of listings until it has been looked up ``lookups`` times: each look-up here counts)."""
    listed = broker_get(exchange, "/v2/orders", status="all", limit=500)
    if listed is None:
        return None
    seen = {o["client_order_id"] for o in listed}
    for cid in sorted(set(ours) - seen):
        for _ in range(20):
            reply = requests.get(exchange.url + "/v2/orders:by_client_order_id",
                                 params={"client_order_id": cid}, headers=HEADERS, timeout=5)
            if reply.ok:
                listed.append({**reply.json(), "hidden_from_listing": True})
                break
            if reply.status_code != 404:
                return None
    return list(listed)


def book_differences(client: redis.Redis, keys: Keys, exchange: PaperExchange) -> list[str]:
    """Every way our books and the broker's differ at quiescence (empty when they agree): each
    client_order_id once at the broker and recorded here with the same status and filled quantity,
    every record missing at the broker never placed, positions equal, cash equal within
    ``CASH_TOLERANCE``, no reservation left."""
    problems: list[str] = []
    ours = records(client, keys)
    theirs = broker_orders(exchange, ours)
    positions = broker_get(exchange, "/v2/positions")
    account = broker_get(exchange, "/v2/account")
    if theirs is None or positions is None or account is None:
        return ["the exchange does not answer"]
    if len(theirs) >= 500:
        problems.append("the broker lists 500 orders: the listing may be truncated")
    counts = Counter(o["client_order_id"] for o in theirs)
    problems += [f"{cid}: {n} orders at the broker" for cid, n in sorted(counts.items()) if n > 1]
    for order in theirs:
        cid = order["client_order_id"]
        record = ours.get(cid)
        if record is None:
            problems.append(f"{cid}: at the broker ({order['status']}, filled {order['filled_qty']}) "
                            "but no record here")
            continue
        if record.get("status") != order["status"]:
            problems.append(f"{cid}: {record.get('status')} here, {order['status']} at the broker; "
                            f"record {record}")
        if Decimal(record.get("applied_qty", "0")) != Decimal(order["filled_qty"] or 0):
            problems.append(f"{cid}: applied {record.get('applied_qty')} here, filled {order['filled_qty']} "
                            f"at the broker; record {record}")
    for cid, record in sorted(ours.items()):
        if cid not in counts and (record.get("status") != OrderStatus.REJECTED.value
                                  or Decimal(record.get("applied_qty", "0")) != 0):
            problems.append(f"{cid}: not at the broker, but {record.get('status')} here; record {record}")
    snapshot = Portfolio(client, keys, "paper").snapshot()
    here = {s: p.qty for s, p in snapshot.positions.items() if p.qty}
    there = {p["symbol"]: Decimal(p["qty"]) for p in positions if Decimal(p["qty"])}
    if here != there:
        problems.append(f"positions: ours {here}, the broker's {there}")
    if abs(snapshot.cash - Decimal(account["cash"])) > CASH_TOLERANCE:
        problems.append(f"cash: ours {snapshot.cash}, the broker's {account['cash']} "
                        f"(difference {Decimal(account['cash']) - snapshot.cash})")
    if snapshot.reservations or snapshot.reserved != 0:
        problems.append(f"reservations left open: reserved {snapshot.reserved}, {snapshot.reservations}")
    held = {s: p.reserved for s, p in snapshot.positions.items() if p.reserved}
    if held:
        problems.append(f"shares still held for sells: {held}")
    report = verify(client, keys, "paper", allow_short=False)
    if not report.ok:
        problems.append(f"ledger replay: {report.problems[:3]}")
    return problems


def dump_state(client: redis.Redis, keys: Keys, exchange: PaperExchange, path: Path) -> None:
    """Write both sides' state to ``path`` as JSON, for a diagnosis after the keys are gone."""
    snapshot = Portfolio(client, keys, "paper").snapshot()
    raw_state: Any = client.hgetall(keys.trading_state)
    raw_report: Any = client.hgetall(keys.reconciliation)
    raw_repairs: Any = client.hgetall(keys.repair_requests)
    members: Any = client.smembers(keys.open_orders)
    state = {
        "ours": {"cash": str(snapshot.cash), "reserved": str(snapshot.reserved),
                 "positions": {s: [str(p.qty), str(p.avg_cost), str(p.reserved)]
                               for s, p in snapshot.positions.items()},
                 "reservations": {r: str(v) for r, v in snapshot.reservations.items()},
                 "open_orders": sorted(reply_text(m) for m in members),
                 "records": records(client, keys),
                 "repair_requests": {reply_text(k): reply_text(v) for k, v in raw_repairs.items()},
                 "trading_state": {reply_text(k): reply_text(v) for k, v in raw_state.items()},
                 "reconciliation": {reply_text(k): reply_text(v) for k, v in raw_report.items()},
                 "reports_with_differences": differing_reports(client, keys)},
        "broker": {"orders": broker_get(exchange, "/v2/orders", status="all", limit=500),
                   "positions": broker_get(exchange, "/v2/positions"),
                   "account": broker_get(exchange, "/v2/account")},
    }
    path.write_text(json.dumps(state, indent=1, default=str))


def differing_reports(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The reconciler's reports that found differences: time, status, differences, in flight."""
    found = []
    for _, fields in _entries(client, keys.stream(REPORT_STREAM)):
        report = {reply_text(k): reply_text(v) for k, v in fields.items()}
        if report.get("status") in ("differences", "halted"):
            found.append({"time": report.get("time"), "status": report["status"],
                          "differences": json.loads(report.get("differences") or "[]"),
                          "in_flight": json.loads(report.get("in_flight") or "[]")})
    return found


def undecided(intents: list[Intent], decided: dict[str, list[str]], dead_letters: int) -> list[str]:
    """Intents risk neither approved nor refused (with the dead-letter count, which may hold them),
    and intents decided both ways (an order and a refusal, or two orders)."""
    missing = [i.id for i in intents if i.id not in decided]
    problems = [f"{len(missing)} intent(s) never decided ({dead_letters} dead letters): {missing[:10]}"
                ] if missing else []
    for intent_id, outcomes in sorted(decided.items()):
        if len(set(outcomes)) > 1:
            problems.append(f"intent {intent_id} decided more than one way: {sorted(set(outcomes))}")
    return problems
