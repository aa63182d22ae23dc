"""The broker adapter under the shared Redis rate limit: requests take a slot, a 429 pauses everyone."""

from __future__ import annotations

from decimal import Decimal

import pytest
import redis

from shared.brokers import AlpacaBroker, OrderRequest
from shared.config import LimitSettings
from shared.errors import RateLimited
from shared.keys import Keys
from shared.models import Side
from shared.safety.rate_limit import RateLimiter
from tests.support.paper import HEADERS, PaperExchange

pytestmark = pytest.mark.multiprocess


def adapter(exchange: PaperExchange, limiter: RateLimiter, **settings: object) -> AlpacaBroker:
    """The adapter pointed at the exchange, counting against ``limiter``."""
    base = exchange.broker(**settings)
    return AlpacaBroker(base.settings, api_key=HEADERS["APCA-API-KEY-ID"],
                        secret_key=HEADERS["APCA-API-SECRET-KEY"], base_url=exchange.url,
                        stream_url=exchange.stream_url, limiter=limiter)


def order(cid: str) -> OrderRequest:
    """A one-share market buy."""
    return OrderRequest(client_order_id=cid, symbol="AAPL", side=Side.BUY, quantity=Decimal(1))


def test_429_pauses_the_shared_limit(exchange: PaperExchange, client: redis.Redis, keys: Keys) -> None:
    """A 429 seen by one adapter sets the shared pause, so every process sharing the limit waits."""
    limiter = RateLimiter.from_settings(client, keys, LimitSettings())
    exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "rate_limit", "retry_after": 0.3, "count": 1})
    adapter(exchange, limiter).submit(order("paused-1"))
    assert limiter.paused_until() > 0
    other = RateLimiter.from_settings(client, keys, LimitSettings())  # another process's view
    assert other.paused_until() == limiter.paused_until()
    assert [o["client_order_id"] for o in exchange.get("/v2/orders", status="all")] == ["paused-1"]


def test_exhausted_shared_limit_refuses_without_calling(exchange: PaperExchange, client: redis.Redis,
                                                        keys: Keys) -> None:
    """With the shared budget spent and no slot within the longest wait, the call is RateLimited, unsent."""
    limiter = RateLimiter.from_settings(client, keys, LimitSettings(api_rate_limit=2, api_rate_period_s=60))
    broker = adapter(exchange, limiter, max_rate_limit_wait_s=0.5)
    broker.submit(order("budget-1"))
    broker.submit(order("budget-2"))
    with pytest.raises(RateLimited):
        broker.submit(order("budget-3"))
    placed = sorted(o["client_order_id"] for o in exchange.get("/v2/orders", status="all"))
    assert placed == ["budget-1", "budget-2"]


def test_prepaid_submit_takes_no_slot_and_a_retry_after_429_takes_one(
        exchange: PaperExchange, client: redis.Redis, keys: Keys) -> None:
    """A submit whose slot the caller already took sends at once, even with the budget spent; its
    retry after a 429 waits for a slot of its own like any other request."""
    limiter = RateLimiter.from_settings(client, keys, LimitSettings(api_rate_limit=1, api_rate_period_s=60))
    broker = adapter(exchange, limiter, max_rate_limit_wait_s=0.5)
    broker.submit(order("paid-1"))  # spends the whole budget
    broker.submit(order("paid-2"), prepaid=True)
    placed = sorted(o["client_order_id"] for o in exchange.get("/v2/orders", status="all"))
    assert placed == ["paid-1", "paid-2"]
    exchange.set_faults({"endpoint": "POST /v2/orders", "kind": "rate_limit", "retry_after": 0.1, "count": 1})
    with pytest.raises(RateLimited):  # the retry needs a slot, and none is free within the wait
        broker.submit(order("paid-3"), prepaid=True)
