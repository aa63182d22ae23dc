"""Tests for shared.models: what a valid message is, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from shared.models import (
    Alert,
    AlertSeverity,
    Fill,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
    model_fields_for_log,
)
from tests.support.factories import T0, bar, intent, order


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.value.errors())


class TestMessage:
    def test_id_is_generated_and_unique(self) -> None:
        """Two messages built without an id get different non-empty ids."""
        assert bar().id and bar().id != bar().id

    def test_naive_time_refused(self) -> None:
        """A naive time is refused, naming the time field."""
        with pytest.raises(ValidationError) as info:
            bar(time=datetime(2026, 1, 2, 14, 30))  # noqa: DTZ001
        assert "time" in errors_of(info) and "naive" in errors_of(info)

    def test_time_normalised_to_utc(self) -> None:
        """A time at +05:30 is stored as the same instant in UTC."""
        value = bar(time=datetime(2026, 1, 2, 20, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))))
        assert value.time == T0 and value.time.tzinfo == UTC

    def test_time_outside_utc_range_refused(self) -> None:
        """A time that has no UTC equivalent (year 1 at +01:00) is a validation error, not OverflowError."""
        with pytest.raises(ValidationError, match="out of range"):
            bar(time=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))

    def test_frozen(self) -> None:
        """Messages are immutable once built."""
        with pytest.raises(ValidationError):
            bar().close = Decimal("1")  # type: ignore[misc]

    def test_unknown_field_refused(self) -> None:
        """A field the model does not define is refused, not dropped."""
        with pytest.raises(ValidationError, match="venue"):
            bar(venue="XNAS")


class TestBar:
    def test_valid_bar_keeps_decimals_exact(self) -> None:
        """Prices given as strings become exact Decimals."""
        value = bar(close="11.0000000001")
        assert value.close == Decimal("11.0000000001")

    @pytest.mark.parametrize("field", ["open", "high", "low", "close", "volume", "vwap"])
    @pytest.mark.parametrize("number", ["NaN", "sNaN", "Infinity", "-Infinity"])
    def test_non_finite_decimal_refused(self, field: str, number: str) -> None:
        """NaN and infinities are refused in every price and size field, naming the field."""
        with pytest.raises(ValidationError) as info:
            bar(**{field: Decimal(number)})
        assert errors_of(info).startswith(field)

    @pytest.mark.parametrize(("changes", "reason"), [
        ({"low": "10.5"}, "low above open"),
        ({"low": "11.5", "open": "12"}, "low above close"),
        ({"high": "10.5"}, "high below close"),
        ({"high": "11", "open": "11.5"}, "high below open"),
        ({"high": "8", "low": "9"}, "high below low"),
    ])
    def test_inconsistent_bar_refused(self, changes: dict[str, str], reason: str) -> None:
        """A bar whose low or high does not bound open and close is refused."""
        with pytest.raises(ValidationError, match="inconsistent bar"):
            bar(**changes)

    def test_prices_must_be_positive(self) -> None:
        """Zero prices are refused, each price field named (a price of zero is bad data)."""
        with pytest.raises(ValidationError) as info:
            bar(open="0", high="0", low="0", close="0")
        named = {str(e["loc"][0]) for e in info.value.errors() if "greater than 0" in e["msg"]}
        assert named == {"open", "high", "low", "close"}

    def test_volume_zero_allowed_negative_refused(self) -> None:
        """Zero volume is valid; negative volume is refused."""
        assert bar(volume="0").volume == 0
        with pytest.raises(ValidationError, match="volume"):
            bar(volume="-1")

    @pytest.mark.parametrize("symbol", ["", "aapl", "AAPL US", "A" * 33])
    def test_bad_symbol_refused(self, symbol: str) -> None:
        """Empty, lowercase, spaced or over-long symbols are refused."""
        with pytest.raises(ValidationError, match="symbol"):
            bar(symbol=symbol)

    @pytest.mark.parametrize("symbol", ["BRK.B", "BTC/USD", "A", "ES-2026"])
    def test_good_symbols_accepted(self, symbol: str) -> None:
        """Share classes, crypto pairs and dashed symbols are valid."""
        assert bar(symbol=symbol).symbol == symbol

    def test_negative_trade_count_refused(self) -> None:
        """trade_count cannot be negative."""
        with pytest.raises(ValidationError, match="trade_count"):
            bar(trade_count=-1)


class TestIntent:
    def test_quantity_or_notional(self) -> None:
        """An intent by quantity and one by notional are both valid."""
        assert intent(quantity="5").quantity == Decimal("5")
        assert intent(quantity=None, notional="250.50").notional == Decimal("250.50")

    def test_no_size_is_left_to_risk(self) -> None:
        """An intent with neither quantity nor notional is valid: risk sizes it."""
        sized_by_risk = intent(quantity=None)
        assert (sized_by_risk.quantity, sized_by_risk.notional) == (None, None)

    def test_quantity_and_notional_together_refused(self) -> None:
        """Giving both quantity and notional is refused."""
        with pytest.raises(ValidationError, match="quantity or notional, not both"):
            intent(notional="100")

    @pytest.mark.parametrize("field", ["quantity", "notional"])
    @pytest.mark.parametrize("number", ["0", "-1", "NaN", "Infinity"])
    def test_size_must_be_positive_and_finite(self, field: str, number: str) -> None:
        """Zero, negative and non-finite sizes are refused, naming the field."""
        changes = {"quantity": None, field: Decimal(number)}
        with pytest.raises(ValidationError) as info:
            intent(**changes)
        assert field in errors_of(info)

    def test_limit_order_needs_limit_price(self) -> None:
        """A limit intent without limit_price is refused."""
        with pytest.raises(ValidationError, match="limit order needs limit_price"):
            intent(order_type=OrderType.LIMIT)

    def test_market_order_takes_no_limit_price(self) -> None:
        """A market intent with a limit_price is refused (it would be silently ignored)."""
        with pytest.raises(ValidationError, match="market order takes no limit_price"):
            intent(limit_price="10")

    def test_stop_limit_needs_both_prices(self) -> None:
        """A stop-limit intent needs a stop_price as well as a limit_price."""
        with pytest.raises(ValidationError, match="stop_limit order needs stop_price"):
            intent(order_type=OrderType.STOP_LIMIT, limit_price="10")
        assert intent(order_type=OrderType.STOP_LIMIT, limit_price="10", stop_price="9.5").stop_price

    def test_take_profit_needs_a_stop_loss(self) -> None:
        """A take-profit alone is refused: the executor places it with its stop-loss as one OCO pair."""
        with pytest.raises(ValidationError, match="a take_profit needs a stop_loss"):
            intent(take_profit="170")
        assert intent(stop_loss="140", take_profit="170").take_profit == Decimal(170)

    def test_stop_order_takes_no_limit_price(self) -> None:
        """A plain stop order with a limit_price is refused."""
        with pytest.raises(ValidationError, match="stop order takes no limit_price"):
            intent(order_type=OrderType.STOP, stop_price="9", limit_price="10")

    def test_correlation_id_is_the_intent_id(self) -> None:
        """An intent's correlation id is its own id."""
        value = intent(id="intent-7")
        assert value.correlation_id == "intent-7"

    def test_empty_source_refused(self) -> None:
        """Every intent says where it came from."""
        with pytest.raises(ValidationError, match="source"):
            intent(source="")


