"""Tests for shared.bus.codec: exact round trips, readable envelopes, and malformed input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Context, Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.bus.codec import DECIMAL_EXT, decode, encode, pack, unpack
from shared.errors import CodecError, UnknownSchema
from shared.models import (
    Alert,
    AlertSeverity,
    Bar,
    Fill,
    Intent,
    IntentRejected,
    Message,
    Order,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from tests.support import factories

EDGE_DECIMALS = [
    Decimal("0"),
    Decimal("-0"),
    Decimal("0E-8"),
    Decimal("1E+3"),
    Decimal("1E-30"),
    Decimal("-1E-30"),
    Decimal("-42.4200"),
    Decimal("1.000000000"),
    Decimal("123456789012345678901234567890.123456789012345678901234567890"),
    Decimal("-98765432109876543210987654321098765432109876543210"),
    Decimal("9.99999999999999999999999999999999999999E+999"),
]

EXACT = Context(prec=5000)  # the default 28 digits would round a high below its close
finite_decimals = st.one_of(
    st.sampled_from(EDGE_DECIMALS),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=8),
    st.builds(lambda digits, exp: Decimal(f"{digits}E{exp}"),
              st.integers(min_value=-(10**60), max_value=10**60), st.integers(-60, 60)),
)
# copy_abs is exact; abs() would round to the context's 28 digits.
positive_decimals = finite_decimals.map(Decimal.copy_abs).filter(lambda d: d > 0)
non_negative_decimals = st.one_of(st.sampled_from([Decimal("0"), Decimal("-0"), Decimal("0E-8")]),
                                  positive_decimals)

offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))
aware_datetimes = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),  # noqa: DTZ001
                               timezones=st.one_of(st.just(UTC), offsets))
symbols = st.from_regex(r"\A[A-Z0-9./-]{1,32}\Z")
ids = st.text(min_size=1, max_size=40)
text = st.text(max_size=60)


@st.composite
def bars(draw: st.DrawFn) -> Bar:
    open_, close = draw(positive_decimals), draw(positive_decimals)
    low = draw(st.sampled_from([min(open_, close), EXACT.divide(min(open_, close), 2)]))
    high = EXACT.add(max(open_, close), draw(non_negative_decimals))
    return Bar(time=draw(aware_datetimes), symbol=draw(symbols), open=open_, high=high, low=low,
               close=close, volume=draw(non_negative_decimals),
               vwap=draw(st.none() | positive_decimals),
               trade_count=draw(st.none() | st.integers(min_value=0, max_value=2**63)))


def _prices(draw: st.DrawFn, order_type: OrderType) -> dict[str, Decimal | None]:
    limit = draw(positive_decimals) if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None
    stop = draw(positive_decimals) if order_type in (OrderType.STOP, OrderType.STOP_LIMIT) else None
    return {"limit_price": limit, "stop_price": stop}


@st.composite
def intents(draw: st.DrawFn) -> Intent:
    order_type = draw(st.sampled_from(OrderType))
    by_quantity = draw(st.booleans())
    return Intent(time=draw(aware_datetimes), source=draw(ids), symbol=draw(symbols),
                  side=draw(st.sampled_from(Side)), order_type=order_type,
                  quantity=draw(positive_decimals) if by_quantity else None,
                  notional=None if by_quantity else draw(positive_decimals),
                  time_in_force=draw(st.sampled_from(TimeInForce)), reason=draw(text),
                  **_prices(draw, order_type))


@st.composite
def orders(draw: st.DrawFn) -> Order:
    order_type = draw(st.sampled_from(OrderType))
    return Order(time=draw(aware_datetimes), intent_id=draw(ids), client_order_id=draw(ids),
                 account=draw(text), symbol=draw(symbols), side=draw(st.sampled_from(Side)),
                 quantity=draw(positive_decimals), order_type=order_type,
                 time_in_force=draw(st.sampled_from(TimeInForce)), reservation_id=draw(ids),
                 **_prices(draw, order_type))


fills = st.builds(Fill, fill_id=ids, quantity=positive_decimals, price=positive_decimals,
                  fee=non_negative_decimals, time=aware_datetimes)
order_events = st.builds(
    OrderEvent, time=aware_datetimes, client_order_id=ids, intent_id=st.none() | ids,
    broker_order_id=st.none() | ids, symbol=symbols, side=st.sampled_from(Side),
    status=st.sampled_from(OrderStatus), filled_quantity=non_negative_decimals,
    filled_avg_price=st.none() | positive_decimals, fill=st.none() | fills, reason=text,
)
alerts = st.builds(Alert, time=aware_datetimes, severity=st.sampled_from(AlertSeverity), source=text,
                   kind=text, text=text, details=st.dictionaries(text, text, max_size=4))
rejections = st.builds(IntentRejected, time=aware_datetimes, intent_id=ids, symbol=symbols, reason=text)
messages = st.one_of(bars(), intents(), orders(), order_events, alerts, rejections)


def exact(value: Any) -> Any:
    """``value`` with every Decimal and datetime replaced by a form that tells apart equal-but-different
    values (``-0`` from ``0``, ``1E+3`` from ``1000``, one offset from another)."""
    if isinstance(value, Decimal):
        return ("decimal", value.as_tuple())
    if isinstance(value, datetime):
        return ("datetime", value.isoformat(), value.utcoffset())
    if isinstance(value, dict):
        return {key: exact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [exact(item) for item in value]
    return value


class TestRoundTrip:
    @given(messages)
    def test_every_message_round_trips_exactly(self, message: Message) -> None:
        """decode(encode(m)) is a message of the same type whose every field is identical, digit for digit."""
        decoded = decode(encode(message))
        assert type(decoded) is type(message)
        assert decoded == message
        assert exact(decoded.model_dump()) == exact(message.model_dump())

    @given(messages)
    def test_round_trip_through_redis_style_bytes(self, message: Message) -> None:
        """A stream entry read back as bytes keys and values (as redis-py returns it) decodes the same."""
        fields = {key.encode(): value if isinstance(value, bytes) else value.encode()
                  for key, value in encode(message).items()}
        assert exact(decode(fields).model_dump()) == exact(message.model_dump())

    @given(st.one_of(st.sampled_from(EDGE_DECIMALS), st.decimals()))
    def test_any_decimal_packs_exactly(self, value: Decimal) -> None:
        """pack/unpack keeps a Decimal's sign, digits and exponent (even -0, NaN and exponent forms)."""
        result = unpack(pack({"d": value}))["d"]
        assert isinstance(result, Decimal)
        assert result.as_tuple() == value.as_tuple()

    @pytest.mark.parametrize("value", EDGE_DECIMALS, ids=str)
    def test_edge_decimal_travels_as_its_string(self, value: Decimal) -> None:
        """A Decimal goes on the wire as extension 1 holding its exact string form."""
        assert msgpack.unpackb(pack(value)) == msgpack.ExtType(DECIMAL_EXT, str(value).encode())

    def test_volume_of_negative_zero_keeps_its_sign(self) -> None:
        """A bar whose volume is Decimal('-0') comes back as -0, not 0."""
        decoded = decode(encode(factories.bar(volume=Decimal("-0"))))
        assert isinstance(decoded, Bar)
        assert str(decoded.volume) == "-0"

    @given(aware_datetimes)
    def test_aware_datetime_comes_back_as_the_same_instant_in_utc(self, when: datetime) -> None:
        """A datetime at any offset comes back as the same instant, with microseconds, in UTC."""
        result = unpack(pack({"t": when}))["t"]
        assert result == when
        assert result.utcoffset() == timedelta(0)
        assert result.microsecond == when.astimezone(UTC).microsecond

    def test_message_time_is_normalised_to_utc(self) -> None:
        """A bar stamped 16:30:00.123456+02:00 decodes with time 14:30:00.123456 UTC."""
        bar = factories.bar(time=datetime(2026, 1, 2, 16, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2))))
        decoded = decode(encode(bar))
        assert decoded.time == datetime(2026, 1, 2, 14, 30, 0, 123456, tzinfo=UTC)
        assert decoded.time.tzinfo == UTC

    def test_pre_epoch_datetime_with_microseconds(self) -> None:
        """A time before 1970 with a fraction of a second is not rounded to the wrong second."""
        when = datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
        assert unpack(pack(when)) == when

    def test_naive_datetime_is_refused(self) -> None:
        """pack refuses a naive datetime instead of guessing its zone."""
        with pytest.raises(TypeError, match="naive"):
            pack({"t": datetime(2026, 1, 2, 14, 30)})  # noqa: DTZ001

    def test_message_with_naive_time_cannot_be_built(self) -> None:
        """A message cannot even be created with a naive time, so none reaches the wire."""
        with pytest.raises(ValueError, match="naive"):
            factories.bar(time=datetime(2026, 1, 2, 14, 30))  # noqa: DTZ001

    def test_unsupported_type_is_refused(self) -> None:
        """pack refuses a value it has no wire form for (a float-free set, say)."""
        with pytest.raises(TypeError, match="set"):
            pack({1, 2})


