"""``bastion verify --broker``: our books against the embedded paper exchange's, on a real Redis."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis

from services.cli._context import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE
from services.cli.service import main
from shared.brokers import AlpacaBroker, OrderRequest
from shared.clock import LiveClock
from shared.config import PortfolioSettings
from shared.keys import Keys
from shared.models import Fill, OrderStatus, OrderType, Side, TimeInForce
from shared.portfolio import Portfolio
from shared.redis.connection import connect_url
from tests.support.paper import KEY_ID, SECRET, PaperExchange
from tests.support.processes import free_port, wait_for


def point_cli_at(monkeypatch: pytest.MonkeyPatch, redis_url: str, keys: Keys, port: int) -> None:
    """The CLI reads this Redis under the test's prefix and the paper exchange on ``port``."""
    for name in list(os.environ):
        if name.upper().startswith("BASTION_") or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)
    env = {"REDIS_URL": redis_url, "BASTION_KEY_PREFIX": keys.prefix,
           "BASTION_PAPER_EXCHANGE__PORT": str(port), "BASTION_PAPER_EXCHANGE__API_KEY": KEY_ID,
           "BASTION_PAPER_EXCHANGE__SECRET_KEY": SECRET, "BASTION_BROKER__READ_RETRIES": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


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
    broker.submit(OrderRequest(client_order_id=cid, symbol="AAPL", side=Side.BUY, quantity=Decimal(qty)))
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
        broker.submit(OrderRequest(client_order_id="bst-r1", symbol="AAPL", side=Side.BUY,
                                   quantity=Decimal(1), order_type=OrderType.LIMIT, limit_price=Decimal(1),
                                   time_in_force=TimeInForce.GTC))
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


class TestVerifyBrokerUnreachable:
    def test_unreachable_broker_exits_3_with_the_reason(self, real_redis_url: str, keys: Keys,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening where the paper exchange should be: exit 3, the reason on stderr, no
        traceback."""
        point_cli_at(monkeypatch, real_redis_url, keys, free_port())
        client = connect_url(real_redis_url)
        try:
            Portfolio(client, keys, "paper").open()
            assert main(["verify", "--broker"]) == EXIT_UNAVAILABLE
        finally:
            for key in client.scan_iter(match=keys.pattern(), count=1000):
                client.delete(key)
            client.close()
        captured = capsys.readouterr()
        assert "broker unreachable" in captured.err and "Traceback" not in captured.err
        assert captured.out.startswith("ok: account 'paper'")


def test_money_within_tolerance_is_printed_not_failed() -> None:
    """A cash difference within ``reconciler.cash_tolerance`` (a look-up's rounded average price)
    does not fail the check; one beyond it, or any order difference, does."""
    from services.cli.commands.verify import _failing
    from services.reconciler._compare import Ours, Theirs, compare

    ours = Ours(opened=True, cash=Decimal("598.109999"), reserved=Decimal(0), positions={}, open_orders={})
    close = compare(ours, Theirs(cash=Decimal("598.11"), positions={}, open_orders={}),
                    cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
    far = compare(ours, Theirs(cash=Decimal("599"), positions={}, open_orders={}),
                  cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
    assert [d.kind for d in close.differences] == ["cash"] and _failing(close) == []
    assert [d.kind for d in _failing(far)] == ["cash"]
