"""alpaca-py's own TradingClient and TradingStream against the paper exchange as an OS process."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, OrderStatus, TimeInForce
from alpaca.trading.requests import (
    LimitOrderRequest,
    MarketOrderRequest,
    StopLimitOrderRequest,
    StopLossRequest,
    StopOrderRequest,
    TakeProfitRequest,
)
from alpaca.trading.stream import TradingStream
from websockets.sync.client import connect

from shared.clock import LiveClock
from shared.heartbeat import Heartbeat
from shared.keys import BARS, Keys
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.paper import KEY_ID, SECRET, PaperExchange, running_exchange
from tests.support.processes import free_port, spawn, wait_for

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def client(exchange: PaperExchange) -> TradingClient:
    """alpaca-py's TradingClient pointed at the exchange (parsing into alpaca-py's models)."""
    return TradingClient(KEY_ID, SECRET, url_override=exchange.url)


def _status(client: TradingClient, cid: str) -> Any:
    return client.get_order_by_client_id(cid).status  # type: ignore[union-attr]


class TestOrders:
    def test_every_order_type_fills_by_its_rule(self, exchange: PaperExchange, client: TradingClient) -> None:
        """Market, limit, stop and stop-limit orders fill on later bars at the prices their rules give."""
        day = TimeInForce.DAY
        client.submit_order(MarketOrderRequest(symbol="AAPL", qty=10, side=OrderSide.BUY, time_in_force=day,
                                               client_order_id="mkt"))
        client.submit_order(LimitOrderRequest(symbol="AAPL", qty=5, side=OrderSide.BUY, time_in_force=day,
                                              limit_price=99.5, client_order_id="lmt"))
        client.submit_order(StopOrderRequest(symbol="AAPL", qty=3, side=OrderSide.BUY, time_in_force=day,
                                             stop_price=102, client_order_id="stp"))
        client.submit_order(StopLimitOrderRequest(symbol="AAPL", qty=2, side=OrderSide.BUY,
                                                  time_in_force=TimeInForce.GTC, stop_price=100.5,
                                                  limit_price=101, client_order_id="stl"))
        exchange.bar("AAPL", "100", "101", "99", "100.5")
        wait_for(lambda: _status(client, "stl") == OrderStatus.FILLED, message="first bar's fills")
        fills = {cid: client.get_order_by_client_id(cid) for cid in ("mkt", "lmt", "stl", "stp")}
        assert fills["mkt"].filled_avg_price == "100"  # type: ignore[union-attr]
        assert fills["lmt"].filled_avg_price == "99.5"  # type: ignore[union-attr]
        assert fills["stl"].filled_avg_price == "100.5"  # type: ignore[union-attr]
        assert fills["stp"].status == OrderStatus.NEW  # type: ignore[union-attr]
        exchange.bar("AAPL", "101", "103", "100.8", "102.5")
        wait_for(lambda: _status(client, "stp") == OrderStatus.FILLED, message="the stop to trigger")
        assert client.get_order_by_client_id("stp").filled_avg_price == "102"  # type: ignore[union-attr]

    def test_bracket_exit_fills_and_cancels_its_sibling(self, exchange: PaperExchange,
                                                        client: TradingClient) -> None:
        """A bracket's legs wait for the entry, then the take-profit fills and the stop-loss is canceled."""
        parent = client.submit_order(MarketOrderRequest(
            symbol="MSFT", qty=5, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, order_class="bracket",
            take_profit=TakeProfitRequest(limit_price=110), stop_loss=StopLossRequest(stop_price=90),
            client_order_id="brk"))
        legs = parent.legs or []  # type: ignore[union-attr]
        assert [leg.status for leg in legs] == [OrderStatus.HELD, OrderStatus.HELD]
        exchange.bar("MSFT", "100", "101", "99", "100")
        wait_for(lambda: _status(client, "brk") == OrderStatus.FILLED, message="the entry to fill")
        legs = client.get_order_by_client_id("brk").legs or []  # type: ignore[union-attr]
        assert [leg.status for leg in legs] == [OrderStatus.NEW, OrderStatus.NEW]
        exchange.bar("MSFT", "105", "111", "104", "110")

        def exits() -> list[Any] | None:
            found = client.get_order_by_client_id("brk").legs or []  # type: ignore[union-attr]
            done = {leg.status for leg in found} == {OrderStatus.FILLED, OrderStatus.CANCELED}
            return found if done else None

        take_profit, stop_loss = wait_for(exits, message="the take-profit to fill")
        assert (take_profit.type, take_profit.status, take_profit.filled_avg_price) == (
            "limit", "filled", "110")
        assert stop_loss.status == OrderStatus.CANCELED
        assert client.get_all_positions() == []

    def test_cancel_then_cancel_again_is_refused(self, client: TradingClient) -> None:
        """An open order cancels (204) and a second cancel answers 422."""
        order = client.submit_order(LimitOrderRequest(symbol="AAPL", qty=1, side=OrderSide.BUY,
                                                      time_in_force=TimeInForce.GTC, limit_price=1))
        client.cancel_order_by_id(order.id)  # type: ignore[union-attr]
        assert client.get_order_by_id(order.id).status == OrderStatus.CANCELED  # type: ignore[union-attr]
        with pytest.raises(APIError) as refused:
            client.cancel_order_by_id(order.id)  # type: ignore[union-attr]
        assert refused.value.status_code == 422

    def test_client_order_id_reuse_is_refused(self, client: TradingClient) -> None:
        """A second order with a used client_order_id gets 422 and is not placed."""
        request = MarketOrderRequest(symbol="AAPL", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY,
                                     client_order_id="once")
        client.submit_order(request)
        with pytest.raises(APIError) as refused:
            client.submit_order(request)
        assert refused.value.status_code == 422
        assert "client_order_id must be unique" in refused.value.message
        assert len(client.get_orders()) == 1  # type: ignore[arg-type]

    def test_positions_and_account_follow_fills(self, exchange: PaperExchange, client: TradingClient) -> None:
        """After buying 10 at 100 and selling 4 at 110, the position is 6 at 100 and cash is exact."""
        client.submit_order(MarketOrderRequest(symbol="SPY", qty=10, side=OrderSide.BUY,
                                               time_in_force=TimeInForce.DAY, client_order_id="b"))
        exchange.bar("SPY", "100", "100", "100", "100")
        wait_for(lambda: _status(client, "b") == OrderStatus.FILLED, message="the buy")
        client.submit_order(MarketOrderRequest(symbol="SPY", qty=4, side=OrderSide.SELL,
                                               time_in_force=TimeInForce.DAY, client_order_id="s"))
        exchange.bar("SPY", "110", "110", "110", "110")
        wait_for(lambda: _status(client, "s") == OrderStatus.FILLED, message="the sell")
        position = client.get_open_position("SPY")
        held = (position.qty, position.avg_entry_price, position.market_value)  # type: ignore[union-attr]
        assert held == ("6", "100", "660")
        account = client.get_account()
        assert (account.cash, account.equity) == ("99440", "100100")  # type: ignore[union-attr]

    def test_clock_and_assets_parse(self, client: TradingClient) -> None:
        """The clock and asset endpoints answer in shapes alpaca-py accepts."""
        assert client.get_clock().is_open is True  # type: ignore[union-attr]
        assert client.get_asset("AAPL").symbol == "AAPL"  # type: ignore[union-attr]
        assert isinstance(client.get_all_assets(), list)

    def test_wrong_keys_are_refused(self, exchange: PaperExchange) -> None:
        """A client with the wrong secret gets 401."""
        with pytest.raises(APIError) as refused:
            TradingClient(KEY_ID, "wrong", url_override=exchange.url).get_account()
        assert refused.value.status_code == 401


