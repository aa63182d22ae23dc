"""The strategy API in a worker process: warm-up from the bars stream, and the account view."""

from __future__ import annotations

import json
import signal
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from services.ingester import Ingester, bar_id
from services.strategy import Catalog, StoredState, StrategyWorker
from shared.bus import codec
from shared.clock import SimulatedClock
from shared.config import BusSettings, IngesterSettings, Settings, StrategySettings
from shared.keys import INTENTS, Keys
from shared.models import Bar, Intent, Side
from shared.portfolio import Portfolio
from shared.safety.trading_state import KillSwitch, TradingState
from tests.conftest import SERVER_BACKENDS
from tests.support import factories
from tests.support.environment import env_for
from tests.support.factories import T0
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess

PARTITIONS = 4


def aapl(minutes: range) -> list[Bar]:
    """AAPL bars as the ingester stamps them, closing at 100 + minute, trade_count = minute."""
    return [factories.bar("AAPL", m, str(100 + m), id=bar_id("AAPL", T0 + timedelta(minutes=m)),
                          trade_count=m) for m in minutes]


def account_with_history(client: redis.Redis, keys: Keys) -> Ingester:
    """10 AAPL held at 100 in account ``paper`` (10,000 opened), an open AAPL limit order, trading
    REDUCING, and AAPL bars 0..4 delivered to the strategy group with no strategy on AAPL."""
    portfolio = Portfolio(client, keys, "paper")
    portfolio.open(Decimal("10000"))
    portfolio.reserve("r-1", "AAPL", Side.BUY, Decimal(10), Decimal(100))
    portfolio.apply_fill("r-1", factories.fill("f-1", "10", "100"))
    record = {"status": "new", "symbol": "AAPL", "side": "sell", "quantity": "4", "order_type": "limit",
              "applied_qty": "0"}
    client.hset(keys.order("c-1"), mapping=record)  # type: ignore[arg-type]
    client.sadd(keys.open_orders, "c-1")
    KillSwitch(client, keys).engage(TradingState.REDUCING, by="test", reason="drill")
    partitioned = IngesterSettings(partitions=PARTITIONS)
    ingester = Ingester(client, keys, partitioned, BusSettings(), SimulatedClock(T0))
    ingester.offer(aapl(range(5)))
    nothing = Settings(ingester=partitioned, strategy=StrategySettings(plugins={}))
    StrategyWorker(client, keys, nothing, SimulatedClock(T0), "deliverer", Catalog(nothing.strategy)).run(
        threading.Event(), burst=True)
    return ingester


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_a_worker_process_warms_up_from_the_stream_and_sees_the_account(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A worker process with the default warm-up starts a new strategy from the bars already on
    the stream (never trading on them, stored once with the live bars), and each live bar sees
    the account's position, equity, buying power, open order and trading state."""
    ingester = account_with_history(client, keys)
    ingester.offer(aapl(range(5, 7)))
    env = env_for(server_url, keys, ingester__partitions=PARTITIONS, strategy__warmup_bars=3,
                  strategy__modules=["tests.system.strategy_account_plugin"],
                  strategy__plugins={"AAPL": "account_echo"})
    log = tmp_path / "worker.log"
    worker = spawn("services.strategy", "--instance", "w1", env=env, log=log)
    try:
        wait_for(lambda: client.llen(f"{keys.prefix}:account-echo") >= 2, timeout=60,
                 message="both live bars applied")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()[-2000:]
    finally:
        stop_all([worker])
    echoes = [json.loads(line) for line in client.lrange(f"{keys.prefix}:account-echo", 0, -1)]
    assert [echo["seq"] for echo in echoes] == [5, 6]
    seen = echoes[0]["account"]
    money = {name: Decimal(seen.pop(name)) for name in ("position_qty", "avg_cost", "equity", "buying_power")}
    # equity: cash 9000 + 10 AAPL at 106, the close of the newest bar
    assert money == {"position_qty": 10, "avg_cost": 100, "equity": 10060, "buying_power": 9000}
    assert seen == {"symbol": "AAPL", "trading_state": "REDUCING",
                    "open_orders": [{"client_order_id": "c-1", "side": "sell", "quantity": "4", "filled": "0",
                                     "status": "new", "order_type": "limit"}]}
    state = StoredState.parse(client.get(keys.strategy_state("account_echo", "AAPL"))).state
    assert state == {"seen": [2, 3, 4, 5, 6], "warm": [2, 3, 4]}
    entries: Any = client.xrange(keys.stream(INTENTS))
    published = [codec.decode(fields) for _, fields in entries]
    assert [i.reason for i in published if isinstance(i, Intent)] == ["seq 5", "seq 6"]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [(line["symbol"], line["bars"]) for line in lines if line["event"] == "strategy.warmed_up"] == [
        ("AAPL", 3)]
