"""shared.brokers' adapter over alpaca-py against the paper exchange process: orders, reads and the
trade-update stream, ambiguity and rate limits, injected faults, restarts."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.brokers import AlpacaBroker, OrderRequest
from shared.clock import LiveClock
from shared.config import Settings
from shared.errors import (
    AmbiguousSubmit,
    BrokerUnavailable,
    InsufficientBuyingPower,
    OrderNotFound,
    OrderRejected,
    RateLimited,
)
from shared.keys import Keys
from shared.models import OrderEvent, OrderStatus, OrderType, Side
from shared.redis.connection import connect_url
from tests.conftest import FAKE_TCP, REAL, delete_keys
from tests.support.factories import market_request, resting_request
from tests.support.paper import HEADERS, PaperExchange, running_exchange
from tests.support.processes import free_port, wait_for


@pytest.fixture
def broker(exchange: PaperExchange) -> AlpacaBroker:
    """The adapter pointed at the exchange."""
    return exchange.broker()


def orders_with(exchange: PaperExchange, cid: str) -> list[dict[str, Any]]:
    """Every order the exchange holds with ``cid`` (a raw listing, no adapter)."""
    return [o for o in exchange.get("/v2/orders", status="all", limit=500) if o["client_order_id"] == cid]


def next_event(updates: Any) -> OrderEvent:
    event = updates.get(timeout=10)
    assert event is not None, "no trade update within 10s"
    return event  # type: ignore[no-any-return]


class RecordingClock(LiveClock):
    """The live clock, remembering every sleep the adapter asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


