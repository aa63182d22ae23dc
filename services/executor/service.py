"""The executor: submits approved orders and turns the broker's reports into portfolio changes.

Guarantees (the failure table in docs/OPERATIONS.md says what each fault does):

* **One order per client_order_id.** An order is recorded (``pending_submit``) before its submit.
  A redelivered order still ``pending_submit`` (we died mid-submit) is looked up at the broker
  first and submitted again only if it is not there; the adapter resolves a duplicate by the id.
* **The orders stream is not a back door.** Only an order whose reservation is open and matches
  it (symbol, side, quantity) is submitted; anything else is dead-lettered with the reason.
* **A possibly-live order is never given up.** An ambiguous submit (placed? reply lost) is
  ``unknown``, keeps its reservation, and is chased by client_order_id with back-off until the
  broker shows it or has not found it ``unknown_lookup_limit`` times in a row ("never placed":
  released). An order whose handling fails on its last delivery, or a ``pending_submit`` older
  than ``stale_pending_s``, is chased the same way. The broker down or rate limiting keeps the
  order in hand (:class:`~shared.errors.Unavailable`): it is not counted as the order's failure.
* **A fill is a fact, booked exactly once.** Reports carry the order's cumulative filled quantity;
  the increase over the record's ``applied_qty`` is booked in the portfolio's atomic write
  together with the record's new ``applied_qty`` (compare-and-set: a racing report retries), so
  the two never part. A fill beyond the reservation is booked, alerted CRITICAL, and moves
  trading to REDUCING when cash goes negative. A reservation is released only when the broker
  reports the order terminal, refused it, or never placed it.
* **Gaps are closed.** Every order held open is looked up every ``poll_interval_s`` and after each
  reconnect of the trade-update stream; the broker's open orders with our prefix that we do not
  track are adopted, others alerted (and cancelled with ``cancel_foreign_orders``); orders the
  reconciler asks about (``repair-requests``) are looked up at once.
* **Kill switch requests** (:mod:`shared.safety.trading_state`) are carried out once per change ``seq``:
  cancel every open order (a pending or unknown one the broker does not show yet keeps the pass
  open until it resolves) and flatten every position (client_order_id ``bst-flat-<seq>-<SYMBOL>``).

Concurrency: four threads -- the order consumer, the trade-update reader, the order watcher
(polls, chases, repairs) and the trading-state watcher. The events of one symbol's orders are
applied one at a time (a lock per symbol); submits take no lock. No background thread ends
before the stop: a failed pass is logged and tried again. Run one executor per account.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.brokers import SUBMIT_ENDPOINT, Broker, BrokerOrder, OrderRequest, build_broker
from shared.bus import Delivery, Publisher
from shared.clock import Clock
from shared.config import Settings
from shared.errors import (
    AmbiguousSubmit,
    BrokerError,
    HandlerRejected,
    OrderNotFound,
    OrderRejected,
    PortfolioConflict,
    PortfolioError,
    RedisUnavailable,
    StaleFencingToken,
    Unavailable,
)
from shared.keys import ALERTS, ORDER_EVENTS, ORDERS, Keys
from shared.logging import bind_correlation, get_logger
from shared.models import (
    CLIENT_ORDER_PREFIX,
    Alert,
    AlertSeverity,
    Fill,
    Order,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
)
from shared.portfolio import Outcome, Portfolio, RecordUpdate, Reservation
from shared.redis.boundary import unavailable
from shared.redis.client import reply_text
from shared.safety.account_activity import AccountActivity
from shared.safety.limits import Refusal
from shared.safety.protections import ClosedTrade, ProtectionLock, Protections
from shared.safety.rate_limit import Grant
from shared.safety.symbols import SymbolProperties
from shared.safety.trading_state import KillSwitch, TradingState, TradingStatus
from shared.service import ServiceContext
from shared.stop import Stoppable

__all__ = ["Executor", "main"]

log = get_logger(component="executor")
# KEYS[1] = the order record; KEYS[2] = the open-orders set; ARGV[1] = client_order_id;
# ARGV[2..] = field, value, ... of a new record. Returns the existing record (flat HGETALL) and
# changes nothing, or creates the record, adds it to the open set and returns an empty list.
_CREATE_RECORD = """
local unpack = unpack or table.unpack
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return {}
"""
# KEYS[1] = the order record; ARGV = field, value, ... Sets them only while the record is
# pending_submit (an order whose outcome became unknown); returns 1 if set, else 0.
_MARK_UNKNOWN = """
local unpack = unpack or table.unpack
if redis.call('HGET', KEYS[1], 'status') ~= 'pending_submit' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
PRICE_PLACES = Decimal("0.000001")
STOP_TYPES = (OrderType.STOP, OrderType.STOP_LIMIT)
_NOT_YET_SHOWN = (OrderStatus.PENDING_SUBMIT, OrderStatus.UNKNOWN)
_APPLY_ATTEMPTS = 5  # a report racing another for the same order (or a stalled lock) is re-read
_WATCH_TICK_S = 0.5


