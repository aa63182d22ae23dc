"""The whole desk end to end, every service a real OS process, on both shared servers.

A fixed CSV of bars is replayed through the ingester; strategy workers, risk, the executor, the
paper exchange and the reconciler run as they do under honcho (the monitor and its rq worker
join on the real redis-server only: rq cannot run on fakeredis's TCP server, which has no
INFO/CONFIG). Entries carry a protective stop. The assertions are about money and orders: the
expected entries, the expected exits less those a stop made first, each approved order at the
exchange exactly once (and only protective orders besides), each fill in the portfolio exactly
once, the ledger replaying to the state, our books equal to the exchange's, and a clean stop with
nothing pending.
"""

from __future__ import annotations

import csv
import json
import math
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from services.strategy._builtin import SmaCrossover, SmaParams, SmaState
from shared.bus import codec
from shared.keys import INTENTS, ORDERS, Keys
from shared.models import Bar, Intent, Order, OrderStatus
from shared.portfolio import Portfolio, verify
from tests.conftest import REAL, SERVER_BACKENDS
from tests.support.environment import desk_env
from tests.support.paper import PaperExchange, running_exchange
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess

SYMBOLS = ["AAPL", "MSFT", "NVDA", "SPY", "QQQ", "TSLA"]
TICKS = 48
PARAMS = {"fast": 3, "slow": 8, "quantity": Decimal(5), "stop_bps": Decimal(150)}
START = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
PROTECTIVE = re.compile(r"(.+)-(?:sl|flat)\d+")  # the executor's stops and flattens
TERMINAL = {status.value.encode() for status in OrderStatus if status.is_terminal}


def price(symbol_index: int, tick: int) -> Decimal:
    """A wave per symbol, so the SMA crossover trades several times."""
    wave = 4 * math.sin(2 * math.pi * (tick + 3 * symbol_index) / (12 + symbol_index))
    return Decimal(100 + 10 * symbol_index + wave).quantize(Decimal("0.01"))


def write_bars(path: Path) -> list[Bar]:
    """Write the replay CSV (Alpaca's bar columns plus symbol) and return its bars."""
    bars = []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["symbol", "timestamp", "open", "high", "low", "close", "volume", "trade_count",
                         "vwap"])
        for tick in range(TICKS):
            when = START + timedelta(minutes=tick)
            for index, symbol in enumerate(SYMBOLS):
                close = price(index, tick)
                writer.writerow([symbol, when.isoformat(), close, close, close, close, 100000, 10, close])
                bars.append(Bar(time=when, symbol=symbol, open=close, high=close, low=close, close=close,
                                volume=Decimal(100000)))
    return bars


def expected_sides(bars: list[Bar]) -> dict[str, list[str]]:
    """What SMA crossover must emit per symbol, in order, run offline on the same bars."""
    result: dict[str, list[str]] = {}
    for symbol in SYMBOLS:
        strategy = SmaCrossover(symbol, SmaParams(**PARAMS), SmaState())
        result[symbol] = [i.side.value for bar in bars if bar.symbol == symbol for i in strategy.on_bar(bar)]
    return result


def is_subsequence(short: list[str], long: list[str]) -> bool:
    """True when ``short`` is ``long`` with some items left out, the rest in order."""
    remaining = iter(long)
    return all(item in remaining for item in short)


def messages(client: redis.Redis, keys: Keys, stream: str) -> list[Any]:
    """Every decoded message on ``stream``."""
    return [codec.decode(fields) for _, fields in client.xrange(keys.stream(stream))]


