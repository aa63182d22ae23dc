"""Brokers: one interface for the services, one implementation over alpaca-py, one fake.

:func:`build_broker` reads :class:`~shared.config.BrokerSettings`: ``kind="paper"`` (default)
points alpaca-py at the embedded paper exchange (``http://<paper_exchange.host>:<port>``, keys
from the settings or, when unset, the pair the exchange generated and keeps in Redis);
``kind="alpaca"`` points it at Alpaca (paper unless ``live``). Every failure is a
:class:`~shared.errors.BrokerError`; see :mod:`shared.brokers._alpaca` for retry and
ambiguous-submit policy.
"""

from __future__ import annotations

import redis

from shared.brokers._alpaca import AlpacaBroker
from shared.brokers._fake import BrokerCall, FakeBroker
from shared.brokers._mapping import UpdateFilter
from shared.brokers._types import (
    SUBMIT_ENDPOINT,
    Account,
    Broker,
    BrokerOrder,
    OrderRequest,
    Position,
    TradeUpdates,
)
from shared.clock import Clock
from shared.config import Settings
from shared.errors import ConfigError
from shared.keys import Keys
from shared.safety.rate_limit import RateLimiter

__all__ = [
    "SUBMIT_ENDPOINT",
    "Account",
    "AlpacaBroker",
    "Broker",
    "BrokerCall",
    "BrokerOrder",
    "FakeBroker",
    "OrderRequest",
    "Position",
    "TradeUpdates",
    "UpdateFilter",
    "build_broker",
]

_LIVE_HOST = "api.alpaca.markets"


def build_broker(settings: Settings, *, client: redis.Redis | None = None, clock: Clock | None = None
                 ) -> AlpacaBroker:
    """The broker these settings name. ``client`` is needed only to read generated paper keys."""
    broker = settings.broker
    if broker.kind == "alpaca":
        assert broker.api_key is not None and broker.secret_key is not None  # settings validate this
        base_url = broker.base_url
        if base_url and _LIVE_HOST in base_url and "paper-api" not in base_url and not broker.live:
            raise ConfigError([("broker.base_url", f"{base_url} is Alpaca's live endpoint but broker.live "
                                                   "is not set")])
        key, secret = broker.api_key.get_secret_value(), broker.secret_key.get_secret_value()
    else:
        exchange = settings.paper_exchange
        base_url = broker.base_url or f"http://{exchange.host}:{exchange.port}"
        key, secret = _paper_keys(settings, client)
    stream_url = broker.stream_url
    if stream_url is None and base_url:
        stream_url = base_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/")
        stream_url += "/stream"
    limiter = None
    if client is not None:  # the shared limit lives in Redis: every process counts against one budget
        limiter = RateLimiter.from_settings(client, Keys(settings.key_prefix), settings.limits, clock=clock)
    return AlpacaBroker(broker, api_key=key, secret_key=secret, base_url=base_url, stream_url=stream_url,
                        clock=clock, limiter=limiter)


def _paper_keys(settings: Settings, client: redis.Redis | None) -> tuple[str, str]:
    for source in (settings.broker, settings.paper_exchange):
        if source.api_key is not None and source.secret_key is not None:
            return source.api_key.get_secret_value(), source.secret_key.get_secret_value()
    if client is None:
        raise ConfigError([("broker.api_key", "no paper exchange keys configured and no Redis client given "
                                              "to read the generated pair")])
    stored = client.hmget(Keys(settings.key_prefix).paper("credentials"), ["key_id", "secret_key"])
    if stored[0] is None or stored[1] is None:
        raise ConfigError([("broker.api_key", "the paper exchange has not generated its keys yet "
                                              "(start it first, or set paper_exchange.api_key/secret_key)")])
    return (stored[0].decode() if isinstance(stored[0], bytes) else str(stored[0]),
            stored[1].decode() if isinstance(stored[1], bytes) else str(stored[1]))
