"""A process that gets SIGTERM while its main thread is writing a log line.

The log stream sends the signal from inside its ``write``, so the handler runs while structlog's
writer holds its lock. Exit 0 once the stop flag is set and ``stop.requested`` was logged; a
handler that logged or took any lock itself would hang here instead.
"""

from __future__ import annotations

import io
import os
import signal
import sys

from shared.logging import configure_logging, get_logger
from shared.stop import StopSignal


class _SignallingStream(io.StringIO):
    """Writes through to stdout; the first line containing "signal me" sends SIGTERM mid-write."""

    def write(self, text: str) -> int:
        if "signal me" in text and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        sys.stdout.write(text)
        sys.stdout.flush()
        return len(text)


def main() -> int:
    configure_logging("signal-test", "INFO", stream=_SignallingStream())
    stop = StopSignal()
    stop.install(grace_seconds=60)
    get_logger().info("signal me")
    return 0 if stop.wait(30) else 1


if __name__ == "__main__":
    sys.exit(main())
