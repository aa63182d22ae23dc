"""The lifecycle drill's machinery (tests/system/test_lifecycle_drill.py): the desk as OS processes, a
seeded storm (exchange faults and process kills), a driver of intents and bars, an operator.

Everything random is drawn from one ``random.Random(seed)`` before the storm starts
(:class:`Storm`), or from the driver's own generator seeded from it, so a seed names one plan of
faults and kills; what the processes make of it still depends on timing.

A run, as a timeline (``D`` = the storm's seconds)::

    time 0      the desk starts; the reconciler holds trading HALTED until its first pass
    time s      the start-up pass succeeded (ACTIVE): bars, intents and the storm begin
    time s+t1   plan "base": drop_after / reply_timeout / hide_new_orders on submits, 500s on
                look-ups by client_order_id, duplicate / reordered trade updates, partial fills
    time s+t2   SIGKILL risk or the executor; restarted 0.5-3 s later (a few times per run)
    time s+t3   plan "outage": base + refuse "*" for 2 s, then the stream's reconnect refused 3 s
    any time    the reconciler halts on a confirmed difference; the drill, as the operator, lifts
                the halt once a later reconciliation is clean (:func:`lift_reconciler_halts`)
    time s+D    intents stop, faults cleared, dead services restarted; bars go on until every
                order is terminal at the broker and here; then the books are compared
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
import requests

from services.reconciler.service import HOLD_REASON
from services.reconciler.service import SERVICE as RECONCILER
from shared.bus import publish
from shared.clock import LiveClock
from shared.keys import BARS, INTENTS, Keys
from shared.models import Bar, Intent, OrderType, Side
from shared.portfolio import Portfolio
from shared.redis.client import reply_text
from shared.redis.connection import connect_url
from shared.safety.trading_state import KillSwitch, TradingState
from tests.support.environment import desk_env
from tests.support.paper import HEADERS, PaperExchange
from tests.support.processes import REPO_ROOT, spawn, stop_all

SYMBOLS = ("AAPL", "MSFT", "SPY")
CASH = "100000"
SERVICES = ("risk", "executor", "reconciler")
VICTIMS = ("risk", "executor")
INTENT_EVERY_S = 0.3
BAR_EVERY_S = 0.4




def drill_seconds() -> float:
    """The storm's length: ``DRILL_SECONDS`` (the manual drill is 60), 25 by default."""
    return float(os.environ.get("DRILL_SECONDS", "25"))


def drill_seed() -> int:
    """The storm's seed: ``DRILL_SEED``, 20240607 by default."""
    return int(os.environ.get("DRILL_SEED", "20240607"))


def drill_kill_signal() -> signal.Signals:
    """How the chaos kills: SIGKILL, or ``DRILL_KILL_SIGNAL=ABRT`` to diagnose a stall (as
    abrupt, but with ``PYTHONFAULTHANDLER`` set the victim first writes every thread's stack to
    its log)."""
    return signal.Signals[f"SIG{os.environ.get('DRILL_KILL_SIGNAL', 'KILL').upper()}"]


def drill_env(url: str, keys: Keys, exchange: PaperExchange) -> dict[str, str]:
    """A desk's environment tuned for quick recovery: short polls, look-ups, claims and passes,
    limits and protections that refuse none of the driver's orders, $100,000 on both sides."""
    settings = {
        "EXECUTOR__POLL_INTERVAL_S": "1", "EXECUTOR__STALE_PENDING_S": "15",
        "EXECUTOR__UNKNOWN_LOOKUP_LIMIT": "5", "EXECUTOR__UNKNOWN_BACKOFF_MAX_S": "2",
        "BROKER__TIMEOUT_S": "2", "BROKER__RESOLVE_ATTEMPTS": "3", "BROKER__RESOLVE_INTERVAL_S": "0.2",
        "BUS__CLAIM_IDLE_MS": "2000", "BUS__CLAIM_INTERVAL_MS": "1000", "BUS__BLOCK_MS": "100",
        "RECONCILER__INTERVAL_S": "2", "RECONCILER__REPAIR_AFTER_S": "5", "RECONCILER__REPAIR_WAIT_S": "10",
        "RECONCILER__RECHECK_DELAY_S": "0.5", "RECONCILER__STARTUP_RETRY_S": "0.5",
        "RECONCILER__HOLD_UNTIL_RECONCILED": "true",
        "LIMITS__MAX_POSITION_FRACTION": "1", "LIMITS__MAX_ORDERS_PER_MINUTE": "100000",
        "LIMITS__MAX_OPEN_ORDERS": "10000", "LIMITS__PDT_ENABLED": "false",
        "LIMITS__API_RATE_LIMIT": "100000",
        "PROTECTIONS__COOLDOWN_ENABLED": "false", "PROTECTIONS__LOW_PROFIT_ENABLED": "false",
        "PROTECTIONS__STOPLOSS_GUARD_ENABLED": "false", "PROTECTIONS__MAX_DRAWDOWN_ENABLED": "false",
        "PORTFOLIO__STARTING_CASH": CASH, "PAPER_EXCHANGE__STARTING_CASH": CASH,
    }
    return {**desk_env(url, keys, settings, exchange=exchange), "PYTHONFAULTHANDLER": "1"}


