"""Tests for shared.logging: JSON lines with service, pid and correlation ids; secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from shared.logging import (
    CHATTY_LOGGERS,
    REDACTED,
    bind_correlation,
    configure_logging,
    get_logger,
    merge_correlation,
    redact,
)


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """Each test starts and ends with structlog's defaults and no bound context; the root logger's
    handlers and the levels configure_logging sets are put back afterwards."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", *CHATTY_LOGGERS)}
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    """A StringIO that configure_logging writes this test's JSON lines to."""
    out = io.StringIO()
    configure_logging("tester", "DEBUG", stream=out)
    return out


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestJsonLines:
    def test_line_carries_service_pid_level_timestamp(self, stream: io.StringIO) -> None:
        """Each event is one JSON line with event, service, pid, level and a UTC ISO timestamp."""
        get_logger().info("order.submitted", qty=3)
        [line] = lines(stream)
        assert line["event"] == "order.submitted"
        assert line["qty"] == 3
        assert line["service"] == "tester"
        assert line["pid"] == os.getpid()
        assert line["level"] == "info"
        assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).utcoffset() is not None

    def test_one_line_per_event(self, stream: io.StringIO) -> None:
        """Two events make two lines, each valid JSON on its own."""
        log = get_logger()
        log.info("a")
        log.warning("b", text="with\nnewline")
        assert [line["event"] for line in lines(stream)] == ["a", "b"]
        assert lines(stream)[1]["level"] == "warning"

    def test_bound_correlation_ids(self, stream: io.StringIO) -> None:
        """Ids bound with bind_correlation appear on lines inside the block only; None ids are skipped."""
        log = get_logger()
        with bind_correlation(intent_id="i-1", client_order_id="c-1", message_id=None):
            log.info("inside")
        log.info("outside")
        inside, outside = lines(stream)
        assert (inside["intent_id"], inside["client_order_id"]) == ("i-1", "c-1")
        assert "message_id" not in inside
        assert "intent_id" not in outside and outside["service"] == "tester"

    def test_lazy_ids_evaluated_only_when_a_line_is_written(self, stream: io.StringIO) -> None:
        """Ids bound as a function are computed for a written line only; inner blocks win over outer."""
        calls: list[str] = []

        def ids() -> dict[str, Any]:
            calls.append("called")
            return {"message_id": "m-1", "intent_id": "i-inner"}

        log = get_logger()
        with bind_correlation(intent_id="i-outer", symbol="AAPL"), bind_correlation(ids):
            log.debug("written")
            assert calls == ["called"]
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
            get_logger().info("filtered out")
        assert calls == ["called"]
        [line] = lines(stream)
        assert (line["message_id"], line["intent_id"], line["symbol"]) == ("m-1", "i-inner", "AAPL")

    def test_line_from_another_thread_names_the_service(self, stream: io.StringIO) -> None:
        """A thread starts with no context variables, yet its lines still carry service and pid."""
        thread = threading.Thread(target=lambda: get_logger().info("threaded"))
        thread.start()
        thread.join()
        [line] = lines(stream)
        assert (line["service"], line["pid"]) == ("tester", os.getpid())

    def test_logger_initial_values(self, stream: io.StringIO) -> None:
        """Values given to get_logger are on every line of that logger."""
        get_logger(consumer="c-2").info("x")
        assert lines(stream)[0]["consumer"] == "c-2"

    def test_level_filter(self) -> None:
        """Below the configured level nothing is written."""
        out = io.StringIO()
        configure_logging("tester", "WARNING", stream=out)
        log = get_logger()
        log.info("quiet")
        log.error("loud")
        assert [line["event"] for line in lines(out)] == ["loud"]

    def test_exception_rendered_as_data(self, stream: io.StringIO) -> None:
        """log.exception adds the exception type and message as structured data."""
        try:
            raise RuntimeError("broker down")
        except RuntimeError:
            get_logger().exception("submit.failed")
        [line] = lines(stream)
        assert line["level"] == "error"
        assert line["exception"][0]["exc_type"] == "RuntimeError"
        assert line["exception"][0]["exc_value"] == "broker down"

    def test_capture_logs_sees_bound_fields(self) -> None:
        """Events can be asserted on as dicts with capture_logs, correlation ids included."""
        with capture_logs(processors=[merge_correlation]) as captured, bind_correlation(intent_id="i-5"):
            get_logger().info("risk.approved", symbol="AAPL")
        assert captured == [{"event": "risk.approved", "symbol": "AAPL", "intent_id": "i-5",
                             "log_level": "info"}]


