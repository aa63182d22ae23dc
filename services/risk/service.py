"""Risk: every intent is checked, sized, rounded and paid for before it becomes an order.

Consumes ``intents`` (group ``risk``); publishes approved orders to ``orders``, refusals to
``rejections`` (``<rule>: <sentence>``) and protection locks to ``alerts``. The checks run in
the order docs/RISK.md gives (the first refusal wins; every failing limit is reported together);
the last is ``Portfolio.reserve`` under the account lock, the guard that makes overspending
impossible. A strategy's intent that cannot execute now waits in the
:class:`~shared.safety.deferred.DeferredQueue` and is decided again every ``TICK_S``; a manual
intent is never deferred. Marks come from ``<prefix>:last-price``, which the ingester writes in
the script that publishes each bar, so an intent finds the price of the bar it came from.

Guarantee: each intent is decided once. The reservation id is the intent id, the
client_order_id derives from it, and the publish is applied once per intent id
(:meth:`shared.bus.Idempotency.publish_once`); a redelivered intent whose reservation is open
republishes the order that reservation records. A reservation refused because another writer
moved the account (stale fencing token, version conflict) is decided again, not rejected.

Threads: the intents consumer and the ticker (:meth:`RiskService.run_ticks`: the deferred queue
and MaxDrawdown's equity samples); they share only the equity sample time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

import redis
from redis.client import Pipeline

from services.risk._account import AccountView, Reads, client_order_id
from services.risk._deferred import DeferredTicks
from shared.brokers import Broker, build_broker
from shared.bus import Delivery, Idempotency, codec
from shared.clock import Clock
from shared.config import Settings
from shared.errors import (
    BrokerError,
    HandlerRejected,
    InsufficientFunds,
    InsufficientPosition,
    PortfolioConflict,
    PortfolioError,
    RedisUnavailable,
    StaleFencingToken,
)
from shared.keys import INTENTS, ORDERS, REJECTIONS, Keys
from shared.logging import get_logger
from shared.models import ExitReason, Intent, IntentRejected, Order, OrderType
from shared.portfolio import Portfolio, Reservation
from shared.redis.boundary import REDIS_DOWN
from shared.safety.deferred import DeferredIntent, DeferredQueue
from shared.safety.limits import (
    AccountSnapshot,
    OrderCheck,
    OrderSubmissions,
    Refusal,
    Rule,
    check_order,
    is_reducing,
)
from shared.safety.protections import Protections
from shared.safety.protective_stops import cancel_on_purpose, open_protective_stops
from shared.safety.sizing import check_exits, size_order
from shared.safety.symbols import PreparedOrder, SymbolProperties
from shared.safety.trading_state import KillSwitch
from shared.service import ServiceContext

__all__ = ["Deferred", "Refused", "RiskService", "client_order_id", "main"]

log = get_logger(component="risk")
GROUP = "risk"
_DECIDE_ATTEMPTS = 3
_STOP_TYPES = (OrderType.STOP, OrderType.STOP_LIMIT)
_PENDING_RULES = {Rule.MAX_GROSS_EXPOSURE, Rule.MAX_POSITION_FRACTION, Rule.MAX_POSITION_QUANTITY,
                  Rule.MAX_OPEN_ORDERS, Rule.PATTERN_DAY_TRADING}


class Refused(Exception):
    """An intent risk will not approve; the message is the reason a user reads."""


class Deferred(Exception):
    """An intent that cannot go now, only because of pending orders; the message is the refusal."""


class RiskService(DeferredTicks):
    """Decides on intents; holds no state of its own (everything is read from Redis)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock, *,
                 broker: Broker | None = None, broker_factory: Callable[[], Broker] | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.portfolio = Portfolio(client, keys, settings.portfolio.account, settings=settings.portfolio,
                                   lock_settings=settings.lock, clock=clock)
        self.once = Idempotency(client, keys, GROUP, settings.bus.idempotency_ttl_s)
        self.kill_switch = KillSwitch(client, keys, clock)
        self.protections = Protections(client, keys, settings.protections, clock)
        self.submissions = OrderSubmissions(client, keys, settings.limits, clock)
        self.deferred = DeferredQueue(client, keys, clock, settings.limits.deferred_max_age_s,
                                      on_dropped=self._dropped)
        factory = broker_factory if broker is None else (lambda: broker)
        self.account = AccountView(client, keys, self.portfolio, settings.limits, clock, factory)
        self._last_equity_sample: datetime | None = None
        self._sample_lock = threading.Lock()

    # -- intents --------------------------------------------------------------------------------

    def handle_intent(self, delivery: Delivery) -> None:
        """Approve, refuse or defer one intent (a bus handler)."""
        intent = delivery.message
        if not isinstance(intent, Intent):
            return
        self._read_and_decide(intent, None)

    def _read_and_decide(self, intent: Intent, queued: DeferredIntent | None) -> None:
        """Read (taking the account lock if it is free), then approve, refuse or defer ``intent``
        (``queued``: its deferred-queue entry when it is decided again); the lock is let go in
        every case. A reservation refused only because another writer moved the account (a stale
        fencing token, a version conflict) is decided again from fresh reads."""
        for attempt in range(1, _DECIDE_ATTEMPTS + 1):
            reads = self._read(intent)
            try:
                if reads.seen:
                    self._settle(reads)
                    log.info("risk.duplicate_intent", deferred=queued is not None)
                    return
                recorded = reads.book.reservations.get(intent.id)
                if recorded is not None:  # decided before (its publish was lost): that decision stands
                    self._settle(reads)
                    self._republish(intent, recorded, reads)
                    return
                if queued is None:
                    self._cancel_opposite(intent, reads)
                self._decide_and_publish(intent, queued, reads)
                return
            except (StaleFencingToken, PortfolioConflict) as exc:
                if attempt == _DECIDE_ATTEMPTS:
                    raise  # the bus delivers it again
                log.info("risk.decide_again", error=str(exc), attempt=attempt)
            finally:
                self.account.let_go(reads)

    def _republish(self, intent: Intent, recorded: Reservation, reads: Reads) -> None:
        """Publish (once) the order the intent's reservation records, whatever the marks say now
        (an entry with its protective exits: the order was never filled, so the position read now
        says whether it opens one)."""
        if (recorded.side, recorded.symbol) != (intent.side.value, intent.symbol):
            raise HandlerRejected(f"reservation {intent.id!r} holds {recorded.side} {recorded.symbol}, "
                                  f"not this intent's {intent.side.value} {intent.symbol}")
        limit = recorded.price if intent.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None
        held = reads.book.positions.get(intent.symbol)
        entry = not is_reducing(intent.side, held.qty if held is not None else Decimal(0), recorded.qty)
        order = Order(time=self.clock.now(), intent_id=intent.id, client_order_id=client_order_id(intent.id),
                      account=self.portfolio.account, symbol=intent.symbol, side=intent.side,
                      quantity=recorded.qty, order_type=intent.order_type, limit_price=limit,
                      stop_price=intent.stop_price, time_in_force=intent.time_in_force,
                      reservation_id=intent.id, exit_reason=_exit_reason(intent, entry),
                      stop_loss=intent.stop_loss if entry else None,
                      take_profit=intent.take_profit if entry else None, source=intent.source)
        self._publish_once(intent.id, order)
        log.info("risk.republished", client_order_id=order.client_order_id, quantity=str(order.quantity))

    def _read(self, intent: Intent) -> Reads:
        return self.account.read(intent.id, once=self.once, kill_switch=self.kill_switch,
                                 protections=self.protections, deferred=self.deferred,
                                 submissions=self.submissions)

    def _settle(self, reads: Reads, rejection: IntentRejected | None = None, source: str = "") -> None:
        """After a decision that made no order, in one round trip: let the account lock go (first:
        the executor may be waiting for it), uncount the submission counted with ``reads``, and
        publish ``rejection`` if there is one (and route it to the strategy of ``source``,
        :meth:`_feed`). A failed let-go or refund is logged (the lock
        expires; the count leaves the window); a failed publish raises."""
        held, reads.held = reads.held, None
        refund = reads.admission is None  # None: the submission was counted
        if held is None and not refund and rejection is None:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                if held is not None:
                    self.portfolio.queue_let_go(pipe, held)
                if refund:
                    self.submissions.queue_refund(pipe, reads.admission_id)
                if rejection is not None:
                    self.once.queue_publish_once(pipe, rejection.intent_id, self.keys.stream(REJECTIONS),
                                                 codec.encode(rejection), self.settings.bus.maxlen,
                                                 copies=self._feed(source, rejection.symbol))
                replies = pipe.execute(raise_on_error=False)
        except REDIS_DOWN as exc:
            if rejection is not None:
                raise RedisUnavailable(f"risk: publishing the rejection failed: {exc}") from exc
            log.warning("risk.settle_failed", error=str(exc))
            return
        if held is not None:
            self.portfolio.let_go_from(held, replies.pop(0))
        if rejection is not None:
            self.once.published(replies.pop())
        if any(isinstance(reply, Exception) for reply in replies):  # the refund's
            log.warning("risk.submission_refund_failed", error=str(replies))

    def _decide_and_publish(self, intent: Intent, queued: DeferredIntent | None, reads: Reads) -> None:
        try:
            order, published = self.decide(intent, reads)
        except BaseException as exc:
            if not isinstance(exc, (Deferred, Refused)):
                self._settle(reads)
                raise
            reason = _rejection_reason(intent, exc)
            rejection = None if reason is None else self._rejected(intent, reason)
            self._settle(reads, rejection, intent.source)
            if rejection is None:
                self._defer(intent, f"waiting: {exc}", queued)
            else:
                log.info("risk.rejected", reason=rejection.reason)
            return
        if not published:  # the reservation was there already (a redelivery): publish it now
            self._publish_once(intent.id, order)
        log.info("risk.approved", client_order_id=order.client_order_id, quantity=str(order.quantity),
                 side=order.side.value, deferred=queued is not None)

    def _rejected(self, intent: Intent, reason: str) -> IntentRejected:
        return IntentRejected(time=self.clock.now(), intent_id=intent.id, symbol=intent.symbol, reason=reason)

    def _reject(self, intent: Intent, reason: str) -> None:
        self.once.publish_once(intent.id, self.keys.stream(REJECTIONS),
                               codec.encode(self._rejected(intent, reason)), self.settings.bus.maxlen,
                               copies=self._feed(intent.source, intent.symbol))
        log.info("risk.rejected", reason=reason)

    def _check_locks(self, intent: Intent, reads: Reads) -> None:
        """Refuse an entry a protection locks, unless an operator overrides the locks (logged)."""
        refusal = self.protections.refusal(intent.symbol, intent.side, reads.locks)
        if refusal is None:
            return
        if intent.override_locks is None:
            hint = "; an operator may override: bastion order ... --override-locks REASON" \
                if intent.source == "manual" else ""
            raise Refused(f"{refusal}{hint}")
        log.warning("risk.locks_overridden", symbol=intent.symbol, side=intent.side.value,
                    lock=refusal.reason, override=intent.override_locks)

    def _feed(self, source: str, symbol: str) -> list[str]:
        """Where a rejection of an intent from ``source`` is copied: its strategy's bar partition
        (the strategy's ``on_order_event`` sees it), or nowhere."""
        feed = self.keys.strategy_feed(source, symbol, self.settings.ingester.partitions)
        return [feed] if feed else []

    def decide(self, intent: Intent, reads: Reads) -> tuple[Order, bool]:
        """The order ``intent`` becomes, with its reservation made; Refused or Deferred otherwise.

        ``reads``: what :meth:`AccountView.read` returned for it. The order is published on
        ``orders`` in the round trip of the reservation's write, provided the reservation is
        there (the second value says whether that happened: not when the reservation was made
        before, by an earlier delivery of the intent).
        """
        book = reads.book
        held = book.positions.get(intent.symbol)
        position = held.qty if held is not None else Decimal(0)
        status = reads.status
        _refuse_if(status.refusal(intent.side, position))
        if not is_reducing(intent.side, position):
            self._check_locks(intent, reads)
        elif position > 0:
            self._make_room_for_exit(intent, reads, position)
        closed = self.account.market_closed()
        if closed is not None:
            raise Deferred(closed)
        price = self._reference_price(intent, reads.marks)
        _refuse_if(check_exits(intent.side, price, intent.stop_loss, intent.take_profit))
        stale_balance: str | None = None
        if intent.quantity is not None:
            quantity = intent.quantity
        elif intent.notional is not None:
            quantity = self._shares_for(intent, price)
        else:  # sized on the account: the balance must be fresh first
            stale_balance = self.account.refresh_if_needed(reads)
            quantity = self._sized(intent, price, reads, position, stale_balance)
        prepared = self._round(intent, quantity, price)
        quantity = prepared.quantity
        if prepared.limit_price is not None and intent.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            price = prepared.limit_price
        _refuse_if(status.refusal(intent.side, position, quantity))
        entry = not is_reducing(intent.side, position, quantity)
        if intent.quantity is not None or intent.notional is not None:
            stale_balance = self.account.refresh_if_needed(reads)
        if stale_balance is not None and entry:
            raise Refused(f"{Rule.STALE_BALANCE}: {stale_balance}; entries wait for a fresh balance")
        snapshot = self.account.snapshot(reads)
        check = OrderCheck(intent.symbol, intent.side, quantity, price)
        found = [r for r in check_order(check, snapshot, self.settings.limits)
                 if entry or r.rule is not Rule.STALE_BALANCE]
        if found:
            reason = "; ".join(str(r) for r in found)
            if {r.rule for r in found} <= _PENDING_RULES and not check_order(
                    check, _without_pending(snapshot), self.settings.limits):
                raise Deferred(f"{reason} (counting pending orders)")
            raise Refused(reason)
        _refuse_if(reads.admission)
        order = Order(time=self.clock.now(), intent_id=intent.id, client_order_id=client_order_id(intent.id),
                      account=self.portfolio.account, symbol=intent.symbol, side=intent.side,
                      quantity=quantity, order_type=intent.order_type,
                      limit_price=prepared.limit_price,
                      stop_price=intent.stop_price, time_in_force=intent.time_in_force,
                      reservation_id=intent.id, exit_reason=_exit_reason(intent, entry),
                      stop_loss=intent.stop_loss if entry else None,
                      take_profit=intent.take_profit if entry else None, source=intent.source)
        return order, self._reserve(intent, reads, order, price)

    def _reserve(self, intent: Intent, reads: Reads, order: Order, price: Decimal) -> bool:
        """Reserve what ``order`` needs (under the lock ``reads`` holds, if it does) and publish it
        behind the write; True if it was published."""
        def publish(pipe: Pipeline) -> None:
            self.once.queue_publish_once(pipe, intent.id, self.keys.stream(ORDERS), codec.encode(order),
                                         self.settings.bus.maxlen,
                                         provided=(self.portfolio.reservations_key, intent.id))

        quantity, book = order.quantity, reads.book
        held, reads.held = reads.held, None  # spent by the reserve, whatever its outcome
        try:
            outcome = self.portfolio.reserve(intent.id, intent.symbol, intent.side, quantity, price,
                                             then=publish, held=held)
        except InsufficientFunds as exc:
            reason = str(exc).split(": ", 1)[-1]
            needed = quantity * price * (1 + self.settings.portfolio.fee_buffer_bps / Decimal(10_000))
            if book.reserved > 0 and self.portfolio.snapshot().cash >= needed:
                raise Deferred(f"{reason} (cash is reserved by pending orders)") from exc
            raise Refused(reason) from exc
        except InsufficientPosition as exc:
            raise Refused(str(exc).split(": ", 1)[-1]) from exc
        except (StaleFencingToken, PortfolioConflict):
            raise  # another writer moved the account: decided again
        except PortfolioError as exc:
            raise Refused(str(exc)) from exc
        if outcome.followed is None:
            return False  # the reservation was open already: nothing was written or queued
        if self.once.published(outcome.followed[0]) is None:  # cannot be: the write just made it
            raise RuntimeError(f"order of intent {intent.id} not published: its reservation is missing")
        return True

    def _round(self, intent: Intent, quantity: Decimal, price: Decimal) -> PreparedOrder:
        result = SymbolProperties(intent.symbol).prepare(intent.side, quantity, intent.limit_price,
                                                         reference_price=price)
        if isinstance(result, Refusal):
            raise Refused(str(result))
        return result

    def _reference_price(self, intent: Intent, marks: dict[str, Decimal]) -> Decimal:
        if intent.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and intent.limit_price is not None:
            return intent.limit_price
        if intent.order_type is OrderType.STOP and intent.stop_price is not None:
            return intent.stop_price
        mark = marks.get(intent.symbol)
        if mark is None:
            raise Deferred(f"no price for {intent.symbol} yet (no bar seen)")  # a strategy's waits for one
        return mark

    def _make_room_for_exit(self, intent: Intent, reads: Reads, position: Decimal) -> None:
        """A sell of a long that the protective stops' reservations leave no room for: ask the
        broker to cancel those stops (marked ``cancel_reason``, so the executor does not replace
        them) and defer the exit until their shares are released."""
        held = reads.book.positions.get(intent.symbol)
        free = position - (held.reserved if held is not None else Decimal(0))
        if free >= (intent.quantity if intent.quantity is not None else position):
            return
        found = open_protective_stops(self.client, self.keys, reads.open_orders).get(intent.symbol, [])
        stops = [cid for cid, side in found if side == intent.side.value]
        if not stops:
            return  # other orders hold the shares: the reservation's refusal says so
        self.account.let_go(reads)  # no broker call under the account lock
        broker = self.account.broker()
        for cid in stops:
            try:
                cancel_on_purpose(self.client, self.keys, cid, f"exit {intent.id}", broker.cancel)
            except BrokerError as exc:  # the next decision asks again
                log.warning("risk.protection_cancel_failed", client_order_id=cid, error=str(exc))
        log.info("risk.protection_cancelled_for_exit", stops=stops)
        raise Deferred(f"{intent.symbol} shares are held by protective stop(s) {', '.join(stops)}: "
                       "cancelling them first")

    def _sized(self, intent: Intent, price: Decimal, reads: Reads, position: Decimal,
               stale_balance: str | None) -> Decimal:
        """The size of an intent that named none (:mod:`shared.safety.sizing`)."""
        book = reads.book
        held = book.positions.get(intent.symbol)
        free = position - held.reserved if held is not None and position > 0 else position
        if stale_balance is not None and not is_reducing(intent.side, position):
            raise Refused(f"{Rule.STALE_BALANCE}: {stale_balance}; entries wait for a fresh balance")
        sized = size_order(intent.symbol, intent.side, price, intent.stop_loss, free_position=free,
                           buying_power=book.cash - book.reserved,
                           fee_buffer_bps=self.settings.portfolio.fee_buffer_bps,
                           snapshot=self.account.snapshot(reads), risk=self.settings.risk,
                           limits=self.settings.limits)
        if isinstance(sized, Refusal):
            raise Refused(str(sized))
        log.info("risk.sized", quantity=str(sized.quantity), basis=sized.basis)
        return sized.quantity

    def _shares_for(self, intent: Intent, price: Decimal) -> Decimal:
        assert intent.notional is not None
        shares = (intent.notional / price).quantize(Decimal(1), rounding=ROUND_DOWN)
        if shares <= 0:
            raise Refused(f"notional {intent.notional} buys no whole share at {price}")
        return shares

    def _publish_once(self, intent_id: str, order: Order) -> None:
        self.once.publish_once(intent_id, self.keys.stream(ORDERS), codec.encode(order),
                               self.settings.bus.maxlen)


