"""The API's routes, authentication and errors (services/api/_app.py, _reads.py, _actions.py), on
every Redis backend; every reply is checked against openapi.yaml by the test client."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from services.api import Desk
from services.api import _reads as reads
from services.cli.commands.status import collect
from services.risk.service import RiskService
from shared.brokers import BrokerCall, FakeBroker
from shared.bus import codec, publish
from shared.clock import LiveClock, SimulatedClock
from shared.config import Settings
from shared.errors import BrokerUnavailable, OrderNotFound
from shared.keys import ALERTS, INTENTS, ORDER_EVENTS, ORDERS, REJECTIONS, Keys
from shared.models import Alert, AlertSeverity, Intent, IntentRejected, OrderEvent, OrderStatus, Side
from shared.portfolio import Portfolio
from shared.safety.trading_state import KillSwitch, TradingState
from tests.services.api.client import OPERATOR, READ, Api
from tests.support.factories import T0, fill, order
from tests.support.processes import free_port

GETS = ["/api/v1/status", "/api/v1/portfolio", "/api/v1/orders", "/api/v1/fills", "/api/v1/alerts",
        "/api/v1/equity", "/api/v1/reconciliation", "/api/v1/streams"]
ACTIONS = [("/api/v1/kill-switch", {"engaged": True, "reason": "r"}), ("/api/v1/flatten", {"reason": "r"}),
           ("/api/v1/orders", {"side": "buy", "symbol": "AAPL", "quantity": "1", "reason": "r"}),
           ("/api/v1/orders/c-1/cancel", {"reason": "r"})]


def holding(desk: Desk, symbol: str = "AAPL", qty: str = "20", price: str = "150") -> Portfolio:
    """Open the account and buy ``qty`` of ``symbol`` at ``price``."""
    settings = desk.settings.portfolio
    portfolio = Portfolio(desk.redis, desk.keys, settings.account, settings=settings)
    portfolio.open()
    portfolio.reserve("h", symbol, Side.BUY, Decimal(qty), Decimal(price))
    portfolio.apply_fill("h", fill("h:1", qty, price))
    return portfolio


def record(desk: Desk, cid: str, status: str = "new", created_at: str = "2026-01-02T14:30:00+00:00",
           **fields: str) -> None:
    """An order record as the executor keeps it (open ones in the open set)."""
    desk.redis.hset(desk.keys.order(cid), mapping={
        "status": status, "symbol": "AAPL", "side": "buy", "quantity": "5", "applied_qty": "0",
        "applied_cost": "0", "created_at": created_at, **fields})
    if not OrderStatus(status).is_terminal:
        desk.redis.sadd(desk.keys.open_orders, cid)


def intents(desk: Desk) -> list[Intent]:
    """The intents published so far, oldest first."""
    found = [codec.decode(fields) for _, fields in desk.redis.xrange(desk.keys.stream(INTENTS))]
    return [message for message in found if isinstance(message, Intent)]


class TestAuthentication:
    def test_health_needs_no_token(self, api: Api) -> None:
        """GET /health answers 200 without a token, and says Redis answers."""
        reply = api.get("/health", token=None)
        assert (reply.status, reply.body) == (200, {"status": "ok", "redis": "ok"})

    @pytest.mark.parametrize("path", GETS)
    def test_every_route_refuses_a_missing_or_wrong_token(self, api: Api, path: str) -> None:
        """No token, a wrong one, or another scheme: 401 with a JSON error and WWW-Authenticate."""
        for token in (None, "nope", READ + "x"):
            reply = api.get(path, token=token)
            assert reply.status == 401 and "bearer token" in reply.body["error"]
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert api.get(path, token=None, headers={"Authorization": f"Basic {READ}"}).status == 401

    @pytest.mark.parametrize(("path", "body"), ACTIONS)
    def test_the_read_only_token_cannot_act(self, api: Api, desk: Desk, path: str,
                                            body: dict[str, Any]) -> None:
        """The read-only token on an action gets 403 and changes nothing."""
        record(desk, "c-1")
        reply = api.post(path, body, token=READ)
        assert reply.status == 403 and "operator" in reply.body["error"]
        assert KillSwitch(desk.redis, desk.keys).current().seq == 0
        assert intents(desk) == []

    def test_an_unknown_path_is_401_before_404(self, api: Api) -> None:
        """An unauthenticated caller learns nothing about paths; an authenticated one gets 404/405."""
        assert api.get("/api/v1/nothing", token=None).status == 401
        reply = api.get("/api/v1/nothing")
        assert reply.status == 404 and reply.body["error"] == "not found: GET /api/v1/nothing"
        reply = api.request("DELETE", "/api/v1/status")
        assert reply.status == 405 and "GET" in reply.headers["Allow"]

    def test_the_operator_token_reads_too(self, api: Api) -> None:
        """The operator token is good for every GET route."""
        assert api.get("/api/v1/streams", token=OPERATOR).status == 200


class TestReads:
    def test_status_is_the_cli_report(self, api: Api, desk: Desk) -> None:
        """GET /status is collect()'s report: the same account figures, positions and state."""
        holding(desk)
        desk.redis.hset(desk.keys.last_price, "AAPL", "151.25")
        KillSwitch(desk.redis, desk.keys).engage("REDUCING", "alice", "drill")
        reply = api.get("/api/v1/status")
        assert reply.status == 200
        assert reply.body == json.loads(json.dumps(collect(desk)))
        assert reply.body["account"]["equity"] == str(Decimal("100000") - 20 * 150 + 20 * Decimal("151.25"))
        assert reply.body["positions"] == {"AAPL": {"quantity": "20", "avg_cost": "150.0000000000"}}
        assert reply.body["trading_state"]["state"] == "REDUCING"

    def test_portfolio_figures_equal_the_status_account(self, api: Api, desk: Desk) -> None:
        """GET /portfolio shows the account as status does, with positions' marks and values."""
        holding(desk)
        desk.redis.hset(desk.keys.last_price, "AAPL", "151.25")
        body = api.get("/api/v1/portfolio").body
        account = collect(desk)["account"]
        for name in ("cash", "reserved", "buying_power", "equity", "realized_pnl"):
            assert body[name] == account[name]
        assert body["positions"]["AAPL"] == {"quantity": "20", "avg_cost": "150.0000000000",
                                             "reserved_to_sell": "0", "mark": "151.25", "value": "3025.00"}

    def test_portfolio_of_an_unopened_account_is_404(self, api: Api) -> None:
        """Before the executor opens the account, GET /portfolio is 404 saying so."""
        reply = api.get("/api/v1/portfolio")
        assert reply.status == 404 and "has not been opened" in reply.body["error"]

    def test_orders_open_and_recent(self, api: Api, desk: Desk) -> None:
        """GET /orders lists the open orders, and the newest records first, at most ``limit``."""
        record(desk, "c-1", created_at="2026-01-02T14:30:00+00:00")
        record(desk, "c-2", status="filled", created_at="2026-01-02T14:31:00+00:00", applied_qty="5")
        record(desk, "c-3", status="canceled", created_at="2026-01-02T14:32:00+00:00")
        body = api.get("/api/v1/orders").body
        assert [o["client_order_id"] for o in body["open"]] == ["c-1"]
        assert [o["client_order_id"] for o in body["recent"]] == ["c-3", "c-2", "c-1"]
        assert body["recent"][1]["applied_qty"] == "5"
        newest = api.get("/api/v1/orders?limit=2").body["recent"]
        assert [o["client_order_id"] for o in newest] == ["c-3", "c-2"]

    @pytest.mark.parametrize("limit", ["0", "501", "abc", "-1", "1.5", "", "%C2%B2"])
    def test_a_bad_limit_is_400(self, api: Api, limit: str) -> None:
        """``limit`` outside 1..500, or not an integer, is a 400 naming it."""
        reply = api.get(f"/api/v1/fills?limit={limit}")
        assert reply.status == 400 and "limit must be an integer from 1 to 500" in reply.body["error"]

    def test_fills_newest_first_across_pages(self, api: Api, desk: Desk,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """GET /fills returns the order events with a fill, newest first, read a page at a time."""
        monkeypatch.setattr(reads, "PAGE", 2)
        for n in range(5):
            event = OrderEvent(time=T0, client_order_id=f"c-{n}", symbol="AAPL", side=Side.BUY,
                               status=OrderStatus.PARTIALLY_FILLED, filled_quantity=Decimal(n + 1),
                               fill=fill(f"c-{n}:1", "1", "10.5") if n % 2 == 0 else None)
            publish(desk.redis, desk.keys, ORDER_EVENTS, event)
        body = api.get("/api/v1/fills").body
        assert [f["client_order_id"] for f in body["fills"]] == ["c-4", "c-2", "c-0"]
        assert body["fills"][0]["fill"]["price"] == "10.5"
        newest = api.get("/api/v1/fills?limit=2").body["fills"]
        assert [f["client_order_id"] for f in newest] == ["c-4", "c-2"]

    def test_alerts_decoded_newest_first(self, api: Api, desk: Desk) -> None:
        """GET /alerts decodes the alerts stream, newest first; a foreign entry shows its raw fields."""
        for kind in ("a", "b"):
            publish(desk.redis, desk.keys, ALERTS, Alert(time=T0, severity=AlertSeverity.WARNING,
                                                         source="test", kind=kind, text=f"alert {kind}"))
        desk.redis.xadd(desk.keys.stream(ALERTS), {"note": "not a message"})
        alerts = api.get("/api/v1/alerts").body["alerts"]
        assert alerts[0]["note"] == "not a message"
        assert [(a["kind"], a["severity"]) for a in alerts[1:]] == [("b", "warning"), ("a", "warning")]

    def test_equity_history_is_risks_samples_bounded_newest_first(self, api: Api, desk: Desk) -> None:
        """GET /equity: risk's equity samples (a minute apart), the newest ``risk.equity_history_keep``
        kept, newest first, with the cash beside the equity at marks."""
        settings = Settings(key_prefix=desk.keys.prefix, risk={"equity_history_keep": 2})
        clock = SimulatedClock(T0)
        risk = RiskService(desk.redis, desk.keys, settings, clock, broker=FakeBroker(lambda call: None))
        risk.portfolio.open()
        desk.redis.hset(desk.keys.last_price, "AAPL", "150")
        for minute in range(3):
            if minute == 2:  # 10 AAPL bought at 100, marked at 150: equity 100,500, cash 99,000
                risk.portfolio.reserve("r1", "AAPL", Side.BUY, Decimal(10), Decimal(100))
                risk.portfolio.apply_fill("r1", fill("r1:1", "10", "100"))
            risk.sample_equity(force=True)
            clock.advance(timedelta(minutes=1))
        samples = api.get("/api/v1/equity").body["equity"]
        assert [(s["time"], s["equity"], s["cash"]) for s in samples] == [
            ((T0 + timedelta(minutes=2)).isoformat(), "100500", "99000"),
            ((T0 + timedelta(minutes=1)).isoformat(), "100000", "100000")]
        assert len(api.get("/api/v1/equity?limit=1").body["equity"]) == 1

    def test_reconciliation_none_then_reports(self, api: Api, desk: Desk) -> None:
        """GET /reconciliation: no report before the reconciler's first pass; then the latest and
        its history, JSON fields parsed."""
        assert api.get("/api/v1/reconciliation").body == {"latest": None, "recent": []}
        fields = {"status": "differences", "time": "2026-01-02T14:30:00+00:00", "error": "",
                  "differences": json.dumps([{"kind": "cash", "subject": "cash"}]), "in_flight": "[]",
                  "cash_compared": "1"}
        desk.redis.hset(desk.keys.reconciliation, mapping=fields)
        desk.redis.xadd(desk.keys.stream("reconciliation"), fields)
        body = api.get("/api/v1/reconciliation").body
        assert body["latest"]["differences"] == [{"kind": "cash", "subject": "cash"}]
        assert body["latest"]["in_flight"] == [] and body["recent"][0]["status"] == "differences"

    def test_streams_with_groups(self, api: Api, desk: Desk) -> None:
        """GET /streams shows each stream's length and its groups' pending and lag."""
        publish(desk.redis, desk.keys, ALERTS, Alert(time=T0, severity=AlertSeverity.INFO, source="t",
                                                     kind="k", text="t"))
        desk.redis.xgroup_create(desk.keys.stream(ALERTS), "monitor", id="0")
        streams = api.get("/api/v1/streams").body["streams"]
        assert streams["alerts"]["length"] == 1
        assert streams["alerts"]["groups"]["monitor"]["pending"] == 0


class TestKillSwitch:
    def test_engage_and_release_logged_with_who_and_why(self, api: Api, desk: Desk) -> None:
        """POST /kill-switch engages and releases through KillSwitch, by api:operator with the
        reason, and logs each action with role and reason but never a token."""
        with capture_logs() as logs:
            on = api.post("/api/v1/kill-switch", {"engaged": True, "reason": "drill", "state": "REDUCING",
                                                  "cancel_orders": True})
            off = api.post("/api/v1/kill-switch", {"engaged": False, "reason": "drill over"})
        assert on.status == 200 and on.body["previous"] == "ACTIVE" and on.body["state"] == "REDUCING"
        assert off.body["state"] == "ACTIVE" and off.body["seq"] == on.body["seq"] + 1
        history = KillSwitch(desk.redis, desk.keys).history(2)
        assert [(h["state"], h["by"], h["reason"]) for h in history] == [
            ("ACTIVE", "api:operator", "drill over"), ("REDUCING", "api:operator", "drill")]
        actions = [e for e in logs if e["event"] == "api.action"]
        assert [(e["action"], e["role"], e["reason"], e["engaged"]) for e in actions] == [
            ("kill_switch", "operator", "drill", True), ("kill_switch", "operator", "drill over", False)]
        assert OPERATOR not in repr(logs) and READ not in repr(logs)

    def test_flatten_asks_the_executor(self, api: Api, desk: Desk) -> None:
        """POST /flatten engages HALTED with the flatten request, as `kill-switch on --flatten`."""
        reply = api.post("/api/v1/flatten", {"reason": "end of day"})
        assert reply.status == 200 and reply.body["flatten"] is True
        status = KillSwitch(desk.redis, desk.keys).current()
        assert (status.state, status.flatten_positions) == (TradingState.HALTED, True)
        assert status.by == "api:operator"

    @pytest.mark.parametrize(("body", "words"), [
        ({"engaged": True}, "reason: Field required"),
        ({"engaged": True, "reason": "   "}, "reason must not be blank"),
        ({"engaged": "yes", "reason": "r"}, "engaged: Input should be a valid boolean"),
        ({"engaged": False, "reason": "r", "flatten": True}, "cancel_orders and flatten need engaged"),
        ({"engaged": True, "reason": "r", "state": "ACTIVE"}, "state: Input should be 'HALTED' or"),
        ({"engaged": True, "reason": "r", "who": "me"}, "who: Extra inputs are not permitted"),
    ])
    def test_a_refused_body_is_422_naming_the_field(self, api: Api, desk: Desk, body: dict[str, Any],
                                                    words: str) -> None:
        """A body its model refuses is a 422 whose error names the field; nothing is changed."""
        reply = api.post("/api/v1/kill-switch", body)
        assert reply.status == 422 and words in reply.body["error"]
        assert KillSwitch(desk.redis, desk.keys).current().seq == 0

    @pytest.mark.parametrize(("data", "words"), [
        ("not json", "request body is not valid JSON"), ("", "request body is not valid JSON"),
        ("[1, 2]", "request body must be a JSON object"), (b"\xff\xfe", "request body is not valid JSON"),
    ])
    def test_a_body_that_is_not_a_json_object_is_400(self, api: Api, data: str | bytes, words: str) -> None:
        """A body that is not JSON, or not an object, is a 400."""
        reply = api.request("POST", "/api/v1/kill-switch", data=data,
                            headers={"Content-Type": "application/json"})
        assert reply.status == 400 and words in reply.body["error"]

    def test_a_body_over_a_mebibyte_is_413(self, api: Api) -> None:
        """An oversized body is refused with a JSON 413, not read."""
        reply = api.request("POST", "/api/v1/kill-switch", data="x" * (1024 * 1024 + 1))
        assert reply.status == 413


class FakeRisk:
    """Decides the next intent on the stream like risk: approves it, or refuses it with ``refusal``."""

    def __init__(self, desk: Desk, refusal: str | None = None) -> None:
        self.desk, self.refusal = desk, refusal
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        reply: Any = self.desk.redis.xread({self.desk.keys.stream(INTENTS): "0-0"}, block=10_000, count=1)
        wish = codec.decode(reply[0][1][0][1])
        assert isinstance(wish, Intent)
        if self.refusal is not None:
            decision = IntentRejected(time=T0, intent_id=wish.id, symbol=wish.symbol, reason=self.refusal)
            publish(self.desk.redis, self.desk.keys, REJECTIONS, decision)
        else:
            publish(self.desk.redis, self.desk.keys, ORDERS, order(intent_id=wish.id,
                                                                   client_order_id=f"bst-{wish.id}",
                                                                   quantity=wish.quantity))


class TestManualOrder:
    def test_without_wait_the_intent_is_sent(self, api: Api, desk: Desk) -> None:
        """POST /orders with no wait answers 202 pending and publishes the manual intent exactly as
        asked (symbol upper-cased, quantity and limit exact)."""
        reply = api.post("/api/v1/orders", {"side": "buy", "symbol": "aapl", "quantity": 0.1,
                                            "limit_price": "150.05", "reason": "test buy"})
        assert reply.status == 202 and reply.body["decision"] == "pending"
        [sent] = intents(desk)
        assert (sent.id, sent.source, sent.symbol, sent.side) == (reply.body["intent_id"], "manual", "AAPL",
                                                                  Side.BUY)
        assert (sent.quantity, sent.limit_price, sent.order_type.value) == (Decimal("0.1"), Decimal("150.05"),
                                                                           "limit")
        assert sent.reason == "api:operator: test buy"

    def test_approved_by_risk(self, api: Api, desk: Desk) -> None:
        """With wait_s, risk's approval comes back with the order's client_order_id."""
        risk = FakeRisk(desk)
        reply = api.post("/api/v1/orders", {"side": "sell", "symbol": "AAPL", "quantity": "3", "wait_s": 10,
                                            "reason": "trim"})
        risk.thread.join(10)
        assert reply.status == 200 and reply.body["decision"] == "approved"
        assert reply.body["client_order_id"] == f"bst-{reply.body['intent_id']}"
        assert reply.body["quantity"] == "3"

    def test_refused_by_risk(self, api: Api, desk: Desk) -> None:
        """With wait_s, risk's refusal comes back with its reason."""
        risk = FakeRisk(desk, refusal="trading_halted: trading is HALTED")
        reply = api.post("/api/v1/orders", {"side": "buy", "symbol": "AAPL", "quantity": "3", "wait_s": 10,
                                            "reason": "try"})
        risk.thread.join(10)
        assert reply.status == 200 and reply.body == {"intent_id": reply.body["intent_id"],
                                                      "decision": "refused",
                                                      "reason": "trading_halted: trading is HALTED"}

    @pytest.mark.parametrize(("change", "words"), [
        ({"quantity": "-1"}, "quantity: Input should be greater than 0"),
        ({"quantity": "ten"}, "quantity: Input should be a valid decimal"),
        ({"symbol": "AA PL"}, "symbol: String should match pattern"),
        ({"side": "hold"}, "side: Input should be 'buy' or 'sell'"),
        ({"limit_price": "0"}, "limit_price: Input should be greater than 0"),
        ({"wait_s": 31}, "wait_s: Input should be less than or equal to 30"),
        ({"quantity": "NaN"}, "quantity: Input should be a finite number"),
        ({"reason": ""}, "reason: String should have at least 1 character"),
    ])
    def test_a_bad_order_is_422_and_nothing_is_sent(self, api: Api, desk: Desk, change: dict[str, Any],
                                                     words: str) -> None:
        """A malformed order is refused with a 422 naming the field, before any intent is published."""
        body = {"side": "buy", "symbol": "AAPL", "quantity": "1", "reason": "r", **change}
        reply = api.post("/api/v1/orders", body)
        assert reply.status == 422 and words in reply.body["error"], reply.body
        assert intents(desk) == []


class TestCancel:
    def test_an_open_order_is_cancelled_at_the_broker_marked_with_why(self, api: Api, desk: Desk,
                                                                      broker: FakeBroker) -> None:
        """POST /orders/{id}/cancel marks the record with who and why, then asks the broker by id."""
        record(desk, "bst-1")
        reply = api.post("/api/v1/orders/bst-1/cancel", {"reason": "changed my mind"})
        assert reply.status == 202 and reply.body == {"client_order_id": "bst-1", "cancel_requested": True,
                                                      "status": "new"}
        assert broker.calls == [BrokerCall("cancel", ("bst-1",))]
        assert desk.redis.hget(desk.keys.order("bst-1"), "cancel_reason") == b"api:operator: changed my mind"

    def test_orders_that_cannot_be_cancelled(self, api: Api, desk: Desk, broker: FakeBroker) -> None:
        """No such order: 404; ended: 409; a protective stop: 409; the broker never asked."""
        record(desk, "bst-done", status="filled")
        record(desk, "bst-1-sl1", protects="bst-1")
        assert api.post("/api/v1/orders/bst-none/cancel", {"reason": "r"}).status == 404
        ended = api.post("/api/v1/orders/bst-done/cancel", {"reason": "r"})
        assert ended.status == 409 and "already filled" in ended.body["error"]
        stop = api.post("/api/v1/orders/bst-1-sl1/cancel", {"reason": "r"})
        assert stop.status == 409 and "protective stop" in stop.body["error"]
        assert broker.calls == []

    @pytest.mark.parametrize(("error", "status"), [
        (OrderNotFound("not found", client_order_id="bst-1"), 409),
        (BrokerUnavailable("HTTP 503"), 503),
    ])
    def test_broker_trouble(self, api: Api, desk: Desk, broker: FakeBroker, error: Exception,
                            status: int) -> None:
        """The broker not showing the order yet is a 409; the broker away is a 503."""
        def fail(call: BrokerCall) -> None:
            raise error

        broker.handler = fail
        record(desk, "bst-1", status="pending_submit")
        reply = api.post("/api/v1/orders/bst-1/cancel", {"reason": "r"})
        assert reply.status == status and "bst-1" in reply.body["error"]


class TestRedisDown:
    @pytest.fixture
    def down(self, clean_environment: None, keys: Keys, broker: FakeBroker) -> Api:
        """An API whose Redis is a port nobody listens on."""
        client = redis.Redis(port=free_port(), socket_connect_timeout=1)
        return Api(Desk(Settings(key_prefix=keys.prefix), client, keys, LiveClock(), lambda: broker))

    @pytest.mark.parametrize("path", GETS)
    def test_reads_are_503(self, down: Api, path: str) -> None:
        """Every read route answers 503 with a JSON error while Redis is unreachable."""
        reply = down.get(path)
        assert reply.status == 503 and reply.body["error"].startswith("Redis unavailable")

    def test_an_action_is_503_and_health_says_so(self, down: Api) -> None:
        """An action is 503 too; /health still answers 200, saying Redis is unreachable."""
        assert down.post("/api/v1/kill-switch", {"engaged": True, "reason": "r"}).status == 503
        assert down.get("/health", token=None).body == {"status": "ok", "redis": "unreachable"}
