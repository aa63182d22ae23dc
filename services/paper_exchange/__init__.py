"""The embedded paper exchange: Alpaca's Trading API v2 on loopback, filled from Bastion's bars.

Consumes: ``bars`` in group ``paper_exchange.consumer_group`` (``paper-exchange``), acknowledged
once the batch's matching is written to its book. Produces: Alpaca REST replies and
``trade_updates`` on its websocket (the subset alpaca-py's TradingClient and TradingStream use,
docs/BROKERS.md); its book in Redis under ``<prefix>:paper:*``, written before anything is
answered, so a restart reads it back and loses and replays nothing. Orders fill on a bar after
the one they arrived with: no look-ahead. Run it with ``python -m services.paper_exchange``.
"""

from services.paper_exchange._engine import ApiError, Exchange, credentials
from services.paper_exchange._faults import FaultPlan, FaultRule, Faults, parse_plan
from services.paper_exchange.service import main, serve

__all__ = [
    "ApiError", "Exchange", "FaultPlan", "FaultRule", "Faults", "credentials", "main", "parse_plan", "serve",
]
