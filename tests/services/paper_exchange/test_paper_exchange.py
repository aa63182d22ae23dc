"""The paper exchange's book and matching, in process on fakeredis (bars handed in directly)."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
import redis

from services.paper_exchange import ApiError, Exchange, parse_plan
from services.paper_exchange._matching import match, round_price
from shared.clock import SimulatedClock
from shared.config import PaperExchangeSettings
from shared.keys import Keys
from tests.support.factories import bar
from tests.support.processes import spawn


def make(**settings: Any) -> tuple[Exchange, SimulatedClock, list[dict[str, Any]]]:
    """An exchange on a fresh fakeredis trading the ingester's default symbols (AAPL, MSFT, SPY)."""
    clock = SimulatedClock()
    events: list[dict[str, Any]] = []
    exchange = Exchange(fakeredis.FakeRedis(server=fakeredis.FakeServer()), Keys("t"),
                        PaperExchangeSettings(**settings), clock, publish=events.extend,
                        symbols=("AAPL", "MSFT", "SPY"))
    return exchange, clock, events


def order(qty: str = "10", side: str = "buy", type_: str = "market", **extra: Any) -> dict[str, Any]:
    return {"symbol": "AAPL", "qty": qty, "side": side, "type": type_, "time_in_force": "gtc", **extra}


class TestNoLookAhead:
    def test_bar_before_acceptance_is_not_used(self) -> None:
        """A bar that started before the order was accepted never fills it; one at acceptance does."""
        exchange, clock, _ = make()
        placed = exchange.submit(order())
        assert exchange.on_bar(bar(price="90", time=clock.now() + timedelta(seconds=-1))) == 0
        assert exchange.get(placed["id"])["status"] == "new"
        assert exchange.on_bar(bar(price="100", time=clock.now())) == 1
        assert exchange.get(placed["id"])["filled_avg_price"] == "100"

    def test_bracket_legs_wait_for_the_bar_after_the_entry(self) -> None:
        """The exit legs cannot trade on the bar that filled their parent, even if it touched them."""
        exchange, clock, _ = make()
        parent = exchange.submit(order(order_class="bracket", take_profit={"limit_price": "105"},
                                       stop_loss={"stop_price": "95"}))
        exchange.on_bar(bar(open="100", high="106", low="94", close="100", time=clock.now()))
        legs = exchange.get(parent["id"])["legs"]
        assert [leg["status"] for leg in legs] == ["new", "new"]
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(open="100", high="106", low="99", close="100", time=clock.now()))
        assert sorted(leg["status"] for leg in exchange.get(parent["id"])["legs"]) == ["canceled", "filled"]


