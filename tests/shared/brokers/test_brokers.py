"""shared.brokers in process: building the adapter, the mapping of Alpaca's JSON and errors onto our
models, the trade-update filter and the fake broker (the adapter against the paper exchange process
is tests/system/test_broker_adapter.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import urllib3
from alpaca.common.exceptions import APIError

from shared.brokers import AlpacaBroker, BrokerCall, FakeBroker, UpdateFilter, build_broker
from shared.brokers._alpaca import _translate
from shared.brokers._mapping import status as broker_status
from shared.clock import LiveClock
from shared.config import Settings
from shared.errors import (
    AmbiguousSubmit,
    BrokerError,
    BrokerUnavailable,
    InsufficientBuyingPower,
    OrderNotFound,
    OrderRejected,
    PatternDayTrading,
)
from shared.keys import Keys
from shared.models import OrderEvent, OrderStatus, Side
from tests.support.factories import market_request


class TestBuildBroker:
    def test_paper_default_points_at_the_exchange(self) -> None:
        """kind=paper with keys builds a client for http://host:port and its /stream."""
        settings = Settings(paper_exchange={"port": 9999, "api_key": "k", "secret_key": "s"})
        broker = build_broker(settings)
        assert broker._client._base_url == "http://127.0.0.1:9999"
        assert broker._stream_args["url"] == "ws://127.0.0.1:9999/stream"

    def test_alpaca_live_url_without_live_flag_is_refused(self) -> None:
        """Pointing at Alpaca's live host needs broker.live: a ConfigError names the field."""
        from shared.errors import ConfigError

        settings = Settings(broker={"kind": "alpaca", "api_key": "k", "secret_key": "s",
                                    "base_url": "https://api.alpaca.markets"})
        with pytest.raises(ConfigError, match=r"broker\.base_url"):
            build_broker(settings)

    def test_paper_keys_come_from_redis_when_generated(self) -> None:
        """With no keys configured, the pair the exchange stored in Redis is used."""
        import fakeredis

        client = fakeredis.FakeRedis()
        client.hset(Keys().paper("credentials"), mapping={"key_id": "gen", "secret_key": "sec"})
        broker = build_broker(Settings(), client=client)
        assert broker._stream_args["api_key"] == "gen"

    def test_client_has_retries_off_and_a_timeout(self) -> None:
        """alpaca-py's own 429/504 retry loop is off on the adapter's client (these internals exist),
        and its connection pool neither retries nor redirects and times out every request."""
        client = build_broker(Settings(paper_exchange={"api_key": "k", "secret_key": "s"}))._client
        assert (client._retry, client._retry_codes) == (0, [])
        options = client._pool.connection_pool_kw
        assert options["retries"].total is False
        assert (options["timeout"].connect_timeout, options["timeout"].read_timeout) == (10.0, 10.0)

    def test_environment_proxy_is_read_once_at_construction(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A proxy in the environment still applies, read once for the broker's host (not per request)."""
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        pool = build_broker(Settings(paper_exchange={"api_key": "k", "secret_key": "s"}))._client._pool
        assert isinstance(pool, urllib3.ProxyManager)
        assert pool.proxy is not None and pool.proxy.url == "http://proxy.example:3128"
        monkeypatch.delenv("HTTP_PROXY")
        pool = build_broker(Settings(paper_exchange={"api_key": "k", "secret_key": "s"}))._client._pool
        assert not isinstance(pool, urllib3.ProxyManager)

    def test_a_reply_that_is_not_json_is_a_broken_reply(self) -> None:
        """A 200 whose body is not JSON: a read is retried and then BrokerUnavailable; a submit is
        ambiguous (it may have been placed) and, not found by look-up, AmbiguousSubmit."""
        class Garbage(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._reply()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self._reply()

            def _reply(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "11")
                self.end_headers()
                self.wfile.write(b"<html>oops!")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            settings = Settings().broker.model_copy(update={"read_retries": 1, "resolve_attempts": 1})
            broker = AlpacaBroker(settings, api_key="k", secret_key="s", stream_url=None,
                                  base_url=f"http://127.0.0.1:{server.server_port}")
            with pytest.raises(BrokerUnavailable, match="not JSON"):
                broker.account()
            with pytest.raises(AmbiguousSubmit, match="not JSON"):
                broker.submit(market_request("garbage", "1"))
        finally:
            server.shutdown()
            server.server_close()


class TestUpdateFilter:
    @staticmethod
    def update(event: str, filled: str, execution: str | None = None,
               qty: str | None = None) -> dict[str, Any]:
        status = {"new": "new", "partial_fill": "partially_filled", "fill": "filled"}[event]
        return {"event": event, "timestamp": "2026-01-02T15:00:00.000001Z", "execution_id": execution,
                "qty": qty, "price": "10.01" if qty else None,
                "order": {"id": "o", "client_order_id": "c", "symbol": "AAPL", "side": "buy",
                          "status": status,
                          "filled_qty": filled, "filled_avg_price": "10.01" if filled != "0" else None}}

    def test_repeats_are_dropped(self) -> None:
        """The same execution twice yields one event."""
        f = UpdateFilter()
        assert f.accept(self.update("fill", "5", "x1", "5")) is not None
        assert f.accept(self.update("fill", "5", "x1", "5")) is None

    def test_late_partial_fill_keeps_its_fill_but_not_its_status(self) -> None:
        """A partial fill arriving after the fill passes its fill, stamped FILLED with the full quantity."""
        f = UpdateFilter()
        done = f.accept(self.update("fill", "5", "x2", "3"))
        late = f.accept(self.update("partial_fill", "2", "x1", "2"))
        assert done is not None and late is not None and late.fill is not None
        assert (late.status, late.filled_quantity, late.fill.quantity) == (OrderStatus.FILLED, 5, 2)
        assert f.accept(self.update("new", "0")) is None

    def test_event_ids_are_stable(self) -> None:
        """The same update yields the same message id in two filters (downstream dedupes on it)."""
        one = UpdateFilter().accept(self.update("fill", "5", "x1", "5"))
        two = UpdateFilter().accept(self.update("fill", "5", "x1", "5"))
        assert one is not None and two is not None and one.id == two.id


class TestFakeBroker:
    def test_calls_go_to_the_handler_and_events_to_subscribers(self) -> None:
        """Calls reach the function, its errors propagate, and emitted events reach subscribers."""
        def handler(call: BrokerCall) -> Any:
            if call.method == "submit":
                raise InsufficientBuyingPower("no cash", client_order_id=call.args[0].client_order_id)
            return []

        fake = FakeBroker(handler)
        updates = fake.trade_updates()
        assert fake.positions() == []
        with pytest.raises(InsufficientBuyingPower):
            fake.submit(market_request("x"))
        event = OrderEvent(time=LiveClock().now(), client_order_id="x", symbol="AAPL", side=Side.BUY,
                           status=OrderStatus.NEW)
        fake.emit(event)
        assert updates.get(timeout=1) == event
        assert [c.method for c in fake.calls] == ["positions", "submit"]


def _api_error(status: int, message: str) -> APIError:
    response = requests.Response()
    response.status_code = status
    body = json.dumps({"code": status * 100000, "message": message})
    response._content = body.encode()
    return APIError(body, requests.HTTPError(response=response))


class TestErrorTranslation:
    @pytest.mark.parametrize(("status", "message", "expected"), [
        (403, "trade denied due to pattern day trading protection", PatternDayTrading),
        (403, "insufficient buying power", InsufficientBuyingPower),
        (403, "insufficient qty available for order", OrderRejected),
        (422, "qty must be > 0", OrderRejected),
        (404, "order not found", OrderNotFound),
        (500, "internal error", BrokerUnavailable),
        (401, "request is not authorized", BrokerError),
    ])
    def test_alpaca_errors_become_typed_errors(self, status: int, message: str, expected: type) -> None:
        """Each Alpaca status/message maps to its Bastion error, keeping the broker's words."""
        error = _translate("submit", status, _api_error(status, message), "cid-1")
        assert type(error) is expected
        assert error.client_order_id == "cid-1"
        if isinstance(error, OrderRejected):
            assert message in error.reason

    @pytest.mark.parametrize(("word", "status"), [
        ("accepted", OrderStatus.NEW), ("held", OrderStatus.NEW), ("done_for_day", OrderStatus.NEW),
        ("partial_fill", OrderStatus.PARTIALLY_FILLED), ("fill", OrderStatus.FILLED),
        ("pending_cancel", OrderStatus.PENDING_CANCEL), ("replaced", OrderStatus.REPLACED),
        ("expired", OrderStatus.EXPIRED), ("something_new", OrderStatus.UNKNOWN),
    ])
    def test_statuses_map(self, word: str, status: OrderStatus) -> None:
        """Alpaca's order statuses and trade-update events map onto OrderStatus."""
        assert broker_status(word) == status
