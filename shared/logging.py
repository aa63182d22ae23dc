"""structlog JSON logging: one line per event on stdout, secrets redacted.

Every line carries ``service``, ``pid``, ``level``, ``timestamp`` and whatever correlation ids
are bound with :func:`bind_correlation` (``intent_id``, ``client_order_id``, ``message_id``...),
so one trade can be followed across processes with ``grep``. The bus binds a message's ids for
every message it handles, so binding is cheap: one context variable is set and reset per block,
and the ids are worked out only when a line is actually written. Values under secret-looking keys,
``SecretStr`` values and passwords inside URLs are replaced before rendering.

Libraries that log through the standard library (alpaca-py, urllib3, websockets, asyncio) are
routed through the same pipeline by a handler on the root logger: their lines are JSON too, with
``logger`` (the stdlib logger's name) added, the same redaction, and exceptions rendered as data
without frame locals. ``extra=`` fields of stdlib records are dropped (they are not checked for
secrets). structlog's lines and stdlib's go through one writer, so they never interleave
mid-line. urllib3 and websockets log at WARNING or above whatever the level (websockets'
debug lines would carry the stream's authentication message). What is left to the caller: a
secret written into a message's text (not under a key, not a URL password) is not recognised.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any, TextIO

import structlog
from pydantic import SecretStr
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["bind_correlation", "configure_logging", "get_logger", "merge_correlation", "redact"]

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(password|passwd|secret|api_key|apikey|token|authorization|credential)", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_NOT_SECRET = {"fencing_token", "token_count"}
# stdlib loggers held at WARNING or above: per-request (urllib3) and per-frame (websockets) lines
CHATTY_LOGGERS = ("urllib3", "websockets")

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


class _ServiceFields:
    """structlog processor: ``service`` and ``pid`` on every line, from whichever thread (a new
    thread starts with empty context variables), the pid read per line (an rq work horse is a
    fork). Values bound in the context win."""

    __slots__ = ("service",)

    def __init__(self, service: str) -> None:
        self.service = service

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", self.service)
        event_dict.setdefault("pid", os.getpid())
        return event_dict


class _JsonLinesHandler(logging.Handler):
    """A root-logger handler writing each stdlib record as one line through structlog's writer for
    the same stream (and its lock: a stdlib line and a structlog line never interleave)."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._out = structlog.WriteLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """Send this process's structlog events, and its stdlib ``logging`` records, to ``stream``
    (stdout) as JSON lines at ``level``. Process-global; calling it again replaces the setup."""
    out = stream or sys.stdout
    numeric = logging.getLevelName(level)
    # Before rendering, for both kinds of line. Frame locals would carry secrets (an HTTP client's
    # headers) past the redactor, so exceptions are rendered without them.
    context: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_correlation,
        _ServiceFields(service),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Processor] = [
        structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
        _redact_processor,
        structlog.processors.JSONRenderer(default=str),
    ]
    structlog.configure(
        processors=[*context, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*context, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render])
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(handler)
    root.addHandler(_JsonLinesHandler(out, formatter))
    root.setLevel(numeric)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


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
