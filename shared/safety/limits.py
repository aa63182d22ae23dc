"""Pre-trade checks: pure functions over an :class:`AccountSnapshot`, each refusal a :class:`Refusal`.

Guarantee: every ``check_*`` function is pure (no I/O, no clock: ``now`` is in the snapshot), so
the same snapshot always gives the same verdict, and :func:`check_order` returns *every* rule the
order breaks, in a fixed order, each as a :class:`Refusal` whose ``rule`` is machine-readable and
whose ``reason`` a user can read. Two checks need Redis and say so: :class:`OrderSubmissions`
counts submissions per minute in Redis (shared by every risk process, timed by Redis ``TIME``),
and :func:`read_bar_arrivals` reads when the ingester accepted each symbol's newest bar from
``Keys.bar_arrival``.

The rules (parameters in :class:`~shared.config.LimitSettings`; see docs/RISK.md):

* position per symbol: quantity cap and fraction of equity, for orders that add exposure;
* order notional: at most ``max_order_notional`` (every order), at least ``min_order_notional``
  (entries only: a small exit is never trapped);
* gross exposure: sum of ``|position + pending| * price`` over symbols, at most
  ``max_gross_leverage * equity``, for orders that add exposure;
* open orders: fewer than ``max_open_orders`` before a new one;
* pattern day trading: an order that would complete a day trade is refused when the completed
  day trades in the last ``pdt_window_business_days`` business days plus the pending ones reach
  ``pdt_max_day_trades`` while equity is below ``pdt_equity_threshold``;
* stale data: an entry is refused when the ingester accepted no bar of its symbol for
  ``stale_data_after_s`` (exits pass: never trap a position because the feed died). Measured by
  *arrival* on the ingester's clock, not by bar time (a synthetic market's runs ahead of the
  clock, a replay's years behind): has the feed stopped delivering this symbol? The ingester's
  and risk's clocks must agree well within the limit (one host, or NTP);
* stale balance: :func:`needs_refresh` says when the balance must be refreshed from the broker
  (older than ``balance_max_age_s``, or ``balance_refresh_after_fills`` fills since); an order
  sized on such a balance is refused.

Left to the caller (the risk service): build the snapshot fresh (positions and pending orders
from the portfolio, equity from a refreshed balance, marks), detect which symbols were opened
today and which pending orders would complete a day trade (``opened_today``,
``pending_day_trades``), keep the list of completed day trades, refresh the balance when
:func:`needs_refresh` says so and log the change, and consult the trading state and protection
locks (:mod:`shared.safety.trading_state`, :mod:`shared.safety.protections`). Business days are
Monday to Friday in New York: exchange holidays are not known here, so a holiday counts as a business day (the
window is then shorter in calendar time, never longer: the count errs towards refusing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import redis
from redis.client import Pipeline

from shared.clock import Clock, LiveClock, utc
from shared.config import LimitSettings
from shared.keys import Keys
from shared.models import Side
from shared.redis.boundary import redis_errors
from shared.safety.rate_limit import Denied, Grant, Limit, RateLimiter

__all__ = [
    "NEW_YORK",
    "AccountSnapshot",
    "OrderCheck",
    "OrderSubmissions",
    "Refusal",
    "Rule",
    "bar_arrivals_from",
    "business_days",
    "check_gross_exposure",
    "check_open_orders",
    "check_order",
    "check_order_notional",
    "check_pdt",
    "check_position",
    "check_stale_balance",
    "check_stale_data",
    "is_day_trade",
    "is_reducing",
    "needs_refresh",
    "read_bar_arrivals",
    "trading_day",
]

NEW_YORK = ZoneInfo("America/New_York")
_ZERO = Decimal(0)


class Rule(StrEnum):
    """Which rule refused an order (stable names: alerts and tests match on them)."""

    TRADING_HALTED = "trading_halted"
    TRADING_REDUCING = "trading_reducing"
    PROTECTION_LOCK = "protection_lock"
    NO_EQUITY = "no_equity"
    MAX_POSITION_QUANTITY = "max_position_quantity"
    MAX_POSITION_FRACTION = "max_position_fraction"
    MAX_ORDER_NOTIONAL = "max_order_notional"
    MIN_ORDER_NOTIONAL = "min_order_notional"
    MAX_GROSS_EXPOSURE = "max_gross_exposure"
    MAX_OPEN_ORDERS = "max_open_orders"
    MAX_ORDERS_PER_MINUTE = "max_orders_per_minute"
    PATTERN_DAY_TRADING = "pattern_day_trading"
    STALE_DATA = "stale_data"
    STALE_BALANCE = "stale_balance"
    QUANTITY_ROUNDS_TO_ZERO = "quantity_rounds_to_zero"
    PRICE_ROUNDS_TO_ZERO = "price_rounds_to_zero"
    BELOW_MIN_QUANTITY = "below_min_quantity"
    BELOW_MIN_NOTIONAL = "below_min_notional"
    SIZING = "sizing"


@dataclass(frozen=True)
class Refusal:
    """Why an order may not go: ``rule`` for machines, ``reason`` for the user."""

    rule: Rule
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


@dataclass(frozen=True)
class OrderCheck:
    """The order being checked; ``price`` is its limit price, or the last price for a market order."""

    symbol: str
    side: Side
    quantity: Decimal
    price: Decimal

    @property
    def notional(self) -> Decimal:
        """``quantity * price``."""
        return self.quantity * self.price

    @property
    def signed_quantity(self) -> Decimal:
        """The quantity as a change of position: positive for a buy, negative for a sell."""
        return self.quantity if self.side is Side.BUY else -self.quantity


@dataclass(frozen=True)
class AccountSnapshot:
    """What the checks decide on, read fresh by the caller just before checking.

    ``positions``/``pending``/``opened_today`` are signed quantities per symbol (short and sell
    negative); ``pending`` is what open orders would add if filled. ``day_trades`` holds the
    trading day of each completed day trade; ``pending_day_trades`` counts open orders that would
    complete one. ``bar_arrivals`` is when the ingester accepted each symbol's newest bar
    (:func:`read_bar_arrivals`).
    """

    now: datetime
    equity: Decimal
    positions: Mapping[str, Decimal] = field(default_factory=dict)
    pending: Mapping[str, Decimal] = field(default_factory=dict)
    prices: Mapping[str, Decimal] = field(default_factory=dict)
    open_orders: int = 0
    day_trades: Sequence[date] = ()
    pending_day_trades: int = 0
    opened_today: Mapping[str, Decimal] = field(default_factory=dict)
    bar_arrivals: Mapping[str, datetime] = field(default_factory=dict)
    balance_refreshed_at: datetime | None = None
    fills_since_refresh: int = 0


def is_reducing(side: Side, position_qty: Decimal, quantity: Decimal | None = None) -> bool:
    """True if an order of ``side`` only reduces the position's size (a sell of a long, a buy of a
    short), and, when ``quantity`` is given, does not go through zero into the other direction."""
    if (position_qty > 0 and side is Side.SELL) or (position_qty < 0 and side is Side.BUY):
        return quantity is None or quantity <= abs(position_qty)
    return False


def check_order_notional(order: OrderCheck, settings: LimitSettings, *, entry: bool = True) -> Refusal | None:
    """Max notional on every order; min notional on entries only."""
    notional = order.notional
    what = f"{order.side} {order.quantity} {order.symbol} @ {order.price}"
    if notional > settings.max_order_notional:
        return Refusal(Rule.MAX_ORDER_NOTIONAL,
                       f"{what} is {notional} notional, above the {settings.max_order_notional} maximum")
    if entry and notional < settings.min_order_notional:
        return Refusal(Rule.MIN_ORDER_NOTIONAL,
                       f"{what} is {notional} notional, below the {settings.min_order_notional} minimum")
    return None


def check_position(order: OrderCheck, snapshot: AccountSnapshot, settings: LimitSettings) -> Refusal | None:
    """The symbol's position after this order (with pending orders) within the quantity cap and
    the equity fraction; an order that does not grow the position's size always passes."""
    current = snapshot.positions.get(order.symbol, _ZERO) + snapshot.pending.get(order.symbol, _ZERO)
    after = current + order.signed_quantity
    if abs(after) <= abs(current):
        return None
    cap = settings.max_position_quantity
    if cap is not None and abs(after) > cap:
        return Refusal(Rule.MAX_POSITION_QUANTITY, f"{order.symbol} position would be {after} "
                       f"(with pending orders), above the {cap} maximum")
    if snapshot.equity <= 0:
        return Refusal(Rule.NO_EQUITY, f"equity is {snapshot.equity}: no new exposure")
    limit = settings.max_position_fraction * snapshot.equity
    value = abs(after) * order.price
    if value > limit:
        return Refusal(Rule.MAX_POSITION_FRACTION, f"{order.symbol} position would be worth {value}, above "
                       f"{settings.max_position_fraction} of equity {snapshot.equity} ({limit})")
    return None