# -- the storm ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``victim`` at ``at`` seconds into the storm; start it again ``down_s`` later."""

    at: float
    victim: str
    down_s: float


@dataclass(frozen=True)
class Plan:
    """From ``at`` seconds into the storm, the exchange's fault plan is ``rules`` (seeded ``seed``)."""

    at: float
    name: str
    seed: int
    rules: tuple[dict[str, Any], ...]


def base_rules() -> tuple[dict[str, Any], ...]:
    """The faults in force through the whole storm."""
    return (
        {"endpoint": "POST /v2/orders", "kind": "drop_after", "probability": 0.12},
        {"endpoint": "POST /v2/orders", "kind": "reply_timeout", "seconds": 12, "probability": 0.05},
        {"endpoint": "POST /v2/orders", "kind": "hide_new_orders", "lookups": 3, "probability": 0.15},
        {"endpoint": "POST /v2/orders", "kind": "hide_new_orders", "lookups": 12, "probability": 0.03},
        {"endpoint": "GET /v2/orders:by_client_order_id", "kind": "status", "status": 500,
         "probability": 0.3},
        {"endpoint": "stream", "kind": "duplicate_updates", "probability": 0.25},
        {"endpoint": "stream", "kind": "reorder_updates", "probability": 0.25},
        {"endpoint": "fills", "kind": "partial_fills", "fraction": 0.5, "probability": 0.3},
    )


def outage_rules() -> tuple[dict[str, Any], ...]:
    """Every connection refused for 2 s (the first request after the plan is set), then the
    trade-update stream's reconnect refused for 3 s more. (``refuse`` on the endpoint ``"stream"``
    never fires: the websocket's connect is the HTTP endpoint ``"GET /stream"``, and ``"stream"``
    rules are drawn only for the update fan-out, which applies duplicate/reorder kinds only.)"""
    return ({"endpoint": "*", "kind": "refuse", "seconds": 2, "count": 1},
            {"endpoint": "GET /stream", "kind": "refuse", "seconds": 3, "count": 1})