class TestEnvelope:
    def test_fields_are_human_readable(self) -> None:
        """type, v, id, time, symbol and cid are plain text; only the body is msgpack."""
        order = factories.order(intent_id="intent-1", symbol="MSFT")
        fields = encode(order)
        assert fields["type"] == "order"
        assert fields["v"] == "1"
        assert fields["id"] == order.id
        assert fields["time"] == "2026-01-02T14:30:00+00:00"
        assert fields["symbol"] == "MSFT"
        assert fields["cid"] == "intent-1"
        assert isinstance(fields["body"], bytes)
        assert {key for key, value in fields.items() if not isinstance(value, str)} == {"body"}

    def test_time_field_is_utc_iso(self) -> None:
        """The time field is the message's instant in ISO-8601 UTC, whatever offset it was built with."""
        bar = factories.bar(time=datetime(2026, 1, 2, 9, 30, 0, 5, tzinfo=timezone(timedelta(hours=-5))))
        assert encode(bar)["time"] == "2026-01-02T14:30:00.000005+00:00"

    def test_correlation_id_follows_the_message(self) -> None:
        """cid is the intent id of an intent and the client order id of an order event."""
        intent = Intent(time=datetime(2026, 1, 2, tzinfo=UTC), source="manual", symbol="AAPL",
                        side=Side.BUY, quantity=Decimal("1"))
        event = OrderEvent(time=datetime(2026, 1, 2, tzinfo=UTC), client_order_id="coid-9",
                           symbol="AAPL", side=Side.SELL, status=OrderStatus.NEW)
        assert encode(intent)["cid"] == intent.id
        assert encode(event)["cid"] == "coid-9"

    def test_symbol_and_cid_absent_when_the_message_has_none(self) -> None:
        """An alert has no symbol and no correlation id, so neither field is written."""
        alert = Alert(time=datetime(2026, 1, 2, tzinfo=UTC), severity=AlertSeverity.WARNING,
                      source="monitor", kind="lag", text="consumer lag 500")
        assert set(encode(alert)) == {"type", "v", "id", "time", "body"}