def check_gross_exposure(order: OrderCheck, snapshot: AccountSnapshot,
                         settings: LimitSettings) -> Refusal | None:
    """Gross exposure after the order (positions and pending orders at their prices) within
    ``max_gross_leverage * equity``; an order that does not grow gross exposure always passes."""
    symbols = set(snapshot.positions) | set(snapshot.pending) | {order.symbol}
    before = _ZERO
    after = _ZERO
    for symbol in symbols:
        quantity = snapshot.positions.get(symbol, _ZERO) + snapshot.pending.get(symbol, _ZERO)
        price = order.price if symbol == order.symbol else snapshot.prices.get(symbol)
        if price is None:
            if quantity:
                return Refusal(Rule.MAX_GROSS_EXPOSURE, f"no price for {symbol}: gross exposure unknown")
            continue
        before += abs(quantity) * price
        if symbol == order.symbol:
            quantity += order.signed_quantity
        after += abs(quantity) * price
    if after <= before:
        return None
    if snapshot.equity <= 0:
        return Refusal(Rule.NO_EQUITY, f"equity is {snapshot.equity}: no new exposure")
    limit = settings.max_gross_leverage * snapshot.equity
    if after > limit:
        return Refusal(Rule.MAX_GROSS_EXPOSURE, f"gross exposure would be {after}, above {limit} "
                       f"({settings.max_gross_leverage} x equity {snapshot.equity})")
    return None


