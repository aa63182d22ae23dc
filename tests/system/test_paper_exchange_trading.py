"""alpaca-py's TradingClient against the paper exchange: Alpaca's error shape on every route,
replacing orders, closing positions, the asset list and the buying-power rule."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import fakeredis
import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, OrderStatus, TimeInForce
from alpaca.trading.models import FailedClosePositionDetails, Order
from alpaca.trading.requests import (
    ClosePositionRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    ReplaceOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)
from structlog.testing import capture_logs

from services.paper_exchange import Exchange, Faults
from services.paper_exchange._server import Server
from shared.clock import LiveClock
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from shared.redis.connection import connect_url
from tests.conftest import delete_keys
from tests.support.paper import KEY_ID, SECRET, PaperExchange, running_exchange
from tests.support.processes import free_port, wait_for

pytestmark = pytest.mark.multiprocess

DAY, GTC = TimeInForce.DAY, TimeInForce.GTC


@pytest.fixture
def client(exchange: PaperExchange) -> TradingClient:
    """alpaca-py's TradingClient pointed at the exchange."""
    return TradingClient(KEY_ID, SECRET, url_override=exchange.url)


@contextmanager
def configured(server_url: str, keys: Keys, tmp_path: Path, **env: str) -> Iterator[tuple[PaperExchange,
                                                                                          TradingClient]]:
    """An exchange process started with extra ``BASTION_PAPER_EXCHANGE__*`` settings, and its client."""
    settings = {f"BASTION_PAPER_EXCHANGE__{name.upper()}": value for name, value in env.items()}
    try:
        with running_exchange(server_url, keys, tmp_path, **settings) as exchange:
            yield exchange, TradingClient(KEY_ID, SECRET, url_override=exchange.url)
    finally:
        delete_keys(server_url, keys)


def order_of(client: TradingClient, order_id: Any) -> Order:
    found = client.get_order_by_id(order_id)
    assert isinstance(found, Order)
    return found


def refused(call: Any, *args: Any) -> APIError:
    """The APIError ``call(*args)`` raises (its body parsed as Alpaca's error shape)."""
    with pytest.raises(APIError) as caught:
        call(*args)
    error = caught.value
    assert isinstance(error.code, int) and isinstance(error.message, str)
    return error


def buy(client: TradingClient, symbol: str, qty: float, **extra: Any) -> Order:
    placed = client.submit_order(MarketOrderRequest(symbol=symbol, qty=qty, side=OrderSide.BUY,
                                                    time_in_force=GTC, **extra))
    assert isinstance(placed, Order)
    return placed


def filled(client: TradingClient, order: Order) -> Order:
    return wait_for(lambda: (o := order_of(client, order.id)).status == OrderStatus.FILLED and o,
                    message=f"order {order.client_order_id} to fill")


def positions(client: TradingClient) -> dict[str, str]:
    return {p.symbol: p.qty for p in client.get_all_positions()}  # type: ignore[union-attr]


