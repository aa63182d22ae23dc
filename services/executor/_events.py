"""Broker reports (trade updates, look-ups) into order records, fills into the portfolio."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from services.executor._records import (
    APPLY_ATTEMPTS,
    CREATE_RECORD_SCRIPT,
    PRICE_PLACES,
    execute_queued,
    next_status,
    parse_time,
)
from shared.brokers import Broker, BrokerOrder
from shared.bus import Publisher, codec
from shared.clock import Clock
from shared.config import Settings
from shared.errors import (
    OrderNotFound,
    PortfolioConflict,
    PortfolioError,
    StaleFencingToken,
)
from shared.keys import ALERTS, ORDER_EVENTS, Keys
from shared.logging import bind_correlation, get_logger
from shared.models import (
    CLIENT_ORDER_PREFIX,
    Alert,
    AlertSeverity,
    ExitReason,
    Fill,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
)
from shared.portfolio import Outcome, Portfolio, RecordUpdate
from shared.safety.account_activity import AccountActivity
from shared.safety.protections import ClosedTrade, ProtectionLock, Protections
from shared.safety.trading_state import KillSwitch, TradingState

__all__ = ["EventBook"]

log = get_logger(component="executor")


class EventBook:
    """Applies the broker's reports to order records and the portfolio (a fill booked exactly once)."""

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
        self.acted_key = keys.trading_state_acted
        self.poll_requested = threading.Event()  # set on a stream reconnect: poll at the next tick
        self._locks: dict[str, threading.RLock] = {}  # one per symbol, made under _locks_guard
        self._locks_guard = threading.Lock()
        self._foreign_alerted: set[str] = set()

    def apply_broker_order(self, placed: BrokerOrder) -> None:
        """Apply an order as the broker reports it (a submit reply or a look-up), and its legs."""
        if placed.legs:
            self._record_legs(placed)
        for order in (placed, *placed.legs):
            self.apply_event(OrderEvent(
                time=self.clock.now(), client_order_id=order.client_order_id,
                broker_order_id=order.broker_order_id, symbol=order.symbol, side=order.side,
                status=order.status, filled_quantity=order.filled_quantity,
                filled_avg_price=order.filled_avg_price))

    def _record_legs(self, placed: BrokerOrder) -> None:
        """Record the legs of a protective OCO pair we placed (the broker names them), unless they
        are recorded: each is tracked like the take-profit it belongs to (``oco_parent``), shares
        its reservation and protects the same entry; a stop leg's exit reason is stop_loss."""
        parent_cid = placed.client_order_id
        parent = self._record(parent_cid)
        if not parent.get("protects"):
            return
        with self.client.pipeline(transaction=True) as pipe:
            for leg in placed.legs:
                stop = leg.stop_price is not None
                fields = {
                    "status": OrderStatus.NEW.value, "intent_id": parent.get("intent_id", ""),
                    "reservation_id": parent["reservation_id"], "symbol": leg.symbol, "side": leg.side.value,
                    "quantity": str(leg.quantity), "order_type": leg.order_type.value, "applied_qty": "0",
                    "applied_cost": "0", "created_at": self.clock.now().isoformat(),
                    "exit_reason": (ExitReason.STOP_LOSS if stop else ExitReason.TAKE_PROFIT).value,
                    "protects": parent["protects"], "oco_parent": parent_cid,
                    "source": parent.get("source", "")}
                leg_cid = leg.client_order_id
                pipe.eval(CREATE_RECORD_SCRIPT, 2, self.keys.order(leg_cid), self.keys.open_orders, leg_cid,
                          *(x for pair in fields.items() for x in pair))
            pipe.hset(self.keys.order(parent_cid), "legs", " ".join(o.client_order_id for o in placed.legs))
            pipe.execute()

    def oco_members(self, cid: str, record: Mapping[str, str]) -> list[str]:
        """The other orders of ``cid``'s OCO pair (empty for an order in none)."""
        parent = record.get("oco_parent") or (cid if record.get("legs") else "")
        if not parent:
            return []
        legs = (record if parent == cid else self._record(parent)).get("legs", "").split()
        return [member for member in (parent, *legs) if member != cid]

    def _may_release(self, cid: str, record: Mapping[str, str]) -> bool:
        """Whether ``cid``, ended, gives back what its reservation holds: an OCO pair shares one,
        given back when its last open order ends (unless a fill used it up)."""
        others = self.oco_members(cid, record)
        if not others:
            return True
        if any(not OrderStatus(self._record(m).get("status", "canceled")).is_terminal for m in others):
            return False
        return bool(self.client.hexists(self.portfolio.reservations_key, record["reservation_id"]))

    def apply_event(self, event: OrderEvent) -> bool:
        """Apply an order report: the fill increase (once, with the record, atomically), the
        status, the release when the broker ended the order. A report racing another for the same
        order is re-read and applied again; an order we do not track is adopted when its id is ours.
        True when the order is an entry with a stop-loss and the report booked a fill of it.
        """
        with self._symbol_lock(event.symbol), bind_correlation(client_order_id=event.client_order_id):
            for attempt in range(1, APPLY_ATTEMPTS + 1):
                record = self._record(event.client_order_id)
                if not record:
                    record = self._adopt(event)
                    if not record:
                        return False
                try:
                    return self._apply(event, record)
                except (PortfolioConflict, StaleFencingToken) as exc:
                    if attempt == APPLY_ATTEMPTS:
                        raise
                    log.info("executor.apply_retry", error=str(exc), attempt=attempt)
        return False

    def _apply(self, event: OrderEvent, record: dict[str, str]) -> bool:
        """Apply ``event`` to the order ``record``: the fill (written with the record), the release
        of what the reservation still holds when the broker ended the order, then the status,
        counts, open set and published event in one MULTI. True when a fill of an entry with a
        stop-loss was booked."""
        cid = event.client_order_id
        with self.client.pipeline(transaction=True) as writes:
            if record.get("unannounced"):  # a fill booked before a crash, not yet counted
                self._queue_announcement(writes, cid, record, record["unannounced"])
            booked = self._book_fill(event, record)
            if booked is None:  # filled more than applied, with no price to book it at: wait
                execute_queued(writes)
                return False
            outcome, fill = booked
            if outcome is not None:
                self._queue_announcement(writes, cid, record, record["unannounced"], fill)
            status = OrderStatus(record["status"])
            new_status, reopened = next_status(status, event.status, record.get("never_placed") == "1")
            ended = new_status.is_terminal and not status.is_terminal
            if ended and not (outcome is not None and outcome.completed) and self._may_release(cid, record):
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
                if record.get("protects") and new_status is not OrderStatus.FILLED \
                        and not record.get("cancel_reason"):  # ended unfilled, not by us: replaced
                    writes.sadd(self.keys.unprotected, record["protects"])
            if new_status != status or outcome is not None:
                published = event.model_copy(update={
                    "status": new_status, "intent_id": record.get("intent_id"), "time": self.clock.now()})
                self.publisher.queue_publish(writes, ORDER_EVENTS, published)
                feed = self.keys.strategy_feed(record.get("source", ""), event.symbol,
                                               self.settings.ingester.partitions)
                if feed is not None:  # the strategy that asked for the order hears of it, in its bars' order
                    writes.xadd(feed, codec.encode(published))  # type: ignore[arg-type]
            execute_queued(writes)
        if ended and Decimal(record.get("reduced_qty", "0")) > 0:
            self._record_trade_closed(cid, record)
        if reopened:
            self._alert(AlertSeverity.CRITICAL, "order_reappeared",
                        f"{record['side']} {record['quantity']} {record['symbol']}: given up as never "
                        f"placed, but the broker reports it {event.status.value}; tracking it again", cid)
        if outcome is not None and outcome.beyond:
            self._beyond_reservation(cid, record, outcome)
        return outcome is not None and bool(record.get("stop_loss"))

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
                                 fill.time if fill is not None else parse_time(at))
        if record.get("stop_loss"):
            writes.sadd(self.keys.unprotected, cid)
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
        self.client.eval(CREATE_RECORD_SCRIPT, 2, self.keys.order(cid), self.keys.open_orders, cid,
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

    def _symbol_lock(self, symbol: str) -> threading.RLock:
        """The lock that serialises the events of ``symbol``'s orders (a fill reads the position
        it changes); other symbols' events, and submits, do not wait for it (but the submit of an
        OCO pair holds it until its legs are recorded)."""
        with self._locks_guard:
            return self._locks.setdefault(symbol, threading.RLock())

    def _release(self, record: dict[str, str], status: OrderStatus) -> None:
        """The broker ended an order with part of its reservation unused: give that part back."""
        try:
            self.portfolio.release(record["reservation_id"], reason=status.value)
        except (PortfolioConflict, StaleFencingToken):
            raise  # retried by apply_event
        except PortfolioError as exc:  # no such reservation (an adopted order): nothing to give back
            log.warning("executor.release_failed", error=str(exc))

    def _record_trade_closed(self, cid: str, record: dict[str, str]) -> None:
        """An order that reduced a position ended: add its PnL to the symbol's round trip, and when
        the position is flat (or turned), hand the round trip to the protections, named by this
        order and its exit reason (once per order: same id)."""
        symbol = record["symbol"]
        pnl = Decimal(record.get("realized", "0")) - Decimal(record.get("fees", "0"))
        before: Any = self.client.hget(self.keys.round_trips, symbol)
        pnl += Decimal(before.decode()) if before is not None else Decimal(0)
        held = self.portfolio.snapshot().positions.get(symbol)
        entry_side = Side(record.get("entry_side", "buy"))
        still_open = held is not None and held.qty and (held.qty > 0) == (entry_side is Side.BUY)
        if still_open:
            self.client.hset(self.keys.round_trips, symbol, str(pnl))
            log.info("executor.trade_reduced", symbol=symbol, round_trip_pnl=str(pnl))
            return
        trade = ClosedTrade(trade_id=cid, symbol=symbol, side=entry_side, pnl=pnl,
                            exit_reason=ExitReason(record.get("exit_reason", ExitReason.SIGNAL.value)),
                            at=self.clock.now())
        locks = self.protections.record_trade_closed(trade)
        self.client.hdel(self.keys.round_trips, symbol)
        log.info("executor.trade_closed", symbol=symbol, pnl=str(pnl), exit_reason=trade.exit_reason.value)
        self._alert_locks(locks)

    def _alert_locks(self, locks: list[ProtectionLock]) -> None:
        for lock in locks:
            self.publisher.publish(ALERTS, Alert(
                time=self.clock.now(), severity=AlertSeverity.WARNING, source="executor",
                kind="protection_lock", text=f"{lock.protection} locks {lock.symbol} {lock.side} entries "
                                             f"until {lock.until.isoformat()}: {lock.reason}",
                details={"protection": lock.protection, "symbol": lock.symbol, "side": lock.side,
                         "until": lock.until.isoformat()}))

    def _alert(self, severity: AlertSeverity, kind: str, text: str, cid: str, **details: str) -> None:
        self.publisher.publish(ALERTS, Alert(time=self.clock.now(), severity=severity, source="executor",
                                             kind=kind, text=text,
                                             details={"client_order_id": cid, **details}))

    def _record(self, cid: str) -> dict[str, str]:
        raw: Any = self.client.hgetall(self.keys.order(cid))
        return {k.decode(): v.decode() for k, v in raw.items()}