class TestFills:
    def test_redelivered_bar_fills_nothing_twice(self) -> None:
        """The same bar message delivered again (the bus is at-least-once) changes nothing."""
        exchange, clock, _ = make()
        exchange.submit(order("5"))
        same = bar(price="100", time=clock.now(), id="bar-1")
        assert exchange.on_bar(same) == 1
        cash = exchange.account()["cash"]
        assert exchange.on_bar(same) == 0
        assert exchange.account()["cash"] == cash == "99500"
        assert exchange.positions()[0]["qty"] == "5"

    def test_fills_are_limited_by_volume(self) -> None:
        """With half of each bar's volume available, 10 shares against 8-share bars fill 4, 4, then 2."""
        exchange, clock, events = make(max_volume_fraction=Decimal("0.5"))
        placed = exchange.submit(order("10"))
        for _ in range(3):
            exchange.on_bar(bar(price="10", volume="8", time=clock.now()))
        fills = [(e["event"], e["qty"]) for e in events if "qty" in e]
        assert fills == [("partial_fill", "4"), ("partial_fill", "4"), ("fill", "2")]
        assert exchange.get(placed["id"])["status"] == "filled"

    def test_a_bar_trades_only_its_symbols_orders(self) -> None:
        """A bar of MSFT leaves AAPL's order open and fills MSFT's; Redis's open set keeps AAPL's only."""
        exchange, clock, _ = make()
        apple = exchange.submit(order("1"))
        microsoft = exchange.submit({**order("1"), "symbol": "MSFT"})
        assert exchange.on_bar(bar("MSFT", price="50", time=clock.now())) == 1
        assert exchange.get(apple["id"])["status"] == "new"
        assert exchange.get(microsoft["id"])["status"] == "filled"
        assert exchange.store.client.zrange("t:paper:open", 0, -1) == [apple["id"].encode()]

    def test_a_batch_of_bars_trades_in_order_and_marks_every_symbol(self) -> None:
        """on_bars fills AAPL's order on its first bar in the batch and leaves each symbol's last close
        as its price, MSFT's too (which had no order to trade)."""
        exchange, clock, _ = make()
        placed = exchange.submit(order("1"))
        batch = [bar("MSFT", price="50", time=clock.now()), bar(price="101", time=clock.now()),
                 bar(price="102", time=clock.now() + timedelta(seconds=60)),
                 bar("MSFT", price="51", time=clock.now() + timedelta(seconds=60))]
        assert exchange.on_bars(batch) == 1
        assert exchange.get(placed["id"])["filled_avg_price"] == "101"
        assert exchange.store.prices() == {"AAPL": Decimal("102"), "MSFT": Decimal("51")}
        assert exchange.on_bars([]) == 0

    def test_an_order_and_its_legs_take_consecutive_sequence_numbers(self) -> None:
        """A bracket's parent and its two legs are numbered in a row, and the next order after them."""
        exchange, _, _ = make()
        parent = exchange.submit(order(order_class="bracket", take_profit={"limit_price": "105"},
                                       stop_loss={"stop_price": "95"}))
        later = exchange.submit(order("1"))
        legs = [leg["id"] for leg in exchange.get(parent["id"])["legs"]]
        seqs = [exchange.store.load(i)["seq"] for i in (parent["id"], *legs, later["id"])]  # type: ignore[index]
        assert seqs == list(range(seqs[0], seqs[0] + 4))

    def test_slippage_and_commission(self) -> None:
        """10 bps slippage moves a buy up (rounded against the buyer) and commission comes off cash."""
        exchange, clock, _ = make(slippage_bps=Decimal("10"), commission_per_share=Decimal("0.01"))
        placed = exchange.submit(order("10"))
        exchange.on_bar(bar(open="100.01", high="101", low="100", close="100.5", time=clock.now()))
        assert exchange.get(placed["id"])["filled_avg_price"] == "100.12"  # 100.110001 rounded up
        assert exchange.account()["cash"] == str(Decimal("100000") - Decimal("1001.2") - Decimal("0.1"))

    def test_day_order_expires_on_the_next_session(self) -> None:
        """A day limit order left open expires on the first bar of a later New York date; gtc does not."""
        exchange, clock, events = make()
        day = exchange.submit({**order("1", type_="limit", limit_price="1"), "time_in_force": "day"})
        gtc = exchange.submit(order("1", type_="limit", limit_price="1"))
        clock.advance(timedelta(days=1))
        exchange.on_bar(bar(price="10", time=clock.now()))
        assert exchange.get(day["id"])["status"] == "expired"
        assert exchange.get(gtc["id"])["status"] == "new"
        assert events[-1]["event"] == "expired"

    def test_a_market_ahead_of_the_wall_clock_fills_day_orders_and_expires_them_by_its_own_date(self) -> None:
        """Bars days ahead of the wall clock (the synthetic market): a day order fills on the next bar,
        and one left open expires only when the market's New York date moves on."""
        exchange, clock, _ = make()
        ahead = timedelta(days=3)
        exchange.on_bar(bar(price="10", time=clock.now() + timedelta(seconds=ahead.total_seconds())))
        day = {"time_in_force": "day"}
        market = exchange.submit({**order("1"), **day})
        resting = exchange.submit({**order("1", type_="limit", limit_price="1"), **day})
        assert exchange.on_bar(bar(price="11",
                                   time=clock.now() + timedelta(seconds=ahead.total_seconds() + 60))) == 1
        assert exchange.get(market["id"])["status"] == "filled"
        assert exchange.get(resting["id"])["status"] == "new"
        next_day = (ahead + timedelta(days=1)).total_seconds()
        exchange.on_bar(bar(price="11", time=clock.now() + timedelta(seconds=next_day)))
        assert exchange.get(resting["id"])["status"] == "expired"

    def test_a_bar_older_than_the_market_at_acceptance_is_not_used(self) -> None:
        """With the market ahead of the wall clock, a bar older than the newest one seen when the
        order was accepted does not fill it (no look-back), a newer one does."""
        exchange, clock, _ = make()
        ahead = timedelta(days=3).total_seconds()
        exchange.on_bar(bar("MSFT", price="10", time=clock.now() + timedelta(seconds=ahead)))
        exchange.submit(order("1"))
        assert exchange.on_bar(bar(price="9", time=clock.now() + timedelta(seconds=ahead - 60))) == 0
        assert exchange.on_bar(bar(price="10", time=clock.now() + timedelta(seconds=ahead + 60))) == 1

    def test_sell_side_and_short_refusal(self) -> None:
        """Selling more than held is refused (403); a held position sells at the bar's price."""
        exchange, clock, _ = make()
        with pytest.raises(ApiError) as refused:
            exchange.submit(order("1", "sell"))
        assert refused.value.status == 403
        exchange.submit(order("3"))
        exchange.on_bar(bar(price="10", time=clock.now()))
        sell = exchange.submit(order("3", "sell", "limit", limit_price="11"))
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(open="10", high="12", low="10", close="11", time=clock.now()))
        assert exchange.get(sell["id"])["filled_avg_price"] == "11"
        assert exchange.positions() == []
        assert exchange.account()["cash"] == "100003"

    def test_validation_messages(self) -> None:
        """Unsupported or malformed requests get 422 with a message naming the problem."""
        exchange, _, _ = make()
        for body, words in [
            (order(type_="trailing_stop"), "not supported"),
            ({**order(), "time_in_force": "ioc"}, "time_in_force"),
            (order(type_="limit"), "limit_price is required"),
            ({**order(), "qty": "-1"}, "qty must be a positive"),
            (order(order_class="bracket", take_profit={"limit_price": "90"}, stop_loss={"stop_price": "95"}),
             "take_profit.limit_price must be beyond"),
        ]:
            with pytest.raises(ApiError, match=words) as bad:
                exchange.submit(body)
            assert bad.value.status == 422