def check_open_orders(snapshot: AccountSnapshot, settings: LimitSettings) -> Refusal | None:
    """Fewer than ``max_open_orders`` open before a new one is placed."""
    if snapshot.open_orders >= settings.max_open_orders:
        return Refusal(Rule.MAX_OPEN_ORDERS, f"{snapshot.open_orders} orders are open, "
                       f"the maximum is {settings.max_open_orders}")
    return None


def trading_day(when: datetime) -> date:
    """The New York calendar date of ``when`` (the day a US day trade is counted on)."""
    return utc(when).astimezone(NEW_YORK).date()


def business_days(today: date, count: int) -> list[date]:
    """The last ``count`` business days (Monday-Friday) ending with ``today`` (or the last one before
    it, on a weekend), newest first."""
    days: list[date] = []
    day = today
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day -= timedelta(days=1)
    return days


def is_day_trade(order: OrderCheck, snapshot: AccountSnapshot) -> bool:
    """An order completes a day trade when it reduces a position that was opened today in the same
    direction (a sell against shares bought today, a buy against a short sold today)."""
    position = snapshot.positions.get(order.symbol, _ZERO)
    opened = snapshot.opened_today.get(order.symbol, _ZERO)
    if not is_reducing(order.side, position) and not is_reducing(order.side, opened):
        return False
    return opened > 0 if order.side is Side.SELL else opened < 0


def check_pdt(order: OrderCheck, snapshot: AccountSnapshot, settings: LimitSettings) -> Refusal | None:
    """Refuse the day trade that would be one more than ``pdt_max_day_trades`` in the window
    (completed plus pending), while equity is below ``pdt_equity_threshold``."""
    if not settings.pdt_enabled or snapshot.equity >= settings.pdt_equity_threshold:
        return None
    if not is_day_trade(order, snapshot):
        return None
    window = set(business_days(trading_day(snapshot.now), settings.pdt_window_business_days))
    completed = sum(1 for day in snapshot.day_trades if day in window)
    total = completed + snapshot.pending_day_trades + 1
    if total > settings.pdt_max_day_trades:
        return Refusal(Rule.PATTERN_DAY_TRADING, f"{order.side} {order.symbol} would be day trade number "
                       f"{total} in {settings.pdt_window_business_days} business days ({completed} done, "
                       f"{snapshot.pending_day_trades} pending) with equity {snapshot.equity} below "
                       f"{settings.pdt_equity_threshold}")
    return None


def check_stale_data(symbol: str, arrived_at: datetime | None, now: datetime,
                     settings: LimitSettings, *, entry: bool = True) -> Refusal | None:
    """Refuse an entry when no bar of ``symbol`` was ever accepted, or none for longer than
    ``stale_data_after_s`` before ``now`` (``arrived_at``: when the ingester accepted its newest)."""
    if not entry:
        return None
    if arrived_at is None:
        return Refusal(Rule.STALE_DATA, f"no bar for {symbol} accepted yet")
    age = (utc(now) - utc(arrived_at)).total_seconds()
    if age > settings.stale_data_after_s:
        return Refusal(Rule.STALE_DATA, f"no bar for {symbol} accepted for {age:g}s, "
                       f"the limit is {settings.stale_data_after_s:g}s")
    return None


def needs_refresh(last_refresh: datetime | None, fills_since: int, now: datetime,
                  settings: LimitSettings) -> bool:
    """True when the balance must be re-read from the broker before sizing: never read, older than
    ``balance_max_age_s``, or ``balance_refresh_after_fills`` fills since the last read."""
    if last_refresh is None or fills_since >= settings.balance_refresh_after_fills:
        return True
    return (utc(now) - utc(last_refresh)).total_seconds() > settings.balance_max_age_s


