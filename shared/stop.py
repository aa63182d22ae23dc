"""How a service process stops: a flag its loops check, set by SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol

from shared.logging import get_logger

__all__ = ["StopSignal", "Stoppable", "write_line"]

log = get_logger(component="stop")


class Stoppable(Protocol):
    """A stop flag a loop can check and wait on (:class:`StopSignal`, ``threading.Event``)."""

    def is_set(self) -> bool: ...

    def wait(self, seconds: float, /) -> bool: ...


class StopSignal:
    """A stop flag a service loop checks between messages; SIGTERM/SIGINT set it.

    The first signal asks the loop to finish the message in hand (acknowledge it) and exit 0;
    if that takes more than ``grace_seconds``, or a second signal arrives, the process exits now
    (exit status 1; the entry in hand stays pending and is claimed by another consumer).

    The handlers take no lock: a signal runs its handler in the main thread between two
    bytecodes, possibly while that thread holds the log writer's lock or an Event's, and a
    handler that logged or set an Event there would wait for itself forever (the process then
    hung until SIGKILL). The handler only notes the signal, arms the grace timer and writes a
    byte to a pipe; a watcher thread logs ``stop.requested`` and sets the flag. The two exits
    write their line straight to stdout with ``os.write``.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._signal = 0  # the first signal received (set by the handler: a plain attribute)

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self.event.is_set()

    def set(self) -> None:
        """Request a stop."""
        self.event.set()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a stop request; True if one came."""
        return self.event.wait(seconds)

    def install(self, grace_seconds: float) -> None:
        """Route SIGTERM and SIGINT here (call from the main thread)."""
        wake_read, wake_write = os.pipe()

        def on_signal(signum: int, _: FrameType | None) -> None:
            if self._signal:
                write_line("stop.forced", "warning", signal=signum)
                raise SystemExit(1)
            self._signal = signum
            signal.setitimer(signal.ITIMER_REAL, grace_seconds)
            os.write(wake_write, b"!")

        def on_grace_expired(signum: int, _: FrameType | None) -> None:
            write_line("stop.grace_expired", "warning", grace_seconds=grace_seconds)
            raise SystemExit(1)

        def watch() -> None:
            os.read(wake_read, 1)
            log.info("stop.requested", signal=self._signal, grace_seconds=grace_seconds)
            self.event.set()

        threading.Thread(target=watch, name="stop-signal", daemon=True).start()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGALRM, on_grace_expired)


def write_line(event: str, level: str, **fields: Any) -> None:
    """One JSON log line written to stdout without structlog or any lock (for signal handlers)."""
    line = json.dumps({**fields, "event": event, "pid": os.getpid(), "level": level}) + "\n"
    os.write(1, line.encode())