class TestRedaction:
    @pytest.mark.parametrize("key", ["password", "api_key", "secret_key", "authorization", "Authorization",
                                     "redis_password", "apikey", "access_token", "credentials"])
    def test_secret_keys_redacted(self, stream: io.StringIO, key: str) -> None:
        """A value under a secret-looking key is written as the redaction mark."""
        get_logger().info("e", **{key: "s3cr3t-value"})
        assert "s3cr3t-value" not in stream.getvalue()
        assert lines(stream)[0][key] == REDACTED

    def test_secretstr_redacted(self, stream: io.StringIO) -> None:
        """A SecretStr under any key is redacted."""
        get_logger().info("e", harmless_name=SecretStr("s3cr3t-value"))
        assert "s3cr3t-value" not in stream.getvalue()
        assert lines(stream)[0]["harmless_name"] == REDACTED

    @pytest.mark.parametrize("url", ["redis://:hunter2pw@127.0.0.1:6390/0", "rediss://bob:hunter2pw@h:6380/1"])
    def test_password_in_url_redacted(self, stream: io.StringIO, url: str) -> None:
        """A password inside a redis:// URL is redacted wherever the URL appears, host and user kept."""
        get_logger().info(f"connecting to {url}", url=url)
        [line] = lines(stream)
        assert "hunter2pw" not in stream.getvalue()
        assert line["url"] == url.replace("hunter2pw", REDACTED)
        assert url.replace("hunter2pw", REDACTED) in line["event"]

    def test_url_without_password_untouched(self, stream: io.StringIO) -> None:
        """A URL with a port but no password is left as it is."""
        get_logger().info("e", url="redis://127.0.0.1:6390/0")
        assert lines(stream)[0]["url"] == "redis://127.0.0.1:6390/0"

    def test_nested_secrets_redacted(self, stream: io.StringIO) -> None:
        """Secrets inside nested mappings and lists are redacted, other values kept."""
        get_logger().info("e", request={"headers": {"Authorization": "Bearer tok-1"}, "symbol": "AAPL",
                                        "urls": ["redis://:pw-2@h:1/0"], "key": SecretStr("ss-3")})
        request = lines(stream)[0]["request"]
        assert request == {"headers": {"Authorization": REDACTED}, "symbol": "AAPL",
                           "urls": [f"redis://:{REDACTED}@h:1/0"], "key": REDACTED}

    def test_fencing_token_not_redacted(self, stream: io.StringIO) -> None:
        """fencing_token looks like a secret by name but is a counter worth reading, so it is kept."""
        get_logger().info("portfolio.write", fencing_token=42, token="t-1", nested={"fencing_token": 7})
        [line] = lines(stream)
        assert line["fencing_token"] == 42
        assert line["nested"] == {"fencing_token": 7}
        assert line["token"] == REDACTED

    def test_exception_message_redacted(self, stream: io.StringIO) -> None:
        """A Redis URL with a password inside an exception message is redacted."""
        try:
            raise ConnectionError("cannot reach redis://:exc-pw-9@10.0.0.1:6379/0")
        except ConnectionError:
            get_logger().exception("redis.down")
        assert "exc-pw-9" not in stream.getvalue()

    def test_exception_frame_locals_not_logged(self, stream: io.StringIO) -> None:
        """A secret held in a local variable of a failing frame (HTTP headers) never reaches the log."""
        def submit() -> None:
            headers = {"APCA-API-KEY-ID": "AKID", "APCA-API-SECRET-KEY": "local-secret-7"}
            raise ConnectionError(f"broker down ({len(headers)} headers sent)")

        try:
            submit()
        except ConnectionError:
            get_logger().exception("submit.failed")
        assert "local-secret-7" not in stream.getvalue()
        assert lines(stream)[0]["exception"][0]["exc_value"] == "broker down (2 headers sent)"

    def test_empty_and_none_secrets_shown(self) -> None:
        """An empty or missing password is shown as it is, so a missing setting is visible."""
        assert redact({"password": "", "api_key": None}) == {"password": "", "api_key": None}

    def test_redact_does_not_touch_the_original(self) -> None:
        """redact returns a copy and leaves the caller's mapping unchanged."""
        original = {"password": "p", "nested": {"secret": "s"}}
        redact(original)
        assert original == {"password": "p", "nested": {"secret": "s"}}
