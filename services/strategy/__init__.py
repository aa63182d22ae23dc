"""Strategy workers: bars in, intents out, per-symbol state persisted, scaled by partition leases.

Run one with ``python -m services.strategy``; run several (``honcho start -c strategy=3``) and
each bar of a symbol is applied exactly once, in order, by one worker at a time. Write a
strategy by subclassing :class:`Strategy` and decorating it with :func:`register` (see
``docs/STRATEGIES.md``); list its module in ``strategy.modules`` and name it in
``strategy.plugins``. Ships with ``sma_crossover`` and ``vwap_reversion``.
"""

from services.strategy import _builtin
from services.strategy._api import Binding, Catalog, Strategy, intent_id, register, registered, strategy_class
from services.strategy._builtin import SmaCrossover, SmaParams, SmaState, VwapParams, VwapReversion, VwapState
from services.strategy._leases import PartitionLeases, lease_resource
from services.strategy._service import load_catalog, main
from services.strategy._worker import GROUP, StoredState, StrategyWorker, WorkerStats, consumer_name

__all__ = [
    "GROUP",
    "Binding",
    "Catalog",
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
    "intent_id",
    "lease_resource",
    "load_catalog",
    "main",
    "register",
    "registered",
    "strategy_class",
]

del _builtin
