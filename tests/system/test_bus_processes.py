"""The bus with real OS processes sharing one server: fakeredis's TCP server and a real redis-server."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
import redis

from shared.bus import trim
from shared.keys import BARS, Keys
from tests.conftest import SERVER_BACKENDS
from tests.support.environment import env_for
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess

PRODUCERS = 4
PER_PRODUCER = 2_500
TOTAL = PRODUCERS * PER_PRODUCER
# Fast bus timings for every test process (``env_for(url, keys, FAST_BUS)``). The stream is kept short
# (maxlen 500, trimmed every 100 publishes), so every test here also checks that trimming under load
# never drops an entry a group still needs.
FAST_BUS = {"bus__block_ms": 200, "bus__claim_idle_ms": 1000, "bus__claim_interval_ms": 250,
            "bus__maxlen": 500, "bus__trim_every": 100}


def create_group(client: redis.Redis, keys: Keys, group: str = "effects") -> None:
    """Create the consumers' group before any producer publishes: a stream trimmed while no group
    exists loses its oldest entries (no group needs them yet), which a consumer starting a moment
    after the producers would then never see."""
    client.xgroup_create(keys.stream(BARS), group, id="0", mkstream=True)


def effects(client: redis.Redis, keys: Keys) -> list[str]:
    """Every effect applied, in the order applied."""
    return [item.decode() for item in client.lrange(f"{keys.prefix}:effects", 0, -1)]


def pending(client: redis.Redis, keys: Keys, group: str = "effects") -> int:
    """Entries delivered to the group and not acknowledged."""
    return int(client.xpending(keys.stream(BARS), group)["pending"])


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_exactly_once_effect_with_a_consumer_killed_mid_run(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """4 producers x 2,500 messages, 3 consumers, one SIGKILLed mid-run: every effect exactly once."""
    env = env_for(server_url, keys, FAST_BUS)
    create_group(client, keys)
    consumers = [spawn("tests.procs.bus_consumer", "--name", f"c{i}", env=env, log=tmp_path / f"c{i}.log")
                 for i in range(3)]
    producers = [spawn("tests.procs.bus_producer", "--symbol", f"P{i}", "--count", str(PER_PRODUCER), env=env,
                       log=tmp_path / f"p{i}.log") for i in range(PRODUCERS)]
    try:
        wait_for(lambda: int(client.get(f"{keys.prefix}:started:c0") or 0) >= 300, timeout=120,
                 message="consumer c0 to be well into its work")
        consumers[0].send_signal(signal.SIGKILL)
        consumers[0].wait(10)
        for proc in producers:
            assert proc.wait(300) == 0
        wait_for(lambda: client.llen(f"{keys.prefix}:effects") >= TOTAL, timeout=300,
                 message=f"{TOTAL} effects")
        wait_for(lambda: pending(client, keys) == 0, timeout=60, message="nothing pending")
        applied = effects(client, keys)
        assert len(applied) == TOTAL
        assert len(set(applied)) == TOTAL, Counter(applied).most_common(3)
        assert set(applied) == {f"P{p}:{seq}" for p in range(PRODUCERS) for seq in range(PER_PRODUCER)}
        trim(client, keys.stream(BARS), 500)  # everything acknowledged: trimming may now cut to maxlen
        assert client.xlen(keys.stream(BARS)) == 500
        for live in consumers[1:]:
            live.send_signal(signal.SIGTERM)
            assert live.wait(30) == 0
    finally:
        stop_all(consumers + producers)


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_single_consumer_applies_in_publish_order(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """With one consumer, effects are applied in exactly the order the messages were published."""
    env = env_for(server_url, keys, FAST_BUS)
    create_group(client, keys)
    producer = spawn("tests.procs.bus_producer", "--symbol", "FIFO", "--count", "1000", env=env,
                     log=tmp_path / "producer.log")
    consumer = spawn("tests.procs.bus_consumer", "--name", "solo", env=env, log=tmp_path / "consumer.log")
    try:
        assert producer.wait(120) == 0
        wait_for(lambda: client.llen(f"{keys.prefix}:effects") >= 1000, timeout=120, message="1000 effects")
        assert effects(client, keys) == [f"FIFO:{seq}" for seq in range(1000)]
    finally:
        stop_all([consumer, producer])


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_sigterm_finishes_the_message_in_hand(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """SIGTERM mid-message: entries in hand are finished and acknowledged, and the process exits 0."""
    env = env_for(server_url, keys, FAST_BUS, bus__batch=4)
    producer = spawn("tests.procs.bus_producer", "--symbol", "SLOW", "--count", "50", env=env)
    assert producer.wait(60) == 0
    consumer = spawn("tests.procs.bus_consumer", "--name", "slow", "--delay-ms", "300", env=env,
                     log=tmp_path / "consumer.log")
    try:
        wait_for(lambda: int(client.get(f"{keys.prefix}:started:slow") or 0) >= 2, timeout=60,
                 message="the consumer to be mid-message")
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(30) == 0
        started = int(client.get(f"{keys.prefix}:started:slow") or 0)
        assert len(effects(client, keys)) == started  # what was in hand was finished
        assert pending(client, keys) == 0  # and acknowledged
        assert started < 50  # it stopped rather than draining the stream
        assert client.xlen(keys.stream(BARS)) == 50
    finally:
        stop_all([consumer])


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_second_sigterm_exits_at_once(
    server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A second SIGTERM ends a consumer stuck in a slow handler now; its entry stays pending."""
    env = env_for(server_url, keys, FAST_BUS, bus__grace_seconds=60)
    producer = spawn("tests.procs.bus_producer", "--symbol", "STUCK", "--count", "3", env=env)
    assert producer.wait(60) == 0
    log = tmp_path / "consumer.log"
    consumer = spawn("tests.procs.bus_consumer", "--name", "stuck", "--delay-ms", "120000", env=env, log=log)
    try:
        wait_for(lambda: int(client.get(f"{keys.prefix}:started:stuck") or 0) >= 1, timeout=60,
                 message="the consumer to be mid-message")
        consumer.send_signal(signal.SIGTERM)
        wait_for(lambda: "stop.requested" in log.read_text(), timeout=30, message="the first SIGTERM seen")
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(30) == 1
        assert effects(client, keys) == []
        assert pending(client, keys) >= 1
    finally:
        stop_all([consumer])


def test_bad_setting_stops_start_up_naming_the_field(keys: Keys) -> None:
    """A consumer process given an invalid bus setting exits 2 and names the field."""
    proc = spawn("tests.procs.bus_consumer", "--name", "x",
                 env={"REDIS_URL": "redis://127.0.0.1:1/0", "BASTION_BUS__MAX_DELIVERIES": "0"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"bus.max_deliveries" in err




def test_sigterm_while_writing_a_log_line_still_stops(tmp_path: Path) -> None:
    """A SIGTERM that lands while the main thread holds the log writer's lock sets the stop flag
    and logs stop.requested; the handler takes no lock, so the process does not hang on itself."""
    log = tmp_path / "signalled.log"
    proc = spawn("tests.procs.signal_while_logging", log=log)
    try:
        assert proc.wait(60) == 0, log.read_text()
        assert '"event": "stop.requested"' in log.read_text()
    finally:
        stop_all([proc])