class TestTradeUpdates:
    def test_trade_stream_receives_updates_in_order(self, exchange: PaperExchange,
                                                     client: TradingClient) -> None:
        """TradingStream authenticates, listens, and receives new, partial_fill and fill in that order."""
        received: list[tuple[str, str | None]] = []
        stream = TradingStream(KEY_ID, SECRET, url_override=exchange.stream_url)

        async def on_update(update: Any) -> None:
            received.append((str(update.event.value if hasattr(update.event, "value") else update.event),
                             str(update.qty) if update.qty is not None else None))

        stream.subscribe_trade_updates(on_update)
        thread = threading.Thread(target=stream.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: exchange.get("/_paper/health")["listeners"] == 1, message="the stream to listen")
            client.submit_order(MarketOrderRequest(symbol="AAPL", qty=10, side=OrderSide.BUY,
                                                   time_in_force=TimeInForce.DAY))
            exchange.bar("AAPL", "100", "100", "100", "100", volume="6")
            exchange.bar("AAPL", "100", "100", "100", "100", volume="6")
            wait_for(lambda: len(received) == 3, message="three updates")
            assert received == [("new", None), ("partial_fill", "6.0"), ("fill", "4.0")]
        finally:
            assert stream._loop is not None
            asyncio.run_coroutine_threadsafe(stream.stop_ws(), stream._loop).result(5)
            asyncio.run_coroutine_threadsafe(stream.close(), stream._loop).result(5)
            thread.join(10)

    def test_stream_refuses_wrong_keys(self, exchange: PaperExchange) -> None:
        """A bad authenticate is answered "unauthorized" and no listener is registered."""
        with connect(exchange.stream_url) as ws:
            ws.send(json.dumps({"action": "authenticate", "data": {"key_id": KEY_ID, "secret_key": "no"}}))
            reply = json.loads(ws.recv(timeout=5))
        assert reply["data"]["status"] == "unauthorized"
        assert exchange.get("/_paper/health")["listeners"] == 0


