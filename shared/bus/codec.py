"""The wire format: human-readable envelope fields plus a msgpack body.

A stream entry written by :func:`encode` has these fields, so ``redis-cli XRANGE`` is useful::

    type    message type (``bar``, ``intent``, ``order``, ``order_event``, ``alert``...)
    v       schema version of that type
    id      the message id (idempotency key: a retried XADD repeats it)
    time    ISO-8601 UTC time of the message
    symbol  the symbol, when the message has one
    cid     correlation id (intent id or client order id), when it has one
    body    msgpack of every field of the model

In the body, ``Decimal`` travels as msgpack extension 1 holding its exact string form, and
datetimes as msgpack timestamps (UTC, microseconds); both round-trip exactly. :func:`decode`
raises :class:`~shared.errors.CodecError` (or :class:`~shared.errors.UnknownSchema`) for anything
it cannot turn back into a valid message; the bus dead-letters such entries with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack
from pydantic import ValidationError

from shared.errors import CodecError, UnknownSchema
from shared.models import MESSAGE_TYPES, Message

__all__ = ["decode", "encode", "pack", "unpack"]

DECIMAL_EXT = 1
_REGISTRY: dict[str, type[Message]] = {cls.TYPE: cls for cls in MESSAGE_TYPES}


def _default(value: Any) -> Any:
    # Aware datetimes never get here: the packer writes them as timestamps itself.
    if isinstance(value, Decimal):
        # tuple.__new__ skips ExtType.__new__, which re-checks our constant code in Python:
        # this runs for every Decimal of every message.
        return tuple.__new__(msgpack.ExtType, (DECIMAL_EXT, str(value).encode("ascii")))
    if isinstance(value, datetime):
        raise TypeError(f"naive datetime {value!r} cannot go on the wire")
    raise TypeError(f"cannot encode {type(value).__name__} on the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == DECIMAL_EXT:
        try:
            return Decimal(data.decode("ascii"))
        except (UnicodeDecodeError, InvalidOperation) as exc:
            raise CodecError(f"bad decimal on the wire: {data!r}") from exc
    raise CodecError(f"unknown msgpack extension type {code}")


def pack(value: Any) -> bytes:
    """msgpack ``value``, keeping Decimal and aware datetimes exact."""
    return msgpack.packb(value, default=_default, datetime=True, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Reverse of :func:`pack`; raise CodecError on anything malformed."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, timestamp=3, raw=False, strict_map_key=True)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CodecError(f"body is not valid msgpack: {exc}") from exc


def encode(message: Message) -> dict[str, str | bytes]:
    """The stream-entry fields for ``message``."""
    fields: dict[str, str | bytes] = {
        "type": message.TYPE,
        "v": str(message.VERSION),
        "id": message.id,
        "time": message.time.isoformat(),
    }
    if message.symbol_field is not None:
        fields["symbol"] = message.symbol_field
    if message.correlation_id is not None:
        fields["cid"] = message.correlation_id
    fields["body"] = pack(message.model_dump(mode="python"))
    return fields


def decode(fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> Message:
    """Turn a stream entry's fields back into its message; raise CodecError if it can't."""
    if not isinstance(fields, Mapping):
        raise CodecError(f"entry fields are a {type(fields).__name__}, not a map")
    type_name, version, body = _field(fields, b"type"), _field(fields, b"v"), _field(fields, b"body")
    if type_name is None or version is None or body is None:
        raise CodecError("missing envelope field (type, v and body are required)")
    type_text = type_name.decode(errors="replace") if isinstance(type_name, bytes) else str(type_name)
    cls = _REGISTRY.get(type_text)
    if cls is None:
        raise UnknownSchema(f"unknown message type {type_text!r}")
    version_text = version.decode(errors="replace") if isinstance(version, bytes) else str(version)
    if version_text != str(cls.VERSION):
        raise UnknownSchema(f"{type_text} schema version {version_text!r} is not supported "
                            f"(this build reads version {cls.VERSION})")
    payload = unpack(body if isinstance(body, bytes) else str(body).encode())
    if not isinstance(payload, dict):
        raise CodecError(f"{type_text} body is a {type(payload).__name__}, not a map")
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise CodecError(f"invalid {type_text}: {problems}") from None


def _field(fields: Mapping[Any, Any], name: bytes) -> Any:
    """A field by its bytes name (as redis-py returns them) or, failing that, its str name."""
    value = fields.get(name)
    return fields.get(name.decode()) if value is None else value
