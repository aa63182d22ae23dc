"""The desk the pipeline benchmark runs: its processes, its configuration, its bars.

See ``tests/bench/pipeline.py``'s docstring for what each piece is for; this module holds the
mechanics: the exchange, risk, executor and strategy worker processes (:class:`Desk`), their
environment (:func:`desk_env`), the bars published through the ingester's gate
(:class:`BarPublisher`), priming (:func:`prime`) and draining (:func:`drain`).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import redis

from services.ingester import BarGate, partition_of
from services.risk.service import client_order_id
from services.strategy import GROUP as STRATEGY_GROUP
from services.strategy import intent_id
from shared.bus import publish
from shared.clock import LiveClock, epoch_micros
from shared.heartbeat import alive_instances
from shared.keys import BARS, INTENTS, ORDERS, Keys
from shared.models import Bar, OrderStatus
from shared.redis.client import reply_text
from tests.support.paper import KEY_ID, SECRET, PaperExchange
from tests.support.processes import cpu_seconds, spawn, stop_all, wait_for

STRATEGY = "every_bar"
STRATEGY_MODULE = "tests.procs.every_bar_strategy"
PARTITIONS = 8  # the ingester.partitions default, which source and worker must agree on
PRICE = Decimal("100.00")
VOLUME = Decimal("1000000")
CASH = "1000000000"
WIDE = "1000000000"  # a limit that 500 orders/s never reaches
SUBMIT_OP = "submit"  # the broker adapter's name for POST /v2/orders in the shared rate limiter



def flat_bar(symbol: str, when: datetime, number: int | None = None) -> Bar:
    """A flat bar; ``number`` goes in ``trade_count``, which ``every_bar`` orders on."""
    return Bar(time=when, symbol=symbol, open=PRICE, high=PRICE, low=PRICE, close=PRICE, volume=VOLUME,
               trade_count=number)


class BarPublisher:
    """Publishes one bar at a time exactly as the ingester does: through its gate's script."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.gate = BarGate(client, keys)
        self.bars_key = keys.stream(BARS)
        self.partition_keys = [keys.stream(keys.bar_partition(n)) for n in range(PARTITIONS)]
        self.clock = LiveClock()

    def publish(self, symbol: str, number: int) -> tuple[str, str, int]:
        """Publish bar ``number`` (its ``trade_count``) of ``symbol`` stamped now; (bar id, symbol,
        t0 in µs since the epoch)."""
        when = self.clock.now()
        bar = flat_bar(symbol, when, number)
        verdicts = self.gate.admit_and_publish([bar], self.bars_key, self.partition_keys,
                                               [partition_of(symbol, PARTITIONS)], arrived=when)
        if verdicts[0] != 1:
            raise RuntimeError(f"the gate did not accept bar {bar.id} of {symbol} at {when}: {verdicts[0]!r}")
        return bar.id, symbol, epoch_micros(when)


def desk_env(url: str, keys: Keys, exchange_port: int, symbols: Sequence[str], order_every: int
              ) -> dict[str, str]:
    """The environment of every desk process (see the pipeline docstring's configuration)."""
    return {
        "REDIS_URL": url, "BASTION_KEY_PREFIX": keys.prefix, "BASTION_LOG__LEVEL": "INFO",
        "BASTION_PAPER_EXCHANGE__PORT": str(exchange_port), "BASTION_PAPER_EXCHANGE__API_KEY": KEY_ID,
        "BASTION_PAPER_EXCHANGE__SECRET_KEY": SECRET, "BASTION_PAPER_EXCHANGE__STARTING_CASH": CASH,
        "BASTION_PORTFOLIO__STARTING_CASH": CASH,
        "BASTION_INGESTER__PARTITIONS": str(PARTITIONS),
        "BASTION_INGESTER__SYMBOLS": json.dumps(list(symbols)),
        "BASTION_STRATEGY__MODULES": json.dumps([STRATEGY_MODULE]),
        "BASTION_STRATEGY__PLUGINS": json.dumps({"*": STRATEGY}),
        "BASTION_STRATEGY__PARAMS": json.dumps({STRATEGY: {"every": str(order_every)}}),
        "BASTION_LIMITS__MAX_OPEN_ORDERS": WIDE, "BASTION_LIMITS__MAX_ORDERS_PER_MINUTE": WIDE,
        "BASTION_LIMITS__API_RATE_LIMIT": WIDE, "BASTION_LIMITS__API_RATE_PERIOD_S": "3600",
        "BASTION_LIMITS__ENDPOINT_RATE_LIMITS": json.dumps({SUBMIT_OP: int(WIDE)}),
        "BASTION_LIMITS__BALANCE_REFRESH_AFTER_FILLS": WIDE, "BASTION_LIMITS__BALANCE_MAX_AGE_S": "3600",
    }


def acked(client: redis.Redis, keys: Keys, cid: str) -> bool:
    """The executor recorded an answer from the exchange for order ``cid``."""
    status = client.hget(keys.order(cid), "status")
    return status is not None and reply_text(status) != OrderStatus.PENDING_SUBMIT.value


def order_cid(bar_id: str, symbol: str) -> str:
    """The client_order_id of the order ``every_bar``'s intent on this (ordering) bar becomes."""
    return client_order_id(intent_id(STRATEGY, symbol, bar_id, 0))


