"""Tests for shared.logging's routing of stdlib ``logging`` (alpaca-py, urllib3, websockets) into JSON lines.

configure_logging puts a handler on the root logger, which is process-global, so each test runs a
short script in its own Python process and reads what it printed on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from shared.logging import REDACTED
from tests.support.processes import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import logging
    import sys
    import threading

    from shared.logging import bind_correlation, configure_logging, get_logger

    configure_logging("probe", sys.argv[1])
    configure_logging("probe", sys.argv[1])  # configuring again replaces the handler: no doubled lines
    stream = logging.getLogger("alpaca.trading.stream")
    get_logger().info("structlog.line")
    stream.warning("websocket error, restarting connection: %s", "server closed")
    stream.debug("stream debug")
    logging.getLogger("urllib3.connectionpool").debug("Starting new HTTP connection (1): 127.0.0.1:8790")
    logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")
    logging.getLogger("websockets.client").debug("> TEXT '{\\"action\\": \\"auth\\"}'")
    with bind_correlation(client_order_id="bst-1"):
        stream.info("connected to redis://:hunter2pw@10.0.0.1:6379/0")
    thread = threading.Thread(target=lambda: stream.error("from a thread"))
    thread.start()
    thread.join()

    def fail():
        api_secret = "frame-local-secret"
        raise ConnectionError(f"stream dropped ({len(api_secret)})")

    try:
        fail()
    except ConnectionError:
        stream.exception("error during websocket communication")
    """)


def run_probe(level: str) -> tuple[str, list[dict[str, Any]]]:
    """Run SCRIPT at ``level``; its raw stdout and every line parsed as JSON (failing if one is not)."""
    result = subprocess.run([sys.executable, "-c", SCRIPT, level], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout, [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def info_run() -> tuple[str, list[dict[str, Any]]]:
    """The probe's output at INFO (run once for the module)."""
    return run_probe("INFO")


def by_event(lines: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    [line] = [line for line in lines if line["event"].startswith(prefix)]
    return line


class TestStdlibLines:
    def test_alpaca_warning_is_one_json_line_with_service_and_level(
            self, info_run: tuple[str, list[dict[str, Any]]]) -> None:
        """A warning from the alpaca.trading.stream logger is one JSON object with service, pid,
        level, logger name and timestamp, like a structlog line next to it."""
        _, lines = info_run
        line = by_event(lines, "websocket error")
        assert line["event"] == "websocket error, restarting connection: server closed"
        assert line["service"] == "probe"
        assert line["level"] == "warning"
        assert line["logger"] == "alpaca.trading.stream"
        assert isinstance(line["pid"], int) and line["pid"] != os.getpid()
        assert line["timestamp"].endswith("Z")
        assert by_event(lines, "structlog.line")["pid"] == line["pid"]

    def test_every_line_once_and_levels_applied(self, info_run: tuple[str, list[dict[str, Any]]]) -> None:
        """Configured twice, each record is written once; below INFO nothing from any library, and
        urllib3 and websockets only from WARNING."""
        _, lines = info_run
        assert [line["event"][:20] for line in lines] == [
            "structlog.line", "websocket error, res", "Retrying after conne", "connected to redis:/",
            "from a thread", "error during websock"]

    def test_correlation_and_thread_lines_carry_the_context(
            self, info_run: tuple[str, list[dict[str, Any]]]) -> None:
        """Ids bound with bind_correlation reach stdlib lines; a line from another thread still names
        the service and pid."""
        _, lines = info_run
        assert by_event(lines, "connected to")["client_order_id"] == "bst-1"
        threaded = by_event(lines, "from a thread")
        assert (threaded["service"], threaded["level"]) == ("probe", "error")
        assert isinstance(threaded["pid"], int)

    def test_secrets_redacted_in_stdlib_lines(self, info_run: tuple[str, list[dict[str, Any]]]) -> None:
        """A URL password in a library's message is redacted; an exception is data, without frame locals."""
        out, lines = info_run
        assert "hunter2pw" not in out and "frame-local-secret" not in out
        assert by_event(lines, "connected to")["event"] == f"connected to redis://:{REDACTED}@10.0.0.1:6379/0"
        failure = by_event(lines, "error during")
        assert failure["level"] == "error"
        assert failure["exception"][0]["exc_type"] == "ConnectionError"
        assert failure["exception"][0]["exc_value"] == "stream dropped (18)"

    def test_debug_level_keeps_chatty_libraries_at_warning(self) -> None:
        """At DEBUG a library's debug line is written, but urllib3's and websockets' are not."""
        _, lines = run_probe("DEBUG")
        events = [line["event"] for line in lines]
        assert "stream debug" in events
        assert not any(line["logger"].startswith(("urllib3", "websockets")) and line["level"] == "debug"
                       for line in lines if "logger" in line)
        assert not any("Starting new HTTP" in event or "TEXT" in event for event in events)
