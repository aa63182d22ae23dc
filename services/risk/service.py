"""Risk: every intent is checked, sized and paid for before it becomes an order.

For each intent on ``intents`` (group ``risk``):

1. trading state: HALTED refuses everything, REDUCING refuses what would add exposure;
2. sizing: a quantity is used as given, a notional becomes whole shares at the reference price
   (the limit price, or the symbol's last bar close);
3. limits: order notional within [min_order_notional, max_order_notional]; a buy may not take
   the position past ``max_position_fraction`` of equity (read before the lock: a limit, not
   the spending guard);
4. payment: ``Portfolio.reserve`` under the account lock (read-after-lock, fenced write) holds
   cash for a buy or quantity for a sell -- the guard that makes overspending impossible;
5. the approved :class:`~shared.models.Order` goes to ``orders``; a refusal goes to
   ``rejections`` with its reason.

Idempotent: the reservation id is the intent id (reserving it again with the same terms is a
no-op), the client_order_id is derived from the intent id (the executor deduplicates on it), and
the publish is applied once per intent id through :class:`~shared.bus.Idempotency`.

Concurrency model: two threads, each one bus consumer -- intents, and bars (group ``risk-marks``,
which keeps the portfolio's last prices current).
"""

from __future__ import annotations

import threading
from decimal import ROUND_DOWN, Decimal

import redis
from redis.client import Pipeline

from shared import codec
from shared.bus import Delivery, Idempotency
from shared.clock import Clock
from shared.config import Settings
from shared.errors import InsufficientFunds, InsufficientPosition, PortfolioError
from shared.keys import BARS, INTENTS, ORDERS, REJECTIONS, Keys
from shared.logging import get_logger
from shared.models import Bar, Intent, IntentRejected, Order, OrderType, Side
from shared.portfolio import Portfolio
from shared.service import ServiceContext

__all__ = ["RiskService", "client_order_id", "main"]

log = get_logger(component="risk")
GROUP = "risk"


def client_order_id(intent_id: str) -> str:
    """The broker's client_order_id for the order an intent becomes (deterministic)."""
    return f"bst-{intent_id}"


class Refused(Exception):
    """An intent risk will not approve; the message is the reason a user reads."""


