"""The trading desk as real OS processes: paper exchange, risk and executor on one shared server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
import redis
import requests

from services.reconciler.service import REPORT_STREAM
from shared.bus import publish
from shared.clock import LiveClock
from shared.keys import ALERTS, BARS, INTENTS, ORDERS, Keys
from shared.models import Order, Side
from shared.portfolio import Portfolio, verify
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.trading_state import KillSwitch, TradingState
from tests.conftest import SERVER_BACKENDS
from tests.support.environment import desk_env
from tests.support.paper import HEADERS, PaperExchange, running_exchange
from tests.support.processes import REPO_ROOT, free_port, spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess
CASH = "10000"
# The settings of every desk process here (``desk_env(url, keys, DESK, exchange=...)``): a $10,000
# account at both ends.
DESK = {"bus__block_ms": 100, "portfolio__starting_cash": CASH, "paper_exchange__starting_cash": CASH,
        "limits__max_position_fraction": 1}


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_twenty_concurrent_orders_for_sixty_percent_of_cash(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """20 concurrent `bastion order buy`, each 60% of cash: exactly one fills and nothing overspends."""
    with running_exchange(server_url, keys, tmp_path, BASTION_PAPER_EXCHANGE__STARTING_CASH=CASH) as exchange:
        env = desk_env(server_url, keys, DESK, exchange=exchange)
        services = [spawn(f"services.{name}", env=env, log=tmp_path / f"{name}.log")
                    for name in ("risk", "executor")]
        try:
            bar = exchange.bar("AAPL", "100", "100", "100", "100")
            client.hset(keys.bar_arrival, "AAPL", bar.time.isoformat())  # as the ingester would (stale data)
            portfolio = Portfolio(client, keys, "paper")
            wait_for(lambda: portfolio.marks().get("AAPL") == Decimal(100), timeout=30,
                     message="risk to see AAPL")

            def order() -> subprocess.CompletedProcess[str]:
                return cli(env, "order", "buy", "AAPL", "60", "--wait", "60")

            with ThreadPoolExecutor(max_workers=20) as pool:
                results = list(pool.map(lambda _: order(), range(20)))
            codes = sorted(r.returncode for r in results)
            assert codes == [0] + [1] * 19, [r.stdout + r.stderr for r in results]
            # refused by the reservation, or by a limit that counts the approved order as pending
            assert all(any(why in r.stdout for why in ("insufficient funds", "max_position_fraction"))
                       for r in results if r.returncode == 1)
            # `order --wait` answers once risk approved; the fill needs a bar after the exchange accepted
            wait_for(lambda: exchange.get("/v2/orders", status="all"), timeout=60, message="the order placed")
            exchange.bar("AAPL", "100", "100", "100", "100")
            def filled() -> bool:
                held = portfolio.snapshot().positions.get("AAPL")
                return held is not None and held.qty == 60

            wait_for(filled, timeout=60, message="the fill applied")
            snap = portfolio.snapshot()
            assert snap.cash == Decimal(4000) and snap.reserved == 0
            positions = exchange.get("/v2/positions")
            assert [(p["symbol"], p["qty"]) for p in positions] == [("AAPL", "60")]
            assert Decimal(exchange.get("/v2/account")["cash"]) == Decimal(4000)
            assert len(exchange.get("/v2/orders", status="all")) == 1
            assert verify(client, keys, "paper", allow_short=False).ok
            for proc in services:
                proc.send_signal(signal.SIGTERM)
            assert [proc.wait(30) for proc in services] == [0, 0]
        finally:
            stop_all(services)



@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_a_fill_made_while_the_trade_update_stream_was_down_is_booked(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """The exchange refuses connections for 3 s (its websocket dropped with them) and fills a
    resting order meanwhile: the update is lost, alpaca-py reconnects by itself, and the executor,
    noticing the reconnect, looks the order up and books the fill (periodic polls are off here,
    so only the reconnect can find it)."""
    with running_exchange(server_url, keys, tmp_path, BASTION_PAPER_EXCHANGE__STARTING_CASH=CASH) as exchange:
        env = desk_env(server_url, keys, DESK, exchange=exchange, executor__poll_interval_s=3600)
        executor = spawn("services.executor", env=env, log=tmp_path / "executor.log")
        try:
            portfolio = Portfolio(client, keys, "paper")
            wait_for(lambda: portfolio.snapshot().opened, timeout=30, message="the account opened")
            wait_for(lambda: exchange.get("/_paper/health")["listeners"] == 1, timeout=30,
                     message="the executor listening")
            exchange.bar("AAPL", "100", "100", "100", "100")
            portfolio.reserve("i1", "AAPL", Side.BUY, Decimal(5), Decimal(100))
            publish(client, keys, ORDERS, Order(time=LiveClock().now(), intent_id="i1",
                                                client_order_id="bst-i1", account="paper", symbol="AAPL",
                                                side=Side.BUY, quantity=Decimal(5), reservation_id="i1"))
            record = keys.order("bst-i1")
            wait_for(lambda: client.hget(record, "status") == b"new", timeout=30, message="the order placed")
            exchange.set_faults({"endpoint": "GET /v2/clock", "kind": "refuse", "seconds": 3, "count": 1})
            with contextlib.suppress(requests.RequestException):
                requests.get(exchange.url + "/v2/clock", headers=HEADERS, timeout=5)
            exchange.bar("AAPL", "100", "100", "100", "100")  # fills while nobody listens
            wait_for(lambda: client.hget(record, "status") == b"filled", timeout=60,
                     message="the fill booked after the reconnect")
            assert [o["status"] for o in exchange.get("/v2/orders", status="all")] == ["filled"]
            snap = portfolio.snapshot()
            assert (snap.positions["AAPL"].qty, snap.cash, snap.reserved) == (Decimal(5), Decimal(9500), 0)
            assert "executor.trade_updates_reconnected" in (tmp_path / "executor.log").read_text()
            executor.send_signal(signal.SIGTERM)
            assert executor.wait(30) == 0
        finally:
            stop_all([executor])


def test_the_desk_rides_out_a_redis_restart(keys: Keys, tmp_path: Path) -> None:
    """Redis stopped until risk, the executor, the ingester and the reconciler have each met the
    outage, then started again from its AOF (a real server only: fakeredis keeps nothing across a
    restart): no service exits, bars flow again, and a kill switch engaged after it still cancels
    the order that rested at the exchange through it."""
    with desk_on_its_own_redis(keys, tmp_path, ("risk", "executor", "ingester", "reconciler"),
                               BASTION_INGESTER__SYMBOLS='["MSFT"]') as desk:
        client = connect_url(desk.server.url)
        kill_switch = KillSwitch(client, keys)
        wait_for(lambda: (kill_switch.current().state, kill_switch.current().by)
                 == (TradingState.ACTIVE, "reconciler"), timeout=60, message="the start-up reconciliation")
        bar = desk.exchange.bar("AAPL", "100", "100", "100", "100")
        client.hset(keys.bar_arrival, "AAPL", bar.time.isoformat())  # as the ingester would (stale data)
        rested = cli(desk.env, "order", "buy", "AAPL", "1", "--limit", "50", "--wait", "60")
        assert rested.returncode == 0, rested.stdout + rested.stderr
        wait_for(lambda: [o["status"] for o in desk.exchange.get("/v2/orders")] == ["new"], timeout=60,
                 message="the limit order resting at the exchange")

        client.close()
        desk.server.stop()  # SIGTERM: the AOF is flushed
        desk.wait_logged({"risk": "risk.tick_redis_unavailable", "ingester": "ingester.redis_unavailable",
                          "executor": "executor.trading_state_redis_unavailable",
                          "reconciler": "reconciler.redis_unavailable"})
        desk.server.start()
        client = connect_url(desk.server.url)
        desk.wait_for_bars(client, keys)

        halted = cli(desk.env, "kill-switch", "on", "--reason", "after the outage", "--cancel-orders")
        assert halted.returncode == 0, halted.stdout + halted.stderr
        wait_for(lambda: [o["status"] for o in desk.exchange.get("/v2/orders", status="all")] == ["canceled"],
                 timeout=60, message="the resting order cancelled")
        portfolio = Portfolio(client, keys, "paper")
        wait_for(lambda: portfolio.snapshot().reserved == 0, timeout=60, message="its reservation released")
        desk.stop_cleanly()
        assert verify(client, keys, "paper", allow_short=False).ok
        client.close()


def test_the_desk_waits_out_a_full_redis(keys: Keys, tmp_path: Path) -> None:
    """Redis refusing writes (memory full: maxmemory 1 under noeviction; a full disk refuses them
    with MISCONF) until the ingester, the monitor and the reconciler have each met it, then taking
    writes again, with the whole desk running: no service exits, nothing is dead-lettered, bars
    flow again, and the ledger replays to the portfolio. (The worker, with no new bar to commit,
    is tested alone in tests/services/strategy/test_strategy.py.)"""
    names = ("strategy", "risk", "executor", "ingester", "reconciler", "monitor")
    with desk_on_its_own_redis(keys, tmp_path, names, BASTION_MONITOR__INTERVAL_S="0.5") as desk:
        client = connect_url(desk.server.url)
        wait_for(lambda: client.xlen(keys.stream(INTENTS)) > 0, timeout=60, message="bars becoming intents")
        started = [(ALERTS, "monitor"), (INTENTS, "risk"), (ORDERS, "executor")]  # groups made
        wait_for(lambda: all(has_group(client, keys.stream(s), g) for s, g in started)
                 and client.exists(keys.stream(REPORT_STREAM)), timeout=60,
                 message="every service past its start-up writes")

        client.config_set("maxmemory", 1)
        desk.wait_logged({"ingester": "ingester.redis_unavailable", "monitor": "monitor.redis_unavailable",
                          "reconciler": "reconciler.redis_unavailable"})
        client.config_set("maxmemory", 0)
        desk.wait_for_bars(client, keys)
        desk.stop_cleanly()
        assert client.xlen(keys.dead_letter) == 0
        assert verify(client, keys, "paper", allow_short=False).ok
        client.close()


@dataclass
class OwnRedisDesk:
    """The desk's processes on a Redis server of their own, which a test may stop or fill."""

    server: RedisServer
    exchange: PaperExchange
    env: dict[str, str]
    logs: Path
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def wait_logged(self, events: dict[str, str]) -> None:
        """Wait until each service's log has its event (the service has met the fault)."""
        for name, event in events.items():
            wait_for(logged(self.logs / f"{name}.log", event), timeout=60,
                     message=f"{name} meeting the fault")

    def wait_for_bars(self, client: redis.Redis, keys: Keys) -> None:
        """Wait until the ingester publishes again."""
        published = client.xlen(keys.stream(BARS))
        wait_for(lambda: client.xlen(keys.stream(BARS)) > published, timeout=60, message="bars again")

    def stop_cleanly(self) -> None:
        """Every service still running, then SIGTERM: each exits 0."""
        assert {name: proc.poll() for name, proc in self.services.items()} == dict.fromkeys(self.services)
        for proc in self.services.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(30) for name, proc in self.services.items()}
        assert codes == dict.fromkeys(self.services, 0)


