"""Test helpers for the paper exchange: run it as an OS process, feed it bars, set its faults."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests

from shared.brokers import AlpacaBroker
from shared.bus import publish
from shared.clock import LiveClock
from shared.config import BrokerSettings
from shared.keys import BARS, Keys
from shared.models import Bar
from shared.redis.connection import connect_url
from tests.support.processes import free_port, spawn, stop_all, wait_for

KEY_ID = "PKTESTKEY"
SECRET = "test-secret-not-real"
HEADERS = {"APCA-API-KEY-ID": KEY_ID, "APCA-API-SECRET-KEY": SECRET}


@dataclass
class PaperExchange:
    """A running exchange process and what a test needs to talk to it."""

    redis_url: str
    keys: Keys
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    def start(self) -> None:
        """Start the process and wait until it answers."""
        self.starts += 1
        env = {"REDIS_URL": self.redis_url, "BASTION_KEY_PREFIX": self.keys.prefix,
               "BASTION_PAPER_EXCHANGE__PORT": str(self.port), "BASTION_PAPER_EXCHANGE__API_KEY": KEY_ID,
               "BASTION_PAPER_EXCHANGE__SECRET_KEY": SECRET, "BASTION_BUS__BLOCK_MS": "100", **self.env}
        with open(self.log_dir / f"paper-exchange-{self.starts}.log", "wb") as log:
            self.proc = spawn("services.paper_exchange", env=env, stdout=log.fileno())
        wait_for(self._up, timeout=30, message="the paper exchange to answer")

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            _, err = self.proc.communicate()
            raise AssertionError(f"paper exchange exited {self.proc.returncode}: {err.decode()[-2000:]}")
        try:
            return requests.get(self.url + "/_paper/health", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_all([self.proc])
            self.proc = None

    def restart(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL when ``kill``) and start again on the same port and prefix."""
        if kill and self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.stop()
        self.start()

    def set_faults(self, *rules: dict[str, Any], seed: int = 1) -> None:
        """Replace the exchange's fault plan."""
        plan = json.dumps({"seed": seed, "rules": list(rules)})
        reply = requests.put(self.url + "/_paper/faults", data=plan, headers=HEADERS, timeout=5)
        assert reply.ok, reply.text

    def bar(self, symbol: str, open_: str, high: str, low: str, close: str, volume: str = "100000") -> Bar:
        """Publish a bar starting now (so every order accepted before this call may use it) on
        ``bars``, and its close as the symbol's last price, as the ingester would."""
        bar = Bar(symbol=symbol, time=LiveClock().now(), open=Decimal(open_), high=Decimal(high),
                  low=Decimal(low), close=Decimal(close), volume=Decimal(volume))
        client = connect_url(self.redis_url)
        try:
            publish(client, self.keys, BARS, bar)
            client.hset(self.keys.last_price, symbol, close)
        finally:
            client.close()
        return bar

    def get(self, path: str, **params: Any) -> Any:
        """GET an API path with the test keys (a raw client, no adapter)."""
        reply = requests.get(self.url + path, params=params, headers=HEADERS, timeout=5)
        return reply.json() if reply.text else None

    def broker(self, **overrides: Any) -> AlpacaBroker:
        """The adapter pointed at this exchange (short timeouts and waits for tests)."""
        values: dict[str, Any] = {"timeout_s": 2.0, "resolve_interval_s": 0.05, "resolve_attempts": 5,
                                  "read_retries": 2, **overrides}
        return AlpacaBroker(BrokerSettings(**values), api_key=KEY_ID, secret_key=SECRET, base_url=self.url,
                            stream_url=self.stream_url)


@contextmanager
def running_exchange(redis_url: str, keys: Keys, log_dir: Path, **env: str) -> Iterator[PaperExchange]:
    """A started exchange, stopped afterwards."""
    exchange = PaperExchange(redis_url, keys, log_dir, env=env)
    exchange.start()
    try:
        yield exchange
    finally:
        exchange.stop()
