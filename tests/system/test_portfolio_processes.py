"""Portfolio under real OS processes sharing one server: the race, random contention, a stalled holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from decimal import Decimal as D
from pathlib import Path

import pytest
import redis

from shared.config import PortfolioSettings
from shared.keys import Keys
from shared.portfolio import Portfolio, lock_resource, verify
from tests.conftest import SERVER_BACKENDS
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)]

WORKER = "tests.procs.portfolio_worker"


def worker(server_url: str, keys: Keys, name: str, mode: str, *extra: str) -> subprocess.Popen[bytes]:
    return spawn(WORKER, "--url", server_url, "--prefix", keys.prefix, "--name", name, "--mode", mode,
                 *extra, stdout=subprocess.DEVNULL)


def finished(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    wait_for(lambda: proc.poll() is not None, timeout=timeout, message=f"worker {proc.pid} to exit")
    return int(proc.returncode)


def reply(client: redis.Redis, keys: Keys, name: str) -> str:
    popped = client.blpop([f"{keys.prefix}:test:reply:{name}"], timeout=60)
    assert popped is not None, f"worker {name} did not answer"
    return str(popped[1].decode())


def handle(client: redis.Redis, keys: Keys, account: str) -> Portfolio:
    return Portfolio(client, keys, account, settings=PortfolioSettings(account=account))


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc (``T`` when stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class TestClassicRace:
    ROUNDS = 200

    def test_two_processes_buying_at_once_never_overspend(self, server_url: str, client: redis.Redis,
                                                          keys: Keys) -> None:
        """Two processes with handles made before either buys each buy 40 @ 150 of $10,000: one wins, 200x."""
        names = ["a", "b"]
        procs = [worker(server_url, keys, name, "race", "--seed", str(i)) for i, name in enumerate(names)]
        try:
            for n in range(self.ROUNDS):
                account = f"race{n}"
                handle(client, keys, account).open(D(10000))
                for name in names:
                    prepare = json.dumps({"op": "prepare", "account": account})
                    client.rpush(f"{keys.prefix}:test:cmd:{name}", prepare)
                assert [reply(client, keys, name) for name in names] == ["ready", "ready"]
                go = client.pipeline(transaction=True)  # both commands leave Redis in one step
                for name in names:
                    go.rpush(f"{keys.prefix}:test:cmd:{name}", json.dumps({"op": "go", "round": n}))
                go.execute()
                answers = sorted(reply(client, keys, name) for name in names)
                assert answers == ["insufficient", "ok"], f"round {n}: {answers}"
                snap = handle(client, keys, account).snapshot()
                assert (snap.cash, snap.reserved) == (D(10000) - D(6000) - D(1), D(0)), f"round {n}"
                assert snap.positions["AAPL"].qty == 40 and snap.fees == 1
                report = verify(client, keys, account, allow_short=False)
                assert report.ok and report.entries == 3, report.problems
            for name in names:
                client.rpush(f"{keys.prefix}:test:cmd:{name}", json.dumps({"op": "stop"}))
            assert [finished(p) for p in procs] == [0, 0]
        finally:
            stop_all(procs)


class TestRandomContention:
    def test_eight_processes_random_ops_keep_invariants_and_replay(self, server_url: str, client: redis.Redis,
                                                                    keys: Keys) -> None:
        """8 processes x 50 random reserves, fills, duplicate fills and releases: invariants hold at every
        ledger step and the replay equals the final state."""
        handle(client, keys, "acct").open(D(20000))
        procs = [worker(server_url, keys, f"w{i}", "random", "--ops", "50", "--seed", str(i))
                 for i in range(8)]
        try:
            client.rpush(f"{keys.prefix}:test:go", *["go"] * 8)
            codes = [finished(p, timeout=240) for p in procs]
            errors = [p.stderr.read().decode()[-2000:] for p in procs if p.returncode and p.stderr]
            assert codes == [0] * 8, errors
        finally:
            stop_all(procs)
        report = verify(client, keys, "acct", allow_short=False)
        assert report.ok, report.problems
        assert report.entries > 8 * 10  # the processes really wrote (many ops are refusals or duplicates)
        ops = {e[1][b"op"] for e in client.xrange(keys.ledger("acct"))}
        assert ops == {b"open", b"reserve", b"fill", b"release"}


class TestStalledHolder:
    def test_holder_stopped_past_its_lease_cannot_write(self, server_url: str, client: redis.Redis,
                                                        keys: Keys) -> None:
        """A holder SIGSTOPped after deciding, its lease lost while another wrote, is refused on SIGCONT."""
        handle(client, keys, "acct").open(D(10000))
        stalled = worker(server_url, keys, "a", "stall", "--lease-ms", "300")
        try:
            pid = int(wait_for(lambda: client.get(f"{keys.prefix}:test:stalled"), message="holder to decide"))
            wait_for(lambda: process_state(pid) == "T", message="holder to be stopped")
            wait_for(lambda: not client.exists(keys.lock(lock_resource("acct"))), message="lease to expire")
            second = worker(server_url, keys, "b", "once")
            assert finished(second) == 0
            assert client.get(f"{keys.prefix}:test:result:b") == b"ok"
            after_b = handle(client, keys, "acct").read()
            ledger_after_b = client.xlen(keys.ledger("acct"))
            os.kill(pid, signal.SIGCONT)
            assert finished(stalled) == 0
            assert client.get(f"{keys.prefix}:test:result:a") == b"stale"
            assert handle(client, keys, "acct").read() == after_b
            assert client.xlen(keys.ledger("acct")) == ledger_after_b
            assert after_b.reserved == D(6006)  # only B's reservation: no $12,012 held from $10,000
            assert verify(client, keys, "acct", allow_short=False).ok
        finally:
            if stalled.poll() is None:
                os.kill(stalled.pid, signal.SIGCONT)
            stop_all([stalled])
