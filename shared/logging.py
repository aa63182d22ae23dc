"""structlog JSON logging: one line per event on stdout, secrets redacted.

Every line carries ``service``, ``pid``, ``level``, ``timestamp`` and whatever correlation ids
are bound with :func:`bind_correlation` (``intent_id``, ``client_order_id``, ``message_id``...),
so one trade can be followed across processes with ``grep``. The bus binds a message's ids for
every message it handles, so binding is cheap: one context variable is set and reset per block,
and the ids are worked out only when a line is actually written. Values under secret-looking keys,
``SecretStr`` values and passwords inside URLs are replaced before rendering.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any

import structlog
from pydantic import SecretStr
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["bind_correlation", "configure_logging", "get_logger", "merge_correlation", "redact"]

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(password|passwd|secret|api_key|apikey|token|authorization|credential)", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_NOT_SECRET = {"fencing_token", "token_count"}

CorrelationIds = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
# The blocks bound so far in this context, outermost first; each is a mapping or a function
# returning one (evaluated only when a line is written).
_CORRELATION: ContextVar[tuple[CorrelationIds, ...]] = ContextVar("bastion_correlation", default=())


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets replaced, recursing into mappings and lists."""
    if isinstance(value, SecretStr):
        return REDACTED
    if key and _secret_name(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        if "@" not in value or "://" not in value:  # no URL with credentials (most values): no regex
            return value
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _secret_name(key: str) -> bool:
    """Whether a field called ``key`` holds a secret (a log line has a few dozen distinct keys)."""
    return key not in _NOT_SECRET and _SECRET_KEY.search(key) is not None


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {key: redact(value, key) for key, value in event_dict.items()}


def merge_correlation(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: add the ids bound by :func:`bind_correlation` (the innermost block and
    the event's own values win; ``None`` values are left out)."""
    for bound in reversed(_CORRELATION.get()):
        for key, value in (bound() if callable(bound) else bound).items():
            if value is not None:
                event_dict.setdefault(key, value)
    return event_dict


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """Send this process's structlog events to ``stream`` (stdout) as JSON lines."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            merge_correlation,
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
    """Correlation ids bound for the duration of a ``with`` block, unbound on exit."""

    __slots__ = ("_ids", "_token")

    def __init__(self, ids: CorrelationIds) -> None:
        self._ids = ids
        self._token: Token[tuple[CorrelationIds, ...]] | None = None

    def __enter__(self) -> None:
        self._token = _CORRELATION.set((*_CORRELATION.get(), self._ids))

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _CORRELATION.reset(self._token)


def bind_correlation(ids: Callable[[], Mapping[str, Any]] | None = None, /, **values: Any) -> _Bound:
    """Bind correlation ids (``None`` values are skipped) to every log line inside the ``with`` block.

    Pass the ids as keywords, or as a function returning them: it is called only if a line is
    written inside the block (the bus's per-message binding costs nothing until then).
    """
    return _Bound(ids if ids is not None else values)
