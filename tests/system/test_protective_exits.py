"""Protective stops with real OS processes: the paper exchange and the executor on one shared server.

The test plays risk (it reserves an entry in the portfolio and publishes the approved ``Order``, with a
``stop_loss``, on the orders stream) and the ingester (bars on the bars stream, the exchange's only
source of prices). The exchange fills a market order on the first bar after it accepted it and
triggers a sell stop on a bar whose low reaches the stop price, so every step below waits for the
order to be at the exchange before it publishes the bar that is to fill it.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.bus import codec, publish
from shared.clock import LiveClock
from shared.config import PortfolioSettings
from shared.keys import ALERTS, ORDERS, Keys
from shared.models import Alert, AlertSeverity, ExitReason, Order, Side
from shared.portfolio import Portfolio, Snapshot, verify
from shared.redis.client import reply_text
from shared.safety.protections import ClosedTrade
from shared.safety.trading_state import KillSwitch, TradingState
from tests.conftest import SERVER_BACKENDS
from tests.support.environment import desk_env
from tests.support.paper import PaperExchange, running_exchange
from tests.support.processes import spawn, stop_all, wait_for

pytestmark = pytest.mark.multiprocess

CASH = "10000"
ENTRY = "bst-i1"  # the entry's client_order_id (and "i1" its intent and reservation)
STOP_LOSS = Decimal("95")
TAKE_PROFIT = Decimal("110")
QUANTITY = Decimal(10)
# a $10,000 account at both ends; a protective stop tried 3 times, 0.2 s then 0.4 s apart; a submit
# whose reply is a 503 looked up by client_order_id quickly before it counts as not placed
DESK = {"bus__block_ms": 100, "portfolio__starting_cash": CASH, "paper_exchange__starting_cash": CASH,
        "executor__protect_attempts": 3, "executor__protect_backoff_s": 0.2,
        "broker__resolve_interval_s": 0.05}


class Desk:
    """The executor as a process trading at a running paper exchange, and the test's view of both:
    order records, the exchange's orders, the portfolio, the alerts and the closed trades."""

    def __init__(self, exchange: PaperExchange, client: redis.Redis, keys: Keys, log_dir: Path) -> None:
        self.exchange = exchange
        self.client = client
        self.keys = keys
        self.log_dir = log_dir
        self.env = desk_env(exchange.redis_url, keys, DESK, exchange=exchange)
        self.portfolio = Portfolio(client, keys, "paper",
                                   settings=PortfolioSettings(starting_cash=Decimal(CASH)))
        self.executor: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Open the account, price AAPL at 100 (a bar no order is waiting for), start the executor
        and wait until it follows the exchange's trade updates."""
        self.portfolio.open()
        self.exchange.bar("AAPL", "100", "100", "100", "100")
        self.executor = spawn("services.executor", env=self.env, log=self.log_dir / "executor.log")
        wait_for(lambda: self.exchange.get("/_paper/health")["listeners"] == 1, timeout=30,
                 message="the executor listening to trade updates")

    def stop(self) -> None:
        """SIGTERM the executor: it must exit cleanly."""
        assert self.executor is not None
        self.executor.send_signal(signal.SIGTERM)
        assert self.executor.wait(30) == 0

    def enter(self, take_profit: Decimal | None = None) -> None:
        """As risk approves an entry: reserve 10 AAPL at 100, publish the buy with its stop-loss
        (and ``take_profit``), and wait until the exchange holds it (record ``new``)."""
        self.portfolio.reserve("i1", "AAPL", Side.BUY, QUANTITY, Decimal(100))
        publish(self.client, self.keys, ORDERS, Order(
            time=LiveClock().now(), intent_id="i1", client_order_id=ENTRY, account="paper", symbol="AAPL",
            side=Side.BUY, quantity=QUANTITY, reservation_id="i1", stop_loss=STOP_LOSS,
            take_profit=take_profit))
        self.wait_status(ENTRY, "new")

    def record(self, cid: str) -> dict[str, str]:
        """The executor's record of order ``cid`` ({} if none)."""
        raw: Any = self.client.hgetall(self.keys.order(cid))
        return {reply_text(k): reply_text(v) for k, v in raw.items()}

    def wait_status(self, cid: str, status: str, timeout: float = 30) -> dict[str, str]:
        """Wait until the record of ``cid`` has ``status``; the record."""

        def reached() -> dict[str, str]:
            record = self.record(cid)
            return record if record.get("status") == status else {}

        return wait_for(reached, timeout=timeout, message=f"{cid} {status} here")

    def at_exchange(self, status: str = "all") -> dict[str, dict[str, Any]]:
        """The exchange's orders (``status`` open, closed or all), by client_order_id."""
        return {o["client_order_id"]: o for o in self.exchange.get("/v2/orders", status=status, limit=500)}

    def wait_flat(self) -> Snapshot:
        """Wait until no AAPL is held and no reservation is open (cash or shares); the snapshot."""

        def flat() -> Snapshot | None:
            snap = self.portfolio.snapshot()
            held = snap.positions.get("AAPL")
            done = (held is None or held.empty) and snap.reserved == 0 and not snap.reservations
            return snap if done else None

        snap = wait_for(flat, message="the position flat, no reservation open")
        assert snap is not None
        return snap

    def alerts(self, kind: str) -> list[Alert]:
        """The alerts of ``kind`` on the alerts stream."""
        raw: Any = self.client.xrange(self.keys.stream(ALERTS))
        found = (codec.decode(fields) for _, fields in raw)
        return [a for a in found if isinstance(a, Alert) and a.kind == kind]

    def all_protected(self) -> bool:
        """No entry is waiting for a protection pass (the set ``Keys.unprotected`` is empty)."""
        return not self.client.smembers(self.keys.unprotected)

    def closed_trades(self) -> list[ClosedTrade]:
        """The round trips handed to the protections."""
        raw: Any = self.client.zrange(self.keys.closed_trades, 0, -1, withscores=True)
        return [ClosedTrade.decode(reply_text(member), score) for member, score in raw]


