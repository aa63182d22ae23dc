"""A portfolio client in its own OS process, for tests/system/test_portfolio_processes.py.

``python -m tests.procs.portfolio_worker --url U --prefix P --name N --mode M [...]``

Modes:

* ``race``   serve commands (JSON) from the list ``P:test:cmd:N`` until ``stop``:
  ``prepare`` builds a Portfolio handle for the round's account and reads a snapshot (the stale
  view a naive scheduler would decide on), answering ``ready`` on ``P:test:reply:N``; ``go``
  waits a random 0-2 ms, then buys 40 @ 150 (reserve + full fill, fee 1) on the handle built
  before, answering ``ok`` or ``insufficient``.
* ``random`` wait for a token on ``P:test:go``, then run ``--ops`` random reserves, fills
  (partial, full, repeated) and releases on ``--account``.
* ``stall``  reserve 40 @ 150 on ``--account`` but SIGSTOP itself between the decision and the
  write (after setting ``P:test:stalled``); once continued, record the outcome in
  ``P:test:result:N`` (``stale`` if the write was refused).
* ``once``   reserve 40 @ 150 on ``--account``; record ``ok`` or the error's class name.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from decimal import Decimal
from typing import Any

from shared.clock import LiveClock
from shared.config import LockSettings, PortfolioSettings
from shared.errors import (
    FillRefused,
    InsufficientFunds,
    InsufficientPosition,
    StaleFencingToken,
)
from shared.keys import Keys
from shared.models import Fill
from shared.portfolio import Portfolio
from shared.portfolio.locks import FencedLock
from shared.redis.connection import connect_url

SYMBOLS = ("AAA", "BBB", "CCC")


def _portfolio(client: Any, args: argparse.Namespace, account: str,
               cls: type[Portfolio] = Portfolio) -> Portfolio:
    return cls(client, Keys(args.prefix), account, settings=PortfolioSettings(account=account),
               lock_settings=LockSettings(lease_ms=args.lease_ms, wait_ms=60_000), clock=LiveClock())


def _fill(fill_id: str, qty: Decimal, price: Decimal, fee: Decimal = Decimal(1)) -> Fill:
    return Fill(fill_id=fill_id, quantity=qty, price=price, fee=fee, time=LiveClock().now())


def race(client: Any, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    cmd, reply = f"{args.prefix}:test:cmd:{args.name}", f"{args.prefix}:test:reply:{args.name}"
    portfolio: Portfolio | None = None
    while True:
        popped = client.blpop([cmd], timeout=30)
        if popped is None:
            return 2  # the test went away
        message = json.loads(popped[1])
        if message["op"] == "stop":
            return 0
        if message["op"] == "prepare":
            portfolio = _portfolio(client, args, message["account"])
            portfolio.snapshot()  # "I have $10,000": the stale view nothing may decide on
            client.rpush(reply, "ready")
        elif message["op"] == "go":
            assert portfolio is not None
            time.sleep(rng.uniform(0, 0.002))  # randomized timing between the two buyers
            rid = f"{args.name}-{message['round']}"
            try:
                portfolio.reserve(rid, "AAPL", "buy", Decimal(40), Decimal(150))
            except InsufficientFunds:
                client.rpush(reply, "insufficient")
                continue
            portfolio.apply_fill(rid, _fill(f"fill-{rid}", Decimal(40), Decimal(150)))
            client.rpush(reply, "ok")


def random_ops(client: Any, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    portfolio = _portfolio(client, args, args.account)
    if client.blpop([f"{args.prefix}:test:go"], timeout=60) is None:
        return 2
    open_ids: dict[str, tuple[str, Decimal, Decimal]] = {}  # rid -> (side, remaining qty, price)
    applied: list[tuple[str, Fill]] = []
    for n in range(args.ops):
        choice = rng.random()
        try:
            if choice < 0.3 or not open_ids:
                rid, symbol = f"{args.name}-{n}", rng.choice(SYMBOLS)
                qty, price = Decimal(rng.randint(1, 20)), Decimal(rng.randint(1000, 10000)) / 100
                side = "buy" if rng.random() < 0.6 else "sell"
                portfolio.reserve(rid, symbol, side, qty, price)
                open_ids[rid] = (side, qty, price)
            elif choice < 0.75:
                rid = rng.choice(sorted(open_ids))
                side, remaining, price = open_ids[rid]
                qty = remaining if rng.random() < 0.5 else Decimal(rng.randint(1, int(remaining)))
                fill = _fill(f"{rid}-f{n}", qty, price + Decimal(rng.randint(-10, 10)) / 100,
                             Decimal(rng.randint(0, 100)) / 100)
                outcome = portfolio.apply_fill(rid, fill)
                applied.append((rid, fill))
                if outcome.completed:
                    del open_ids[rid]
                else:
                    open_ids[rid] = (side, remaining - qty, price)
            elif choice < 0.85 and applied:
                rid, fill = rng.choice(applied)
                assert portfolio.apply_fill(rid, fill).duplicate  # a redelivered fill
            else:
                rid = rng.choice(sorted(open_ids))
                portfolio.release(rid, "canceled")
                del open_ids[rid]
        except (InsufficientFunds, InsufficientPosition, FillRefused):
            continue
    return 0


class _Stalling(Portfolio):
    """Stops its own process between the decision and the write (a GC pause, a SIGSTOP)."""

    def _commit(self, lock: FencedLock, token: int, state: Any, entry: Any, outcome: Any,
                then: Any = None, record: Any = None) -> tuple[Any, ...]:
        self.redis.set(f"{self.keys.prefix}:test:stalled", os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)
        return super()._commit(lock, token, state, entry, outcome, then, record)


def stall(client: Any, args: argparse.Namespace) -> int:
    portfolio = _portfolio(client, args, args.account, cls=_Stalling)
    result = f"{args.prefix}:test:result:{args.name}"
    try:
        portfolio.reserve(f"{args.name}-r", "AAPL", "buy", Decimal(40), Decimal(150))
    except StaleFencingToken:
        client.set(result, "stale")
        return 0
    client.set(result, "written")
    return 1


def once(client: Any, args: argparse.Namespace) -> int:
    portfolio = _portfolio(client, args, args.account)
    result = f"{args.prefix}:test:result:{args.name}"
    try:
        portfolio.reserve(f"{args.name}-r", "AAPL", "buy", Decimal(40), Decimal(150))
    except Exception as exc:
        client.set(result, type(exc).__name__)
        return 1
    client.set(result, "ok")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", choices=["race", "random", "stall", "once"], required=True)
    parser.add_argument("--account", default="acct")
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lease-ms", type=int, default=5000)
    args = parser.parse_args()
    client = connect_url(args.url)
    modes = {"race": race, "random": random_ops, "stall": stall, "once": once}
    return modes[args.mode](client, args)


if __name__ == "__main__":
    sys.exit(main())