@dataclass(frozen=True)
class Storm:
    """The seeded schedule of fault plans and kills for a storm of ``seconds``."""

    seed: int
    seconds: float
    plans: tuple[Plan, ...]
    kills: tuple[Kill, ...]
    driver_seed: int

    @classmethod
    def draw(cls, seed: int, seconds: float) -> Storm:
        rng = random.Random(seed)
        outage_at = rng.uniform(0.3, 0.6) * seconds
        plans = (Plan(0.0, "base", rng.randrange(1 << 30), base_rules()),
                 Plan(outage_at, "outage", rng.randrange(1 << 30), base_rules() + outage_rules()))
        count = max(3, int(seconds // 8))
        times = sorted(rng.uniform(1.0, max(seconds - 3.0, 2.0)) for _ in range(count))
        kills = tuple(Kill(round(at, 2), rng.choice(VICTIMS), round(rng.uniform(0.5, 3.0), 2))
                      for at in times)
        return cls(seed, seconds, plans, kills, rng.randrange(1 << 30))

    def describe(self) -> str:
        plans = ", ".join(f"{p.name}@{p.at:.1f}s" for p in self.plans)
        kills = ", ".join(f"{k.victim}@{k.at:.1f}s(down {k.down_s:.1f}s)" for k in self.kills)
        return f"seed {self.seed}, {self.seconds:g}s: plans {plans}; kills {kills}"


def set_faults(exchange: PaperExchange, rules: tuple[dict[str, Any], ...], seed: int,
               deadline_s: float = 20.0) -> None:
    """PUT the fault plan, retrying while the exchange refuses connections (a ``refuse`` fault)."""
    body = json.dumps({"seed": seed, "rules": list(rules)})
    until = time.monotonic() + deadline_s
    while True:
        try:
            reply = requests.put(exchange.url + "/_paper/faults", data=body, headers=HEADERS, timeout=5)
            assert reply.ok, reply.text
            return
        except requests.RequestException:
            if time.monotonic() > until:
                raise
            time.sleep(0.2)


def broker_get(exchange: PaperExchange, path: str, **params: Any) -> Any:
    """GET an API path (a raw client); None when the exchange does not answer right now."""
    try:
        reply = requests.get(exchange.url + path, params=params, headers=HEADERS, timeout=5)
    except requests.RequestException:
        return None
    return reply.json() if reply.ok else None


# -- the desk -----------------------------------------------------------------------------------


@dataclass
class Desk:
    """The services as processes on one server; each appends to ``<logs>/<name>.log``."""

    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kill_with: signal.Signals = signal.SIGKILL
    events: list[str] = field(default_factory=list)  # kills, restarts, unexpected exits
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str) -> None:
        with self._guard:
            self.procs[name] = spawn(f"services.{name}", env=self.env, log=self.logs / f"{name}.log")

    def kill(self, name: str, at: float) -> None:
        """SIGKILL ``name`` (noting it in the service's log); an earlier exit of its own is noted."""
        with self._guard:
            proc = self.procs[name]
            if proc.poll() is not None:
                if proc.returncode != -self.kill_with:
                    self.events.append(f"{at:.1f}s {name} had exited by itself with {proc.returncode}")
                return
            proc.send_signal(self.kill_with)
            proc.wait()
            self.events.append(f"{at:.1f}s {self.kill_with.name} {name} (pid {proc.pid})")
        self._note(name, f"drill: {self.kill_with.name} pid {proc.pid} at {at:.1f}s")

    def ensure_running(self, at: float, names: tuple[str, ...] = SERVICES) -> None:
        """Start each of ``names`` that is not running (killed, or exited by itself: noted)."""
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None and proc.returncode != -self.kill_with:
                self.events.append(f"{at:.1f}s {name} had exited by itself with {proc.returncode}")
            self._note(name, f"drill: starting {name} at {at:.1f}s")
            self.start(name)
            self.events.append(f"{at:.1f}s started {name}")

    def _note(self, name: str, text: str) -> None:
        with (self.logs / f"{name}.log").open("a") as log:
            log.write(f"----- {text} -----\n")

    def stop(self) -> None:
        stop_all(list(self.procs.values()))

    def exited(self) -> dict[str, int | None]:
        """Each service's exit code (None: still running)."""
        return {name: proc.poll() for name, proc in self.procs.items()}

    def tails(self, lines: int = 25, width: int = 400) -> str:
        """The last ``lines`` lines of every log (services and exchange), each cut to ``width``."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path.name} <==\n" + "\n".join(line[:width] for line in text))
        return "\n".join(parts)

    def event_counts(self, names: tuple[str, ...]) -> dict[str, int]:
        """How many log lines of every service carry each event in ``names``."""
        counts: Counter[str] = Counter()
        for path in self.logs.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line).get("event")
                except ValueError:
                    continue
                if event in names:
                    counts[event] += 1
        return dict(sorted(counts.items()))


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``bastion ARGS`` against the desk ``env`` describes."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


# -- the threads --------------------------------------------------------------------------------


class Driver:
    """Publishes bars for :data:`SYMBOLS` (as the ingester would) and manual intents of 1-5
    shares: buys, and sells of what is held and not already being sold."""

    def __init__(self, url: str, keys: Keys, seed: int) -> None:
        self.url = url
        self.keys = keys
        self.rng = random.Random(seed)
        self.prices = {symbol: Decimal(100) for symbol in SYMBOLS}
        self.intents: list[Intent] = []
        self.bars = 0
        self.errors: list[str] = []

    def bar_round(self, client: redis.Redis) -> None:
        """One bar per symbol, starting now, its close the symbol's last price, its time the last
        bar's and its arrival."""
        now = LiveClock().now()
        for symbol in SYMBOLS:
            open_ = self.prices[symbol]
            close = max(open_ + Decimal(self.rng.randint(-15, 15)) / 100, Decimal(50))
            self.prices[symbol] = close
            bar = Bar(symbol=symbol, time=now, open=open_, high=max(open_, close) + Decimal("0.02"),
                      low=min(open_, close) - Decimal("0.02"), close=close, volume=Decimal(100000))
            publish(client, self.keys, BARS, bar)
            client.hset(self.keys.last_price, symbol, str(close))
            client.hset(self.keys.last_bar, symbol, now.isoformat())
            client.hset(self.keys.bar_arrival, symbol, now.isoformat())
        self.bars += 1

    def intent(self, client: redis.Redis, portfolio: Portfolio) -> None:
        """One manual market intent: a buy, or a sell of shares held and not reserved."""
        symbol = self.rng.choice(SYMBOLS)
        held = portfolio.snapshot().positions.get(symbol)
        free = int(held.qty - held.reserved) if held is not None else 0
        quantity = self.rng.randint(1, 5)
        side = Side.BUY
        if free > 0 and self.rng.random() < 0.5:
            side, quantity = Side.SELL, min(quantity, free)
        intent = Intent(time=LiveClock().now(), source="manual", symbol=symbol, side=side,
                        quantity=Decimal(quantity), order_type=OrderType.MARKET, reason="lifecycle drill")
        publish(client, self.keys, INTENTS, intent)
        self.intents.append(intent)

    def run_bars(self, stop: threading.Event) -> None:
        self._loop(stop, BAR_EVERY_S, lambda client, _: self.bar_round(client))

    def run_intents(self, stop: threading.Event) -> None:
        self._loop(stop, INTENT_EVERY_S, self.intent)

    def _loop(self, stop: threading.Event, every_s: float, step: Any) -> None:
        client = connect_url(self.url)
        portfolio = Portfolio(client, self.keys, "paper")
        try:
            while not stop.is_set():
                try:
                    step(client, portfolio)
                except Exception as exc:  # the drill goes on; the error is reported at the end
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                stop.wait(every_s)
        finally:
            client.close()


def lift_reconciler_halts(url: str, keys: Keys, desk: Desk, stop: threading.Event) -> None:
    """Play the operator until ``stop``: a halt the reconciler engaged on a confirmed difference is
    lifted (``bastion kill-switch off``) once a later reconciliation report is clean, so the storm
    keeps placing orders; each halt and lift is noted in ``desk.events``."""
    client = connect_url(url)
    switch = KillSwitch(client, keys)
    start = time.monotonic()
    noted = 0
    try:
        while not stop.wait(0.5):
            status = switch.current()
            if not (status.state is TradingState.HALTED and status.by == RECONCILER
                    and not status.reason.startswith(HOLD_REASON)):
                continue
            at = time.monotonic() - start
            if status.seq != noted:
                noted = status.seq
                desk.events.append(f"{at:.1f}s HALTED by the reconciler: {status.reason[:300]}")
            raw: Any = client.hgetall(keys.reconciliation)
            report = {reply_text(k): reply_text(v) for k, v in raw.items()}
            checked = datetime.fromisoformat(report["time"]) if report.get("time") else None
            if report.get("status") == "ok" and checked and status.at and checked > status.at:
                switch.engage(TradingState.ACTIVE, "lifecycle-drill", "the reconciliation is clean again")
                desk.events.append(f"{at:.1f}s halt lifted after a clean reconciliation")
    finally:
        client.close()


def run_storm(storm: Storm, desk: Desk, exchange: PaperExchange, stop: threading.Event) -> None:
    """Set each fault plan and carry out each kill at its time into the storm, until ``stop``."""
    start = time.monotonic()
    steps: list[tuple[float, int, Any]] = [(p.at, 0, p) for p in storm.plans]
    for kill in storm.kills:
        steps += [(kill.at, 1, ("kill", kill)), (kill.at + kill.down_s, 2, ("start", kill))]
    for at, _, step in sorted(steps, key=lambda s: (s[0], s[1])):
        if stop.wait(max(start + at - time.monotonic(), 0)):
            return
        if isinstance(step, Plan):
            set_faults(exchange, step.rules, step.seed)
            desk.events.append(f"{at:.1f}s fault plan {step.name!r}")
        elif step[0] == "kill":
            desk.kill(step[1].victim, at)
        else:
            desk.ensure_running(at, (step[1].victim,))