class Executor:
    """Submits orders and applies broker reports; all state lives in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock, broker: Broker,
                 publisher: Publisher) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.broker = broker
        self.publisher = publisher
        self.portfolio = Portfolio(client, keys, settings.portfolio.account, settings=settings.portfolio,
                                   lock_settings=settings.lock, clock=clock)
        self.kill_switch = KillSwitch(client, keys, clock)
        self.protections = Protections(client, keys, settings.protections, clock)
        self.activity = AccountActivity(client, keys, settings.portfolio.account)
        self.acted_key = f"{keys.trading_state}:acted"
        self.poll_requested = threading.Event()  # set on a stream reconnect: poll at the next tick
        self._locks: dict[str, threading.Lock] = {}  # one per symbol, made under _locks_guard
        self._locks_guard = threading.Lock()
        self._foreign_alerted: set[str] = set()

    # -- orders -------------------------------------------------------------------------------

    def handle_order(self, delivery: Delivery, *, bypass_state: bool = False) -> None:
        """Submit one approved order, exactly once at the broker (a bus handler); ``bypass_state``
        for the executor's own flatten orders, which the trading state must not stop."""
        order = delivery.message
        if not isinstance(order, Order):
            return
        cid = order.client_order_id
        record, status, slot, reservation = self._create_record(order)
        if record and record["status"] != OrderStatus.PENDING_SUBMIT:
            self._unused(slot)
            log.info("executor.duplicate_order", status=record["status"])
            return
        mismatch = _reservation_mismatch(order, reservation)
        if mismatch is not None:
            self._unused(slot)
            if not record:  # ours, made a moment ago: nothing was sent
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.delete(self.keys.order(cid))
                    pipe.srem(self.keys.open_orders, cid)
                    pipe.execute()
            raise HandlerRejected(f"not submitted: {mismatch}")
        try:
            self._submit(order, status, slot, redelivered=bool(record), bypass_state=bypass_state)
        except Unavailable:
            raise  # kept in hand by the bus: not this order's failure
        except Exception as exc:
            if delivery.deliveries >= self.settings.bus.max_deliveries:
                self._mark_unknown(cid, f"handling failed {delivery.deliveries} times: {exc}")
            raise

    def _submit(self, order: Order, status: TradingStatus, slot: str | None, *, redelivered: bool,
                bypass_state: bool) -> None:
        cid = order.client_order_id
        if redelivered:  # we may have submitted it before we died: the broker says
            try:
                found = self.broker.get_order(cid)
            except OrderNotFound:
                found = None
            if found is not None:
                self._unused(slot)
                log.info("executor.found_at_broker", status=found.status.value)
                self.apply_broker_order(found)
                return
        refusal = None if bypass_state else self._trading_state_refusal(order, status)
        if refusal is not None:
            self._unused(slot)
            if redelivered:  # not shown once, but it may have been placed: chase it, keep the cash
                self._mark_unknown(cid, refusal)
            else:
                self._give_up(cid, _order_fields(order), OrderStatus.REJECTED, refusal)
            return
        request = self._rounded(order)
        if isinstance(request, str):
            self._unused(slot)
            self._give_up(cid, _order_fields(order), OrderStatus.REJECTED, request)
            return
        try:
            placed = self.broker.submit(request, prepaid=slot is not None)
        except OrderRejected as exc:
            self._give_up(cid, _order_fields(order), OrderStatus.REJECTED, exc.reason)
            return
        except AmbiguousSubmit as exc:
            self._mark_unknown(cid, str(exc))
            return
        log.info("executor.submitted", broker_order_id=placed.broker_order_id, status=placed.status.value)
        self.apply_broker_order(placed)

    def _trading_state_refusal(self, order: Order, status: TradingStatus) -> str | None:
        """Why the trading state ``status`` (read now) forbids submitting ``order`` (approved before
        a change), or None."""
        if status.state is TradingState.ACTIVE:
            return None
        held = self.portfolio.snapshot().positions.get(order.symbol)
        refusal = status.refusal(order.side, held.qty if held is not None else Decimal(0), order.quantity)
        return None if refusal is None else f"not submitted: {refusal}"

    def _rounded(self, order: Order) -> OrderRequest | str:
        """The request with quantity and limit price rounded (never worse than asked), or why not."""
        prepared = SymbolProperties(order.symbol).prepare(order.side, order.quantity, order.limit_price)
        if isinstance(prepared, Refusal):
            return f"not submitted: {prepared}"
        request = OrderRequest.from_order(order)
        if (prepared.quantity, prepared.limit_price) == (order.quantity, order.limit_price):
            return request
        log.info("executor.rounded", quantity=str(prepared.quantity), limit_price=str(prepared.limit_price))
        return replace(request, quantity=prepared.quantity, limit_price=prepared.limit_price)

    def _create_record(self, order: Order) -> tuple[dict[str, str], TradingStatus, str | None, bytes | None]:
        """In one round trip: read the order's reservation, record ``order`` (pending submit) unless
        it is recorded already, read the trading state and try to take the submit's slot of the
        broker's shared rate limit: (the record found before, empty if it was new; the state; the
        slot's grant id, None if none was free or the broker has no limit -- the broker then waits
        for one itself; the reservation as stored, None if it is not open)."""
        fields = {
            "status": OrderStatus.PENDING_SUBMIT.value, "intent_id": order.intent_id,
            "reservation_id": order.reservation_id, "symbol": order.symbol, "side": order.side.value,
            "quantity": str(order.quantity), "order_type": order.order_type.value, "applied_qty": "0",
            "applied_cost": "0", "created_at": self.clock.now().isoformat(),
        }
        cid = order.client_order_id
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.portfolio.reservations_key, order.reservation_id)
            pipe.eval(_CREATE_RECORD, 2, self.keys.order(cid), self.keys.open_orders, cid,
                      *(x for pair in fields.items() for x in pair))
            self.kill_switch.queue_current(pipe)
            limiter = self.broker.limiter
            grant_id = limiter.queue_try_acquire(pipe, SUBMIT_ENDPOINT) if limiter is not None else None
            reservation, found, status, *attempt = pipe.execute()
        record = {k.decode(): v.decode() for k, v in zip(found[::2], found[1::2], strict=True)}
        granted = limiter is not None and isinstance(limiter.attempt_from(attempt[0], SUBMIT_ENDPOINT), Grant)
        return record, self.kill_switch.status_from(status), grant_id if granted else None, reservation

    def _unused(self, slot: str | None) -> None:
        """Give back a rate-limit slot taken for a submit that is not made."""
        if slot is None or self.broker.limiter is None:
            return
        try:
            self.broker.limiter.refund(SUBMIT_ENDPOINT, slot)
        except RedisUnavailable as exc:  # it counts until it leaves the window: the safe side
            log.warning("executor.slot_refund_failed", error=str(exc))

    def _mark_unknown(self, cid: str, reason: str) -> None:
        """A pending_submit order whose outcome is unknown: chase it by client_order_id; its
        reservation stays held. Changes nothing if the order has moved on meanwhile."""
        now = self.clock.now()
        fields = {"status": OrderStatus.UNKNOWN.value, "reason": reason[:500], "lookups": "0",
                  "next_lookup_at": now.isoformat()}
        marked = self.client.eval(_MARK_UNKNOWN, 1, self.keys.order(cid),
                                  *(x for pair in fields.items() for x in pair))
        if not marked:
            return
        log.warning("executor.order_unknown", client_order_id=cid, reason=reason)
        record = self._record(cid)
        self.publisher.publish(ORDER_EVENTS, OrderEvent(
            time=now, client_order_id=cid, intent_id=record.get("intent_id"), symbol=record["symbol"],
            side=Side(record["side"]), status=OrderStatus.UNKNOWN, reason=reason[:500]))
        self._alert(AlertSeverity.WARNING, "order_unknown",
                    f"{record['side']} {record['quantity']} {record['symbol']}: outcome unknown, chasing it "
                    f"by client_order_id ({reason[:200]})", cid)

    def _give_up(self, cid: str, record: Mapping[str, str], status: OrderStatus, reason: str, *,
                 never_placed: bool = False) -> None:
        """End an order the broker never took (refused, or never placed): the reservation is released."""
        log.warning("executor.order_failed", client_order_id=cid, status=status.value, reason=reason)
        if never_placed:
            self.client.hset(self.keys.order(cid), "never_placed", "1")
        self.apply_event(OrderEvent(time=self.clock.now(), client_order_id=cid,
                                    intent_id=record.get("intent_id"), symbol=record["symbol"],
                                    side=Side(record["side"]), status=status, reason=reason))
        self._alert(AlertSeverity.WARNING, "order_failed",
                    f"{record['side']} {record['quantity']} {record['symbol']}: {reason}", cid)

    def _alert(self, severity: AlertSeverity, kind: str, text: str, cid: str, **details: str) -> None:
        self.publisher.publish(ALERTS, Alert(time=self.clock.now(), severity=severity, source="executor",
                                             kind=kind, text=text,
                                             details={"client_order_id": cid, **details}))

    # -- broker reports -----------------------------------------------------------------------

    def apply_broker_order(self, placed: BrokerOrder) -> None:
        """Apply an order as the broker reports it (a submit reply or a look-up)."""
        self.apply_event(OrderEvent(
            time=self.clock.now(), client_order_id=placed.client_order_id,
            broker_order_id=placed.broker_order_id, symbol=placed.symbol, side=placed.side,
            status=placed.status, filled_quantity=placed.filled_quantity,
            filled_avg_price=placed.filled_avg_price))

    def apply_event(self, event: OrderEvent) -> None:
        """Apply an order report: the fill increase (once, with the record, atomically), the
        status, the release when the broker ended the order. A report racing another for the same
        order is re-read and applied again; an order we do not track is adopted when its id is ours.
        """
        with self._symbol_lock(event.symbol), bind_correlation(client_order_id=event.client_order_id):
            for attempt in range(1, _APPLY_ATTEMPTS + 1):
                record = self._record(event.client_order_id)
                if not record:
                    record = self._adopt(event)
                    if not record:
                        return
                try:
                    self._apply(event, record)
                    return
                except (PortfolioConflict, StaleFencingToken) as exc:
                    if attempt == _APPLY_ATTEMPTS:
                        raise
                    log.info("executor.apply_retry", error=str(exc), attempt=attempt)

    def _apply(self, event: OrderEvent, record: dict[str, str]) -> None:
        """Apply ``event`` to the order ``record``: the fill (written with the record), the release
        of what the reservation still holds when the broker ended the order, then the status,
        counts, open set and published event in one MULTI."""
        cid = event.client_order_id
        with self.client.pipeline(transaction=True) as writes:
            if record.get("unannounced"):  # a fill booked before a crash, not yet counted
                self._queue_announcement(writes, cid, record, record["unannounced"])
            booked = self._book_fill(event, record)
            if booked is None:  # filled more than applied, with no price to book it at: wait
                _execute(writes)
                return
            outcome, fill = booked
            if outcome is not None:
                self._queue_announcement(writes, cid, record, record["unannounced"], fill)
            status = OrderStatus(record["status"])
            new_status, reopened = _next_status(status, event.status, record.get("never_placed") == "1")
            ended = new_status.is_terminal and not status.is_terminal
            if ended and not (outcome is not None and outcome.completed):
                self._release(record, new_status)  # before the status: a crash here repeats a no-op
            fields: dict[str, str] = {}
            if new_status != status:
                fields["status"] = new_status.value
            if event.broker_order_id and record.get("broker_order_id") != event.broker_order_id:
                fields["broker_order_id"] = event.broker_order_id
            if fields:
                writes.hset(self.keys.order(cid), mapping=fields)  # type: ignore[arg-type]
            if reopened:
                writes.hdel(self.keys.order(cid), "never_placed")
                if not new_status.is_terminal:
                    writes.sadd(self.keys.open_orders, cid)
            if ended:
                writes.srem(self.keys.open_orders, cid)
            if new_status != status or outcome is not None:
                self.publisher.queue_publish(writes, ORDER_EVENTS, event.model_copy(update={
                    "status": new_status, "intent_id": record.get("intent_id"), "time": self.clock.now()}))
            _execute(writes)
        if ended and Decimal(record.get("reduced_qty", "0")) > 0:
            self._record_trade_closed(cid, record)
        if reopened:
            self._alert(AlertSeverity.CRITICAL, "order_reappeared",
                        f"{record['side']} {record['quantity']} {record['symbol']}: given up as never "
                        f"placed, but the broker reports it {event.status.value}; tracking it again", cid)
        if outcome is not None and outcome.beyond:
            self._beyond_reservation(cid, record, outcome)

    def _book_fill(self, event: OrderEvent, record: dict[str, str]
                   ) -> tuple[Outcome | None, Fill | None] | None:
        """Book in the portfolio what the event adds over what the record has applied, writing the
        record's applied figures in the same atomic step: (the outcome, the fill), (None, None)
        when there is nothing new, None when there is but without a price to book it at."""
        cid = event.client_order_id
        applied_qty = Decimal(record["applied_qty"])
        applied_cost = Decimal(record["applied_cost"])
        filled = event.filled_quantity  # cumulative: every report carries the order's filled_qty
        if filled <= applied_qty:
            return None, None
        delta = filled - applied_qty
        fee = Decimal(0)
        if event.fill is not None and event.fill.quantity == delta:
            price, fee = event.fill.price, event.fill.fee
        elif event.filled_avg_price is not None:
            price = ((event.filled_avg_price * filled - applied_cost) / delta).quantize(PRICE_PLACES)
            if price <= 0:
                price = event.filled_avg_price
        else:
            log.warning("executor.fill_without_price", filled=str(filled))
            return None
        fill = Fill(fill_id=f"{cid}:{filled}", quantity=delta, price=price, fee=fee,
                    time=event.fill.time if event.fill is not None else self.clock.now())
        side = Side(record["side"])
        signed = delta if side is Side.BUY else -delta

        def fields(outcome: Outcome) -> dict[str, str]:
            before = outcome.position_before
            reduced = min(delta, abs(before)) if before and (before > 0) != (signed > 0) else Decimal(0)
            new = {"applied_qty": str(filled), "applied_cost": str(applied_cost + delta * price),
                   "realized": str(Decimal(record.get("realized", "0")) + outcome.realized),
                   "fees": str(Decimal(record.get("fees", "0")) + fee),
                   "reduced_qty": str(Decimal(record.get("reduced_qty", "0")) + reduced),
                   "unannounced": f"{signed} {before} {fill.time.isoformat()}"}
            if reduced:
                new["entry_side"] = Side.BUY.value if before > 0 else Side.SELL.value
            return new

        update = RecordUpdate(self.keys.order(cid), ("applied_qty", record["applied_qty"]), fields)
        outcome = self.portfolio.apply_fill(record["reservation_id"], fill, side=side,
                                            symbol=record["symbol"], record=update)
        if outcome.duplicate:  # booked before, the record behind it: bring the record up to date
            self.client.hset(self.keys.order(cid), mapping={
                "applied_qty": str(filled), "applied_cost": str(applied_cost + delta * price)})
            return None, None
        record.update(fields(outcome))
        log.info("executor.fill_applied", fill_id=fill.fill_id, quantity=str(delta), price=str(price))
        return outcome, fill

    def _queue_announcement(self, writes: Pipeline, cid: str, record: Mapping[str, str], note: str,
                            fill: Fill | None = None) -> None:
        """Queue on ``writes`` what a booked fill changes besides the books: the fill and day-trade
        counts (risk's stale-balance and PDT checks), and the end of the record's note of it."""
        signed, before, at = note.split(" ")
        self.activity.queue_fill(writes, cid, record["symbol"], Decimal(signed), Decimal(before),
                                 fill.time if fill is not None else _parse_time(at))
        writes.hdel(self.keys.order(cid), "unannounced")

    def _beyond_reservation(self, cid: str, record: Mapping[str, str], outcome: Outcome) -> None:
        """A fill booked beyond its reservation: alert CRITICAL; with cash below zero, REDUCING."""
        text = f"{record['side']} {record['symbol']} fill booked beyond its reservation: {outcome.beyond}"
        log.error("executor.fill_beyond_reservation", beyond=outcome.beyond)
        self._alert(AlertSeverity.CRITICAL, "fill_beyond_reservation", text, cid)
        cash = self.portfolio.snapshot().cash
        if cash < 0:
            self.kill_switch.engage(TradingState.REDUCING, "executor",
                                    f"cash {cash} after a fill booked beyond its reservation ({cid})",
                                    escalate_only=True)

    def _adopt(self, event: OrderEvent) -> dict[str, str]:
        """Track an order the broker reports that we have no record of, when its client_order_id is
        ours (an order placed by a submit whose record was lost): its fills are booked as facts.
        Another's is alerted once and left alone. The new record, or {} if not adopted."""
        cid = event.client_order_id
        if not cid.startswith(CLIENT_ORDER_PREFIX):
            self._foreign(cid, f"{event.side} {event.symbol}")
            return {}
        fields = {"status": OrderStatus.UNKNOWN.value, "intent_id": event.intent_id or "",
                  "reservation_id": cid, "symbol": event.symbol, "side": event.side.value,
                  "quantity": str(event.filled_quantity), "order_type": OrderType.MARKET.value,
                  "applied_qty": "0", "applied_cost": "0", "created_at": self.clock.now().isoformat(),
                  "adopted": "1"}
        self.client.eval(_CREATE_RECORD, 2, self.keys.order(cid), self.keys.open_orders, cid,
                         *(x for pair in fields.items() for x in pair))
        log.error("executor.order_adopted", status=event.status.value)
        self._alert(AlertSeverity.CRITICAL, "order_adopted",
                    f"the broker has {event.side} {event.symbol} order {cid} ({event.status.value}) that we "
                    "had no record of: tracking it, its fills booked without a reservation", cid)
        return self._record(cid)

    def _foreign(self, cid: str, what: str) -> None:
        if cid in self._foreign_alerted:
            return
        self._foreign_alerted.add(cid)
        action = "cancelling it" if self.settings.executor.cancel_foreign_orders else "left alone"
        log.warning("executor.foreign_order", client_order_id=cid, action=action)
        self._alert(AlertSeverity.WARNING, "foreign_order",
                    f"the broker has an open {what} order {cid} that Bastion did not place: {action}", cid)
        if self.settings.executor.cancel_foreign_orders:
            with contextlib.suppress(OrderNotFound):
                self.broker.cancel(cid)

    def _symbol_lock(self, symbol: str) -> threading.Lock:
        """The lock that serialises the events of ``symbol``'s orders (a fill reads the position
        it changes); other symbols' events, and submits, do not wait for it."""
        with self._locks_guard:
            return self._locks.setdefault(symbol, threading.Lock())

    def _release(self, record: dict[str, str], status: OrderStatus) -> None:
        """The broker ended an order with part of its reservation unused: give that part back."""
        try:
            self.portfolio.release(record["reservation_id"], reason=status.value)
        except (PortfolioConflict, StaleFencingToken):
            raise  # retried by apply_event
        except PortfolioError as exc:  # no such reservation (an adopted order): nothing to give back
            log.warning("executor.release_failed", error=str(exc))

    def _record_trade_closed(self, cid: str, record: dict[str, str]) -> None:
        """Hand an order that reduced a position to the protections (once per order: same id)."""
        trade = ClosedTrade(trade_id=cid, symbol=record["symbol"], side=Side(record.get("entry_side", "buy")),
                            pnl=Decimal(record.get("realized", "0")) - Decimal(record.get("fees", "0")),
                            stop_out=record.get("order_type") in STOP_TYPES, at=self.clock.now())
        locks = self.protections.record_trade_closed(trade)
        log.info("executor.trade_closed", symbol=trade.symbol, pnl=str(trade.pnl), stop_out=trade.stop_out)
        self._alert_locks(locks)

    def _alert_locks(self, locks: list[ProtectionLock]) -> None:
        for lock in locks:
            self.publisher.publish(ALERTS, Alert(
                time=self.clock.now(), severity=AlertSeverity.WARNING, source="executor",
                kind="protection_lock", text=f"{lock.protection} locks {lock.symbol} {lock.side} entries "
                                             f"until {lock.until.isoformat()}: {lock.reason}",
                details={"protection": lock.protection, "symbol": lock.symbol, "side": lock.side,
                         "until": lock.until.isoformat()}))

    def _record(self, cid: str) -> dict[str, str]:
        raw: Any = self.client.hgetall(self.keys.order(cid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- kill switch requests -------------------------------------------------------------------

    def act_on_trading_state(self) -> bool:
        """Carry out the current change's cancel/flatten requests once per seq; True if it acted."""
        status = self.kill_switch.current()
        if not (status.cancel_open_orders or status.flatten_positions):
            return False
        acted = self.client.get(self.acted_key)
        if acted is not None and int(acted) >= status.seq:
            return False
        done = True
        if status.cancel_open_orders:
            done = self._cancel_open_orders(status) and done
        if status.flatten_positions:
            done = self._flatten(status) and done
        if done:
            self.client.set(self.acted_key, status.seq)
            log.warning("executor.trading_state_acted", seq=status.seq, state=status.state.value,
                        cancel_open_orders=status.cancel_open_orders, flatten=status.flatten_positions)
        return done

    def _cancel_open_orders(self, status: TradingStatus) -> bool:
        """Cancel every order we hold open, by client_order_id; False while one could not be
        cancelled, or is pending/unknown and not shown by the broker yet (it may still appear)."""
        members: Any = self.client.smembers(self.keys.open_orders)
        done = True
        for cid in sorted(m.decode() for m in members):
            if cid.startswith(f"bst-flat-{status.seq}-"):
                continue  # this change's own flatten orders
            try:
                self.broker.cancel(cid)
                log.info("executor.cancel_requested", client_order_id=cid, seq=status.seq)
            except OrderNotFound:
                if self._record(cid).get("status") in _NOT_YET_SHOWN:
                    log.info("executor.cancel_waits_for_order", client_order_id=cid)
                    done = False
                else:
                    log.warning("executor.cancel_unknown_order", client_order_id=cid)
            except BrokerError as exc:
                log.warning("executor.cancel_failed", client_order_id=cid, error=str(exc))
                done = False
        return done

    def _flatten(self, status: TradingStatus) -> bool:
        """A closing market order for every position (what other reservations do not already hold)."""
        snapshot = self.portfolio.snapshot()
        marks = self.portfolio.marks()
        done = True
        for symbol, position in sorted(snapshot.positions.items()):
            cid = f"bst-flat-{status.seq}-{symbol}"
            record = self._record(cid)
            if record and record["status"] != OrderStatus.PENDING_SUBMIT:
                continue  # submitted already; one still pending_submit is submitted again below
            quantity = abs(position.qty) - position.reserved if position.qty > 0 else abs(position.qty)
            if quantity <= 0:
                continue
            side = Side.SELL if position.qty > 0 else Side.BUY
            price = marks.get(symbol, position.avg_cost)
            order = Order(time=self.clock.now(), intent_id=cid, client_order_id=cid,
                          account=self.portfolio.account, symbol=symbol, side=side, quantity=quantity,
                          reservation_id=cid)
            try:
                if cid not in snapshot.reservations:
                    self.portfolio.reserve(cid, symbol, side, quantity, price)
                self.handle_order(Delivery(ORDERS, f"flatten-{status.seq}", order, 1), bypass_state=True)
            except (BrokerError, PortfolioError, HandlerRejected) as exc:
                log.warning("executor.flatten_failed", symbol=symbol, error=str(exc))
                done = False
        return done

    def watch_trading_state(self, stop: Stoppable, interval_s: float = 1.0) -> None:
        """Act on kill switch requests until ``stop``; a failed pass (broker or Redis unavailable, or
        a bug) is logged and the next one tries again, so no outage ends the watch."""
        while not stop.is_set():
            _one_pass("trading_state", self.act_on_trading_state)
            stop.wait(interval_s)

    # -- closing gaps -------------------------------------------------------------------------

    def poll_orders(self, *, full: bool = True) -> int:
        """Look orders up at the broker: every order held open (``full``), else only the unknown
        ones due a look-up; a ``pending_submit`` older than ``stale_pending_s`` becomes unknown.
        With ``full``, also the broker's open orders we do not track. Returns how many were looked up.
        """
        members: Any = self.client.smembers(self.keys.open_orders)
        cids = sorted(reply_text(m) for m in members)
        with self.client.pipeline(transaction=False) as pipe:
            for cid in cids:
                pipe.hgetall(self.keys.order(cid))
            raws = pipe.execute()
        now = self.clock.now()
        looked = 0
        for cid, raw in zip(cids, raws, strict=True):
            record = {reply_text(k): reply_text(v) for k, v in raw.items()}
            if not record:
                continue
            status = OrderStatus(record["status"])
            if status is OrderStatus.PENDING_SUBMIT:
                age = (now - _parse_time(record["created_at"])).total_seconds()
                if age > self.settings.executor.stale_pending_s:
                    self._mark_unknown(cid, f"pending_submit for {age:.0f}s with no submit seen")
                continue  # the order consumer owns it until then
            if status is OrderStatus.UNKNOWN:
                due = record.get("next_lookup_at")
                if due is None or now >= _parse_time(due):
                    self._chase(cid, record)
                    looked += 1
            elif full:
                self._look_up(cid)
                looked += 1
        if full:
            self._adopt_untracked(set(cids))
        return looked

    def _look_up(self, cid: str) -> None:
        try:
            self.apply_broker_order(self.broker.get_order(cid))
        except OrderNotFound:
            log.warning("executor.order_not_found_at_broker", client_order_id=cid)

    def _chase(self, cid: str, record: Mapping[str, str]) -> None:
        """Look an unknown order up: shown, it is tracked; not found ``unknown_lookup_limit`` times
        in a row, it was never placed (its reservation is released)."""
        try:
            found = self.broker.get_order(cid)
        except OrderNotFound:
            misses = int(record.get("lookups", "0")) + 1
            limit = self.settings.executor.unknown_lookup_limit
            if misses >= limit:
                self._give_up(cid, record, OrderStatus.REJECTED,
                              f"never placed: the broker did not find it {misses} times in a row",
                              never_placed=True)
                return
            wait = min(0.5 * 2 ** misses, self.settings.executor.unknown_backoff_max_s)
            self.client.hset(self.keys.order(cid), mapping={
                "lookups": str(misses),
                "next_lookup_at": (self.clock.now() + timedelta(seconds=wait)).isoformat()})
            log.info("executor.unknown_not_found", client_order_id=cid, misses=misses, next_in_s=wait)
            return
        log.info("executor.unknown_resolved", client_order_id=cid, status=found.status.value)
        self.client.hdel(self.keys.order(cid), "lookups", "next_lookup_at")
        self.apply_broker_order(found)

    def _adopt_untracked(self, tracked: set[str]) -> None:
        """The broker's open orders that we do not hold open: ours are applied (adopted, or a
        never-placed one reopened), another's are alerted (and cancelled, with the setting)."""
        for order in self.broker.open_orders():
            if order.client_order_id in tracked:
                continue
            if order.client_order_id.startswith(CLIENT_ORDER_PREFIX):
                self.apply_broker_order(order)
            else:
                self._foreign(order.client_order_id, f"{order.side} {order.quantity} {order.symbol}")

    def run_repairs(self) -> int:
        """Look up each order the reconciler asked about and apply what the broker reports; a
        request is removed once that succeeded. Returns how many were done."""
        raw: Any = self.client.hgetall(self.keys.repair_requests)
        done = 0
        for cid in sorted(reply_text(k) for k in raw):
            try:
                self.apply_broker_order(self.broker.get_order(cid))
            except OrderNotFound:
                log.warning("executor.repair_not_found", client_order_id=cid)
            self.client.hdel(self.keys.repair_requests, cid)
            log.warning("executor.repaired", client_order_id=cid)
            done += 1
        return done

    def watch_orders(self, stop: Stoppable, tick_s: float = _WATCH_TICK_S) -> None:
        """Every ``tick_s``: chase unknown orders that are due and carry out repair requests; every
        ``poll_interval_s``, and at the tick after a stream reconnect, poll every open order. A
        failed pass is logged and the next one tries again."""
        next_poll = self.clock.monotonic()

        def one_pass() -> None:
            nonlocal next_poll
            full = self.poll_requested.is_set() or self.clock.monotonic() >= next_poll
            if full:
                self.poll_requested.clear()
                next_poll = self.clock.monotonic() + self.settings.executor.poll_interval_s
            self.poll_orders(full=full)
            self.run_repairs()

        while not stop.is_set():
            _one_pass("orders", one_pass)
            stop.wait(tick_s)

    def follow_trade_updates(self, stop: Any) -> None:
        """Apply the broker's trade updates until ``stop``; once listening, and whenever the
        stream reconnected by itself (updates meanwhile are lost), ask the order watcher
        (:meth:`watch_orders`) to poll every open order -- on its own thread, so updates are not
        kept waiting behind the look-ups.

        A failure -- the stream lost, Redis unavailable, an update that cannot be applied -- is
        logged, and a second later the executor listens again and a poll follows: an update lost
        with the failure is applied from the poll (reports carry cumulative fills)."""
        while not stop.is_set():
            updates = self.broker.trade_updates()
            try:
                if not updates.wait_ready(10.0):
                    log.warning("executor.trade_updates_not_ready")
                    continue
                seen = updates.connections
                self.poll_requested.set()  # anything missed while we were not listening
                while not stop.is_set():
                    event = updates.get(timeout=0.5)
                    if event is not None:
                        self.apply_event(event)
                    if updates.connections != seen:
                        seen = updates.connections
                        log.warning("executor.trade_updates_reconnected", connections=seen)
                        self.poll_requested.set()
            except BrokerError as exc:
                log.warning("executor.trade_updates_lost", error=str(exc))
            except Exception as exc:
                if unavailable(exc):
                    log.warning("executor.trade_updates_redis_unavailable", error=str(exc))
                else:
                    log.exception("executor.trade_updates_failed")
            finally:
                updates.close()
            stop.wait(1.0)


def _one_pass(what: str, run: Callable[[], object]) -> None:
    """Run one pass of a background loop; a failure is logged (``executor.<what>_broker_failed``,
    ``_redis_unavailable``, or ``_failed`` with the traceback for a bug), never raised."""
    try:
        run()
    except BrokerError as exc:
        log.warning(f"executor.{what}_broker_failed", error=str(exc))
    except Exception as exc:
        if unavailable(exc):
            log.warning(f"executor.{what}_redis_unavailable", error=str(exc))
        else:
            log.exception(f"executor.{what}_failed")


def _next_status(current: OrderStatus, reported: OrderStatus, never_placed: bool) -> tuple[OrderStatus, bool]:
    """The order's status after a report: (status, the broker shows an order given up as never
    placed). Status never moves back from terminal, or to ``new`` once past it."""
    if never_placed and current.is_terminal and reported not in (OrderStatus.UNKNOWN, current):
        return reported, True
    if current.is_terminal or reported is OrderStatus.UNKNOWN:
        return current, False
    if reported is OrderStatus.NEW and current not in _NOT_YET_SHOWN:
        return current, False
    return reported, False


def _reservation_mismatch(order: Order, stored: bytes | None) -> str | None:
    """Why the reservation ``stored`` does not pay for ``order`` (None when it does)."""
    if stored is None:
        return f"reservation {order.reservation_id!r} is not open"
    held = Reservation.decode(stored)
    if (held.symbol, held.side, held.qty) != (order.symbol, order.side.value, order.quantity):
        return (f"reservation {order.reservation_id!r} holds {held.side} {held.qty} {held.symbol}, "
                f"not {order.side.value} {order.quantity} {order.symbol}")
    return None


def _order_fields(order: Order) -> dict[str, str]:
    return {"intent_id": order.intent_id, "symbol": order.symbol, "side": order.side.value,
            "quantity": str(order.quantity)}


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _execute(writes: Pipeline) -> None:
    """Send what is queued on ``writes``, if anything."""
    if len(writes):
        writes.execute()


def main(ctx: ServiceContext) -> None:
    """Run the executor until stopped."""
    broker = build_broker(ctx.settings, client=ctx.redis, clock=ctx.clock)
    executor = Executor(ctx.redis, ctx.keys, ctx.settings, ctx.clock, broker, ctx.publisher())
    executor.portfolio.open()
    threads = [threading.Thread(target=target, args=(ctx.stop,), name=name, daemon=True)
               for name, target in (("trade-updates", executor.follow_trade_updates),
                                    ("orders", executor.watch_orders),
                                    ("trading-state", executor.watch_trading_state))]
    for thread in threads:
        thread.start()
    ctx.consumer(ORDERS, ctx.settings.executor.consumer_group, executor.handle_order).run(ctx.stop)
    for thread in threads:
        thread.join(ctx.settings.bus.grace_seconds)