class TestProcess:
    def test_check_sees_it_and_sigterm_stops_it_cleanly(self, exchange: PaperExchange) -> None:
        """--check exits 0 while the exchange beats, and SIGTERM ends it with status 0."""
        env = {"REDIS_URL": exchange.redis_url, "BASTION_KEY_PREFIX": exchange.keys.prefix}
        check = spawn("services.paper_exchange", "--check", env=env)
        check.communicate(timeout=60)
        assert check.returncode == 0
        assert exchange.proc is not None
        exchange.proc.send_signal(signal.SIGTERM)
        assert exchange.proc.wait(timeout=30) == 0

    def test_sigterm_keeps_serving_while_a_stream_is_connected(self, exchange: PaperExchange) -> None:
        """After SIGTERM the exchange keeps serving while a trade-update stream is connected (under
        honcho a stopping executor still needs it), and exits 0 as soon as that stream closes."""
        assert exchange.proc is not None
        log = exchange.log_dir / f"paper-exchange-{exchange.starts}.log"
        with connect(exchange.stream_url) as ws:
            ws.send(json.dumps({"action": "authenticate", "data": {"key_id": KEY_ID, "secret_key": SECRET}}))
            assert json.loads(ws.recv(timeout=5))["data"]["status"] == "authorized"
            exchange.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: b"paper_exchange.stopping" in log.read_bytes(), message="the stop to begin")
            assert exchange.get("/_paper/health")["status"] == "ok"
            assert exchange.proc.poll() is None
        assert exchange.proc.wait(timeout=30) == 0
        assert b"stopping_with_clients" not in log.read_bytes()

    def test_sigterm_with_redis_gone_still_stops_cleanly(self, tmp_path: Path) -> None:
        """With its Redis gone (no heartbeat can be read), a stopping exchange does not wait for
        other services: SIGTERM ends it with status 0."""
        server = RedisServer(free_port(), tmp_path / "redis", appendonly=False)
        server.start()
        try:
            with running_exchange(server.url, Keys("gone"), tmp_path) as exchange:
                assert exchange.proc is not None
                bars = Keys("gone").stream(BARS)
                with connect_url(server.url) as client:  # Redis goes once the bar consumer is reading
                    wait_for(lambda: client.exists(bars) and client.xinfo_consumers(bars, "paper-exchange"),
                             message="the bar consumer to read")
                server.kill()
                exchange.proc.send_signal(signal.SIGTERM)
                assert exchange.proc.wait(timeout=30) == 0
        finally:
            server.kill()

    def test_sigterm_keeps_serving_while_another_service_runs(self, exchange: PaperExchange) -> None:
        """After SIGTERM the exchange keeps serving while another service's heartbeat is alive (a
        stopping risk or rq job may still call it), and exits 0 once that service has stopped."""
        assert exchange.proc is not None
        log = exchange.log_dir / f"paper-exchange-{exchange.starts}.log"
        client = connect_url(exchange.redis_url)
        beat = Heartbeat(client, exchange.keys, "risk", "elsewhere", LiveClock(), interval_s=60, ttl_s=120)
        beat.beat()
        try:
            exchange.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: b"paper_exchange.stopping" in log.read_bytes(), message="the stop to begin")
            assert exchange.get("/_paper/health")["status"] == "ok"
            assert exchange.proc.poll() is None
            beat.stop()
            assert exchange.proc.wait(timeout=30) == 0
        finally:
            client.close()
        assert b"stopping_with_clients" not in log.read_bytes()
