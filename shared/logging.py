"""structlog JSON logging: one line per event on stdout, secrets redacted.

Every line carries ``service``, ``pid``, ``level``, ``timestamp`` and whatever correlation ids
are bound with :func:`bind_correlation` (``intent_id``, ``client_order_id``, ``message_id``...),
so one trade can be followed across processes with ``grep``. Values under secret-looking keys,
``SecretStr`` values and passwords inside URLs are replaced before rendering.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from pydantic import SecretStr
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["bind_correlation", "configure_logging", "get_logger", "redact"]

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(password|passwd|secret|api_key|apikey|token|authorization|credential)", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_NOT_SECRET = {"fencing_token", "token_count"}


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets replaced, recursing into mappings and lists."""
    if isinstance(value, SecretStr):
        return REDACTED
    if key and key not in _NOT_SECRET and _SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {key: redact(value, key) for key, value in event_dict.items()}


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """Send this process's structlog events to ``stream`` (stdout) as JSON lines."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Frame locals would carry secrets (an HTTP client's headers) past the redactor.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            _redact_processor,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())


def get_logger(**initial: Any) -> Any:
    """A logger with ``initial`` values bound."""
    return structlog.get_logger(**initial)


class _Bound:
    """Context values bound for the duration of a ``with`` block, restored on exit."""

    def __init__(self, ids: dict[str, Any]) -> None:
        self._ids = ids
        self._tokens: Mapping[str, Any] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._ids)

    def __exit__(self, *_: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


def bind_correlation(**ids: Any) -> _Bound:
    """Bind correlation ids (skipping ``None``) to every log line inside the ``with`` block.

    Cheap enough to run per message: it sets and resets only the named context variables
    (structlog's ``bound_contextvars`` copies the whole context each time).
    """
    return _Bound({key: value for key, value in ids.items() if value is not None})