@pytest.fixture
def desk(server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path) -> Iterator[Desk]:
    """The paper exchange and the executor running ($10,000 at both ends), AAPL priced at 100."""
    with running_exchange(server_url, keys, tmp_path, BASTION_PAPER_EXCHANGE__STARTING_CASH=CASH) as exchange:
        running = Desk(exchange, client, keys, tmp_path)
        try:
            running.start()
            yield running
        finally:
            if running.executor is not None:
                stop_all([running.executor])


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_entry_fills_stop_is_placed_and_the_stop_fills(desk: Desk) -> None:
    """Entry fills, stop placed, stop fills: the fill of the 10-share entry puts a GTC sell stop for
    10 at the stop-loss at the exchange (its shares reserved here); a bar whose low crosses the stop
    fills it, the position is flat with nothing reserved, our books match the exchange's, and the
    round trip reaches the protections as a stop_loss exit with the PnL the two fills make."""
    desk.enter()
    desk.exchange.bar("AAPL", "100", "101", "99", "100")  # the entry's fill bar; its low stays above 95
    entry = desk.wait_status(ENTRY, "filled")
    stop_cid = f"{ENTRY}-sl1"

    def resting_stop() -> dict[str, Any]:
        return desk.at_exchange("open").get(stop_cid) or {}

    stop = wait_for(resting_stop, message="the protective stop resting at the exchange")
    assert (stop["side"], stop["type"], stop["qty"], Decimal(stop["stop_price"]), stop["time_in_force"]) == (
        "sell", "stop", "10", STOP_LOSS, "gtc")
    record = desk.wait_status(stop_cid, "new")
    assert (record["protects"], record["exit_reason"], record["quantity"]) == (ENTRY, "stop_loss", "10")
    held = desk.portfolio.snapshot().positions["AAPL"]
    assert (held.qty, held.reserved) == (QUANTITY, QUANTITY)  # the stop's reservation holds the shares
    assert entry["applied_qty"] == "10"

    desk.exchange.bar("AAPL", "97", "97", "93", "94")  # the low crosses the stop
    desk.wait_status(stop_cid, "filled")
    snap = desk.wait_flat()
    [trade] = wait_for(desk.closed_trades, message="the round trip closed")
    orders = desk.at_exchange()
    assert sorted(orders) == [ENTRY, stop_cid]
    assert orders[stop_cid]["status"] == "filled"
    # the entry at its bar's open; the stop at the stop price (the bar opened above it)
    assert [Decimal(orders[c]["filled_avg_price"]) for c in (ENTRY, stop_cid)] == [Decimal(100), STOP_LOSS]
    assert (trade.symbol, trade.side, trade.exit_reason) == ("AAPL", Side.BUY, ExitReason.STOP_LOSS)
    assert trade.pnl == (STOP_LOSS - 100) * QUANTITY
    assert snap.cash == Decimal(desk.exchange.get("/v2/account")["cash"])
    assert desk.exchange.get("/v2/positions") == []
    assert desk.alerts("protection_failed") == []
    assert desk.all_protected()  # a filled stop is not replaced
    assert verify(desk.client, desk.keys, "paper", allow_short=False).ok
    desk.stop()


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
@pytest.mark.parametrize(("bar", "exit_reason", "price"), [
    (("105", "112", "104", "111"), ExitReason.TAKE_PROFIT, TAKE_PROFIT),  # the high reaches the target
    (("97", "97", "93", "94"), ExitReason.STOP_LOSS, STOP_LOSS),  # the low crosses the stop
], ids=["target", "stop"])
def test_entry_with_a_take_profit_is_protected_by_an_oco_pair(
        desk: Desk, bar: tuple[str, ...], exit_reason: ExitReason, price: Decimal) -> None:
    """Entry with a take-profit fills: one OCO pair covers it at the exchange -- a GTC take-profit
    sell limit at 110 (``-tp1``) with a stop-loss leg at 95 that the exchange names, recorded here
    (same entry, same reservation: the 10 shares held once). The bar that reaches one side fills it
    and the exchange cancels the other; the position is flat with nothing reserved, nothing open,
    our books match the exchange's, and the round trip reaches the protections with the exit
    reason of the side that filled."""
    desk.enter(TAKE_PROFIT)
    desk.exchange.bar("AAPL", "100", "101", "99", "100")  # the entry's fill bar, inside the pair
    desk.wait_status(ENTRY, "filled")
    tp_cid = f"{ENTRY}-tp1"

    def resting_pair() -> dict[str, Any]:
        found = desk.exchange.get("/v2/orders", status="open", nested="true")
        return next((o for o in found if o["client_order_id"] == tp_cid), {})

    pair = wait_for(resting_pair, message="the OCO pair at the exchange")
    [leg] = pair["legs"]
    assert (pair["order_class"], pair["side"], pair["type"], Decimal(pair["limit_price"]), pair["qty"],
            pair["time_in_force"]) == ("oco", "sell", "limit", TAKE_PROFIT, "10", "gtc")
    assert (leg["side"], leg["type"], Decimal(leg["stop_price"])) == ("sell", "stop", STOP_LOSS)
    leg_cid = leg["client_order_id"]
    parent = desk.wait_status(tp_cid, "new")
    leg_record = desk.wait_status(leg_cid, "new")
    assert (parent["protects"], parent["exit_reason"], parent["legs"]) == (ENTRY, "take_profit", leg_cid)
    assert (leg_record["protects"], leg_record["exit_reason"], leg_record["oco_parent"],
            leg_record["reservation_id"]) == (ENTRY, "stop_loss", tp_cid, tp_cid)
    assert desk.record(ENTRY)["protections"] == tp_cid
    held = desk.portfolio.snapshot().positions["AAPL"]
    assert (held.qty, held.reserved) == (QUANTITY, QUANTITY)  # the pair holds the shares once
    wait_for(desk.all_protected, message="the entry covered")

    desk.exchange.bar("AAPL", *bar)
    filled, other = (tp_cid, leg_cid) if exit_reason is ExitReason.TAKE_PROFIT else (leg_cid, tp_cid)
    desk.wait_status(filled, "filled")
    desk.wait_status(other, "canceled")
    snap = desk.wait_flat()
    [trade] = wait_for(desk.closed_trades, message="the round trip closed")
    assert (trade.exit_reason, trade.pnl) == (exit_reason, (price - 100) * QUANTITY)
    at_exchange = {c: desk.exchange.get("/v2/orders:by_client_order_id", client_order_id=c)
                   for c in (ENTRY, filled, other)}
    assert [at_exchange[c]["status"] for c in (ENTRY, filled, other)] == ["filled", "filled", "canceled"]
    assert Decimal(at_exchange[filled]["filled_avg_price"]) == price
    assert snap.cash == Decimal(desk.exchange.get("/v2/account")["cash"])
    assert desk.exchange.get("/v2/positions") == []
    wait_for(desk.all_protected, message="the ended pair not replaced")
    assert not desk.client.smembers(desk.keys.open_orders)
    assert desk.record(f"{ENTRY}-tp2") == {} and desk.record(f"{ENTRY}-sl2") == {}
    assert desk.alerts("protection_failed") == [] and desk.alerts("foreign_order") == []
    assert verify(desk.client, desk.keys, "paper", allow_short=False).ok
    desk.stop()


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_stop_refused_three_times_is_retried_then_the_position_flattened(desk: Desk) -> None:
    """Entry fills, stop fails, retry, flatten: with the exchange answering ``POST /v2/orders`` 503
    three times (installed once the entry is accepted, so only the stops meet it), the three
    protective stops the executor tries all fail and none exists at the exchange; it then sells the
    10 shares at market (exit reason protection_failed), alerts CRITICAL naming AAPL and the cause,
    and the sell fills on the next bar: the position flat, no reservation left open, our books
    matching the exchange's."""
    desk.enter()
    desk.exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "status", "status": 503, "count": 3})
    desk.exchange.bar("AAPL", "100", "101", "99", "100")  # the entry's fill bar
    desk.wait_status(ENTRY, "filled")
    flat_cid = f"{ENTRY}-flat3"  # named after the last of the three stops tried
    flatten = desk.wait_status(flat_cid, "new")  # at the exchange, waiting for a bar

    stops = [desk.record(f"{ENTRY}-sl{n}") for n in (1, 2, 3)]
    assert [s["status"] for s in stops] == ["rejected"] * 3
    assert all("HTTP 503" in s["reason"] for s in stops), stops
    assert desk.record(f"{ENTRY}-sl4") == {}
    assert desk.record(ENTRY)["protect_attempts"] == "3"
    assert (flatten["side"], flatten["quantity"], flatten["order_type"], flatten["exit_reason"],
            flatten["protects"]) == ("sell", "10", "market", "protection_failed", ENTRY)
    [alert] = wait_for(lambda: desk.alerts("protection_failed"), message="the protection_failed alert")
    assert (alert.severity, alert.details["symbol"], alert.details["client_order_id"]) == (
        AlertSeverity.CRITICAL, "AAPL", ENTRY)
    assert "HTTP 503" in alert.details["cause"]
    assert "after 3 tries" in alert.text and "flattened at market" in alert.text

    desk.exchange.bar("AAPL", "99", "99", "98", "98")  # the flatten's fill bar
    desk.wait_status(flat_cid, "filled")
    snap = desk.wait_flat()
    [trade] = wait_for(desk.closed_trades, message="the round trip closed")
    orders = desk.at_exchange()
    assert {cid: o["status"] for cid, o in orders.items()} == {ENTRY: "filled", flat_cid: "filled"}
    # the flatten at the open of the bar after it was placed (not on an earlier bar)
    assert [Decimal(orders[c]["filled_avg_price"]) for c in (ENTRY, flat_cid)] == [Decimal(100), Decimal(99)]
    assert (trade.exit_reason, trade.pnl) == (ExitReason.PROTECTION_FAILED, -1 * QUANTITY)
    assert snap.cash == Decimal(desk.exchange.get("/v2/account")["cash"])
    assert desk.exchange.get("/v2/positions") == []
    wait_for(desk.all_protected, message="the entry found covered")
    assert not desk.client.smembers(desk.keys.open_orders)
    assert verify(desk.client, desk.keys, "paper", allow_short=False).ok
    desk.stop()


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_kill_switch_flatten_sells_a_protected_position(desk: Desk) -> None:
    """HALTED with cancel-orders and flatten while a protective stop holds every share: the stop is
    cancelled on purpose (not replaced), then the whole position is sold at market on the next bar,
    leaving nothing open at the exchange or reserved here."""
    desk.enter()
    desk.exchange.bar("AAPL", "100", "101", "99", "100")
    desk.wait_status(ENTRY, "filled")
    desk.wait_status(f"{ENTRY}-sl1", "new")
    KillSwitch(desk.client, desk.keys).engage(TradingState.HALTED, "test", "drill", cancel_open_orders=True,
                                              flatten_positions=True)
    desk.wait_status(f"{ENTRY}-sl1", "canceled")
    flatten = desk.wait_status("bst-flat-1-AAPL", "new")
    assert (flatten["side"], flatten["quantity"], flatten["exit_reason"]) == ("sell", "10", "flatten")
    desk.exchange.bar("AAPL", "98", "99", "97", "98")  # the flatten's fill bar
    desk.wait_flat()
    assert sorted(desk.at_exchange()) == ["bst-flat-1-AAPL", ENTRY, f"{ENTRY}-sl1"]
    assert desk.at_exchange("open") == {}
    [trade] = wait_for(desk.closed_trades, message="the round trip closed")
    assert trade.exit_reason is ExitReason.FLATTEN
    desk.stop()


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_kill_switch_flatten_sells_a_position_an_oco_pair_holds(desk: Desk) -> None:
    """As above with an OCO pair holding the shares: both of its orders are cancelled on purpose
    (neither replaced), the pair's reservation given back once both ended, then the position is
    sold at market on the next bar."""
    desk.enter(TAKE_PROFIT)
    desk.exchange.bar("AAPL", "100", "101", "99", "100")
    desk.wait_status(ENTRY, "filled")
    leg_cid = wait_for(lambda: desk.record(f"{ENTRY}-tp1").get("legs"), message="the pair's leg recorded")
    KillSwitch(desk.client, desk.keys).engage(TradingState.HALTED, "test", "drill", cancel_open_orders=True,
                                              flatten_positions=True)
    for cid in (f"{ENTRY}-tp1", leg_cid):
        assert desk.wait_status(cid, "canceled")["cancel_reason"] == "kill switch 1"
    desk.wait_status("bst-flat-1-AAPL", "new")
    desk.exchange.bar("AAPL", "98", "99", "97", "98")  # the flatten's fill bar
    desk.wait_flat()
    assert desk.at_exchange("open") == {}
    [trade] = wait_for(desk.closed_trades, message="the round trip closed")
    assert trade.exit_reason is ExitReason.FLATTEN
    assert desk.record(f"{ENTRY}-tp2") == {}
    desk.stop()
