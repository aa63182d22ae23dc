"""The embedded paper exchange: Alpaca's Trading API v2 on loopback, filled from Bastion's bars.

Run it with ``python -m services.paper_exchange``. It speaks enough of Alpaca's REST API and the
``trade_updates`` websocket for alpaca-py's TradingClient and TradingStream (see
docs/BROKERS.md for the subset), holds its book in memory, written through to Redis under
``<prefix>:paper:*`` before anything is answered, so a restart reads it back and loses and replays
nothing, and fills orders from the ``bars`` stream with no look-ahead.
"""

from services.paper_exchange._engine import ApiError, Exchange, credentials
from services.paper_exchange._faults import FaultPlan, FaultRule, Faults, parse_plan
from services.paper_exchange._service import main, serve

__all__ = [
    "ApiError", "Exchange", "FaultPlan", "FaultRule", "Faults", "credentials", "main", "parse_plan", "serve",
]
