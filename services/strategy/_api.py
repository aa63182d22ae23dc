"""The strategy plugin API: a class with ``on_bar`` and a persisted per-symbol state.

A strategy is a subclass of :class:`Strategy` registered under a name with :func:`register`::

    class MomentumParams(BaseModel):
        lookback: int = 5
        quantity: Decimal = Decimal("1")

    class MomentumState(BaseModel):
        closes: list[Decimal] = []

    @register
    class Momentum(Strategy[MomentumParams, MomentumState]):
        name = "momentum"
        params_model = MomentumParams
        state_model = MomentumState

        def on_bar(self, bar: Bar) -> list[Intent]:
            self.state.closes = [*self.state.closes, bar.close][-self.params.lookback:]
            rising = len(self.state.closes) == self.params.lookback and bar.close > self.state.closes[0]
            if rising and self.account.position_qty == 0 and not self.account.open_orders:
                return [self.intent(bar, Side.BUY, self.params.quantity, "up over lookback")]
            return []

One instance serves one symbol for one batch of bars: the worker builds it from the state
stored in Redis (``<prefix>:strategy:<name>:<SYMBOL>``), calls ``on_bar`` for each new bar and
``on_order_event`` (``on_fill``) for each event of the strategy's own orders, in the order the
partition stream holds them (the executor and risk append the events there), and writes the state
back in the same atomic commit that publishes the intents: each bar and event is seen once. So
the callbacks must be deterministic in the state, the message and ``self.account`` (the read-only
:class:`~services.strategy._view.AccountView` the worker reads once per batch), and keep
everything it needs to remember in ``self.state`` (a pydantic model: Decimals stay exact as JSON
strings); it must not talk to Redis or the outside world. A strategy that needs more Redis
writes in that same commit queues them in :meth:`Strategy.queue_effects`.

A fresh state (no bar applied yet) may first be warmed up (``strategy.warmup``): recent history
run through ``on_bar`` on another instance, with ``self.warming_up`` true and every intent it
returns discarded; only the state it leaves is kept (:mod:`._warmup`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from redis.client import Pipeline

from services.strategy._view import AccountView
from shared.config import StrategySettings
from shared.keys import Keys
from shared.models import Bar, ExitReason, Intent, IntentRejected, Message, OrderEvent, OrderStatus, Side

__all__ = [
    "Binding",
    "Catalog",
    "Strategy",
    "intent_id",
    "register",
    "registered",
    "strategy_class",
]

_FILLED = (OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED)
P = TypeVar("P", bound=BaseModel)
S = TypeVar("S", bound=BaseModel)


def intent_id(strategy: str, symbol: str, trigger_id: str, index: int) -> str:
    """The id of the ``index``-th intent a strategy emitted on one bar or event: the same on every run."""
    text = f"intent:{strategy}:{symbol}:{trigger_id}:{index}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Strategy(ABC, Generic[P, S]):
    """Base of every strategy: ``name``, ``params_model``, ``state_model`` and :meth:`on_bar`."""

    name: ClassVar[str] = ""
    params_model: ClassVar[type[BaseModel]]
    state_model: ClassVar[type[BaseModel]]

    def __init__(self, symbol: str, params: P, state: S, now: datetime | None = None, *,
                 account: AccountView | None = None) -> None:
        self.symbol = symbol
        self.params = params
        self.state = state
        self.now = now  # the worker's clock time when the batch started (stamped on intents)
        self.warming_up = False  # true while fed warm-up history (its intents are discarded)
        self._account = account or AccountView(symbol)
        self._emitted: dict[str, int] = {}

    @property
    def account(self) -> AccountView:
        """The account as the worker read it for this batch: position, equity, open orders..."""
        return self._account

    @abstractmethod
    def on_bar(self, bar: Bar) -> list[Intent]:
        """React to the next bar of ``self.symbol``; return zero or more intents."""

    def on_order_event(self, event: OrderEvent | IntentRejected) -> list[Intent]:
        """What became of one of this strategy's intents on ``self.symbol``, in stream order with
        its bars: risk refused it (:class:`IntentRejected`), or its order, or a protective stop or
        flatten of it (``event.intent_id`` is the entry's), changed status at the broker
        (:class:`OrderEvent`: new, partially_filled, filled, canceled, expired, rejected; quantities
        cumulative). The default passes fills to :meth:`on_fill` and ignores the rest."""
        if isinstance(event, OrderEvent) and event.status in _FILLED:
            return self.on_fill(event)
        return []

    def on_fill(self, event: OrderEvent) -> list[Intent]:
        """One of this strategy's orders filled more (``filled_quantity`` so far, at
        ``filled_avg_price``; ``event.fill`` the execution when the broker named it)."""
        return []

    def queue_effects(self, pipe: Pipeline, keys: Keys) -> None:
        """Queue extra writes into the batch's commit (runs once per batch, after the bars): they
        are run inside the commit script, after its checks, so their replies are not returned."""
        return None

    def intent(self, trigger: Message, side: Side, quantity: Decimal | None, reason: str, *,
               stop_loss: Decimal | None = None, take_profit: Decimal | None = None,
               exit_reason: ExitReason = ExitReason.SIGNAL) -> Intent:
        """A market intent for this symbol, with an id derived from ``trigger`` (the bar or event
        it answers: the same on every run). ``quantity`` None: risk sizes it (an entry by
        ``risk.max_risk_fraction`` and ``stop_loss``, an exit: the whole position); ``stop_loss``
        (and ``take_profit`` with it) protect the entry once it fills (docs/RISK.md)."""
        index = self._emitted.get(trigger.id, 0)
        self._emitted[trigger.id] = index + 1
        return Intent(id=intent_id(self.name, self.symbol, trigger.id, index), time=self.now or trigger.time,
                      source=f"strategy:{self.name}", symbol=self.symbol, side=side, quantity=quantity,
                      stop_loss=stop_loss, take_profit=take_profit, exit_reason=exit_reason, reason=reason)


_REGISTRY: dict[str, type[Strategy[Any, Any]]] = {}

StrategyType = type[Strategy[Any, Any]]


def register(cls: type[Strategy[P, S]]) -> type[Strategy[P, S]]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"strategy name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, StrategyType]:
    """Every registered strategy by name."""
    return dict(_REGISTRY)


def strategy_class(name: str) -> StrategyType:
    """The strategy registered as ``name``; KeyError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no strategy named {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


class Binding:
    """One symbol's strategy class and validated parameters."""

    def __init__(self, cls: StrategyType, params: BaseModel) -> None:
        self.cls = cls
        self.params = params

    def build(self, symbol: str, state: Mapping[str, Any] | None, now: datetime | None,
              account: AccountView | None = None) -> Strategy[Any, Any]:
        """An instance for ``symbol`` from its stored state (or a fresh one), seeing ``account``."""
        model = self.cls.state_model
        instance = self.cls(symbol, self.params, model.model_validate(state) if state else model(), now)
        if account is not None:  # set after construction: a subclass's __init__ need not pass it on
            instance._account = account
        return instance


class Catalog:
    """Which strategy runs on which symbol, from ``strategy.plugins`` and ``strategy.params``.

    ``plugins`` maps a symbol (or ``"*"`` for every other symbol) to a strategy name; a symbol
    with neither runs no strategy (its bars are acknowledged and skipped). ``params`` maps a
    strategy name to its parameters, and ``"<name>:<SYMBOL>"`` to overrides for one symbol.
    """

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings
        self._cache: dict[str, Binding | None] = {}

    def validate(self) -> list[str]:
        """Every problem with the configuration (unknown strategy, bad parameter), as text."""
        problems: list[str] = []
        symbols = set(self.settings.plugins) | {k.split(":", 1)[1] for k in self.settings.params if ":" in k}
        for symbol in sorted(symbols):
            try:
                self.binding(symbol)
            except (KeyError, ValueError) as exc:
                problems.append(exc.args[0])
        for key in sorted(self.settings.params):
            if key.split(":", 1)[0] not in _REGISTRY:
                problems.append(f"strategy.params names no known strategy: {key!r}")
        return problems

    def binding(self, symbol: str) -> Binding | None:
        """The strategy of ``symbol`` (cached), or None when it runs none."""
        if symbol in self._cache:
            return self._cache[symbol]
        name = self.settings.plugins.get(symbol, self.settings.plugins.get("*"))
        result: Binding | None = None
        if name:
            cls = strategy_class(name)
            raw = {**self.settings.params.get(name, {}), **self.settings.params.get(f"{name}:{symbol}", {})}
            try:
                result = Binding(cls, cls.params_model.model_validate(raw))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                     for e in exc.errors(include_url=False))
                raise ValueError(f"strategy.params for {name} on {symbol}: {problems}") from None
        self._cache[symbol] = result
        return result