def _rejection_reason(intent: Intent, outcome: Deferred | Refused) -> str | None:
    """Why an intent refused or deferred is rejected; None when it waits in the deferred queue."""
    if isinstance(outcome, Refused):
        return str(outcome)
    if intent.source.startswith("strategy:"):
        return None
    return f"{outcome} (not now; a manual intent is not deferred)"


def _exit_reason(intent: Intent, entry: bool) -> ExitReason:
    """The intent's exit reason; a stop order that reduces a position is a stop-loss exit."""
    if not entry and intent.exit_reason is ExitReason.SIGNAL and intent.order_type in _STOP_TYPES:
        return ExitReason.STOP_LOSS
    return intent.exit_reason


def _refuse_if(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise Refused(str(refusal))


def _without_pending(snapshot: AccountSnapshot) -> AccountSnapshot:
    """The snapshot as if no order were pending (to tell "not now" from "never")."""
    return replace(snapshot, pending={}, open_orders=0, pending_day_trades=0)


def main(ctx: ServiceContext) -> None:
    """Run the risk service until stopped."""
    def broker() -> Broker:
        return build_broker(ctx.settings, client=ctx.redis, clock=ctx.clock)

    service = RiskService(ctx.redis, ctx.keys, ctx.settings, ctx.clock, broker_factory=broker)
    service.portfolio.open()
    ticker = threading.Thread(target=service.run_ticks, args=(ctx.stop,), name="risk-ticks", daemon=True)
    ticker.start()
    ctx.consumer(INTENTS, GROUP, service.handle_intent).run(ctx.stop)
    ticker.join(ctx.settings.bus.grace_seconds)
