"""Strategy workers: bars in, intents out, per-symbol state persisted, scaled by partition leases.

Consumes: the partitions ``bars:<n>`` it leases, in group ``strategy`` (consumer name
``partition-<n>``): bars, and the events and rejections of the strategies' own orders.
Produces: intents on ``intents``, each strategy's state, dead letters.
Acknowledges (or moves the group past) a batch in the same script that commits its effects
(:mod:`._worker`). Run one with ``python -m services.strategy``, several with
``honcho start -c strategy=3``. Write a strategy by subclassing :class:`Strategy` and decorating
it with :func:`register` (docs/STRATEGIES.md); it sees the account through ``self.account`` (an
:class:`AccountView`), hears of its orders through ``on_order_event`` / ``on_fill``, and may be
warmed up on recent history (``strategy.warmup``). Ships with ``sma_crossover``,
``vwap_reversion`` and ``donchian_breakout``.
"""

from services.strategy import _builtin
from services.strategy._api import Binding, Catalog, Strategy, intent_id, register, registered, strategy_class
from services.strategy._builtin import (
    DonchianBreakout,
    HoldingState,
    SmaCrossover,
    SmaParams,
    SmaState,
    VwapParams,
    VwapReversion,
    VwapState,
    entry_ended,
)
from services.strategy._leases import PartitionLeases, lease_resource
from services.strategy._view import AccountView, OpenOrder
from services.strategy._worker import GROUP, StoredState, StrategyWorker, WorkerStats, consumer_name
from services.strategy.service import load_catalog, main

__all__ = [
    "GROUP",
    "AccountView",
    "Binding",
    "Catalog",
    "DonchianBreakout",
    "HoldingState",
    "OpenOrder",
    "PartitionLeases",
    "SmaCrossover",
    "SmaParams",
    "SmaState",
    "StoredState",
    "Strategy",
    "StrategyWorker",
    "VwapParams",
    "VwapReversion",
    "VwapState",
    "WorkerStats",
    "consumer_name",
    "entry_ended",
    "intent_id",
    "lease_resource",
    "load_catalog",
    "main",
    "register",
    "registered",
    "strategy_class",
]

del _builtin
