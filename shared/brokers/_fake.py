"""A Broker for other services' unit tests, driven by one function (as httpx's MockTransport).

::

    def handler(call: BrokerCall) -> object:
        if call.method == "submit":
            raise InsufficientBuyingPower("no cash", client_order_id=call.args[0].client_order_id)
        return []

    broker = FakeBroker(handler)
    broker.emit(order_event)        # delivered to every open trade_updates() subscription

The handler receives each call (``method`` and ``args``) and returns its result or raises a
BrokerError; ``broker.calls`` records every call in order.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.brokers._types import Account, BrokerOrder, OrderRequest, Position
from shared.models import OrderEvent
from shared.safety.rate_limit import RateLimiter

__all__ = ["BrokerCall", "FakeBroker"]


@dataclass(frozen=True)
class BrokerCall:
    """One call made on a FakeBroker."""

    method: str
    args: tuple[Any, ...] = ()


class _FakeUpdates:
    def __init__(self, owner: FakeBroker) -> None:
        self._owner = owner
        self.queue: queue.Queue[OrderEvent] = queue.Queue()
        self.connections = 1  # a test adds one to stand for a reconnect

    def wait_ready(self, timeout: float) -> bool:
        return True

    def get(self, timeout: float) -> OrderEvent | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._owner._subscriptions.discard(self)


class FakeBroker:
    """Every Broker method becomes ``handler(BrokerCall(method, args))``."""

    def __init__(self, handler: Callable[[BrokerCall], Any]) -> None:
        self.handler = handler
        self.limiter: RateLimiter | None = None
        self.calls: list[BrokerCall] = []
        self._subscriptions: set[_FakeUpdates] = set()

    def _call(self, method: str, *args: Any) -> Any:
        call = BrokerCall(method, args)
        self.calls.append(call)
        return self.handler(call)

    def submit(self, request: OrderRequest, *, prepaid: bool = False) -> BrokerOrder:
        return self._call("submit", request, prepaid)  # type: ignore[no-any-return]

    def cancel(self, client_order_id: str) -> None:
        self._call("cancel", client_order_id)

    def get_order(self, client_order_id: str) -> BrokerOrder:
        return self._call("get_order", client_order_id)  # type: ignore[no-any-return]

    def open_orders(self) -> list[BrokerOrder]:
        return self._call("open_orders")  # type: ignore[no-any-return]

    def positions(self) -> list[Position]:
        return self._call("positions")  # type: ignore[no-any-return]

    def account(self) -> Account:
        return self._call("account")  # type: ignore[no-any-return]

    def market_open(self) -> bool:
        return self._call("market_open")  # type: ignore[no-any-return]

    def trade_updates(self) -> _FakeUpdates:
        subscription = _FakeUpdates(self)
        self._subscriptions.add(subscription)
        return subscription

    def reconnect(self) -> None:
        """Stand for a dropped and restored stream: each open subscription's ``connections`` grows."""
        for subscription in list(self._subscriptions):
            subscription.connections += 1

    def emit(self, event: OrderEvent) -> None:
        """Deliver ``event`` to every open subscription."""
        for subscription in list(self._subscriptions):
            subscription.queue.put(event)