@pytest.mark.multiprocess
class TestAdapter:
    def test_submit_streams_new_then_fill_with_decimals(self, exchange: PaperExchange,
                                                        broker: AlpacaBroker) -> None:
        """A marketable order comes back NEW, then the stream brings NEW and FILLED with an exact fill."""
        with broker.trade_updates() as updates:
            assert updates.wait_ready(10)
            placed = broker.submit(market_request("a1", "3"))
            assert (placed.status, placed.quantity, placed.client_order_id) == (
                OrderStatus.NEW, Decimal(3), "a1")
            exchange.bar("AAPL", "187.13", "188", "187", "187.5")
            first, second = next_event(updates), next_event(updates)
        assert first.status == OrderStatus.NEW and first.fill is None
        assert second.status == OrderStatus.FILLED and second.fill is not None
        assert (second.fill.quantity, second.fill.price, second.filled_avg_price) == (
            Decimal(3), Decimal("187.13"), Decimal("187.13"))
        assert isinstance(second.fill.price, Decimal)

    def test_reads_map_to_our_values(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """Positions, account and open orders come back as Decimal values after a fill."""
        broker.submit(market_request("b1", "4"))
        broker.submit(resting_request("rest"))
        exchange.bar("AAPL", "50.25", "51", "50", "50.5")
        wait_for(lambda: broker.get_order("b1").status == OrderStatus.FILLED, message="the fill")
        (position,) = broker.positions()
        assert (position.symbol, position.quantity, position.avg_entry_price) == ("AAPL", 4, Decimal("50.25"))
        account = broker.account()
        assert account.cash == Decimal("100000") - Decimal("201.00")
        assert [o.client_order_id for o in broker.open_orders()] == ["rest"]

    def test_bracket_request_places_two_held_legs(self, broker: AlpacaBroker) -> None:
        """take_profit and stop_loss make a bracket whose legs are held until the entry fills."""
        placed = broker.submit(OrderRequest(client_order_id="br", symbol="AAPL", side=Side.BUY,
                                            quantity=Decimal(2),
                                            take_profit=Decimal("120"), stop_loss=Decimal("90")))
        assert placed.order_class == "bracket"
        assert sorted(leg.order_type for leg in placed.legs) == [OrderType.LIMIT, OrderType.STOP]
        assert {leg.broker_status for leg in placed.legs} == {"held"}

    def test_cancel_and_not_found(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """Cancel is idempotent; a filled order's cancel is OrderRejected; unknown ids are OrderNotFound."""
        broker.submit(resting_request("c1"))
        broker.cancel("c1")
        broker.cancel("c1")
        assert broker.get_order("c1").status == OrderStatus.CANCELED
        broker.submit(market_request("c2", "1"))
        exchange.bar("AAPL", "10", "10", "10", "10")
        wait_for(lambda: broker.get_order("c2").status == OrderStatus.FILLED, message="the fill")
        with pytest.raises(OrderRejected, match="not cancelable"):
            broker.cancel("c2")
        with pytest.raises(OrderNotFound) as missing:
            broker.get_order("nope")
        assert missing.value.client_order_id == "nope"

    def test_rejections_are_typed(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """A limit buy beyond the cash is InsufficientBuyingPower; a naked sell is OrderRejected."""
        with pytest.raises(InsufficientBuyingPower) as poor:
            broker.submit(OrderRequest(client_order_id="big", symbol="AAPL", side=Side.BUY,
                                       quantity=Decimal(2000),
                                       order_type=OrderType.LIMIT, limit_price=Decimal(100)))
        assert "insufficient buying power" in poor.value.reason
        with pytest.raises(OrderRejected) as naked:
            broker.submit(market_request("short", "1", Side.SELL))
        assert "insufficient qty" in naked.value.reason
        assert orders_with(exchange, "big") == [] and orders_with(exchange, "short") == []

    def test_same_client_order_id_returns_the_existing_order(self, exchange: PaperExchange,
                                                            broker: AlpacaBroker) -> None:
        """Submitting the same request twice places one order; reusing the id for another order is refused."""
        first = broker.submit(market_request("dup", "1"))
        again = broker.submit(market_request("dup", "1"))
        assert again.broker_order_id == first.broker_order_id
        with pytest.raises(OrderRejected, match="already used"):
            broker.submit(market_request("dup", "2"))
        assert len(orders_with(exchange, "dup")) == 1


@pytest.mark.multiprocess
class TestAmbiguityAndRateLimits:
    def test_reply_timeout_is_resolved_by_client_order_id(self, exchange: PaperExchange) -> None:
        """The exchange places the order but the reply times out: the adapter finds it; one order exists."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "reply_timeout", "seconds": 3,
                             "count": 1})
        broker = exchange.broker(timeout_s=0.5)
        placed = broker.submit(market_request("amb", "1"))
        assert placed.client_order_id == "amb" and placed.status == OrderStatus.NEW
        assert len(orders_with(exchange, "amb")) == 1

    def test_dropped_reply_is_resolved_even_when_lookups_lag(self, exchange: PaperExchange) -> None:
        """Accepted, reply dropped, then "not found" twice: the third look-up finds the one order."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "drop_after", "count": 1},
                            {"endpoint": "POST /v2/orders", "kind": "hide_new_orders", "lookups": 2,
                             "count": 1})
        placed = exchange.broker().submit(market_request("lag", "1"))
        assert placed.client_order_id == "lag"
        assert len(orders_with(exchange, "lag")) == 1

    def test_unresolvable_submit_raises_ambiguous(self, exchange: PaperExchange) -> None:
        """Dropped reply and the order hidden past every look-up: AmbiguousSubmit, never a resubmit."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "drop_after", "count": 1},
                            {"endpoint": "POST /v2/orders", "kind": "hide_new_orders", "lookups": 50,
                             "count": 1})
        broker = exchange.broker(resolve_attempts=3)
        with pytest.raises(AmbiguousSubmit) as unknown:
            broker.submit(market_request("ghost", "1"))
        assert unknown.value.client_order_id == "ghost"
        assert len(exchange.get("/v2/orders", status="all")) == 0  # hidden, but placed exactly once:
        exchange.set_faults()
        with pytest.raises(OrderRejected, match="client_order_id must be unique"):
            requests_post_order(exchange, "ghost")

    def test_resubmit_of_a_hidden_order_is_ambiguous_not_rejected(self, exchange: PaperExchange) -> None:
        """Resubmitted, an order the broker holds but cannot find yet ("client_order_id must be
        unique", then "not found"): AmbiguousSubmit, to chase by the id -- never a rejection that
        would release the cash of a live order."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "hide_new_orders", "lookups": 50,
                             "count": 1})
        broker = exchange.broker(resolve_attempts=1)
        broker.submit(market_request("hidden", "1"))
        with pytest.raises(AmbiguousSubmit):
            broker.submit(market_request("hidden", "1"))

    def test_late_placement_after_timeout_is_ambiguous(self, exchange: PaperExchange) -> None:
        """A request that times out before the exchange acts: AmbiguousSubmit, and the order appears later."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "latency", "seconds": 2.5, "count": 1})
        broker = exchange.broker(timeout_s=0.3, resolve_attempts=2)
        with pytest.raises(AmbiguousSubmit):
            broker.submit(market_request("late", "1"))
        found = wait_for(lambda: orders_with(exchange, "late"), message="the late order")
        assert len(found) == 1

    def test_rate_limit_storm_waits_as_told_and_loses_nothing(self, exchange: PaperExchange) -> None:
        """Three 429s with Retry-After 0.2: the adapter waits 0.2s each time; each order is placed once."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "rate_limit", "retry_after": 0.2,
                             "count": 3})
        clock = RecordingClock()
        broker = AlpacaBroker(exchange.broker().settings, api_key=HEADERS["APCA-API-KEY-ID"],
                              secret_key=HEADERS["APCA-API-SECRET-KEY"], base_url=exchange.url,
                              stream_url=exchange.stream_url, clock=clock)
        for n in range(5):
            broker.submit(market_request(f"rl{n}", "1"))
        assert clock.sleeps == [0.2, 0.2, 0.2]
        assert sorted(o["client_order_id"] for o in exchange.get("/v2/orders", status="all")) == [
            f"rl{n}" for n in range(5)]

    def test_rate_limit_that_persists_raises_rate_limited(self, exchange: PaperExchange) -> None:
        """429 on every attempt: RateLimited carrying the wait after rate_limit_retries waits; no order."""
        exchange.set_faults({"endpoint": "*", "kind": "rate_limit", "retry_after": 0.05})
        with pytest.raises(RateLimited) as limited:
            exchange.broker(rate_limit_retries=2).submit(market_request("rl", "1"))
        assert limited.value.retry_after == pytest.approx(0.05)
        exchange.set_faults()
        assert orders_with(exchange, "rl") == []

    def test_exhausted_quota_delays_the_next_request_until_reset(self, exchange: PaperExchange) -> None:
        """A 429's X-Ratelimit-Reset is honoured when Retry-After is absent (computed from the clock)."""
        clock = RecordingClock()
        broker = AlpacaBroker(exchange.broker().settings, api_key=HEADERS["APCA-API-KEY-ID"],
                              secret_key=HEADERS["APCA-API-SECRET-KEY"], base_url=exchange.url,
                              stream_url=exchange.stream_url, clock=clock)
        reset = (clock.now() + timedelta(seconds=30)).timestamp()
        assert broker._rate_limit_delay({"X-Ratelimit-Reset": f"{reset}"}) == pytest.approx(30, abs=1)
        assert broker._rate_limit_delay({"Retry-After": "7"}) == 7


