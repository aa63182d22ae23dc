"""The kill switch outlives a restart of the risk service and of Redis itself (from its AOF)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from shared.bus import codec, publish
from shared.clock import LiveClock
from shared.config import PortfolioSettings
from shared.heartbeat import alive_instances
from shared.keys import INTENTS, ORDERS, REJECTIONS, Keys
from shared.models import Fill, IntentRejected, Order, Side
from shared.portfolio import Portfolio
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.trading_state import KillSwitch, TradingState
from tests.support.factories import intent
from tests.support.processes import REPO_ROOT, free_port, spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess


class Desk:
    """A Redis server with AOF on a fixed port and data directory, and the risk service's environment."""

    def __init__(self, tmp_path: Path, keys: Keys) -> None:
        self.tmp_path = tmp_path
        self.keys = keys
        self.port = free_port()
        self.server = RedisServer(self.port, tmp_path / "redis", appendonly=True)
        self.env = {"REDIS_URL": self.server.url, "BASTION_KEY_PREFIX": keys.prefix,
                    "BASTION_BUS__BLOCK_MS": "100", "BASTION_PORTFOLIO__STARTING_CASH": "10000",
                    # the broker is down for the whole test: exits need no fresh balance
                    "BASTION_BROKER__BASE_URL": f"http://127.0.0.1:{free_port()}",
                    "BASTION_PAPER_EXCHANGE__API_KEY": "k", "BASTION_PAPER_EXCHANGE__SECRET_KEY": "s",
                    "BASTION_BROKER__TIMEOUT_S": "1", "BASTION_BROKER__READ_RETRIES": "0"}
        self.risk: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def client(self) -> redis.Redis:
        return connect_url(self.server.url)

    def restart_redis(self) -> None:
        """Stop the server (SIGTERM flushes the AOF) and start a new one on the same port and data."""
        self.server.stop()
        self.server = RedisServer(self.port, self.tmp_path / "redis", appendonly=True)
        self.server.start()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m services.cli ARGS`` against this desk."""
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO_ROOT,
                              env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def start_risk(self, client: redis.Redis) -> None:
        self.runs += 1
        self.risk = spawn("services.risk", env=self.env, log=self.tmp_path / f"risk-{self.runs}.log")
        wait_for(lambda: alive_instances(client, self.keys, "risk"), timeout=30, message="risk to beat")

    def stop_risk(self) -> None:
        assert self.risk is not None
        self.risk.send_signal(signal.SIGTERM)
        assert self.risk.wait(30) == 0
        self.risk = None


@pytest.fixture
def desk(tmp_path: Path, keys: Keys) -> Iterator[Desk]:
    """A desk whose processes and server are stopped afterwards."""
    result = Desk(tmp_path, keys)
    result.server.start()
    yield result
    if result.risk is not None:
        stop_all([result.risk])
    result.server.stop()


def decision(client: redis.Redis, keys: Keys, intent_id: str) -> Order | IntentRejected | None:
    """Risk's decision on ``intent_id``, if it has published one."""
    for stream in (ORDERS, REJECTIONS):
        for _, fields in client.xrange(keys.stream(stream)):
            if fields.get(b"cid") == intent_id.encode():
                message = codec.decode(fields)
                assert isinstance(message, Order | IntentRejected)
                return message
    return None


def send(client: redis.Redis, keys: Keys, side: Side) -> Order | IntentRejected:
    """Publish a manual intent for 10 AAPL and wait for risk's decision."""
    wish = intent(side, time=LiveClock().now())
    publish(client, keys, INTENTS, wish)
    return wait_for(lambda: decision(client, keys, wish.id), timeout=30, message=f"a decision on {side}")


def test_engaged_kill_switch_survives_risk_and_redis_restarts(desk: Desk, keys: Keys) -> None:
    """HALTED by the CLI, risk restarted and Redis restarted from its AOF: an entry is still refused as
    HALTED; after REDUCING a sell of the position is approved and a buy refused."""
    client = desk.client()
    portfolio = Portfolio(client, keys, "paper", settings=PortfolioSettings(starting_cash=Decimal(10000)))
    portfolio.open()
    portfolio.reserve("h", "AAPL", Side.BUY, Decimal(20), Decimal(150))
    portfolio.apply_fill("h", Fill(fill_id="h:1", quantity=Decimal(20), price=Decimal(150),
                                   time=LiveClock().now()))
    client.hset(keys.last_price, "AAPL", "150")  # as the ingester writes it
    engaged = desk.cli("kill-switch", "on", "--reason", "restart drill")
    assert engaged.returncode == 0, engaged.stderr
    desk.start_risk(client)
    desk.stop_risk()
    client.close()

    desk.restart_redis()
    client = desk.client()
    status = KillSwitch(client, keys).current()
    assert (status.state, status.reason) == (TradingState.HALTED, "restart drill")
    desk.start_risk(client)
    refused = send(client, keys, Side.BUY)
    assert isinstance(refused, IntentRejected) and "HALTED" in refused.reason

    reducing = desk.cli("kill-switch", "on", "--state", "REDUCING", "--reason", "wind down")
    assert reducing.returncode == 0, reducing.stderr
    sold = send(client, keys, Side.SELL)
    assert isinstance(sold, Order) and (sold.side, sold.quantity) == (Side.SELL, Decimal(10))
    bought = send(client, keys, Side.BUY)
    assert isinstance(bought, IntentRejected) and "REDUCING" in bought.reason
    desk.stop_risk()
    client.close()