def check_stale_balance(snapshot: AccountSnapshot, settings: LimitSettings) -> Refusal | None:
    """Refuse sizing on a balance :func:`needs_refresh` calls stale."""
    if not needs_refresh(snapshot.balance_refreshed_at, snapshot.fills_since_refresh, snapshot.now, settings):
        return None
    if snapshot.balance_refreshed_at is None:
        why = "the balance was never read from the broker"
    elif snapshot.fills_since_refresh >= settings.balance_refresh_after_fills:
        why = (f"{snapshot.fills_since_refresh} fills since the last balance refresh "
               f"(limit {settings.balance_refresh_after_fills})")
    else:
        age = (utc(snapshot.now) - utc(snapshot.balance_refreshed_at)).total_seconds()
        why = f"the balance is {age:g}s old (limit {settings.balance_max_age_s:g}s)"
    return Refusal(Rule.STALE_BALANCE, f"{why}: refresh it before sizing")


def check_order(order: OrderCheck, snapshot: AccountSnapshot, settings: LimitSettings) -> list[Refusal]:
    """Every pure rule the order breaks (empty: it may go). Entries are orders that do not reduce
    the current position; exits skip the rules that would trap a position (min notional, stale
    data, position and exposure caps)."""
    position = snapshot.positions.get(order.symbol, _ZERO)
    entry = not is_reducing(order.side, position, order.quantity)
    arrived_at = snapshot.bar_arrivals.get(order.symbol)
    found = [
        check_stale_balance(snapshot, settings),
        check_stale_data(order.symbol, arrived_at, snapshot.now, settings, entry=entry),
        check_order_notional(order, settings, entry=entry),
        check_open_orders(snapshot, settings),
        check_position(order, snapshot, settings) if entry else None,
        check_gross_exposure(order, snapshot, settings) if entry else None,
        check_pdt(order, snapshot, settings),
    ]
    return [refusal for refusal in found if refusal is not None]


def read_bar_arrivals(client: redis.Redis, keys: Keys) -> dict[str, datetime]:
    """When the ingester accepted each symbol's newest bar, from ``Keys.bar_arrival`` (ISO times;
    epoch seconds accepted). An unreadable value is left out, so its symbol counts as stale."""
    with redis_errors(f"reading {keys.bar_arrival}"):
        raw = client.hgetall(keys.bar_arrival)
    return bar_arrivals_from(raw)


def bar_arrivals_from(raw: Mapping[Any, Any]) -> dict[str, datetime]:
    """The arrival times in a reply of ``HGETALL`` of ``Keys.bar_arrival`` (as :func:`read_bar_arrivals`)."""
    out: dict[str, datetime] = {}
    for name, value in raw.items():
        symbol = name.decode() if isinstance(name, bytes) else str(name)
        text = value.decode() if isinstance(value, bytes) else str(value)
        parsed = _parse_time(text)
        if parsed is not None:
            out[symbol] = parsed
    return out


def _parse_time(text: str) -> datetime | None:
    try:
        return utc(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(float(text), tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


class OrderSubmissions:
    """Order submissions per minute, counted in Redis and shared by every risk process.

    A sliding 60-second window timed by Redis ``TIME`` (see :mod:`shared.safety.rate_limit`):
    :meth:`admit` records a submission and returns None, or records nothing and refuses.
    """

    GROUP = "risk-submissions"
    ENDPOINT = "submit"

    def __init__(self, client: redis.Redis, keys: Keys, settings: LimitSettings,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self._limiter = RateLimiter(client, keys, account=Limit(settings.max_orders_per_minute, 60.0),
                                    group=self.GROUP, clock=clock or LiveClock())

    def admit(self) -> Refusal | None:
        """Count one submission if the last minute has room for it; otherwise refuse."""
        return self._refusal(self._limiter.try_acquire(self.ENDPOINT))

    def queue_admit(self, pipe: Pipeline) -> str:
        """Queue :meth:`admit`'s attempt on ``pipe`` (for a caller batching its round trips); returns
        the id :meth:`admitted` and :meth:`refund` take."""
        return self._limiter.queue_try_acquire(pipe, self.ENDPOINT)

    def admitted(self, reply: Any) -> Refusal | None:
        """None if the queued attempt counted a submission, else the refusal."""
        return self._refusal(self._limiter.attempt_from(reply, self.ENDPOINT))

    def queue_refund(self, pipe: Pipeline, admission_id: str) -> None:
        """Queue on ``pipe`` the uncounting of a submission that did not become an order (for a
        caller batching its round trips)."""
        self._limiter.queue_refund(pipe, self.ENDPOINT, admission_id)

    def _refusal(self, attempt: Grant | Denied) -> Refusal | None:
        if isinstance(attempt, Grant):
            return None
        return Refusal(Rule.MAX_ORDERS_PER_MINUTE, f"{self.settings.max_orders_per_minute} orders were "
                       f"submitted in the last minute; the next may go in {attempt.retry_in:.1f}s")
