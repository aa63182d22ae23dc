"""Ingester and strategy workers as real OS processes over fakeredis's TCP server and a real redis-server."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import redis

from services.strategy import GROUP
from shared.bus import codec
from shared.keys import BARS, INTENTS, Keys
from shared.models import Intent
from tests.conftest import SERVER_BACKENDS
from tests.support.environment import env_for
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess

SYMBOLS = ["AAPL", "MSFT", "SPY", "QQQ", "IWM", "TSLA", "NVDA", "AMZN", "META", "GOOG", "AMD", "NFLX"]
BARS_PER_SYMBOL = 40
TOTAL = len(SYMBOLS) * BARS_PER_SYMBOL
PARTITIONS = 8
EVERY = 5  # the recorder emits an intent on every 5th bar


def write_replay(path: Path) -> Path:
    """A CSV of BARS_PER_SYMBOL one-minute bars per symbol, trade_count = sequence number."""
    rows = ["symbol,timestamp,open,high,low,close,volume,trade_count,vwap"]
    for minute in range(BARS_PER_SYMBOL):
        stamp = f"2024-01-02T{14 + (30 + minute) // 60:02d}:{(30 + minute) % 60:02d}:00+00:00"
        rows += [f"{s},{stamp},10.00,10.05,9.95,10.01,1000,{minute},10.00" for s in SYMBOLS]
    path.write_text("\n".join(rows) + "\n")
    return path


def replay(csv_path: Path) -> dict[str, object]:
    """The settings of ingester and workers (``env_for(url, keys, replay(path))``): the replay, the
    recorder on every symbol, fast leases."""
    return {
        "ingester__source": "csv", "ingester__csv_path": csv_path, "ingester__partitions": PARTITIONS,
        "ingester__speed": 20,
        "strategy__modules": ["tests.procs.recording_strategy"], "strategy__plugins": {"*": "recorder"},
        "strategy__params": {"recorder": {"every": str(EVERY)}},
        "strategy__lease_ms": 1000, "strategy__batch": 4,
        "service__heartbeat_interval_s": 0.3, "service__heartbeat_ttl_s": 1.0,
    }


def processed(client: redis.Redis, keys: Keys) -> list[str]:
    """Every "SYMBOL:seq" the recorder committed, in commit order."""
    return [item.decode() for item in client.lrange(f"{keys.prefix}:processed", 0, -1)]


def held_partitions(client: redis.Redis, keys: Keys, instance: str) -> list[int]:
    """The partitions a worker reports holding in its heartbeat."""
    raw = client.get(keys.heartbeat("strategy", instance))
    return list(json.loads(raw).get("partitions", [])) if raw else []


def pending_total(client: redis.Redis, keys: Keys) -> int:
    """Entries delivered to the strategy group and not acknowledged, over every partition."""
    total = 0
    for n in range(PARTITIONS):
        stream = keys.stream(keys.bar_partition(n))
        if client.exists(stream) and any(g["name"] == GROUP.encode() for g in client.xinfo_groups(stream)):
            total += int(client.xpending(stream, GROUP)["pending"])
    return total


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_three_workers_one_killed_every_bar_once_in_order(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """3 workers over 12 symbols, one SIGKILLed mid-run: each bar applied once, in order; intents exact."""
    env = env_for(server_url, keys, replay(write_replay(tmp_path / "replay.csv")))
    names = [f"w{i}" for i in range(3)]
    workers = [spawn("services.strategy", "--instance", name, env=env, log=tmp_path / f"{name}.log")
               for name in names]
    ingester = None
    try:
        wait_for(lambda: all(held_partitions(client, keys, n) for n in names), timeout=60,
                 message="every worker to hold partitions")
        ingester = spawn("services.ingester", env=env, log=tmp_path / "ingester.log")
        wait_for(lambda: client.llen(f"{keys.prefix}:processed") >= TOTAL // 4, timeout=120,
                 message="a quarter of the bars applied")
        assert held_partitions(client, keys, "w0"), "the victim should still hold partitions"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        assert ingester.wait(120) == 0
        wait_for(lambda: client.llen(f"{keys.prefix}:processed") >= TOTAL, timeout=120,
                 message=f"{TOTAL} bars applied")
        wait_for(lambda: pending_total(client, keys) == 0, timeout=60, message="nothing pending")

        applied = processed(client, keys)
        assert len(applied) == TOTAL, Counter(applied).most_common(3)
        by_symbol: dict[str, list[int]] = {}
        for item in applied:
            symbol, seq = item.split(":")
            by_symbol.setdefault(symbol, []).append(int(seq))
        assert by_symbol == {s: list(range(BARS_PER_SYMBOL)) for s in SYMBOLS}

        intents = [codec.decode(f) for _, f in client.xrange(keys.stream(INTENTS))]
        assert all(isinstance(i, Intent) for i in intents)
        got = Counter((i.symbol, i.reason) for i in intents if isinstance(i, Intent))
        expected = {(s, f"seq {n}") for s in SYMBOLS for n in range(0, BARS_PER_SYMBOL, EVERY)}
        assert set(got) == expected and max(got.values()) == 1
        assert len({i.id for i in intents}) == len(intents)
        assert client.xlen(keys.stream(BARS)) == TOTAL

        for survivor in workers[1:]:
            survivor.send_signal(signal.SIGTERM)
            assert survivor.wait(30) == 0
        leases = [k for k in client.scan_iter(match=f"{keys.prefix}:lease:*") if client.get(k) != b"w0"]
        assert leases == []  # the survivors released theirs; only the dead worker's may linger
    finally:
        stop_all(workers + ([ingester] if ingester else []))


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_ingester_replays_a_fixed_number_of_bars_and_exits(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """``--bars N`` (unpaced) publishes N bars to bars and the partitions and exits 0; a rerun adds none."""
    env = env_for(server_url, keys, replay(write_replay(tmp_path / "replay.csv")), ingester__paced="false")
    proc = spawn("services.ingester", "--bars", "100", env=env, log=tmp_path / "ingester.log")
    assert proc.wait(120) == 0, (tmp_path / "ingester.log").read_text()[-2000:]
    assert client.xlen(keys.stream(BARS)) == 100
    assert sum(client.xlen(keys.stream(keys.bar_partition(n))) for n in range(PARTITIONS)) == 100
    again = spawn("services.ingester", "--bars", "100", env=env, log=tmp_path / "again.log")
    assert again.wait(120) == 0
    assert client.xlen(keys.stream(BARS)) == 100  # the same bars again: all refused by the gate
    text = (tmp_path / "again.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    finished = next(line for line in lines if line["event"] == "ingester.finished")
    # each symbol's newest bar comes back as a duplicate (dropped), every older one as out of order
    assert (finished["accepted"], finished["duplicates"], finished["out_of_order"]) == (0, 12, 88)


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_bad_strategy_settings_stop_start_up(server_url: str, keys: Keys, tmp_path: Path) -> None:
    """A worker configured with an unknown strategy exits 2 and names it."""
    env = env_for(server_url, keys, replay(tmp_path / "none.csv"), strategy__plugins={"*": "nope"})
    proc = spawn("services.strategy", env=env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"no strategy named 'nope'" in err
