"""Tests for services.redis (``python -m services.redis``): the embedded redis-server as a process,
stopped cleanly on SIGTERM, and nothing started when REDIS_URL names a server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.redis.server import embedded_url
from tests.shared.redis.test_redis_server import NO_RETRY
from tests.support.environment import clean_env
from tests.support.processes import REPO_ROOT, free_port


class TestMain:
    def spawn(self, env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "services.redis"], cwd=REPO_ROOT,
                                env=clean_env() | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
