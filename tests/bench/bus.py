"""Benchmark: the stream bus beside a bare redis-py loop, both measured in the same run.

Prints one JSON line with two figures, each next to its bare baseline and the ratio bus/bare:

* **Throughput** of one consumer-group hop with 2 consumer processes. ``BENCH_MESSAGES`` bars
  (default 20,000) are pre-published, then 2 processes drain the group: the bus path runs
  :class:`shared.bus.Consumer` (codec decode, pydantic validation, correlation binding, one XACK
  per entry) with a trivial handler; the bare path runs ``XREADGROUP COUNT 64`` + one ``XACK``
  per entry on plain fields, no codec. Timed from the first entry handed over (either process)
  to the last acknowledgement (either process). ``BENCH_ROUNDS`` rounds (default 3) alternate
  bare and bus so background load falls on both; the figures are the medians of the rounds,
  the ratio the median of the per-round ratios (each round's bus figure over its bare one).
  ``throughput_bare_batch_ack`` is the bare loop acknowledging a whole batch with one XACK: an
  upper bound, for context only (the bus acknowledges each entry after its handler).
* **Latency** of a 4-hop relay: a source process publishes ``BENCH_RELAY_RATE`` messages/s
  (default 500) for ``BENCH_RELAY_SECONDS`` (default 6), alternating between the bus relay and
  the bare relay (so each gets half, and both see the same background load), stamping each
  message with ``time.perf_counter_ns()``. Each relay is 4 processes: hop i consumes stream i
  (consumer group, blocking read) and publishes to stream i+1; hop 4 records the end-to-end
  latency. The bus relay carries a :class:`~shared.models.Bar` (the stamp in ``trade_count``,
  taken before the Bar is built and encoded) through :class:`~shared.bus.Consumer` and
  :class:`~shared.bus.Publisher`; the bare relay does ``XREADGROUP BLOCK`` + ``XADD`` + ``XACK``
  with the stamp in a plain field. perf_counter is a per-host clock: fine here, where every
  process runs on this host. The first ``WARMUP`` messages of each relay are not counted.

Targets (issue 2): bus throughput >= 50% of bare; relay p50 <= 1.5x bare. They are printed
beside the figures, never asserted.

Every process is a real OS process (multiprocessing, spawn). Uses a private real redis-server
(no AOF, temp dir) unless ``REDIS_URL`` is set; keys go under a fresh prefix, deleted afterwards.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis

from shared.bus import Consumer, Delivery, Publisher, codec
from shared.clock import LiveClock
from shared.config import BusSettings
from shared.keys import Keys
from shared.logging import configure_logging
from shared.models import Bar
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.processes import free_port

CONSUMERS = 2
HOPS = 4
BATCH = 64
WARMUP = 100
GROUP = "bench"
THROUGHPUT_TARGET = 0.5
RELAY_P50_TARGET = 1.5
BAR_TIME = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
CHILD_TIMEOUT_S = 120.0

Fields = Callable[[int], dict[Any, Any]]  # stream-entry fields for message number i


def _bar(stamp: int) -> Bar:
    return Bar(time=BAR_TIME, symbol="AAPL", open=Decimal("187.15"), high=Decimal("187.42"),
               low=Decimal("187.01"), close=Decimal("187.30"), volume=Decimal("10452"),
               vwap=Decimal("187.2231"), trade_count=stamp)


def _encoded(stamp: int) -> dict[str, str | bytes]:
    return codec.encode(_bar(stamp))


def _plain(stamp: int) -> dict[str, str]:
    return {"symbol": "AAPL", "open": "187.15", "high": "187.42", "low": "187.01", "close": "187.30",
            "volume": "10452", "vwap": "187.2231", "t": str(stamp)}


def _child_setup(url: str) -> redis.Redis:
    configure_logging("bench-bus", "INFO", stream=sys.stderr)  # stdout carries the one JSON line
    return connect_url(url)


# -- throughput: one hop, 2 consumer processes ---------------------------------------------------


def _bus_drain(url: str, prefix: str, stream: str, name: str, ready: Any, start: Any, out: Any) -> None:
    client = _child_setup(url)
    first: list[int] = []

    def handle(delivery: Delivery) -> None:
        if not first:
            first.append(time.perf_counter_ns())

    consumer = Consumer(client, Keys(prefix), stream=stream, group=GROUP, handler=handle,
                        settings=BusSettings(batch=BATCH), clock=LiveClock(), name=name)
    ready.put(name)
    start.wait()
    handled = consumer.run(burst=True)
    end = time.perf_counter_ns()
    out.put({"handled": handled, "dead_lettered": consumer.dead_lettered,
             "first": first[0] if first else None, "last": end})
    client.close()


def _bare_drain(url: str, prefix: str, stream: str, name: str, ready: Any, start: Any, out: Any,
                batch_ack: bool = False) -> None:
    client = _child_setup(url)
    key = Keys(prefix).stream(stream)
    ready.put(name)
    start.wait()
    handled, first = 0, None
    while True:
        reply: Any = client.xreadgroup(GROUP, name, {key: ">"}, count=BATCH)
        if not reply:
            break
        if first is None:
            first = time.perf_counter_ns()
        entries = reply[0][1]
        if batch_ack:
            handled += sum(1 for _, fields in entries if fields)
            client.xack(key, GROUP, *(entry_id for entry_id, _ in entries))
            continue
        for entry_id, fields in entries:
            if fields:
                handled += 1
            client.xack(key, GROUP, entry_id)
    end = time.perf_counter_ns()
    out.put({"handled": handled, "dead_lettered": 0, "first": first, "last": end})
    client.close()


def _bare_drain_batch_ack(url: str, prefix: str, stream: str, name: str, ready: Any, start: Any,
                          out: Any) -> None:
    _bare_drain(url, prefix, stream, name, ready, start, out, batch_ack=True)


def _prepublish(client: redis.Redis, key: str, fields: Fields, count: int) -> None:
    client.xgroup_create(key, GROUP, id="0", mkstream=True)
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.xadd(key, fields(i))
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()


Job = tuple[Callable[..., None], tuple[Any, ...]]


def _run_processes(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Start one spawned process per (target, args); release them together once all are ready.

    Each target is called as ``target(*args, ready, start, out)``: it sets itself up, puts one
    item on ``ready``, waits for ``start``, does its work and puts its result on ``out``.
    """
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, ready, start, out)) for target, args in jobs]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=CHILD_TIMEOUT_S)
        start.set()
        results = [out.get(timeout=CHILD_TIMEOUT_S) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


def _throughput(url: str, prefix: str, target: Callable[..., None], fields: Fields,
                count: int, label: str) -> tuple[float, int]:
    """One round: pre-publish ``count`` entries, drain them with 2 processes; (messages/s, dead)."""
    client = connect_url(url)
    stream = f"tp-{label}"
    key = Keys(prefix).stream(stream)
    _prepublish(client, key, fields, count)
    try:
        results = _run_processes([(target, (url, prefix, stream, f"{label}-{i}")) for i in range(CONSUMERS)])
    finally:
        client.delete(key)
        client.close()
    handled = sum(r["handled"] for r in results)
    if handled != count:
        raise RuntimeError(f"{label}: {handled} of {count} messages handled")
    first = min(r["first"] for r in results if r["first"] is not None)
    last = max(r["last"] for r in results)
    return count / ((last - first) / 1e9), sum(r["dead_lettered"] for r in results)


# -- latency: a 4-hop relay ----------------------------------------------------------------------


def _paced(count: int, rate: float) -> Any:
    """Yield 0..count-1 at ``rate`` per second (an absolute schedule: no drift)."""
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for i in range(count):
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i
        next_at += interval


def _source(url: str, bus_prefix: str, bare_prefix: str, count: int, rate: float, ready: Any, start: Any,
            out: Any) -> None:
    """Publish ``count`` messages into each relay, alternating bus and bare, ``rate`` in all per second."""
    client = _child_setup(url)
    publisher = Publisher(client, Keys(bus_prefix), BusSettings())
    bare_key = Keys(bare_prefix).stream("relay-0")
    ready.put("source")
    start.wait()
    for i in _paced(2 * count, rate):
        if i % 2 == 0:
            publisher.publish("relay-0", _bar(time.perf_counter_ns()))
        else:
            client.xadd(bare_key, _plain(time.perf_counter_ns()))  # type: ignore[arg-type]
    out.put({"sent": count})
    client.close()


def _bus_hop(url: str, prefix: str, hop: int, count: int, ready: Any, start: Any, out: Any) -> None:
    client = _child_setup(url)
    keys = Keys(prefix)
    publisher = Publisher(client, keys, BusSettings())
    latencies: list[int] = []
    last = hop == HOPS - 1
    downstream = f"relay-{hop + 1}"

    def handle(delivery: Delivery) -> None:
        if last:
            bar = delivery.message
            assert isinstance(bar, Bar) and bar.trade_count is not None
            latencies.append(time.perf_counter_ns() - bar.trade_count)
        else:
            publisher.publish(downstream, delivery.message)

    consumer = Consumer(client, keys, stream=f"relay-{hop}", group=GROUP, handler=handle,
                        settings=BusSettings(batch=BATCH), clock=LiveClock(), name=f"hop-{hop}")
    ready.put(hop)
    start.wait()
    consumer.run(max_messages=count)
    out.put({"path": "bus", "hop": hop, "latencies": latencies, "dead_lettered": consumer.dead_lettered})
    client.close()


def _bare_hop(url: str, prefix: str, hop: int, count: int, ready: Any, start: Any, out: Any) -> None:
    client = _child_setup(url)
    keys = Keys(prefix)
    source, downstream = keys.stream(f"relay-{hop}"), keys.stream(f"relay-{hop + 1}")
    name, last = f"hop-{hop}", hop == HOPS - 1
    latencies: list[int] = []
    ready.put(hop)
    start.wait()
    handled = 0
    while handled < count:
        reply: Any = client.xreadgroup(GROUP, name, {source: ">"}, count=BATCH, block=1000)
        for entry_id, fields in reply[0][1] if reply else ():
            if last:
                latencies.append(time.perf_counter_ns() - int(fields[b"t"]))
            else:
                client.xadd(downstream, fields)
            client.xack(source, GROUP, entry_id)
            handled += 1
    out.put({"path": "bare", "hop": hop, "latencies": latencies, "dead_lettered": 0})
    client.close()


def _relay(url: str, prefix: str, count: int, rate: float) -> tuple[list[int], list[int], int]:
    """Both relays at once, fed alternately by one source; (bus latencies, bare latencies, dead)."""
    bus_prefix, bare_prefix = f"{prefix}-bus", f"{prefix}-bare"
    client = connect_url(url)
    for relay_prefix in (bus_prefix, bare_prefix):
        for i in range(HOPS):
            client.xgroup_create(Keys(relay_prefix).stream(f"relay-{i}"), GROUP, id="0", mkstream=True)
    client.close()
    jobs: list[Job] = [(_bus_hop, (url, bus_prefix, i, count)) for i in range(HOPS)]
    jobs += [(_bare_hop, (url, bare_prefix, i, count)) for i in range(HOPS)]
    jobs.append((_source, (url, bus_prefix, bare_prefix, count, rate)))
    results = _run_processes(jobs)
    by_path = {r["path"]: r["latencies"] for r in results if r.get("hop") == HOPS - 1}
    for path, latencies in by_path.items():
        if len(latencies) != count:
            raise RuntimeError(f"{path} relay: {len(latencies)} of {count} messages arrived")
    dead = sum(r.get("dead_lettered", 0) for r in results)
    return by_path["bus"][WARMUP:], by_path["bare"][WARMUP:], dead


def _percentile(values: Sequence[int], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index] / 1000  # ns -> us


# -- the figures ---------------------------------------------------------------------------------


def measure(url: str, messages: int, rounds: int, rate: float, seconds: float) -> dict[str, Any]:
    """Run both comparisons against ``url``; return the figures."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    per_path = max(int(rate * seconds / 2), WARMUP + 100)
    bus_rounds: list[float] = []
    bare_rounds: list[float] = []
    dead = 0
    try:
        for r in range(rounds):  # alternate, so background noise falls on both paths alike
            order: list[tuple[str, Callable[..., None], Fields]] = [
                ("bare", _bare_drain, _plain), ("bus", _bus_drain, _encoded)]
            for label, target, fields in order if r % 2 == 0 else order[::-1]:
                rate_tp, round_dead = _throughput(url, prefix, target, fields, messages, f"{label}{r}")
                (bus_rounds if label == "bus" else bare_rounds).append(rate_tp)
                dead += round_dead
        bare_batch_tp, _ = _throughput(url, prefix, _bare_drain_batch_ack, _plain, messages, "bare-batch")
        bus_lat, bare_lat, relay_dead = _relay(url, prefix, per_path, rate)
        dead += relay_dead
    finally:
        client = connect_url(url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
    bus_tp, bare_tp = statistics.median(bus_rounds), statistics.median(bare_rounds)
    p50_bus, p99_bus = _percentile(bus_lat, 0.50), _percentile(bus_lat, 0.99)
    p50_bare, p99_bare = _percentile(bare_lat, 0.50), _percentile(bare_lat, 0.99)
    round_ratios = [bus / bare for bus, bare in zip(bus_rounds, bare_rounds, strict=True)]
    tp_ratio = statistics.median(round_ratios)  # paired by round: robust to load that comes and goes
    p50_ratio = p50_bus / p50_bare
    return {
        "bench": "bus",
        "throughput_unit": "messages/s",
        "throughput_messages_per_round": messages,
        "throughput_rounds": rounds,
        "throughput_consumers": CONSUMERS,
        "throughput_bus": round(bus_tp),
        "throughput_bare": round(bare_tp),
        "throughput_ratio": round(tp_ratio, 3),
        "throughput_round_ratios": [round(ratio, 3) for ratio in round_ratios],
        "throughput_bare_batch_ack": round(bare_batch_tp),
        "throughput_target_ratio": THROUGHPUT_TARGET,
        "throughput_target_met": tp_ratio >= THROUGHPUT_TARGET,
        "relay_unit": "us",
        "relay_hops": HOPS,
        "relay_rate_per_s": rate,
        "relay_messages_per_path": per_path,
        "relay_counted_per_path": len(bus_lat),
        "relay_p50_bus": round(p50_bus, 1),
        "relay_p99_bus": round(p99_bus, 1),
        "relay_p50_bare": round(p50_bare, 1),
        "relay_p99_bare": round(p99_bare, 1),
        "relay_p50_ratio": round(p50_ratio, 3),
        "relay_p99_ratio": round(p99_bus / p99_bare, 3),
        "relay_p50_target_ratio": RELAY_P50_TARGET,
        "relay_p50_target_met": p50_ratio <= RELAY_P50_TARGET,
        "dead_lettered": dead,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    """Print the benchmark's JSON line."""
    messages = int(os.environ.get("BENCH_MESSAGES", "20000"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    rate = float(os.environ.get("BENCH_RELAY_RATE", "500"))
    seconds = float(os.environ.get("BENCH_RELAY_SECONDS", "6"))
    url = os.environ.get("REDIS_URL")
    if url:
        print(json.dumps(measure(url, messages, rounds, rate, seconds)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        server = RedisServer(free_port(), Path(tmp), appendonly=False)
        server.start()
        try:
            print(json.dumps(measure(server.url, messages, rounds, rate, seconds)), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
