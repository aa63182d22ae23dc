"""``bastion verify --broker``: our books against the embedded paper exchange's, on a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis

from services.cli._context import EXIT_FAILED, EXIT_OK
from services.cli.service import main
from shared.brokers import AlpacaBroker
from shared.clock import LiveClock
from shared.config import PortfolioSettings
from shared.keys import Keys
from shared.models import Fill, OrderStatus, Side
from shared.portfolio import Portfolio
from tests.services.cli.test_cli_verify_broker import point_cli_at
from tests.support.factories import market_request, resting_request
from tests.support.paper import PaperExchange
from tests.support.processes import wait_for


@pytest.fixture
def books(exchange: PaperExchange, client: redis.Redis, keys: Keys,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Portfolio]:
    """Our $100,000 account (as much as the exchange starts with), the CLI pointed at both."""
    point_cli_at(monkeypatch, exchange.redis_url, keys, exchange.port)
    portfolio = Portfolio(client, keys, "paper", settings=PortfolioSettings(starting_cash=Decimal(100000)))
    portfolio.open()
    yield portfolio


def filled_buy(exchange: PaperExchange, broker: AlpacaBroker, cid: str, qty: str, price: str) -> Decimal:
    """Buy ``qty`` AAPL at the exchange at market, fill it with a bar opening at ``price``; the fill price."""
    broker.submit(market_request(cid, qty))
    exchange.bar("AAPL", price, price, price, price)
    wait_for(lambda: broker.get_order(cid).status == OrderStatus.FILLED, message=f"{cid} to fill")
    average = broker.get_order(cid).filled_avg_price
    assert average is not None
    return average


@pytest.mark.multiprocess
class TestVerifyBroker:
    def test_books_that_agree_exit_0(self, exchange: PaperExchange, books: Portfolio, client: redis.Redis,
                                     keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
        """A filled buy booked on both sides and a resting order both know of: the books agree, exit 0."""
        broker = exchange.broker()
        price = filled_buy(exchange, broker, "bst-a1", "10", "150")
        books.reserve("bst-a1", "AAPL", Side.BUY, Decimal(10), price)
        books.apply_fill("bst-a1", Fill(fill_id="bst-a1:1", quantity=Decimal(10), price=price,
                                        time=LiveClock().now()))
        broker.submit(resting_request("bst-r1"))
        client.hset(keys.order("bst-r1"), mapping={"status": "new", "symbol": "AAPL", "side": "buy",
                                                   "quantity": "1", "applied_qty": "0", "applied_cost": "0"})
        client.sadd(keys.open_orders, "bst-r1")
        assert main(["verify", "--broker"]) == EXIT_OK
        out = capsys.readouterr().out
        assert "agrees with the broker (1 position(s), 0 in flight)" in out
        assert "difference" not in out

    def test_broker_position_we_do_not_hold_exits_1_naming_it(
            self, exchange: PaperExchange, books: Portfolio, capsys: pytest.CaptureFixture[str]) -> None:
        """A position bought at the broker behind our back: one line names the symbol, exit 1 (the
        JSON form lists the same differences)."""
        filled_buy(exchange, exchange.broker(), "foreign-1", "10", "150")
        assert main(["verify", "--broker"]) == EXIT_FAILED
        lines = capsys.readouterr().out.splitlines()
        [position] = [line for line in lines if line.startswith("difference: position")]
        assert "AAPL" in position and "broker 10" in position
        assert any(line.startswith("difference: cash") for line in lines)
        assert lines[-1].startswith("FAILED:")
        assert main(["verify", "--broker", "--json"]) == EXIT_FAILED
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is True  # the ledger replays; the broker part differs
        assert [(d["kind"], d["subject"]) for d in report["broker"]["differences"]] == [
            ("position", "AAPL"), ("cash", "cash")]
