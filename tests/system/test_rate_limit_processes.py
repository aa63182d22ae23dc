"""shared.safety.rate_limit across 8 OS processes sharing one server: no window over the limit, and
a 429 pause stops every process."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redis

from shared.keys import Keys
from shared.redis.connection import connect_url
from shared.safety.rate_limit import Limit, RateLimiter
from tests.conftest import SERVER_BACKENDS
from tests.support.processes import spawn, stop_all, wait_for

WORKER = "tests.procs.rate_limit_worker"


def max_in_any_window(times: list[int], period_us: int) -> int:
    """The most grants in any half-open interval of ``period_us`` (two pointers over sorted times)."""
    times = sorted(times)
    best = start = 0
    for end, at in enumerate(times):
        while times[start] <= at - period_us:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.multiprocess
@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
class TestManyProcesses:
    LIMIT = 50
    PERIOD = 1.0
    TOTAL = 1000
    PROCESSES = 8

    @pytest.fixture
    def client(self, server_url: str, keys: Keys) -> Iterator[redis.Redis]:
        """A client of the shared server; the test's keys are deleted afterwards."""
        connection = connect_url(server_url)
        yield connection
        for key in connection.scan_iter(match=keys.pattern(), count=1000):
            connection.delete(key)
        connection.close()

    def workers(self, server_url: str, client: redis.Redis, keys: Keys, mode: str, limit: int,
                *extra: str) -> list[subprocess.Popen[bytes]]:
        """Start the workers and let them go together."""
        procs = [spawn(WORKER, "--url", server_url, "--prefix", keys.prefix, "--limit", str(limit),
                       "--period", str(self.PERIOD), "--mode", mode, *extra, stdout=subprocess.DEVNULL)
                 for _ in range(self.PROCESSES)]
        wait_for(lambda: int(client.get(f"{keys.prefix}:test:ready") or 0) == self.PROCESSES,
                 timeout=60, message="every worker ready")
        client.rpush(f"{keys.prefix}:test:go", *["go"] * self.PROCESSES)
        return procs

    @staticmethod
    def grants(client: redis.Redis, keys: Keys) -> list[tuple[int, int]]:
        return [(int(pid), int(at)) for pid, at in
                (item.split() for item in client.lrange(f"{keys.prefix}:test:grants", 0, -1))]

    def test_eight_processes_never_exceed_the_limit_in_any_window(self, server_url: str, client: redis.Redis,
                                                                  keys: Keys) -> None:
        """8 processes make 1,000 requests at 50/s: no 1 s window (Redis time) holds more than 50 grants,
        and the span is within 10% of the ideal 19 s."""
        procs = self.workers(server_url, client, keys, "count", self.LIMIT, "--total", str(self.TOTAL))
        try:
            for proc in procs:
                wait_for(lambda p=proc: p.poll() is not None, timeout=180, message=f"worker {proc.pid}")  # type: ignore[misc]
            assert [p.returncode for p in procs] == [0] * self.PROCESSES
        finally:
            stop_all(procs)
        grants = self.grants(client, keys)
        assert len(grants) == self.TOTAL
        assert len({pid for pid, _ in grants}) == self.PROCESSES
        times = sorted(at for _, at in grants)
        period_us = int(self.PERIOD * 1_000_000)
        assert max_in_any_window(times, period_us) <= self.LIMIT
        ideal_us = (self.TOTAL // self.LIMIT - 1) * period_us
        span = times[-1] - times[0]
        assert ideal_us <= span <= ideal_us * 1.10, f"span {span} µs against ideal {ideal_us} µs"

    def test_a_429_pause_stops_every_process(self, server_url: str, client: redis.Redis, keys: Keys) -> None:
        """While 8 processes are being granted, pause(0.5): no process gets a grant until it ends,
        then every process is granted again."""
        procs = self.workers(server_url, client, keys, "until-stop", 200)
        try:
            wait_for(lambda: len({pid for pid, _ in self.grants(client, keys)}) == self.PROCESSES,
                     timeout=60, message="every worker granted")
            rl = RateLimiter(client, keys, account=Limit(200, self.PERIOD), group="test")
            now, until = rl.pause(0.5)
            wait_for(lambda: len({pid for pid, at in self.grants(client, keys) if at >= until})
                     == self.PROCESSES, timeout=60, message="every worker granted after the pause")
            client.set(f"{keys.prefix}:test:stop", "1")
            for proc in procs:
                wait_for(lambda p=proc: p.poll() is not None, timeout=60, message=f"worker {proc.pid}")  # type: ignore[misc]
        finally:
            stop_all(procs)
        grants = self.grants(client, keys)
        assert [at for _, at in grants if now < at < until] == []
        assert len({pid for pid, at in grants if at <= now}) == self.PROCESSES
