"""Approved orders from the ``orders`` stream: recorded, checked against their reservation, submitted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal

from services.executor._events import EventBook
from services.executor._records import (
    CREATE_RECORD_SCRIPT,
    MARK_UNKNOWN_SCRIPT,
)
from shared.brokers import SUBMIT_ENDPOINT, OrderRequest
from shared.bus import Delivery
from shared.errors import (
    AmbiguousSubmit,
    HandlerRejected,
    OrderNotFound,
    OrderRejected,
    RedisUnavailable,
    Unavailable,
)
from shared.keys import ORDER_EVENTS
from shared.logging import get_logger
from shared.models import (
    AlertSeverity,
    Order,
    OrderEvent,
    OrderStatus,
    Side,
)
from shared.portfolio import Reservation
from shared.safety.limits import Refusal
from shared.safety.rate_limit import Grant
from shared.safety.symbols import SymbolProperties
from shared.safety.trading_state import TradingState, TradingStatus

__all__ = ["OrderDesk"]

log = get_logger(component="executor")


class OrderDesk(EventBook):
    """Records and submits approved orders, one broker order per client_order_id."""

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
        target = prepared.limit_price if request.oco else request.take_profit  # an OCO's limit is its target
        return replace(request, quantity=prepared.quantity, limit_price=prepared.limit_price,
                       take_profit=target)

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
            "exit_reason": order.exit_reason.value,
        }
        if order.protects is not None:
            fields["protects"] = order.protects
        elif order.stop_loss is not None:  # an entry's exits, placed once it fills
            fields["stop_loss"] = str(order.stop_loss)
            if order.take_profit is not None:
                fields["take_profit"] = str(order.take_profit)
        if order.source:
            fields["source"] = order.source
        cid = order.client_order_id
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.portfolio.reservations_key, order.reservation_id)
            pipe.eval(CREATE_RECORD_SCRIPT, 2, self.keys.order(cid), self.keys.open_orders, cid,
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
        marked = self.client.eval(MARK_UNKNOWN_SCRIPT, 1, self.keys.order(cid),
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
        self.client.hset(self.keys.order(cid), mapping={"reason": reason[:500],
                                                        **({"never_placed": "1"} if never_placed else {})})
        self.apply_event(OrderEvent(time=self.clock.now(), client_order_id=cid,
                                    intent_id=record.get("intent_id"), symbol=record["symbol"],
                                    side=Side(record["side"]), status=status, reason=reason))
        self._alert(AlertSeverity.WARNING, "order_failed",
                    f"{record['side']} {record['quantity']} {record['symbol']}: {reason}", cid)


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