def prime(client: redis.Redis, keys: Keys, symbols: Sequence[str]) -> int:
    """Publish a bar per symbol every 50 ms until each symbol had an order acknowledged; bars sent."""
    publisher = BarPublisher(client, keys)
    cids: dict[str, list[str]] = {symbol: [] for symbol in symbols}
    done: set[str] = set()
    sent = 0

    def primed() -> bool:
        nonlocal sent
        for symbol in symbols:
            if symbol not in done and any(acked(client, keys, cid) for cid in cids[symbol]):
                done.add(symbol)
        for symbol in symbols:
            if symbol not in done:
                bar_id, _, _ = publisher.publish(symbol, 0)  # number 0: an order whatever ``every``
                cids[symbol].append(order_cid(bar_id, symbol))
                sent += 1
        return len(done) == len(symbols)

    wait_for(primed, timeout=60, interval=0.05, message="an order acknowledged for every symbol")
    return sent


def drained(client: redis.Redis, stream_key: str, group: str) -> bool:
    """``group`` has read every entry of ``stream_key`` and acknowledged it."""
    if not client.exists(stream_key):
        return True
    last = client.xinfo_stream(stream_key)["last-generated-id"]
    for info in client.xinfo_groups(stream_key):
        if reply_text(info["name"]) == group:
            return bool(info["last-delivered-id"] == last and int(info["pending"]) == 0)
    return False


def stages(keys: Keys) -> list[tuple[str, str]]:
    """(stream, group) of every stage on the path, upstream first."""
    stages = [(keys.stream(keys.bar_partition(n)), STRATEGY_GROUP) for n in range(PARTITIONS)]
    return [*stages, (keys.stream(INTENTS), "risk"), (keys.stream(ORDERS), "executor")]


def desk_drained(client: redis.Redis, keys: Keys) -> bool:
    """Every stage on the path drained, upstream first (each writes its output before its ack)."""
    return all(drained(client, stream, group) for stream, group in stages(keys))


def redis_cpu_seconds(client: redis.Redis) -> float:
    """User + system CPU seconds of redis-server so far."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Desk:
    """The desk's processes: the paper exchange, risk, the executor, one strategy worker."""

    def __init__(self, url: str, keys: Keys, workdir: Path, symbols: Sequence[str], order_every: int
                 ) -> None:
        self.keys = keys
        self.workdir = workdir
        self.exchange = PaperExchange(url, keys, workdir, env={"BASTION_PAPER_EXCHANGE__STARTING_CASH": CASH})
        self.env = desk_env(url, keys, self.exchange.port, symbols, order_every)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, client: redis.Redis) -> None:
        """Start every process and wait until the worker holds every partition and all beat."""
        self.exchange.start()
        assert self.exchange.proc is not None
        self.procs["paper_exchange"] = self.exchange.proc
        for name in ("risk", "executor"):
            self.procs[name] = spawn(f"services.{name}", env=self.env, log=self.workdir / f"{name}.log")
        self.procs["strategy"] = spawn("services.strategy", "--instance", "bench-strategy-0", env=self.env,
                                       log=self.workdir / "strategy.log")
        wait_for(lambda: len(list(client.scan_iter(match=self.keys.lease("strategy:*")))) == PARTITIONS,
                 timeout=60, message="the strategy worker to hold every partition")
        wait_for(lambda: all(alive_instances(client, self.keys, name) for name in ("risk", "executor")),
                 timeout=60, message="risk and executor heartbeats")

    def stop(self) -> None:
        """SIGTERM the worker, risk and the executor, then the exchange once they have exited (so the
        executor can finish the submit in hand); SIGKILL any still running after 30 s."""
        stop_all([proc for name, proc in self.procs.items() if name != "paper_exchange"], timeout=30)
        self.exchange.stop()  # also one that started but never answered

    def cpu_sample(self, client: redis.Redis) -> dict[str, float | None]:
        """CPU seconds so far of each process, and of redis-server (which also serves the bare relay)."""
        sample = {name: cpu_seconds(proc.pid) for name, proc in self.procs.items()}
        sample["redis_incl_bare_relay"] = redis_cpu_seconds(client)
        return sample


def drain(client: redis.Redis, keys: Keys, symbols: Sequence[str], timeout: float
           ) -> tuple[float | None, int]:
    """Keep the market moving until every stage drained; (seconds it took, None at the deadline;
    keep-alive bars published).

    A bar per symbol every 100 ms goes to ``bars`` only (``shared.bus.publish``, as the tests' paper
    exchange helper does): the exchange fills on it, no strategy sees it, so it makes
    no order. Without it an order reaching the exchange after the last bar would stay open, and
    the exchange's per-order work grows with its open orders.
    """
    clock = LiveClock()
    started = time.monotonic()
    sent = 0
    next_bar = started

    def done() -> bool:
        nonlocal sent, next_bar
        if desk_drained(client, keys):
            return True
        if time.monotonic() >= next_bar:
            for symbol in symbols:
                publish(client, keys, BARS, flat_bar(symbol, clock.now()))
                sent += 1
            next_bar += 0.1
        return False

    try:
        wait_for(done, timeout=timeout, interval=0.02, message="every stage of the desk to drain")
    except AssertionError:
        return None, sent
    return time.monotonic() - started, sent
