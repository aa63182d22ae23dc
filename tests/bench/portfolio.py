"""Benchmark: portfolio reserves per second under contention, beside a bare lock baseline.

Prints one JSON line. Scenarios: 1, 4 and 8 processes reserving on one account (all contending
for its lock), and 8 processes on 8 accounts (one each). Each process runs the full protocol per
reserve (lock with fencing token, fresh read, Decimal decision, fenced Lua write + ledger entry,
release). The baseline runs the same process counts through a bare redis-py loop: ``SET lock NX
PX``, ``INCR``, ``DEL``. Afterwards every account's ledger is replayed (``verify``); the count of
invariant violations or replay differences must be 0.

Uses a private real redis-server (no AOF, temp dir) unless ``REDIS_URL`` is set.
``BENCH_SECONDS`` sets each scenario's duration (default 3).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared.clock import LiveClock
from shared.config import LockSettings, PortfolioSettings
from shared.keys import Keys
from shared.portfolio import Portfolio, verify
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.processes import free_port

SCENARIOS = [("1p_1acct", 1, 1), ("4p_1acct", 4, 1), ("8p_1acct", 8, 1), ("8p_8acct", 8, 8)]


def _portfolio_worker(url: str, prefix: str, account: str, seconds: float, start: Any, out: Any) -> None:
    client = connect_url(url)
    portfolio = Portfolio(client, Keys(prefix), account, settings=PortfolioSettings(account=account),
                          lock_settings=LockSettings(lease_ms=5000, wait_ms=30_000), clock=LiveClock())
    tag = uuid.uuid4().hex[:8]
    price = Decimal(random.randint(10, 500)) + Decimal("0.01")
    start.wait()
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        portfolio.reserve(f"{tag}-{count}", "AAPL", "buy", Decimal(1), price)
        count += 1
    out.put(count)


def _baseline_worker(url: str, prefix: str, account: str, seconds: float, start: Any, out: Any) -> None:
    client = connect_url(url)
    lock, counter = f"{prefix}:bare-lock:{account}", f"{prefix}:bare-counter:{account}"
    token = uuid.uuid4().hex
    start.wait()
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        delay = 0.0005
        while not client.set(lock, token, nx=True, px=5000):
            time.sleep(random.uniform(0.5, 1.5) * delay)
            delay = min(delay * 2, 0.02)
        client.incr(counter)
        client.delete(lock)
        count += 1
    out.put(count)


def _run(target: Any, url: str, prefix: str, processes: int, accounts: int, seconds: float) -> float:
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, prefix, f"bench{i % accounts}", seconds, start, out))
             for i in range(processes)]
    for proc in procs:
        proc.start()
    started = time.monotonic()
    start.set()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    elapsed = max(time.monotonic() - started, seconds)
    for proc in procs:
        proc.join()
    return total / elapsed


def measure(url: str, seconds: float) -> dict[str, Any]:
    """Run every scenario against ``url``; return the figures."""
    result: dict[str, Any] = {"bench": "portfolio", "unit": "reserves/s", "seconds_per_scenario": seconds}
    violations = 0
    client = connect_url(url)
    for name, processes, accounts in SCENARIOS:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        keys = Keys(prefix)
        for i in range(accounts):
            Portfolio(client, keys, f"bench{i}").open(Decimal("1000000000000"))
        result[name] = round(_run(_portfolio_worker, url, prefix, processes, accounts, seconds))
        result[f"{name}_baseline_incr_under_setnx"] = round(
            _run(_baseline_worker, url, prefix, processes, accounts, seconds))
        for i in range(accounts):
            report = verify(client, keys, f"bench{i}", allow_short=False)
            violations += len(report.problems)
        for key in client.scan_iter(match=keys.pattern(), count=1000):
            client.delete(key)
    result["invariant_violations"] = violations
    result["target_8p_1acct"] = 2000
    client.close()
    return result


def main() -> None:
    """Print the benchmark's JSON line."""
    seconds = float(os.environ.get("BENCH_SECONDS", "3"))
    url = os.environ.get("REDIS_URL")
    if url:
        print(json.dumps(measure(url, seconds)))
        return
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        server = RedisServer(free_port(), Path(tmp), appendonly=False)
        server.start()
        try:
            print(json.dumps(measure(server.url, seconds)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