def body_bytes(fields: dict[str, str | bytes]) -> bytes:
    body = fields["body"]
    assert isinstance(body, bytes)
    return body


def _bad_body(fields: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {**fields, "body": body}


def _body_map(**changes: Any) -> dict[str, Any]:
    body = unpack(body_bytes(encode(factories.bar())))
    assert isinstance(body, dict)
    return body | changes


class TestMalformed:
    @pytest.mark.parametrize("missing", ["type", "v", "body"])
    def test_missing_envelope_field(self, missing: str) -> None:
        """An entry without type, v or body is a CodecError naming the envelope fields."""
        fields = {key: value for key, value in encode(factories.bar()).items() if key != missing}
        with pytest.raises(CodecError, match="missing envelope field") as info:
            decode(fields)
        assert missing in info.value.reason

    @pytest.mark.parametrize("fields", [{}, None, [("type", "bar")]], ids=["empty", "none", "list"])
    def test_entry_without_fields(self, fields: Any) -> None:
        """A trimmed entry (no fields, or None) is a CodecError, not an AttributeError."""
        with pytest.raises(CodecError):
            decode(fields)

    def test_unknown_type(self) -> None:
        """An unknown message type is UnknownSchema naming the type."""
        with pytest.raises(UnknownSchema, match="'quote'"):
            decode({**encode(factories.bar()), "type": "quote"})

    @pytest.mark.parametrize("version", ["2", "0", "", "v1", b"99"])
    def test_unknown_schema_version(self, version: str | bytes) -> None:
        """A schema version this build does not read is UnknownSchema naming type and version."""
        with pytest.raises(UnknownSchema, match="bar schema version") as info:
            decode({**encode(factories.bar()), "v": version})
        assert "not supported" in info.value.reason

    @pytest.mark.parametrize("body", [b"\xc1", b"", b"\x81\xa4time", b"\x91" * 100_000 + b"\x00",
                                      b"\x81\xa4time\xa2\xff\xfe", b"\x81\x01\x02"],
                             ids=["reserved-byte", "empty", "truncated", "too-deep", "bad-utf8",
                                  "int-key"])
    def test_body_not_msgpack(self, body: bytes) -> None:
        """A body msgpack cannot read is a CodecError saying so."""
        with pytest.raises(CodecError, match="not valid msgpack"):
            decode(_bad_body(encode(factories.bar()), body))

    def test_trailing_bytes_after_body(self) -> None:
        """A valid body followed by extra bytes is refused, not silently truncated."""
        fields = encode(factories.bar())
        with pytest.raises(CodecError, match="not valid msgpack"):
            decode(_bad_body(fields, body_bytes(fields) + b"\x00"))

    @pytest.mark.parametrize("payload", [[1, 2], "bar", 7, None], ids=["list", "str", "int", "nil"])
    def test_body_not_a_map(self, payload: Any) -> None:
        """A body that is msgpack but not a map is a CodecError naming what it is."""
        with pytest.raises(CodecError, match="not a map"):
            decode(_bad_body(encode(factories.bar()), pack(payload)))

    @pytest.mark.parametrize("data", [b"abc", b"\xff\xfe", b"", b"1.2.3"])
    def test_bad_decimal_ext(self, data: bytes) -> None:
        """Extension 1 whose bytes are no decimal is a CodecError quoting them."""
        body = msgpack.packb(_body_map(open=msgpack.ExtType(DECIMAL_EXT, data)), default=pack_default)
        with pytest.raises(CodecError, match="bad decimal"):
            decode(_bad_body(encode(factories.bar()), body))

    def test_unknown_ext_code(self) -> None:
        """An extension code the codec does not define is a CodecError naming the code."""
        body = msgpack.packb(_body_map(open=msgpack.ExtType(42, b"1")), default=pack_default)
        with pytest.raises(CodecError, match="extension type 42"):
            decode(_bad_body(encode(factories.bar()), body))

    def test_bad_timestamp_ext(self) -> None:
        """A msgpack timestamp of impossible length is a CodecError."""
        with pytest.raises(CodecError, match="timestamp"):
            decode(_bad_body(encode(factories.bar()), b"\x81\xa4time\xd4\xff\x00"))

    @pytest.mark.parametrize(
        ("changes", "named"),
        [
            ({"low": Decimal("100")}, "inconsistent bar"),
            ({"open": Decimal("NaN")}, "open"),
            ({"open": Decimal("sNaN")}, "open"),
            ({"volume": Decimal("-Infinity")}, "volume"),
            ({"symbol": "aapl"}, "symbol"),
            ({"venue": "XNAS"}, "venue"),
            ({"open": True}, "open"),
            ({"time": "2026-01-02T14:30:00"}, "naive"),
            ({"time": "0001-01-01T00:00:00+01:00"}, "time"),
        ],
        ids=["inconsistent", "nan", "snan", "infinite", "lowercase-symbol", "extra-field", "bool-price",
             "naive-time", "time-out-of-range"],
    )
    def test_body_failing_validation(self, changes: dict[str, Any], named: str) -> None:
        """A body that decodes but is not a valid message is a CodecError naming the bad field."""
        with pytest.raises(CodecError, match="invalid bar") as info:
            decode(_bad_body(encode(factories.bar()), pack(_body_map(**changes))))
        assert named in info.value.reason

    def test_missing_body_field(self) -> None:
        """A body without a required field is a CodecError naming it."""
        body = _body_map()
        del body["close"]
        with pytest.raises(CodecError, match="close: Field required"):
            decode(_bad_body(encode(factories.bar()), pack(body)))

    @given(st.binary(max_size=200))
    def test_arbitrary_body_bytes_raise_only_codec_error(self, body: bytes) -> None:
        """Whatever bytes the body holds, decode returns a Bar or raises CodecError, nothing else."""
        try:
            assert isinstance(decode(_bad_body(encode(factories.bar()), body)), Bar)
        except CodecError as exc:
            assert exc.reason

    @given(st.dictionaries(st.sampled_from(["type", "v", "id", "time", "body", b"type", b"v", b"body"]),
                           st.one_of(st.text(max_size=8), st.binary(max_size=40), st.none()), max_size=6))
    def test_arbitrary_envelope_raises_only_codec_error(self, fields: dict[Any, Any]) -> None:
        """Any mix of envelope fields and values decodes or raises CodecError, nothing else."""
        try:
            decode(fields)
        except CodecError as exc:
            assert exc.reason


def pack_default(value: Any) -> Any:
    """msgpack ``default`` that reuses the codec's wire forms, for building hand-made bodies."""
    return msgpack.unpackb(pack(value), raw=False)
