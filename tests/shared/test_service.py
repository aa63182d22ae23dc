"""run_service, the wrapper every service process runs in."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import fakeredis

from shared.clock import LiveClock
from shared.config import Settings
from shared.heartbeat import Heartbeat
from shared.keys import BARS, Keys
from shared.service import ServiceContext
from shared.stop import StopSignal
from tests.conftest import delete_keys
from tests.support.processes import REPO_ROOT

_PROBE = """
import gc
from shared.service import run_service
seen = []
status = run_service("probe", lambda ctx: seen.append(gc.get_freeze_count()), argv=["--instance", "p1"])
print(status, seen[0])
"""


def test_a_service_runs_with_its_start_up_objects_frozen(real_redis_url: str, keys: Keys) -> None:
    """By the time a service's main runs, what start-up made is frozen out of garbage collection
    (so no full collection walks it on the message path), and the service exits 0."""
    env = {"REDIS_URL": real_redis_url, "BASTION_KEY_PREFIX": keys.prefix, "PATH": ""}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    finally:
        delete_keys(real_redis_url, keys)
    assert done.returncode == 0, done.stderr
    status, frozen = done.stdout.split()[-2:]
    assert status == "0" and int(frozen) > 1000


def test_a_consumer_can_block_shorter_than_the_bus_setting() -> None:
    """``ctx.consumer(..., block_ms=...)`` reads with that block (the longest a stop waits for a read),
    and without it with ``bus.block_ms``."""
    client = fakeredis.FakeRedis()
    keys, settings, clock = Keys("t"), Settings(), LiveClock()
    ctx = ServiceContext("probe", "p1", settings, clock, client, keys, StopSignal(),
                         Heartbeat(client, keys, "probe", "p1", clock, 1.0, 3.0))
    blocks: list[int | None] = []
    stop = threading.Event()
    read = client.xreadgroup

    def recording_read(group: str, name: str, streams: dict[Any, Any], **kwargs: Any) -> Any:
        if list(streams.values()) == [">"]:  # a read of new entries (not of its own pending ones)
            blocks.append(kwargs.get("block"))
            stop.set()
        return read(group, name, streams, **{**kwargs, "block": None})

    client.xreadgroup = recording_read  # type: ignore[method-assign]
    ctx.consumer(BARS, "g", lambda delivery: None, block_ms=200).run(stop)
    stop.clear()
    ctx.consumer(BARS, "g", lambda delivery: None).run(stop)
    assert blocks[-2:] == [200, settings.bus.block_ms]