class TestErrorShape:
    def test_unknown_path_and_wrong_method_answer_alpacas_json(self, client: TradingClient) -> None:
        """An unknown path is 404 and a method the route lacks is 405 (with Allow), both as
        {"code", "message"}; an unimplemented Alpaca endpoint says so (501)."""
        missing = refused(client.get, "/watchlists")
        assert (missing.status_code, missing.code) == (404, 40400000)
        assert "not found" in missing.message and "/v2/watchlists" in missing.message
        wrong = refused(client.patch, "/account", {"x": 1})
        assert (wrong.status_code, wrong.code) == (405, 40500000)
        assert wrong.response is not None and "GET" in wrong.response.headers["Allow"]
        history = refused(client.get_portfolio_history)
        assert history.status_code == 501 and "not supported" in history.message

    def test_unauthenticated_unknown_path_is_401_json(self, exchange: PaperExchange) -> None:
        """Wrong keys get 401 in the JSON shape on any path, implemented or not."""
        stranger = TradingClient(KEY_ID, "wrong", url_override=exchange.url)
        assert refused(stranger.get, "/nothing-here").status_code == 401

    def test_a_fault_rule_names_a_new_route(self, exchange: PaperExchange, client: TradingClient) -> None:
        """A fault plan reaches the new routes by their "<METHOD> <route>" names (here a 503 on
        closing a position, which then changes nothing)."""
        held = buy(client, "AAPL", 2)
        exchange.bar("AAPL", "10", "10", "10", "10")
        filled(client, held)
        exchange.set_faults({"endpoint": "DELETE /v2/positions/{symbol_or_asset_id}", "kind": "status",
                             "status": 503, "count": 1})
        error = refused(client.close_position, "AAPL")
        assert (error.status_code, error.message) == (503, "injected fault: HTTP 503")
        assert positions(client) == {"AAPL": "2"}
        assert [o.client_order_id for o in client.get_orders()] == []  # type: ignore[union-attr]

    def test_an_unexpected_failure_is_500_json_and_logged(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A handler that raises answers 500 in the JSON shape and logs the failure with its traceback."""
        redis_client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        book = Exchange(redis_client, Keys("t"), PaperExchangeSettings(), LiveClock())

        def broken() -> dict[str, Any]:
            raise RuntimeError("book on fire")

        monkeypatch.setattr(book, "account", broken)
        with serving(book) as url, capture_logs() as logs:
            error = refused(TradingClient(KEY_ID, SECRET, url_override=url).get_account)
        assert (error.status_code, error.code) == (500, 50000000)
        failed = [e for e in logs if e["event"] == "http.failed"]
        assert failed and failed[0]["endpoint"] == "GET /v2/account" and failed[0]["exc_info"]


@contextmanager
def serving(book: Exchange) -> Iterator[str]:
    """The HTTP server over ``book`` on a loop in a thread, in this process; yields its URL."""
    port = free_port()
    server = Server(book, key_id=KEY_ID, secret_key=SECRET, faults=Faults(), clock=LiveClock(),
                    host="127.0.0.1", port=port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class TestReplace:
    def test_replace_makes_a_new_order_and_marks_the_old_replaced(self, exchange: PaperExchange,
                                                                  client: TradingClient) -> None:
        """The new order carries replaces, the changed fields and a new id; the old one is replaced
        with replaced_by set, and only the new one fills."""
        old = client.submit_order(LimitOrderRequest(symbol="AAPL", qty=1, side=OrderSide.BUY, limit_price=50,
                                                    time_in_force=DAY, client_order_id="first"))
        assert isinstance(old, Order)
        changes = ReplaceOrderRequest(qty=3, limit_price=101, time_in_force=GTC, client_order_id="second")
        new = client.replace_order_by_id(old.id, changes)
        assert isinstance(new, Order)
        assert (new.replaces, new.status, new.qty, new.limit_price) == (old.id, OrderStatus.NEW, "3", "101")
        assert (new.time_in_force, new.client_order_id) == (GTC, "second")
        assert new.id != old.id
        before = order_of(client, old.id)
        assert (before.status, before.replaced_by) == (OrderStatus.REPLACED, new.id)
        assert before.replaced_at is not None
        exchange.bar("AAPL", "100", "100", "100", "100")
        assert filled(client, new).filled_avg_price == "100"
        assert order_of(client, old.id).filled_qty == "0"
        assert [o.id for o in client.get_orders()] == []  # type: ignore[union-attr]

    def test_only_open_orders_can_be_replaced(self, exchange: PaperExchange, client: TradingClient) -> None:
        """A filled or replaced order answers 422, an unknown one 404, a used client_order_id 422."""
        done = buy(client, "AAPL", 1)
        exchange.bar("AAPL", "10", "10", "10", "10")
        filled(client, done)
        assert refused(client.replace_order_by_id, done.id, ReplaceOrderRequest(qty=2)).status_code == 422
        resting = client.submit_order(LimitOrderRequest(symbol="AAPL", qty=1, side=OrderSide.BUY,
                                                        time_in_force=GTC, limit_price=1))
        assert isinstance(resting, Order)
        client.replace_order_by_id(resting.id, ReplaceOrderRequest(limit_price=2))
        again = refused(client.replace_order_by_id, resting.id, ReplaceOrderRequest(limit_price=3))
        assert again.status_code == 422 and "replaced" in again.message
        unknown = UUID("00000000-0000-4000-8000-000000000000")
        assert refused(client.replace_order_by_id, unknown, ReplaceOrderRequest(qty=1)).status_code == 404
        reused = refused(client.replace_order_by_id, order_of(client, resting.id).replaced_by,
                         ReplaceOrderRequest(client_order_id=done.client_order_id))
        assert reused.status_code == 422 and "client_order_id must be unique" in reused.message

    def test_replace_is_checked_without_the_old_orders_reservation(self, client: TradingClient) -> None:
        """Raising a 50k buy to 90k fits 100k of cash (the old reservation is released); 150k does not."""
        old = client.submit_order(LimitOrderRequest(symbol="MSFT", qty=500, side=OrderSide.BUY,
                                                    time_in_force=GTC, limit_price=100))
        assert isinstance(old, Order)
        too_big = refused(client.replace_order_by_id, old.id, ReplaceOrderRequest(qty=1500))
        assert too_big.status_code == 403 and "insufficient buying power" in too_big.message
        assert order_of(client, old.id).status == OrderStatus.NEW  # a refused replace changes nothing
        bigger = client.replace_order_by_id(old.id, ReplaceOrderRequest(qty=900))
        assert isinstance(bigger, Order) and bigger.qty == "900"

    def test_a_replaced_stop_loss_keeps_its_place_in_the_bracket(self, exchange: PaperExchange,
                                                                 client: TradingClient) -> None:
        """The stop-loss leg moved up is still the take-profit's OCO sibling: the take-profit fills and
        the new stop-loss is canceled."""
        entry = buy(client, "MSFT", 5, order_class="bracket", take_profit=TakeProfitRequest(limit_price=110),
                    stop_loss=StopLossRequest(stop_price=90))
        exchange.bar("MSFT", "100", "100", "100", "100")
        take_profit, stop_loss = filled(client, entry).legs or []
        moved = client.replace_order_by_id(stop_loss.id, ReplaceOrderRequest(stop_price=95))
        assert isinstance(moved, Order) and moved.stop_price == "95"
        assert [leg.id for leg in order_of(client, entry.id).legs or []] == [take_profit.id, moved.id]
        exchange.bar("MSFT", "105", "111", "104", "110")
        wait_for(lambda: order_of(client, moved.id).status == OrderStatus.CANCELED, message="the OCO cancel")
        assert order_of(client, take_profit.id).status == OrderStatus.FILLED
        assert positions(client) == {}


class TestClosePositions:
    def test_close_by_qty_percentage_and_asset_id(self, exchange: PaperExchange,
                                                  client: TradingClient) -> None:
        """close_position sells qty, then a percentage (whole shares), then the rest by asset id."""
        opening = buy(client, "SPY", 10)
        exchange.bar("SPY", "10", "10", "10", "10")
        filled(client, opening)
        closing = client.close_position("SPY", ClosePositionRequest(qty="4"))
        assert isinstance(closing, Order)
        assert (closing.side, closing.type, closing.qty, closing.time_in_force) == (
            OrderSide.SELL, "market", "4", DAY)
        exchange.bar("SPY", "11", "11", "11", "11")
        filled(client, closing)
        half = client.close_position("SPY", ClosePositionRequest(percentage="55"))
        assert isinstance(half, Order) and half.qty == "3"  # 55% of 6 is 3.3: whole shares
        exchange.bar("SPY", "11", "11", "11", "11")
        filled(client, half)
        asset_id = client.get_open_position("SPY").asset_id  # type: ignore[union-attr]
        rest = client.close_position(asset_id)
        assert isinstance(rest, Order) and rest.qty == "3"
        exchange.bar("SPY", "12", "12", "12", "12")
        filled(client, rest)
        assert positions(client) == {}
        assert client.get_account().cash == str(100000 - 100 + 44 + 33 + 36)  # type: ignore[union-attr]

    def test_close_is_refused_beyond_the_free_shares(self, exchange: PaperExchange,
                                                     client: TradingClient) -> None:
        """No position is 404; more than held, or shares held for an open sell, is 403 (never a short)."""
        assert refused(client.close_position, "AAPL").status_code == 404
        opening = buy(client, "AAPL", 5)
        exchange.bar("AAPL", "10", "10", "10", "10")
        filled(client, opening)
        beyond = refused(client.close_position, "AAPL", ClosePositionRequest(qty="6"))
        assert beyond.status_code == 403 and "available: 5" in beyond.message
        client.submit_order(LimitOrderRequest(symbol="AAPL", qty=4, side=OrderSide.SELL, time_in_force=GTC,
                                              limit_price=1000))
        held = refused(client.close_position, "AAPL")
        assert held.status_code == 403 and "(requested: 5, available: 1)" in held.message

    def test_close_all_reports_each_position(self, exchange: PaperExchange, client: TradingClient) -> None:
        """Without cancel_orders a position held for an open order is reported refused and the other is
        closed; with cancel_orders the open order is canceled and every position gets a closing order."""
        first, second = buy(client, "AAPL", 3), buy(client, "MSFT", 2)
        exchange.bar("AAPL", "10", "10", "10", "10")
        exchange.bar("MSFT", "20", "20", "20", "20")
        filled(client, first)
        filled(client, second)
        resting = client.submit_order(LimitOrderRequest(symbol="AAPL", qty=3, side=OrderSide.SELL,
                                                        time_in_force=GTC, limit_price=1000))
        assert isinstance(resting, Order)
        results = {r.symbol: r for r in client.close_all_positions()}  # type: ignore[union-attr]
        assert (results["AAPL"].status, results["MSFT"].status) == (403, 200)
        failure = results["AAPL"].body
        assert isinstance(failure, FailedClosePositionDetails)
        assert (failure.available, failure.existing_qty, failure.held_for_orders) == (0, 3, 3)
        assert isinstance(results["MSFT"].body, Order) and results["MSFT"].body.qty == "2"
        closed = {r.symbol: r for r in client.close_all_positions(cancel_orders=True)}  # type: ignore[union-attr]
        assert closed["AAPL"].status == 200 and isinstance(closed["AAPL"].body, Order)
        assert order_of(client, resting.id).status == OrderStatus.CANCELED
        exchange.bar("AAPL", "11", "11", "11", "11")
        exchange.bar("MSFT", "21", "21", "21", "21")
        wait_for(lambda: positions(client) == {}, message="both positions closed")


class TestAssets:
    def test_assets_are_configured_or_seen(self, server_url: str, keys: Keys, tmp_path: Path) -> None:
        """The ingester's symbols and paper_exchange.symbols are listed; an unknown symbol is 404 and
        its order 422 until a bar for it is seen; an asset is found by its id too."""
        with configured(server_url, keys, tmp_path, symbols='["ZZZ"]') as (exchange, client):
            listed = {a.symbol for a in client.get_all_assets()}  # type: ignore[union-attr]
            assert listed == {"AAPL", "MSFT", "SPY", "ZZZ"}
            unknown = refused(client.get_asset, "NVDA")
            assert (unknown.status_code, unknown.message) == (404, "asset not found")
            order = MarketOrderRequest(symbol="NVDA", qty=1, side=OrderSide.BUY, time_in_force=DAY)
            not_traded = refused(client.submit_order, order)
            assert not_traded.status_code == 422 and 'asset "NVDA" not found' in not_traded.message
            exchange.bar("NVDA", "100", "100", "100", "100")
            wait_for(lambda: "NVDA" in {a.symbol for a in client.get_all_assets()},  # type: ignore[union-attr]
                     message="the bar seen")
            placed = client.submit_order(order)
            assert isinstance(placed, Order)
            found = client.get_asset(placed.asset_id)
            assert found.symbol == "NVDA" and found.tradable  # type: ignore[union-attr]
            assert refused(client.get_asset, UUID(int=1)).status_code == 404


class TestBuyingPower:
    def test_an_unvalued_market_buy_is_checked_at_its_first_bar(self, exchange: PaperExchange,
                                                               client: TradingClient) -> None:
        """Before AAPL's first price a market buy of 1,000,000 is accepted unvalued, then rejected at
        the bar that prices it (nothing fills, cash untouched); a small one placed with it fills."""
        huge = buy(client, "AAPL", 1_000_000, client_order_id="huge")
        small = buy(client, "AAPL", 10, client_order_id="small")
        assert huge.status == OrderStatus.NEW
        exchange.bar("AAPL", "453", "453", "453", "453", volume="2000000")
        filled(client, small)
        rejected = wait_for(lambda: (o := order_of(client, huge.id)).status == OrderStatus.REJECTED and o,
                            message="the rejection")
        assert (rejected.filled_qty, rejected.failed_at is not None) == ("0", True)
        assert positions(client) == {"AAPL": "10"}
        assert client.get_account().cash == "95470"  # type: ignore[union-attr]

    def test_refuse_mode_refuses_what_it_cannot_value(self, server_url: str, keys: Keys,
                                                      tmp_path: Path) -> None:
        """With unpriced_orders=refuse a market buy before the first price is refused (403); a limit
        is valued at its limit; after a bar, market buys are valued at the last close."""
        with configured(server_url, keys, tmp_path, unpriced_orders="refuse") as (exchange, client):
            early = refused(buy, client, "AAPL", 1)
            assert early.status_code == 403 and "cannot be valued" in early.message
            limit = LimitOrderRequest(symbol="AAPL", qty=2000, side=OrderSide.BUY, time_in_force=GTC,
                                      limit_price=100)
            assert "insufficient buying power" in refused(client.submit_order, limit).message
            exchange.bar("AAPL", "100", "100", "100", "100")  # its close is the ingester's last price
            assert buy(client, "AAPL", 999).status == OrderStatus.NEW
            late = refused(buy, client, "AAPL", 1000)  # 99,900 of 100,000 reserved: 1000 more do not fit
            assert late.status_code == 403 and "needed: 100000" in late.message

    def test_the_ingesters_last_price_values_a_market_order(self, exchange: PaperExchange,
                                                            client: TradingClient) -> None:
        """A bar the ingester published but the exchange has not consumed yet still values an order:
        the ingester's last price (written with the bar) is the fallback."""
        with connect_url(exchange.redis_url) as redis_client:
            redis_client.hset(exchange.keys.last_price, "QQQ", "500")
        too_big = refused(buy, client, "QQQ", 201)
        assert too_big.status_code == 403 and "needed: 100500" in too_big.message
        assert buy(client, "QQQ", 200).status == OrderStatus.NEW

    def test_short_sales_need_buying_power(self, server_url: str, keys: Keys, tmp_path: Path) -> None:
        """With allow_short a sell beyond the position is a short valued like a buy, and a short ties up
        twice its value of buying power (its proceeds sit in cash)."""
        with configured(server_url, keys, tmp_path, allow_short="true") as (exchange, client):
            exchange.bar("SPY", "100", "100", "100", "100")  # its close is the ingester's last price
            short = MarketOrderRequest(symbol="SPY", qty=1001, side=OrderSide.SELL, time_in_force=GTC)
            assert "insufficient buying power" in refused(client.submit_order, short).message
            placed = client.submit_order(MarketOrderRequest(symbol="SPY", qty=400, side=OrderSide.SELL,
                                                            time_in_force=GTC))
            assert isinstance(placed, Order)
            exchange.bar("SPY", "100", "100", "100", "100")
            filled(client, placed)
            account = client.get_account()
            assert (account.cash, account.buying_power) == ("140000", "60000")  # type: ignore[union-attr]
            cover = client.submit_order(MarketOrderRequest(symbol="SPY", qty=400, side=OrderSide.BUY,
                                                           time_in_force=GTC))
            assert isinstance(cover, Order)  # covering needs shares short, not money