class RiskService:
    """Decides on intents; holds no state of its own (everything is read from Redis)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.portfolio = Portfolio(client, keys, settings.portfolio.account, settings=settings.portfolio,
                                   lock_settings=settings.lock, clock=clock)
        self.once = Idempotency(client, keys, GROUP, settings.bus.idempotency_ttl_s)

    def handle_intent(self, delivery: Delivery) -> None:
        """Approve or refuse one intent (a bus handler)."""
        intent = delivery.message
        if not isinstance(intent, Intent):
            return
        if self.once.seen(intent.id):
            log.info("risk.duplicate_intent")
            return
        try:
            order = self.decide(intent)
        except Refused as refusal:
            rejection = IntentRejected(time=self.clock.now(), intent_id=intent.id, symbol=intent.symbol,
                                       reason=str(refusal))
            self._publish_once(intent.id, rejection, REJECTIONS)
            log.info("risk.rejected", reason=str(refusal))
            return
        self._publish_once(intent.id, order, ORDERS)
        log.info("risk.approved", client_order_id=order.client_order_id, quantity=str(order.quantity),
                 side=order.side.value)

    def decide(self, intent: Intent) -> Order:
        """The order ``intent`` becomes, with its reservation made; Refused otherwise."""
        self._check_trading_state(intent)
        price = self._reference_price(intent)
        quantity = intent.quantity if intent.quantity is not None else self._shares_for(intent, price)
        notional = quantity * price
        risk = self.settings.risk
        if notional > risk.max_order_notional:
            raise Refused(f"order notional {notional} exceeds max_order_notional {risk.max_order_notional}")
        if notional < risk.min_order_notional:
            raise Refused(f"order notional {notional} is below min_order_notional {risk.min_order_notional}")
        if intent.side is Side.BUY:
            self._check_position_limit(intent.symbol, quantity, price)
        try:
            self.portfolio.reserve(intent.id, intent.symbol, intent.side, quantity, price)
        except (InsufficientFunds, InsufficientPosition) as exc:
            raise Refused(str(exc).split(": ", 1)[-1]) from exc
        except PortfolioError as exc:
            raise Refused(str(exc)) from exc
        return Order(time=self.clock.now(), intent_id=intent.id, client_order_id=client_order_id(intent.id),
                     account=self.portfolio.account, symbol=intent.symbol, side=intent.side,
                     quantity=quantity, order_type=intent.order_type, limit_price=intent.limit_price,
                     stop_price=intent.stop_price, time_in_force=intent.time_in_force,
                     reservation_id=intent.id)

    def _check_trading_state(self, intent: Intent) -> None:
        raw = self.client.hget(self.keys.trading_state, "state")
        state = raw.decode() if isinstance(raw, bytes) else "ACTIVE"
        if state == "HALTED":
            raise Refused("trading is HALTED (kill switch)")
        if state == "REDUCING":
            held = self.portfolio.snapshot().positions.get(intent.symbol)
            if intent.side is Side.BUY or held is None or held.qty <= 0:
                raise Refused("trading is REDUCING: only orders that reduce a position are accepted")

    def _reference_price(self, intent: Intent) -> Decimal:
        if intent.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and intent.limit_price is not None:
            return intent.limit_price
        if intent.order_type is OrderType.STOP and intent.stop_price is not None:
            return intent.stop_price
        mark = self.portfolio.marks().get(intent.symbol)
        if mark is None:
            raise Refused(f"no price for {intent.symbol} yet (no bar seen)")
        return mark

    def _shares_for(self, intent: Intent, price: Decimal) -> Decimal:
        assert intent.notional is not None
        shares = (intent.notional / price).quantize(Decimal(1), rounding=ROUND_DOWN)
        if shares <= 0:
            raise Refused(f"notional {intent.notional} buys no whole share at {price}")
        return shares

    def _check_position_limit(self, symbol: str, quantity: Decimal, price: Decimal) -> None:
        snapshot = self.portfolio.snapshot()
        equity = snapshot.equity(self.portfolio.marks())
        held = snapshot.positions.get(symbol)
        after = ((held.qty if held else Decimal(0)) + quantity) * price
        limit = self.settings.risk.max_position_fraction * equity
        if after > limit:
            raise Refused(f"{symbol} position would be {after}, above max_position_fraction of equity "
                          f"({limit})")

    def _publish_once(self, intent_id: str, message: Order | IntentRejected, stream: str) -> None:
        fields = codec.encode(message)

        def effect(pipe: Pipeline) -> None:
            pipe.xadd(self.keys.stream(stream), fields, maxlen=self.settings.bus.maxlen,  # type: ignore[arg-type]
                      approximate=True)

        self.once.apply_once(intent_id, effect)

    def handle_bar(self, delivery: Delivery) -> None:
        """Keep the portfolio's last price of the bar's symbol."""
        bar = delivery.message
        if isinstance(bar, Bar):
            self.portfolio.set_mark(bar.symbol, bar.close)


def main(ctx: ServiceContext) -> None:
    """Run the risk service until stopped."""
    service = RiskService(ctx.redis, ctx.keys, ctx.settings, ctx.clock)
    service.portfolio.open()
    marks = ctx.consumer(BARS, "risk-marks", service.handle_bar)
    thread = threading.Thread(target=marks.run, args=(ctx.stop,), name="risk-marks", daemon=True)
    thread.start()
    ctx.consumer(INTENTS, GROUP, service.handle_intent).run(ctx.stop)
    thread.join(ctx.settings.bus.grace_seconds)
