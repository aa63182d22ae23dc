"""The executor: submits approved orders and turns the broker's events into portfolio changes.

Orders (``orders``, group ``executor``): the order is recorded in ``order:<client_order_id>``
with status ``pending_submit`` *before* the submit (claim before acting), then submitted through
the broker adapter with the client_order_id risk derived from the intent id. A redelivered order
whose record is past ``pending_submit`` is a duplicate and is skipped; one still
``pending_submit`` (we died mid-submit) is submitted again, which the adapter resolves by
client_order_id -- the broker never sees two orders. A broker rejection releases the
reservation; an ambiguous or unavailable broker leaves the entry pending to be retried, and on
the last delivery the order is given up: reservation released, alert raised.

Fills (the broker's trade-update stream, and polls of open orders): each update carries the
order's *cumulative* filled quantity. The executor applies only the increase over what it has
applied, as a fill whose id is ``<client_order_id>:<cumulative qty>`` -- so a repeated update, an
out-of-order one, and a poll that overlaps the stream all change nothing twice. A terminal order
releases whatever its reservation still holds. Every change is published on ``order-events``.

Before a submit the order is checked against the trading state (an order risk approved before a
HALTED, or a non-reducing one under REDUCING, is given up: reservation released) and rounded with
the symbol's default :class:`~shared.symbols.SymbolProperties` (quantity toward zero, a buy limit
down, a sell limit up: never worse than risk approved; one that rounds to zero is given up).

Safety inputs, recorded after a fill is applied for the first time: the fill count and day
trades (:class:`~shared.account_activity.AccountActivity`, for risk's stale-balance and PDT
checks), and the order's realised PnL, fees and reduced quantity in its record; when an order
that reduced a position ends, the closed trade goes to :class:`~shared.protections.Protections`
(a stop-out when it was a stop or stop-limit order) and any lock it writes is alerted.

Kill switch requests (:mod:`shared.trading_state`): :meth:`Executor.act_on_trading_state`, polled
every second, carries out ``cancel_open_orders`` (``broker.cancel`` of every open order) and
``flatten_positions`` (a closing market order per position, client_order_id
``bst-flat-<seq>-<SYMBOL>``, its quantity reserved under the same id) once per change ``seq``.
The seq acted on is kept in ``<prefix>:trading-state:acted`` and written *after* acting:
a crash in between repeats the actions, which are idempotent (a cancel of a canceled order is
accepted; a flatten order's client_order_id is deterministic, so the broker never sees two).

Rate limits: every broker call takes a slot of the limit shared by all processes
(:mod:`shared.rate_limit`, through the adapter); a submit's slot is tried in the round trip that
records the order, so the adapter sends without another round trip when one was free.

Concurrency model: three threads -- the order consumer, the trade-update reader and the
trading-state poller. The events of one symbol's orders are applied one at a time (a lock per
symbol: a fill reads the position it changes, to know what it reduced); a submit takes no lock
(its record is created by one atomic script), so a new order never waits for another order's
fill to be applied. Neither background thread ends before the stop: a failed pass (Redis or the
broker unavailable, a bug) is logged and tried again a second later, and the trade-update reader
then polls the open orders for what it missed. Run one executor per account.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.account_activity import AccountActivity
from shared.brokers import SUBMIT_ENDPOINT, Broker, BrokerOrder, OrderRequest, build_broker
from shared.bus import Delivery, Publisher, StopSignal
from shared.clock import Clock
from shared.config import Settings
from shared.errors import (
    AmbiguousSubmit,
    BrokerError,
    BrokerUnavailable,
    OrderNotFound,
    OrderRejected,
    PortfolioError,
    RateLimited,
    RedisUnavailable,
)
from shared.keys import ALERTS, ORDER_EVENTS, ORDERS, Keys
from shared.limits import Refusal
from shared.logging import bind_correlation, get_logger
from shared.models import Alert, AlertSeverity, Fill, Order, OrderEvent, OrderStatus, OrderType, Side
from shared.portfolio import Portfolio
from shared.protections import ClosedTrade, ProtectionLock, Protections
from shared.rate_limit import Grant
from shared.redis_client import unavailable
from shared.service import ServiceContext
from shared.symbols import SymbolProperties
from shared.trading_state import KillSwitch, TradingState, TradingStatus

__all__ = ["Executor", "main"]

log = get_logger(component="executor")
GROUP = "executor"
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
PRICE_PLACES = Decimal("0.000001")
STOP_TYPES = (OrderType.STOP, OrderType.STOP_LIMIT)


class Executor:
    """Submits orders and applies broker events; all state lives in Redis."""

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
        self._locks: dict[str, threading.Lock] = {}  # one per symbol, made under _locks_guard
        self._locks_guard = threading.Lock()

    # -- orders -------------------------------------------------------------------------------

    def handle_order(self, delivery: Delivery, *, bypass_state: bool = False) -> None:
        """Submit one approved order, exactly once at the broker (a bus handler); ``bypass_state``
        for the executor's own flatten orders, which the trading state must not stop."""
        order = delivery.message
        if not isinstance(order, Order):
            return
        record, status, slot = self._create_record(order)
        if record and record["status"] != OrderStatus.PENDING_SUBMIT:
            self._unused(slot)
            log.info("executor.duplicate_order", status=record["status"])
            return
        refusal = None if bypass_state else self._trading_state_refusal(order, status)
        if refusal is not None:
            self._unused(slot)
            self._give_up(order, OrderStatus.REJECTED, refusal)
            return
        request = self._rounded(order)
        if isinstance(request, str):
            self._unused(slot)
            self._give_up(order, OrderStatus.REJECTED, request)
            return
        try:
            placed = self.broker.submit(request, prepaid=slot is not None)
        except OrderRejected as exc:
            self._give_up(order, OrderStatus.REJECTED, exc.reason)
            return
        except (AmbiguousSubmit, BrokerUnavailable, RateLimited) as exc:
            if delivery.deliveries >= self.settings.bus.max_deliveries:
                self._give_up(order, OrderStatus.REJECTED, f"broker unavailable after "
                                                           f"{delivery.deliveries} attempts: {exc}")
                return
            log.warning("executor.submit_retry_later", error=str(exc), deliveries=delivery.deliveries)
            raise
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

    def _create_record(self, order: Order) -> tuple[dict[str, str], TradingStatus, str | None]:
        """Record ``order`` (pending submit) unless it is recorded already, read the trading state
        and try to take the submit's slot of the broker's shared rate limit, in one round trip:
        (the record found before, empty if it was new; the state; the slot's grant id, None if
        none was free or the broker has no limit -- the broker then waits for one itself)."""
        fields = {
            "status": OrderStatus.PENDING_SUBMIT.value, "intent_id": order.intent_id,
            "reservation_id": order.reservation_id, "symbol": order.symbol, "side": order.side.value,
            "quantity": str(order.quantity), "order_type": order.order_type.value, "applied_qty": "0",
            "applied_cost": "0", "created_at": self.clock.now().isoformat(),
        }
        cid = order.client_order_id
        with self.client.pipeline(transaction=False) as pipe:
            pipe.eval(_CREATE_RECORD, 2, self.keys.order(cid), self.keys.open_orders, cid,
                      *(x for pair in fields.items() for x in pair))
            self.kill_switch.queue_current(pipe)
            limiter = self.broker.limiter
            grant_id = limiter.queue_try_acquire(pipe, SUBMIT_ENDPOINT) if limiter is not None else None
            found, status, *attempt = pipe.execute()
        record = {k.decode(): v.decode() for k, v in zip(found[::2], found[1::2], strict=True)}
        granted = limiter is not None and isinstance(limiter.attempt_from(attempt[0], SUBMIT_ENDPOINT), Grant)
        return record, self.kill_switch.status_from(status), grant_id if granted else None

    def _unused(self, slot: str | None) -> None:
        """Give back a rate-limit slot taken for a submit that is not made."""
        if slot is None or self.broker.limiter is None:
            return
        try:
            self.broker.limiter.refund(SUBMIT_ENDPOINT, slot)
        except RedisUnavailable as exc:  # it counts until it leaves the window: the safe side
            log.warning("executor.slot_refund_failed", error=str(exc))

    def _give_up(self, order: Order, status: OrderStatus, reason: str) -> None:
        log.warning("executor.order_failed", status=status.value, reason=reason)
        event = OrderEvent(time=self.clock.now(), client_order_id=order.client_order_id,
                           intent_id=order.intent_id, symbol=order.symbol, side=order.side, status=status,
                           reason=reason)
        self.apply_event(event)
        self.publisher.publish(ALERTS, Alert(time=self.clock.now(), severity=AlertSeverity.WARNING,
                                             source="executor", kind="order_failed",
                                             text=f"{order.side} {order.quantity} {order.symbol}: {reason}",
                                             details={"client_order_id": order.client_order_id}))

    # -- events -------------------------------------------------------------------------------

    def apply_broker_order(self, placed: BrokerOrder) -> None:
        """Apply an order as the broker reports it (a submit reply or a poll)."""
        self.apply_event(OrderEvent(
            time=self.clock.now(), client_order_id=placed.client_order_id,
            broker_order_id=placed.broker_order_id, symbol=placed.symbol, side=placed.side,
            status=placed.status, filled_quantity=placed.filled_quantity,
            filled_avg_price=placed.filled_avg_price))

    def apply_event(self, event: OrderEvent) -> None:
        """Apply an order event: the fill increase (once), the status, the release when terminal.

        After the portfolio's write, what the event changes -- the order's record, the fill and
        day-trade counts, the open-orders set, the published order event -- is written in one
        MULTI/EXEC (in two, split by the release, when an order ends with part of its reservation
        unused: the record shows the fills before the rest is released, the event follows it).
        """
        with self._symbol_lock(event.symbol), bind_correlation(client_order_id=event.client_order_id):
            record = self._record(event.client_order_id)
            if not record:
                log.warning("executor.unknown_order_event", status=event.status.value)
                return
            with self.client.pipeline(transaction=True) as writes:
                self._apply(event, record, writes)
                _execute(writes)

    def _apply(self, event: OrderEvent, record: dict[str, str], writes: Pipeline) -> None:
        """Apply ``event`` to the order ``record``, queueing on ``writes`` all but the portfolio's
        fill and release, which are written at once."""
        cid = event.client_order_id
        changed, reservation_closed = self._apply_fill_increase(event, record, writes)
        status = OrderStatus(record["status"])
        new_status = event.status
        if status.is_terminal or (new_status == OrderStatus.NEW and status != OrderStatus.PENDING_SUBMIT):
            new_status = status  # never move back from a later state
        fields: dict[str, str] = {}
        if new_status != status:
            fields["status"] = new_status.value
            changed = True
        if event.broker_order_id and record.get("broker_order_id") != event.broker_order_id:
            fields["broker_order_id"] = event.broker_order_id
        if fields:
            writes.hset(self.keys.order(cid), mapping=fields)  # type: ignore[arg-type]
        if new_status.is_terminal:
            if not reservation_closed:
                _execute(writes)
                self._release(record, new_status)
            writes.srem(self.keys.open_orders, cid)
            if Decimal(record.get("reduced_qty", "0")) > 0:
                self._record_trade_closed(cid, record)
        if changed:
            self.publisher.queue_publish(writes, ORDER_EVENTS, event.model_copy(update={
                "status": new_status, "intent_id": record.get("intent_id"), "time": self.clock.now()}))

    def _symbol_lock(self, symbol: str) -> threading.Lock:
        """The lock that serialises the events of ``symbol``'s orders (a fill reads the position
        it changes); other symbols' events, and submits, do not wait for it."""
        with self._locks_guard:
            return self._locks.setdefault(symbol, threading.Lock())

    def _apply_fill_increase(self, event: OrderEvent, record: dict[str, str], writes: Pipeline
                             ) -> tuple[bool, bool]:
        """Apply to the portfolio the fill the event adds over what was applied, and queue on
        ``writes`` what it changes in the record and the counts: (anything applied, the fill
        completed the reservation -- nothing is left to release)."""
        applied_qty = Decimal(record["applied_qty"])
        applied_cost = Decimal(record["applied_cost"])
        filled = event.filled_quantity  # cumulative: Alpaca's updates carry the order's filled_qty
        if filled <= applied_qty:
            return False, False
        delta = filled - applied_qty
        fee = Decimal(0)
        if event.fill is not None and event.fill.quantity == delta:
            price, fee = event.fill.price, event.fill.fee
        elif event.filled_avg_price is not None:
            price = ((event.filled_avg_price * filled - applied_cost) / delta).quantize(PRICE_PLACES)
        else:
            log.warning("executor.fill_without_price", filled=str(filled))
            return False, False
        fill = Fill(fill_id=f"{event.client_order_id}:{filled}", quantity=delta, price=price, fee=fee,
                    time=event.fill.time if event.fill is not None else self.clock.now())
        try:
            outcome = self.portfolio.apply_fill(record["reservation_id"], fill)
        except PortfolioError as exc:
            log.error("executor.fill_refused", error=str(exc), fill_id=fill.fill_id)
            self.publisher.publish(ALERTS, Alert(time=self.clock.now(), severity=AlertSeverity.CRITICAL,
                                                 source="executor", kind="fill_refused", text=str(exc),
                                                 details={"client_order_id": event.client_order_id}))
            return False, False
        before = outcome.position_before  # read under the portfolio lock, just before this fill
        signed = delta if record["side"] == Side.BUY else -delta
        reduced = min(delta, abs(before)) if before and (before > 0) != (signed > 0) else Decimal(0)
        updates = {"applied_qty": str(filled), "applied_cost": str(applied_cost + delta * price)}
        if outcome.changed and not outcome.duplicate:
            self.activity.queue_fill(writes, event.client_order_id, record["symbol"], signed, before,
                                     fill.time)
            updates |= {"realized": str(Decimal(record.get("realized", "0")) + outcome.realized),
                        "fees": str(Decimal(record.get("fees", "0")) + fee),
                        "reduced_qty": str(Decimal(record.get("reduced_qty", "0")) + reduced)}
            if reduced:
                updates["entry_side"] = Side.BUY.value if before > 0 else Side.SELL.value
            record.update(updates)
        writes.hset(self.keys.order(event.client_order_id), mapping=updates)  # type: ignore[arg-type]
        log.info("executor.fill_applied", fill_id=fill.fill_id, quantity=str(delta), price=str(price))
        return True, outcome.completed

    def _release(self, record: dict[str, str], status: OrderStatus) -> None:
        """An order ended with part of its reservation unused: give that part back."""
        try:
            self.portfolio.release(record["reservation_id"], reason=status.value)
        except PortfolioError as exc:
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
        members: Any = self.client.smembers(self.keys.open_orders)
        done = True
        for cid in sorted(m.decode() for m in members):
            if cid.startswith(f"bst-flat-{status.seq}-"):
                continue  # this change's own flatten orders
            try:
                self.broker.cancel(cid)
                log.info("executor.cancel_requested", client_order_id=cid, seq=status.seq)
            except OrderNotFound:
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
            except (BrokerError, PortfolioError) as exc:
                log.warning("executor.flatten_failed", symbol=symbol, error=str(exc))
                done = False
        return done

    def watch_trading_state(self, stop: StopSignal | threading.Event, interval_s: float = 1.0) -> None:
        """Act on kill switch requests until ``stop``; a failed pass (broker or Redis unavailable, or
        a bug) is logged and the next one tries again, so no outage ends the watch."""
        while not stop.is_set():
            try:
                self.act_on_trading_state()
            except BrokerError as exc:
                log.warning("executor.trading_state_action_failed", error=str(exc))
            except Exception as exc:
                if unavailable(exc):
                    log.warning("executor.trading_state_redis_unavailable", error=str(exc))
                else:
                    log.exception("executor.trading_state_failed")
            stop.wait(interval_s)

    # -- catching up --------------------------------------------------------------------------

    def poll_open_orders(self) -> int:
        """Ask the broker for every order we hold open (missed updates); returns how many changed."""
        polled = 0
        members: Any = self.client.smembers(self.keys.open_orders)
        for raw in members:
            cid = raw.decode()
            record = self._record(cid)
            if not record or record["status"] == OrderStatus.PENDING_SUBMIT:
                continue  # the order consumer owns it until it is submitted
            try:
                self.apply_broker_order(self.broker.get_order(cid))
                polled += 1
            except OrderNotFound:
                log.warning("executor.order_not_found_at_broker", client_order_id=cid)
            except BrokerError as exc:
                log.warning("executor.poll_failed", client_order_id=cid, error=str(exc))
        return polled

    def follow_trade_updates(self, stop: Any) -> None:
        """Apply the broker's trade updates until ``stop``; re-poll open orders on reconnect.

        A failure -- the stream lost, Redis unavailable, an update that cannot be applied -- is
        logged, and a second later the executor listens again and polls every open order: an
        update lost with the failure is applied from the poll (updates carry cumulative fills)."""
        while not stop.is_set():
            updates = self.broker.trade_updates()
            try:
                if not updates.wait_ready(10.0):
                    log.warning("executor.trade_updates_not_ready")
                    continue
                self.poll_open_orders()  # anything missed while we were not listening
                while not stop.is_set():
                    event = updates.get(timeout=0.5)
                    if event is not None:
                        self.apply_event(event)
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


def _execute(writes: Pipeline) -> None:
    """Send what is queued on ``writes``, if anything."""
    if len(writes):
        writes.execute()


def main(ctx: ServiceContext) -> None:
    """Run the executor until stopped."""
    broker = build_broker(ctx.settings, client=ctx.redis, clock=ctx.clock)
    executor = Executor(ctx.redis, ctx.keys, ctx.settings, ctx.clock, broker, ctx.publisher())
    executor.portfolio.open()
    follower = threading.Thread(target=executor.follow_trade_updates, args=(ctx.stop,), name="trade-updates",
                                daemon=True)
    follower.start()
    watcher = threading.Thread(target=executor.watch_trading_state, args=(ctx.stop,), name="trading-state",
                               daemon=True)
    watcher.start()
    ctx.consumer(ORDERS, GROUP, executor.handle_order).run(ctx.stop)
    follower.join(ctx.settings.bus.grace_seconds)
    watcher.join(ctx.settings.bus.grace_seconds)