class TestBuyingPower:
    def test_an_unvalued_short_is_rejected_at_its_first_fill_with_its_legs(self) -> None:
        """With allow_short a market short placed before any price is accepted, then rejected at the bar
        that values it beyond the buying power: its held legs are canceled and nothing fills."""
        exchange, clock, events = make(allow_short=True)
        placed = exchange.submit(order("2000", "sell", order_class="bracket",
                                       take_profit={"limit_price": "90"}, stop_loss={"stop_price": "110"}))
        assert exchange.on_bar(bar(price="100", volume="10000", time=clock.now())) == 0
        after = exchange.get(placed["id"])
        assert after["status"] == "rejected" and after["failed_at"] is not None
        assert [leg["status"] for leg in after["legs"]] == ["canceled", "canceled"]
        assert [e["event"] for e in events] == ["new", "rejected", "canceled", "canceled"]
        assert exchange.account()["cash"] == "100000" and exchange.positions() == []

    def test_a_partly_filled_bracket_take_profit_shrinks_its_stop_loss(self) -> None:
        """4 of a bracket's 10 sold at its take-profit leave its stop-loss leg 6 (Alpaca: "adjusted
        to the remaining quantity"); the stop then sells those 6, never more than is held."""
        exchange, clock, _ = make(max_volume_fraction=Decimal("0.5"))
        parent = exchange.submit(order("10", order_class="bracket", take_profit={"limit_price": "110"},
                                       stop_loss={"stop_price": "95"}))
        exchange.on_bar(bar(price="100", time=clock.now()))
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(open="110", high="111", low="109", close="110", volume="8", time=clock.now()))
        take_profit, stop_loss = exchange.get(parent["id"])["legs"]
        assert (take_profit["status"], take_profit["filled_qty"]) == ("partially_filled", "4")
        assert (stop_loss["qty"], stop_loss["status"]) == ("6", "new")
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(price="90", volume="100", time=clock.now()))
        take_profit, stop_loss = exchange.get(parent["id"])["legs"]
        assert (take_profit["status"], stop_loss["status"], stop_loss["filled_qty"]) == (
            "canceled", "filled", "6")
        assert exchange.positions() == []

    def test_exit_legs_hold_the_position_once(self) -> None:
        """A bracket's two active exit legs hold its shares once: another sell is refused, replacing one
        leg does not count the other against it, and closing orders reserve no buying power."""
        exchange, clock, _ = make()
        parent = exchange.submit(order("10", order_class="bracket", take_profit={"limit_price": "120"},
                                       stop_loss={"stop_price": "90"}))
        exchange.on_bar(bar(price="100", time=clock.now()))
        with pytest.raises(ApiError, match=r"requested: 1, available: 0"):
            exchange.submit(order("1", "sell"))
        stop_loss = exchange.get(parent["id"])["legs"][1]
        moved = exchange.replace(stop_loss["id"], {"stop_price": "95"})
        assert (moved["stop_price"], moved["replaces"]) == ("95", stop_loss["id"])
        assert exchange.account()["buying_power"] == "99000"

    def test_covering_a_short_needs_shares_not_money(self) -> None:
        """With allow_short a short of all the buying power leaves none (proceeds sit in cash); a buy
        covering it is accepted anyway, and a buy beyond the short is refused."""
        exchange, clock, _ = make(allow_short=True, starting_cash=Decimal("1000"))
        exchange.on_bar(bar(price="100", time=clock.now()))
        exchange.submit(order("10", "sell"))
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(price="100", time=clock.now()))
        account = exchange.account()
        assert (account["cash"], account["buying_power"], account["equity"]) == ("2000", "0", "1000")
        exchange.submit(order("10"))
        with pytest.raises(ApiError, match="insufficient buying power"):
            exchange.submit(order("1"))