@contextmanager
def desk_on_its_own_redis(keys: Keys, tmp_path: Path, names: Sequence[str], **settings: str
                          ) -> Iterator[OwnRedisDesk]:
    """The paper exchange and the services ``names`` as real processes on a private redis-server
    with AOF, a reconciler pass every 0.5 s, and ``settings`` (BASTION_* variables); all stopped
    afterwards."""
    server = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    server.start()
    desk: OwnRedisDesk | None = None
    try:
        with running_exchange(server.url, keys, tmp_path,
                              BASTION_PAPER_EXCHANGE__STARTING_CASH=CASH) as exchange:
            env = {**desk_env(server.url, keys, DESK, exchange=exchange, reconciler__interval_s=0.5),
                   **settings}
            desk = OwnRedisDesk(server, exchange, env, tmp_path)
            for name in names:
                desk.services[name] = spawn(f"services.{name}", env=env, log=tmp_path / f"{name}.log")
            yield desk
    finally:
        if desk is not None:
            stop_all(list(desk.services.values()))
        server.stop()


def has_group(client: redis.Redis, stream_key: str, group: str) -> bool:
    """``group`` reads ``stream_key``."""
    if not client.exists(stream_key):
        return False
    return any(info["name"] == group.encode() for info in client.xinfo_groups(stream_key))


def logged(path: Path, event: str) -> Callable[[], bool]:
    """A condition: a line of the log at ``path`` has ``event``."""
    return lambda: event in path.read_text()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``bastion ARGS`` against the desk ``env`` describes."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
