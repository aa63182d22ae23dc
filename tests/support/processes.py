"""Helpers for tests that run real OS processes: spawn a module, wait on a condition."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(module: str, *args: str, env: dict[str, str] | None = None,
          stdout: int | None = subprocess.PIPE, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m module args...`` from the repository root.

    With ``log``, stdout and stderr both go to that file (a long-running process can never
    block on a full pipe, and the test can wait for a line in it).
    """
    full_env = {**os.environ, **(env or {})}
    if log is not None:
        with log.open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
        stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.02,
             message: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def stop_all(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Terminate every process still running, killing any that outlives ``timeout``."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from ``/proc`` (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