class _BrokenPipeline:
    """A MULTI/EXEC that loses its connection at EXEC (every queued command is accepted)."""

    def __enter__(self) -> _BrokenPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def execute(self) -> None:
        raise redis.ConnectionError("Redis went away")


class TestBookInMemory:
    def test_a_restarted_exchange_reads_back_the_book(self) -> None:
        """A new exchange on the same keys has the same cash, positions and orders, refuses a used
        client_order_id, numbers after the last order, skips a fill it already applied and goes
        on filling the rest."""
        exchange, clock, _ = make(max_volume_fraction=Decimal("0.5"))
        partly = exchange.submit(order("10", client_order_id="partly"))
        resting = exchange.submit(order("3", type_="limit", limit_price="9"))
        seen = bar(price="10", volume="8", time=clock.now(), id="bar-1")
        assert exchange.on_bar(seen) == 1  # 4 of the 10; the limit at 9 rests
        before = (exchange.account(), exchange.positions(), exchange.list_orders(status="all"))
        restarted = Exchange(exchange.store.client, Keys("t"),
                             PaperExchangeSettings(max_volume_fraction=Decimal("0.5")), clock)
        assert (restarted.account(), restarted.positions(), restarted.list_orders(status="all")) == before
        assert {o["id"] for o in restarted.list_orders()} == {partly["id"], resting["id"]}
        with pytest.raises(ApiError, match="client_order_id must be unique"):
            restarted.submit(order("1", client_order_id="partly"))
        later = restarted.submit(order("1"))
        assert restarted.store.load(later["id"])["seq"] > restarted.store.load(partly["id"])["seq"]  # type: ignore[index]
        assert restarted.on_bar(seen) == 0  # delivered again after the restart: already applied
        assert restarted.get(partly["id"])["filled_qty"] == "4"
        restarted.on_bar(bar(price="9", volume="8", time=clock.now(), id="bar-2"))
        assert restarted.get(partly["id"])["filled_qty"] == "8"
        assert restarted.get(resting["id"])["status"] == "new"  # the 4-share budget went to the older order

    def test_a_failed_write_changes_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An order or a fill whose transaction fails leaves the book as it was: the order unknown and
        its client_order_id free, the fill unapplied; once Redis is back both go through once."""
        exchange, clock, events = make()
        client = exchange.store.client
        with monkeypatch.context() as patch:
            patch.setattr(client, "pipeline", lambda *a, **k: _BrokenPipeline())
            with pytest.raises(redis.ConnectionError):
                exchange.submit(order("5", client_order_id="first"))
        assert exchange.list_orders(status="all") == [] and events == []
        with pytest.raises(ApiError, match="order not found"):
            exchange.get_by_client_id("first")
        placed = exchange.submit(order("5", client_order_id="first"))
        fill_bar = bar(price="100", time=clock.now(), id="bar-1")
        with monkeypatch.context() as patch:
            patch.setattr(client, "pipeline", lambda *a, **k: _BrokenPipeline())
            with pytest.raises(redis.ConnectionError):
                exchange.on_bar(fill_bar)
        assert exchange.get(placed["id"])["status"] == "new"
        assert exchange.account()["cash"] == "100000" and exchange.positions() == []
        assert exchange.on_bar(fill_bar) == 1
        assert exchange.on_bar(fill_bar) == 0
        assert exchange.account()["cash"] == "99500"
        assert [e["event"] for e in events] == ["new", "fill"]

    def test_prices_reach_redis_at_most_a_second_late(self) -> None:
        """Batches of bars that trade nothing keep their prices in memory and write every one not yet
        written once a second has passed since the last write (a change writes them at once)."""
        exchange, clock, _ = make()
        exchange.on_bars([bar(price="100", time=clock.now())])
        prices_key = "t:paper:prices"
        assert exchange.store.client.hgetall(prices_key) == {}
        assert exchange.store.prices() == {"AAPL": Decimal("100")}
        clock.advance(timedelta(seconds=1))
        exchange.on_bars([bar("MSFT", price="50", time=clock.now())])
        assert exchange.store.client.hgetall(prices_key) == {b"AAPL": b"100", b"MSFT": b"50"}
        exchange.on_bars([bar("SPY", price="400", time=clock.now())])
        assert b"SPY" not in exchange.store.client.hgetall(prices_key)
        exchange.submit(order("1"))
        assert exchange.store.client.hget(prices_key, "SPY") == b"400"


class TestMatching:
    def test_stop_limit_triggered_beyond_its_limit_rests(self) -> None:
        """A buy stop-limit whose trigger price is above its limit does not fill on the trigger bar."""
        clock = SimulatedClock()
        result = match(order_type="stop_limit", buy=True, limit=Decimal("101"), stop=Decimal("100"),
                       triggered=False,
                       bar=bar(open="102", high="103", low="101.5", close="102", time=clock.now()),
                       slippage_bps=Decimal(0))
        assert (result.triggered, result.price) == (True, None)

    def test_rounding_never_favours_the_trader(self) -> None:
        """Buys round up and sells down to the cent (to 0.0001 below a dollar)."""
        assert round_price(Decimal("10.001"), buy=True) == Decimal("10.01")
        assert round_price(Decimal("10.009"), buy=False) == Decimal("10.00")
        assert round_price(Decimal("0.12345"), buy=True) == Decimal("0.1235")


class TestFaultPlan:
    def test_bad_plan_is_refused_with_the_field(self) -> None:
        """An unknown fault kind names the rule field that is wrong."""
        with pytest.raises(ValueError, match=r"rules\.0\.kind"):
            parse_plan('{"rules": [{"endpoint": "*", "kind": "gremlins"}]}')

    @pytest.mark.parametrize(("endpoint", "kind"), [
        ("stream", "refuse"), ("fills", "latency"), ("GET /stream", "duplicate_updates"),
        ("*", "partial_fills")])
    def test_a_kind_its_endpoint_never_draws_is_refused(self, endpoint: str, kind: str) -> None:
        """A rule that could never fire (``refuse`` on ``"stream"``: the websocket's connect is
        ``"GET /stream"``) is refused, naming the kinds the endpoint takes."""
        with pytest.raises(ValueError, match="never fires on endpoint"):
            parse_plan({"rules": [{"endpoint": endpoint, "kind": kind}]})

    def test_bad_plan_stops_the_service_with_exit_2(self) -> None:
        """The service refuses to start on a bad fault plan, naming paper_exchange.faults."""
        proc = spawn("services.paper_exchange", env={"BASTION_PAPER_EXCHANGE__FAULTS": "not json",
                                                     "REDIS_URL": "redis://127.0.0.1:1/0"})
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 2, err.decode()
        assert b"paper_exchange.faults" in err


def holding(qty: str = "10", price: str = "100", **settings: Any
            ) -> tuple[Exchange, SimulatedClock, list[dict[str, Any]]]:
    """An exchange holding ``qty`` AAPL bought at ``price`` (the last price too), its events cleared
    and its clock a minute past the fill."""
    exchange, clock, events = make(**settings)
    exchange.submit(order(qty))
    assert exchange.on_bar(bar(price=price, time=clock.now())) == 1
    clock.advance(timedelta(minutes=1))
    events.clear()
    return exchange, clock, events


def oco(qty: str = "10", side: str = "sell", take_profit: str = "110", stop: str = "95",
        **extra: Any) -> dict[str, Any]:
    """Alpaca's oco body as alpaca-py's LimitOrderRequest sends it (no limit_price of its own)."""
    return order(qty, side, "limit", order_class="oco", take_profit={"limit_price": take_profit},
                 stop_loss={"stop_price": stop}, **extra)


def oco_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["order"]["type"]) for e in events]


class TestOco:
    def test_an_oco_on_a_held_position_puts_both_exits_to_work(self) -> None:
        """The answer is the take-profit limit order (limit_price from take_profit) with the stop-loss
        as its one leg; both are ``new`` at once, each with its own id, client_order_id and ``new``
        update; nested listings show the leg under its parent; the two hold the shares once."""
        exchange, _, events = holding()
        placed = exchange.submit(oco(client_order_id="exit-1"))
        (leg,) = placed["legs"]
        assert (placed["type"], placed["limit_price"], placed["side"], placed["status"]) == (
            "limit", "110", "sell", "new")
        assert (leg["type"], leg["stop_price"], leg["side"], leg["qty"], leg["status"]) == (
            "stop", "95", "sell", "10", "new")
        assert {placed["order_class"], leg["order_class"]} == {"oco"}
        assert placed["client_order_id"] == "exit-1" and leg["client_order_id"] not in ("exit-1", "")
        assert leg["id"] != placed["id"]
        assert [(e["event"], e["order"]["id"], e["order"]["client_order_id"]) for e in events] == [
            ("new", placed["id"], "exit-1"), ("new", leg["id"], leg["client_order_id"])]
        nested = exchange.list_orders(nested=True)
        assert [(o["id"], [child["id"] for child in o["legs"]]) for o in nested] == [
            (placed["id"], [leg["id"]])]
        assert {o["id"] for o in exchange.list_orders()} == {placed["id"], leg["id"]}
        assert exchange.account()["buying_power"] == "99000"  # exits reserve no money
        with pytest.raises(ApiError, match=r"insufficient qty .*\(requested: 1, available: 0\)"):
            exchange.submit(order("1", "sell"))

    def test_a_limit_price_equal_to_the_take_profit_and_a_stop_limit_leg_are_accepted(self) -> None:
        """A limit_price equal to take_profit.limit_price is the same order; stop_loss.limit_price
        makes the leg a stop-limit."""
        exchange, _, _ = holding()
        placed = exchange.submit({**oco(limit_price="110.00"), "stop_loss": {"stop_price": "95",
                                                                             "limit_price": "94.5"}})
        (leg,) = placed["legs"]
        assert placed["limit_price"] == "110"
        assert (leg["type"], leg["stop_price"], leg["limit_price"]) == ("stop_limit", "95", "94.5")

    def test_the_take_profit_fills_and_cancels_the_stop(self) -> None:
        """A bar that started before the oco was accepted does not fill it; a later bar through the
        take-profit fills it at its limit and the stop-loss is canceled: the position is closed once."""
        exchange, clock, events = holding()
        placed = exchange.submit(oco())
        assert exchange.on_bar(bar(open="100", high="120", low="90", close="100",
                                   time=clock.now() - timedelta(seconds=1))) == 0
        assert exchange.on_bar(bar(open="104", high="111", low="103", close="110", time=clock.now())) == 1
        after = exchange.get(placed["id"])
        assert (after["status"], after["filled_avg_price"]) == ("filled", "110")
        assert after["legs"][0]["status"] == "canceled" and after["legs"][0]["canceled_at"] is not None
        assert oco_events(events) == [
            ("new", "limit"), ("new", "stop"), ("fill", "limit"), ("canceled", "stop")]
        assert exchange.positions() == [] and exchange.account()["cash"] == "100100"
        assert exchange.list_orders() == []

    def test_the_stop_fills_and_cancels_the_take_profit(self) -> None:
        """A bar through the stop fills the stop-loss (at the worse of its stop and the open) and the
        take-profit is canceled."""
        exchange, clock, events = holding()
        placed = exchange.submit(oco())
        exchange.on_bar(bar(open="94", high="96", low="90", close="91", time=clock.now()))
        after = exchange.get(placed["id"])
        assert after["status"] == "canceled"
        assert (after["legs"][0]["status"], after["legs"][0]["filled_avg_price"]) == ("filled", "94")
        assert oco_events(events) == [
            ("new", "limit"), ("new", "stop"), ("fill", "stop"), ("canceled", "limit")]
        assert exchange.positions() == [] and exchange.account()["cash"] == "99940"

    def test_canceling_either_order_cancels_both(self) -> None:
        """Canceling the take-profit cancels its stop-loss leg, and canceling a stop-loss leg cancels
        its take-profit: one ``canceled`` update each, and the shares are free to sell again."""
        exchange, _, events = holding()
        first = exchange.submit(oco())
        leg_id = first["legs"][0]["id"]
        assert exchange.cancel(first["id"]) == [first["id"], leg_id]
        second = exchange.submit(oco())
        assert exchange.cancel(second["legs"][0]["id"]) == [second["legs"][0]["id"], second["id"]]
        assert [e["event"] for e in events] == ["new", "new", "canceled", "canceled"] * 2
        assert exchange.list_orders() == []
        exchange.submit(order("10", "sell"))

    def test_a_partly_filled_take_profit_shrinks_the_stop(self) -> None:
        """4 of 10 filled at the take-profit leave the stop-loss 6 shares (no update of its own);
        the stop then sells those 6 and the take-profit is canceled: never more than was held."""
        exchange, clock, events = holding(max_volume_fraction=Decimal("0.5"))
        placed = exchange.submit(oco())
        exchange.on_bar(bar(open="110", high="111", low="109", close="110", volume="8", time=clock.now()))
        after = exchange.get(placed["id"])
        assert (after["status"], after["filled_qty"]) == ("partially_filled", "4")
        assert (after["legs"][0]["qty"], after["legs"][0]["status"]) == ("6", "new")
        assert oco_events(events) == [("new", "limit"), ("new", "stop"), ("partial_fill", "limit")]
        clock.advance(timedelta(minutes=1))
        exchange.on_bar(bar(price="90", volume="100", time=clock.now()))
        after = exchange.get(placed["id"])
        assert (after["status"], after["legs"][0]["status"], after["legs"][0]["filled_qty"]) == (
            "canceled", "filled", "6")
        assert exchange.positions() == []

    def test_replaced_orders_stay_in_the_group(self) -> None:
        """Moving the stop-loss, then the take-profit (PATCH), is not refused as selling shares the
        other order holds; the new take-profit keeps the new stop as its leg and still cancels it
        when it fills."""
        exchange, clock, _ = holding()
        placed = exchange.submit(oco())
        moved = exchange.replace(placed["legs"][0]["id"], {"stop_price": "97"})
        assert exchange.get(placed["id"])["legs"][0]["id"] == moved["id"]
        raised = exchange.replace(placed["id"], {"limit_price": "112"})
        assert [leg["id"] for leg in raised["legs"]] == [moved["id"]]
        exchange.on_bar(bar(open="105", high="111", low="104", close="111", time=clock.now()))
        assert exchange.get(raised["id"])["status"] == "new"
        exchange.on_bar(bar(open="111", high="113", low="110", close="112", time=clock.now()))
        assert exchange.get(raised["id"])["filled_avg_price"] == "112"
        assert exchange.get(moved["id"])["status"] == "canceled"
        assert exchange.positions() == []

    def test_a_day_oco_expires_whole_on_the_next_session(self) -> None:
        """A day oco left open expires on the first bar of a later New York date, both its orders."""
        exchange, clock, events = holding()
        placed = exchange.submit({**oco(), "time_in_force": "day"})
        clock.advance(timedelta(days=1))
        exchange.on_bar(bar(price="100", time=clock.now()))
        assert [e["event"] for e in events[2:]] == ["expired", "expired"]
        assert exchange.get(placed["id"])["legs"][0]["status"] == "expired"

    @pytest.mark.parametrize(("change", "words"), [
        ({"take_profit": None}, "oco orders need take_profit.limit_price"),
        ({"take_profit": {}}, "oco orders need take_profit.limit_price"),
        ({"stop_loss": None}, "oco orders need stop_loss.stop_price"),
        ({"stop_loss": {"limit_price": "94"}}, "oco orders need stop_loss.stop_price"),
        ({"type": "market"}, "oco orders must have type limit"),
        ({"type": "stop_limit", "stop_price": "95", "limit_price": "110"}, "oco orders must have type limit"),
        ({"limit_price": "109"}, "limit_price of an oco order must equal take_profit.limit_price"),
        ({"stop_loss": {"stop_price": "110"}}, r"take_profit.limit_price must be at least 0.01 beyond "
                                               r"stop_loss.stop_price"),
        ({"stop_loss": {"stop_price": "109.995"}}, "take_profit.limit_price must be at least 0.01 beyond"),
        ({"stop_loss": {"stop_price": "100"}}, r"stop_loss.stop_price must be at least 0.01 below the "
                                               r"current price \(stop_loss 100, price 100\)"),
        ({"side": "buy", "take_profit": {"limit_price": "90"}, "stop_loss": {"stop_price": "99.995"}},
         "stop_loss.stop_price must be at least 0.01 above the current price"),
        ({"take_profit": {"limit_price": "-1"}}, "take_profit.limit_price must be a positive number"),
    ])
    def test_refusals_name_the_field(self, change: dict[str, Any], words: str) -> None:
        """What Alpaca refuses of an oco is refused with 422 (code 40010001), naming the field, and
        nothing is placed."""
        exchange, _, events = holding()
        with pytest.raises(ApiError, match=words) as refused:
            exchange.submit({**oco(), **change})
        assert (refused.value.status, refused.value.code) == (422, 40010001)
        assert exchange.list_orders() == [] and events == []

    @pytest.mark.parametrize(("body", "settings"), [
        (oco("11"), {}), (oco("11"), {"allow_short": True}),
        (oco("1", "buy", take_profit="90", stop="105"), {"allow_short": True})])
    def test_an_oco_only_exits_what_is_held(self, body: dict[str, Any], settings: dict[str, Any]) -> None:
        """An oco for more than the position (even with shorting allowed), or buying with no short to
        cover, is refused as a plain uncovered sell is: 403 naming the quantity available."""
        exchange, _, events = holding(**settings)
        with pytest.raises(ApiError, match=r"insufficient qty .*\(requested: \d+, available: ") as refused:
            exchange.submit(body)
        assert refused.value.status == 403
        assert exchange.list_orders() == [] and events == []