class TestOrder:
    def test_limit_order_needs_limit_price(self) -> None:
        """An approved limit order without limit_price is refused."""
        with pytest.raises(ValidationError, match="limit order needs limit_price"):
            order(order_type="limit")

    @pytest.mark.parametrize("number", ["0", "-3", "NaN"])
    def test_quantity_positive_and_finite(self, number: str) -> None:
        """An order's quantity must be a positive finite number."""
        with pytest.raises(ValidationError, match="quantity"):
            order(quantity=Decimal(number))

    def test_client_order_id_length(self) -> None:
        """client_order_id is non-empty and at most 128 characters (Alpaca's limit)."""
        assert order(client_order_id="c" * 128)
        for bad in ("", "c" * 129):
            with pytest.raises(ValidationError, match="client_order_id"):
                order(client_order_id=bad)

    def test_correlation_id_is_the_intent_id(self) -> None:
        """An order correlates with the intent it came from."""
        assert order().correlation_id == "i-1"


class TestOrderEvent:
    def test_fill_validated(self) -> None:
        """A fill with a negative fee or a naive time is refused inside an order event."""
        with pytest.raises(ValidationError, match="fee"):
            Fill(fill_id="f", quantity="1", price="10", fee="-0.01", time=T0)
        with pytest.raises(ValidationError, match="naive"):
            Fill(fill_id="f", quantity="1", price="10", time=datetime(2026, 1, 2))  # noqa: DTZ001

    def test_unknown_status_refused(self) -> None:
        """A status outside our state set is refused."""
        with pytest.raises(ValidationError, match="status"):
            OrderEvent(time=T0, client_order_id="c", symbol="AAPL", side=Side.BUY, status="done")

    def test_correlation_id_is_the_client_order_id(self) -> None:
        """An order event correlates by client order id."""
        event = OrderEvent(time=T0, client_order_id="c-9", symbol="AAPL", side=Side.BUY,
                           status=OrderStatus.NEW)
        assert event.correlation_id == "c-9"

    @pytest.mark.parametrize("status", list(OrderStatus))
    def test_terminal_states(self, status: OrderStatus) -> None:
        """Filled, canceled, expired, rejected and replaced are terminal; the rest are not."""
        terminal = {"filled", "canceled", "expired", "rejected", "replaced"}
        assert status.is_terminal == (status.value in terminal)


class TestLogFields:
    def test_order_fields_for_log(self) -> None:
        """An order's log fields carry its type, id, intent id, client order id and symbol."""
        value = order(id="m-1")
        assert model_fields_for_log(value) == {"message_type": "order", "message_id": "m-1",
                                               "intent_id": "i-1", "client_order_id": "c-1", "symbol": "AAPL"}

    def test_intent_fields_for_log_use_its_own_id(self) -> None:
        """An intent's intent_id in log fields is its own id."""
        assert model_fields_for_log(intent(id="i-9"))["intent_id"] == "i-9"

    def test_alert_has_no_symbol(self) -> None:
        """An alert carries no symbol and no correlation id."""
        alert = Alert(time=T0, severity=AlertSeverity.INFO, source="monitor", kind="k", text="t")
        assert alert.symbol_field is None and alert.correlation_id is None
        assert set(model_fields_for_log(alert)) == {"message_type", "message_id"}
