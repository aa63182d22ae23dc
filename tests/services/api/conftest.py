"""Fixtures of the API's tests: a desk on the parametrized Redis backend, its broker, a client."""

from __future__ import annotations

import pytest
import redis

from services.api import Desk
from shared.brokers import BrokerCall, FakeBroker
from shared.clock import LiveClock
from shared.config import Settings
from shared.keys import Keys
from tests.services.api.client import Api


@pytest.fixture
def broker() -> FakeBroker:
    """The broker a cancel reaches: it accepts everything until a test sets ``handler``."""
    def accept(call: BrokerCall) -> None:
        return None

    return FakeBroker(accept)


@pytest.fixture
def desk(clean_environment: None, redis_client: redis.Redis, keys: Keys, broker: FakeBroker) -> Desk:
    """The default settings under the test's prefix, on the parametrized backend."""
    return Desk(Settings(key_prefix=keys.prefix), redis_client, keys, LiveClock(), lambda: broker)


@pytest.fixture
def api(desk: Desk) -> Api:
    """A client of the API serving ``desk``."""
    return Api(desk)