def pending_everywhere(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Pending entries per stream and group (only those with any)."""
    found = {}
    for raw in client.scan_iter(match=f"{keys.prefix}:stream:*", _type="stream"):
        for group in client.xinfo_groups(raw):
            if int(group["pending"]):
                found[f"{raw.decode()}/{group['name'].decode()}"] = int(group["pending"])
    return found


class Desk:
    """Every service process of one deployment, started and stopped by the test."""

    def __init__(self, url: str, keys: Keys, exchange: PaperExchange, log_dir: Path, csv_path: Path) -> None:
        self.log_dir = log_dir
        self.env = desk_env(url, keys, {
            "bus__block_ms": 100, "bus__claim_idle_ms": 1000, "bus__claim_interval_ms": 250,
            "service__heartbeat_interval_s": 0.3, "service__heartbeat_ttl_s": 1,
            "ingester__source": "csv", "ingester__csv_path": csv_path,
            "ingester__symbols": SYMBOLS, "ingester__speed": 8,
            "ingester__partitions": 4,
            "strategy__lease_ms": 1000,
            "strategy__params": {"sma_crossover": {k: str(v) for k, v in PARAMS.items()}},
            "reconciler__interval_s": 2,
        }, exchange=exchange)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        """Start one service process, logging to its own file."""
        proc = spawn(module, *args, env=self.env, log=self.log_dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def stop_cleanly(self) -> dict[str, int | None]:
        """SIGTERM every process still running; their exit statuses."""
        running = {name: p for name, p in self.procs.items() if p.poll() is None}
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        return {name: proc.wait(30) for name, proc in running.items()}


def run_desk(server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path, *, workers: int,
             kill_one: bool, with_monitor: bool) -> None:
    """Replay the bars through a full desk and check the money and the orders."""
    bars = write_bars(tmp_path / "bars.csv")
    expected = expected_sides(bars)
    assert sum(len(v) for v in expected.values()) >= 20  # the data really trades
    with running_exchange(server_url, keys, tmp_path) as exchange:
        desk = Desk(server_url, keys, exchange, tmp_path, tmp_path / "bars.csv")
        try:
            for name in ("risk", "executor", "reconciler"):
                desk.start(name, f"services.{name}")
            if with_monitor:
                desk.start("monitor", "services.monitor")
                desk.start("rqworker", "services.monitor.worker")
            for index in range(workers):
                desk.start(f"strategy-{index}", "services.strategy", "--instance", f"strategy-{index}")
            wait_for(lambda: (client.hget(f"{keys.prefix}:reconciliation", "status") or b"") == b"ok",
                     timeout=60, message="the startup reconciliation")
            wait_for(lambda: len({k for k in client.scan_iter(match=keys.lease("strategy:*"))}) == 4,
                     timeout=30, message="every partition leased")
            ingester = desk.start("ingester", "services.ingester")
            if kill_one:
                wait_for(lambda: client.xlen(keys.stream(INTENTS)) >= 6, timeout=60,
                         message="intents flowing")
                desk.procs["strategy-0"].send_signal(signal.SIGKILL)
                desk.procs["strategy-0"].wait(10)
            assert ingester.wait(120) == 0
            last_bar = (START + timedelta(minutes=TICKS - 1)).isoformat()
            wait_for(lambda: all(json.loads(client.get(keys.strategy_state("sma_crossover", s)) or "{}")
                                 .get("bar_time") == last_bar for s in SYMBOLS),
                     timeout=60, message="every bar applied by the strategies")

            def every_order_done() -> bool:
                approved = [m for m in messages(client, keys, ORDERS) if isinstance(m, Order)]
                statuses = [client.hget(keys.order(o.client_order_id), "status") for o in approved]
                if not all(s in TERMINAL for s in statuses):  # the last close again, so the last market
                    for index, symbol in enumerate(SYMBOLS):  # orders fill; none once they have, so
                        last = str(price(index, TICKS - 1))  # no stop triggers after the check
                        exchange.bar(symbol, last, last, last, last)
                    return False
                # and every order the exchange ended (protective stops too) has ended in our books
                ended = [o["client_order_id"] for o in exchange.get("/v2/orders", status="closed", limit=500)]
                booked = [client.hget(keys.order(cid), "status") for cid in ended]
                return (bool(approved) and all(s in TERMINAL for s in statuses + booked)
                        and not pending_everywhere(client, keys) and positions_agree())

            def positions_agree() -> bool:  # a stop the last bar triggered may still be on its way
                ours = Portfolio(client, keys, "paper").snapshot().positions
                theirs = {p["symbol"]: Decimal(p["qty"]) for p in exchange.get("/v2/positions")}
                return {s: p.qty for s, p in ours.items() if p.qty} == theirs

            wait_for(every_order_done, timeout=90, interval=0.3, message="every approved order done")

            intents = [m for m in messages(client, keys, INTENTS) if isinstance(m, Intent)]
            assert len({i.id for i in intents}) == len(intents), "an intent was published twice"
            for symbol in SYMBOLS:  # a stop that sold first spares the strategy its own sell
                actual = [i.side.value for i in intents if i.symbol == symbol]
                assert actual.count("buy") == expected[symbol].count("buy"), symbol
                assert is_subsequence(actual, expected[symbol]), (symbol, actual, expected[symbol])

            orders = [m for m in messages(client, keys, ORDERS) if isinstance(m, Order)]
            ids = [o.client_order_id for o in orders]
            assert len(set(ids)) == len(ids), "an order was approved twice"
            at_exchange = [o["client_order_id"] for o in exchange.get("/v2/orders", status="all", limit=500)]
            protective = [cid for cid in at_exchange if PROTECTIVE.fullmatch(cid)]
            assert protective, "no entry was protected by a stop"
            assert {PROTECTIVE.fullmatch(cid)[1] for cid in protective} <= set(ids)  # type: ignore[index]
            assert sorted(set(at_exchange) - set(protective)) == sorted(ids)

            portfolio = Portfolio(client, keys, "paper")
            snap = portfolio.snapshot()
            ours = {s: str(p.qty) for s, p in snap.positions.items() if p.qty}
            theirs = {p["symbol"]: p["qty"] for p in exchange.get("/v2/positions")}
            assert {s: Decimal(q) for s, q in ours.items()} == {s: Decimal(q) for s, q in theirs.items()}
            assert snap.cash == Decimal(exchange.get("/v2/account")["cash"])
            assert snap.reserved == 0
            assert verify(client, keys, "paper", allow_short=False).ok
            assert (client.hget(keys.trading_state, "state") or b"ACTIVE") == b"ACTIVE"

            statuses = desk.stop_cleanly()
            assert statuses == dict.fromkeys(statuses, 0), statuses
            assert pending_everywhere(client, keys) == {}
        finally:
            stop_all(list(desk.procs.values()))


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_full_desk_replay(server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path,
                          request: pytest.FixtureRequest) -> None:
    """Every service as a process, one strategy worker: intents, orders and fills exactly once."""
    run_desk(server_url, client, keys, tmp_path, workers=1, kill_one=False,
             with_monitor=request.node.callspec.params["server_url"] == REAL)


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_full_desk_with_a_strategy_worker_killed(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Three strategy workers, one SIGKILLed mid-run: no bar processed twice, no intent lost."""
    run_desk(server_url, client, keys, tmp_path, workers=3, kill_one=True,
             with_monitor=request.node.callspec.params["server_url"] == REAL)
