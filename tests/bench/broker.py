"""Benchmark: an order's round trip through alpaca-py and the paper exchange, beside bare HTTP.

Prints one JSON line. Every figure is measured in the same run, against the same exchange
process, alternating sample by sample so background load falls on all of them:

* ``http_bare``: one ``GET /_paper/health`` through a ``urllib3`` connection pool on loopback
  (the HTTP stack the adapter sends alpaca-py's requests with, on the exchange's own aiohttp
  server, no Redis, no auth): the floor.
* ``submit``: ``AlpacaBroker.submit`` of a market order (alpaca-py's TradingClient, POST
  /v2/orders, the book's Redis transaction) until the reply is parsed.
* ``submit_to_new``: submit until the ``new`` trade update arrives through TradingStream.
* ``submit_to_fill``: the order's whole life for a marketable order: submit, a bar published on
  the bus right after the reply, the exchange's bar consumer filling it, and the ``fill`` trade
  update received through TradingStream.

``BENCH_BROKER_ORDERS`` orders (default 300) after ``WARMUP``; p50/p99 in milliseconds and each
round trip's p50 as a multiple of the bare HTTP p50. Uses a private real redis-server (no AOF)
unless ``REDIS_URL`` is set; keys go under a fresh prefix, deleted afterwards.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import urllib3

from shared.brokers import OrderRequest
from shared.bus import publish
from shared.clock import LiveClock
from shared.keys import BARS, Keys
from shared.logging import configure_logging
from shared.models import Bar, OrderStatus, Side
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.paper import PaperExchange
from tests.support.processes import free_port

WARMUP = 20


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


def measure(redis_url: str, orders: int) -> dict[str, Any]:
    """Run the exchange, take the samples, return the figures."""
    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        env = {"BASTION_PAPER_EXCHANGE__STARTING_CASH": "1000000000", "BASTION_LOG__LEVEL": "WARNING",
               "BASTION_PAPER_EXCHANGE__SYMBOLS": '["BENCH"]'}
        exchange = PaperExchange(redis_url, keys, Path(tmp), env=env)
        exchange.start()
        try:
            return _samples(exchange, orders)
        finally:
            exchange.stop()
            client = connect_url(redis_url)
            batch = list(client.scan_iter(match=keys.pattern(), count=1000))
            for start in range(0, len(batch), 500):
                client.delete(*batch[start:start + 500])
            client.close()


def _samples(exchange: PaperExchange, orders: int) -> dict[str, Any]:
    pool = urllib3.PoolManager(retries=False)
    client = connect_url(exchange.redis_url)
    clock = LiveClock()
    ten = Decimal(10)
    broker = exchange.broker(timeout_s=10)
    bare: list[float] = []
    submit: list[float] = []
    to_new: list[float] = []
    to_fill: list[float] = []
    with broker.trade_updates() as updates:
        if not updates.wait_ready(10):
            raise RuntimeError("trade_updates never confirmed")
        for n in range(orders + WARMUP):
            started = time.perf_counter()
            if pool.request("GET", exchange.url + "/_paper/health", timeout=5).status != 200:
                raise RuntimeError("the exchange is not healthy")
            bare_s = time.perf_counter() - started
            cid = f"bench-{n}"
            started = time.perf_counter()
            broker.submit(OrderRequest(client_order_id=cid, symbol="BENCH", side=Side.BUY,
                                       quantity=Decimal(1)))
            submitted = time.perf_counter()
            new_at = _wait(updates, cid, OrderStatus.NEW)
            publish(client, exchange.keys, BARS, Bar(symbol="BENCH", time=clock.now(), open=ten, high=ten,
                                                     low=ten, close=ten, volume=Decimal(1000)))
            fill_at = _wait(updates, cid, OrderStatus.FILLED)
            if n >= WARMUP:
                bare.append(bare_s)
                submit.append(submitted - started)
                to_new.append(new_at - started)
                to_fill.append(fill_at - started)
    bare_p50 = statistics.median(bare)
    return {
        "benchmark": "broker",
        "orders": len(submit),
        "http_bare": _percentiles(bare),
        "submit": _percentiles(submit),
        "submit_to_new": _percentiles(to_new),
        "submit_to_fill": _percentiles(to_fill),
        "submit_to_new_vs_bare_p50": round(statistics.median(to_new) / bare_p50, 2),
        "submit_to_fill_vs_bare_p50": round(statistics.median(to_fill) / bare_p50, 2),
    }


def _wait(updates: Any, cid: str, status: OrderStatus) -> float:
    """perf_counter when ``cid``'s update with ``status`` arrives."""
    while True:
        event = updates.get(timeout=10)
        if event is None:
            raise RuntimeError(f"no {status} trade update for {cid}")
        if event.client_order_id == cid and event.status == status:
            return time.perf_counter()


def main() -> None:
    """Print the benchmark's JSON line."""
    configure_logging("bench-broker", "WARNING", stream=sys.stderr)
    orders = int(os.environ.get("BENCH_BROKER_ORDERS", "300"))
    url = os.environ.get("REDIS_URL")
    if url:
        print(json.dumps(measure(url, orders)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        server = RedisServer(free_port(), Path(tmp), appendonly=False)
        server.start()
        try:
            print(json.dumps(measure(server.url, orders)), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