def requests_post_order(exchange: PaperExchange, cid: str) -> None:
    """POST an order with a raw request, raising OrderRejected on a 422 (to probe id uniqueness)."""
    reply = requests.post(exchange.url + "/v2/orders", headers=HEADERS, timeout=5, json={
        "symbol": "AAPL", "qty": "1", "side": "buy", "type": "market", "time_in_force": "day",
        "client_order_id": cid})
    if reply.status_code == 422:
        raise OrderRejected(reply.json()["message"], client_order_id=cid)


@pytest.mark.multiprocess
class TestInjectedFaults:
    def test_latency_within_timeout_succeeds(self, exchange: PaperExchange) -> None:
        """A slow but timely reply is just a reply."""
        exchange.set_faults({"endpoint": "GET /v2/account", "kind": "latency", "seconds": 0.2})
        assert exchange.broker(timeout_s=2).account().cash == Decimal(100000)

    def test_read_timeouts_become_broker_unavailable(self, exchange: PaperExchange) -> None:
        """Every read times out: after read_retries the adapter raises BrokerUnavailable."""
        exchange.set_faults({"endpoint": "GET /v2/positions", "kind": "latency", "seconds": 2})
        with pytest.raises(BrokerUnavailable, match="positions"):
            exchange.broker(timeout_s=0.2, read_retries=1).positions()

    @pytest.mark.parametrize("status", [500, 503])
    def test_server_errors_on_reads_become_broker_unavailable(self, exchange: PaperExchange,
                                                              status: int) -> None:
        """A 5xx that persists on a read is BrokerUnavailable naming the status."""
        exchange.set_faults({"endpoint": "GET /v2/account", "kind": "status", "status": status})
        with pytest.raises(BrokerUnavailable, match=str(status)):
            exchange.broker(read_retries=1).account()

    def test_transient_server_error_on_read_is_retried(self, exchange: PaperExchange) -> None:
        """One 503 on a read is retried and the read succeeds."""
        exchange.set_faults({"endpoint": "GET /v2/account", "kind": "status", "status": 503, "count": 1})
        assert exchange.broker().account().cash == Decimal(100000)

    def test_503_on_submit_is_unavailable_and_places_nothing(self, exchange: PaperExchange) -> None:
        """503 before the order is taken: look-ups find nothing, so BrokerUnavailable; no order exists."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "status", "status": 503})
        with pytest.raises(BrokerUnavailable):
            exchange.broker(resolve_attempts=2).submit(market_request("s503", "1"))
        assert orders_with(exchange, "s503") == []

    def test_500_on_submit_is_ambiguous(self, exchange: PaperExchange) -> None:
        """500 may hide a placed order: not found by look-up, the adapter says AmbiguousSubmit."""
        exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "status", "status": 500})
        with pytest.raises(AmbiguousSubmit):
            exchange.broker(resolve_attempts=2).submit(market_request("s500", "1"))

    def test_dropped_connection_on_read_becomes_unavailable(self, exchange: PaperExchange) -> None:
        """Connections closed without a reply on every read: BrokerUnavailable."""
        exchange.set_faults({"endpoint": "GET /v2/orders", "kind": "drop_before"})
        with pytest.raises(BrokerUnavailable):
            exchange.broker(read_retries=1).open_orders()

    def test_refused_connection_is_unavailable_and_places_nothing(self, exchange: PaperExchange) -> None:
        """While the exchange refuses connections a submit is BrokerUnavailable, and no order appears."""
        exchange.set_faults({"endpoint": "GET /v2/clock", "kind": "refuse", "seconds": 2, "count": 1})
        with pytest.raises(requests.RequestException):
            requests.get(exchange.url + "/v2/clock", headers=HEADERS, timeout=5)
        with pytest.raises(BrokerUnavailable, match="refused"):
            exchange.broker().submit(market_request("refused", "1"))
        wait_for(lambda: exchange._up(), message="the exchange to listen again")
        assert orders_with(exchange, "refused") == []

    def test_duplicate_updates_are_delivered_once(self, exchange: PaperExchange,
                                                  broker: AlpacaBroker) -> None:
        """Every update sent twice: the adapter yields each once (the next event is the next order's)."""
        exchange.set_faults({"endpoint": "stream", "kind": "duplicate_updates"})
        with broker.trade_updates() as updates:
            assert updates.wait_ready(10)
            broker.submit(market_request("d1", "2"))
            exchange.bar("AAPL", "10", "10", "10", "10")
            events = [next_event(updates), next_event(updates)]
            broker.submit(resting_request("sentinel"))
            events.append(next_event(updates))
        assert [(e.client_order_id, e.status) for e in events] == [
            ("d1", OrderStatus.NEW), ("d1", OrderStatus.FILLED), ("sentinel", OrderStatus.NEW)]

    def test_out_of_order_updates_never_regress(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """"new" held back until after "fill": the late "new" is dropped and the fill counted once."""
        exchange.set_faults({"endpoint": "stream", "kind": "reorder_updates", "count": 1})
        with broker.trade_updates() as updates:
            assert updates.wait_ready(10)
            broker.submit(market_request("o1", "2"))
            exchange.bar("AAPL", "10", "10", "10", "10")
            first = next_event(updates)
            broker.submit(resting_request("sentinel"))
            second = next_event(updates)
        assert (first.client_order_id, first.status, first.fill is not None) == (
            "o1", OrderStatus.FILLED, True)
        assert (second.client_order_id, second.status) == ("sentinel", OrderStatus.NEW)

    def test_partial_fills_add_up_to_the_order(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """Fills capped at half the remainder: PARTIALLY_FILLED twice, then FILLED, summing to the order."""
        exchange.set_faults({"endpoint": "fills", "kind": "partial_fills", "fraction": 0.5, "count": 2})
        with broker.trade_updates() as updates:
            assert updates.wait_ready(10)
            broker.submit(market_request("p1", "10"))
            assert next_event(updates).status == OrderStatus.NEW
            events = []
            for _ in range(3):
                exchange.bar("AAPL", "10", "10", "10", "10")
                events.append(next_event(updates))
        assert [e.status for e in events] == [OrderStatus.PARTIALLY_FILLED, OrderStatus.PARTIALLY_FILLED,
                                              OrderStatus.FILLED]
        assert [e.fill.quantity for e in events if e.fill] == [5, 2, 3]
        assert events[-1].filled_quantity == 10

    def test_stale_positions_list_is_reported_as_the_broker_says(self, exchange: PaperExchange,
                                                                 broker: AlpacaBroker) -> None:
        """A stale positions list is passed through uncached: the next fresh answer shows the truth."""
        broker.submit(market_request("sp1", "10"))
        exchange.bar("AAPL", "10", "10", "10", "10")
        wait_for(lambda: broker.get_order("sp1").status == OrderStatus.FILLED, message="the buy")
        exchange.set_faults({"endpoint": "GET /v2/positions", "kind": "stale_positions", "count": 2})
        assert [p.quantity for p in broker.positions()] == [10]
        broker.submit(market_request("sp2", "4", Side.SELL))
        exchange.bar("AAPL", "10", "10", "10", "10")
        wait_for(lambda: broker.get_order("sp2").status == OrderStatus.FILLED, message="the sell")
        assert [p.quantity for p in broker.positions()] == [10]  # stale
        assert [p.quantity for p in broker.positions()] == [6]  # fault spent: the truth


@pytest.mark.multiprocess
class TestRestart:
    @pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
    @pytest.mark.parametrize("server_url", [FAKE_TCP, REAL], indirect=True)
    def test_restart_keeps_book_and_replays_no_fill(self, server_url: str, keys: Keys,
                                                    tmp_path: Path, kill: bool) -> None:
        """Orders, positions and cash are unchanged across a restart (even SIGKILL); no fill twice."""
        with running_exchange(server_url, keys, tmp_path) as exchange:
            broker = exchange.broker()
            broker.submit(market_request("r1", "7"))
            broker.submit(resting_request("r2"))
            exchange.bar("AAPL", "20", "20", "20", "20")
            wait_for(lambda: broker.get_order("r1").status == OrderStatus.FILLED, message="the fill")
            before = (exchange.get("/v2/orders", status="all"), exchange.get("/v2/positions"),
                      exchange.get("/v2/account")["cash"])
            client = connect_url(server_url)
            fills_before = client.xlen(keys.paper("fills"))
            exchange.restart(kill=kill)
            after = (exchange.get("/v2/orders", status="all"), exchange.get("/v2/positions"),
                     exchange.get("/v2/account")["cash"])
            assert after == before
            exchange.bar("MSFT", "1", "1", "1", "1")  # proves the consumer is past the old bar
            wait_for(lambda: any(a["symbol"] == "MSFT" for a in exchange.get("/v2/assets")),
                     message="the new bar")
            assert client.xlen(keys.paper("fills")) == fills_before == 1
            assert exchange.get("/v2/account")["cash"] == "99860"
            client.close()
        delete_keys(server_url, keys)


    def test_trade_updates_resume_after_restart(self, exchange: PaperExchange, broker: AlpacaBroker) -> None:
        """The adapter's stream reconnects to the restarted exchange, counts the reconnect (the
        caller's cue to look up what it missed) and receives later updates."""
        with broker.trade_updates() as updates:
            assert updates.wait_ready(10)
            assert updates.connections == 1
            exchange.restart()
            wait_for(lambda: exchange.get("/_paper/health")["listeners"] == 1, message="the stream to return")
            assert updates.wait_ready(10)
            wait_for(lambda: updates.connections == 2, message="the reconnect counted")
            broker.submit(market_request("after", "1"))
            event = next_event(updates)
        assert (event.client_order_id, event.status) == ("after", OrderStatus.NEW)

    def test_closing_the_stream_is_not_a_connection_error(self, exchange: PaperExchange, broker: AlpacaBroker,
                                                          caplog: pytest.LogCaptureFixture) -> None:
        """Closing a subscription stops alpaca-py's stream without its "websocket error, restarting"
        warning (the one a dropped connection gives), and the exchange sees the listener leave."""
        with caplog.at_level(logging.INFO, logger="alpaca.trading.stream"):
            with broker.trade_updates() as updates:
                assert updates.wait_ready(10)
            wait_for(lambda: exchange.get("/_paper/health")["listeners"] == 0, message="the listener to go")
        messages = [r.getMessage() for r in caplog.records if r.name == "alpaca.trading.stream"]
        assert "Trading stream stopped" in messages
        assert not [m for m in messages if "websocket error" in m]


    def test_a_stream_started_before_the_exchange_listens_retries_without_a_traceback(
            self, caplog: pytest.LogCaptureFixture) -> None:
        """Under honcho the executor may subscribe before the exchange listens: each refused attempt
        is one warning line naming the stream as unreachable (no traceback), and it keeps trying."""
        port = free_port()
        with caplog.at_level(logging.INFO, logger="alpaca.trading.stream"):
            broker = AlpacaBroker(Settings().broker, api_key="k", secret_key="s",
                                  base_url=f"http://127.0.0.1:{port}", stream_url=f"ws://127.0.0.1:{port}/stream")
            with broker.trade_updates() as updates:
                wait_for(lambda: sum("unreachable" in r.getMessage() for r in caplog.records) >= 2,
                         message="two refused attempts")
                assert not updates.wait_ready(0)
        records = [r for r in caplog.records
                   if r.name == "alpaca.trading.stream" and r.levelno >= logging.WARNING]
        assert records and all(r.exc_info is None and "unreachable" in r.getMessage() for r in records)
