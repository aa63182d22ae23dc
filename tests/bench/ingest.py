"""Benchmark: sustained bars/s through the ingester and 2 strategy workers, Redis memory bounded.

Prints one JSON line. The system path runs real processes: 2 ``python -m services.strategy``
workers (SMA crossover on every symbol, 8 partitions) and ``python -m services.ingester --bars N``
(synthetic source, unpaced, ``BENCH_INGEST_SYMBOLS`` symbols, default 50). Figures:

* ``ingest_bars_per_s``: N over the span from the first bar seen on ``bars`` (polled every 5 ms,
  Redis TIME) to the id of the last one (stream ids carry Redis's clock too); each bar went
  through the atomic gate and was written to ``bars`` and to its partition.
* ``through_workers_bars_per_s``: N over the span from the first bar written to the moment every
  partition's group had read and acknowledged everything (Redis TIME, polled every 20 ms); each
  bar was decoded, run through its strategy and committed with its state in a MULTI.
* ``bare_xadd_per_s``: a bare redis-py loop XADDing the same number of small plain entries in
  pipelines of 256, measured in the same run on the same server: the ceiling for one writer.
* ``cpu_us_per_bar``: CPU time (user + system) per bar of N, of the ingester process (from its
  first bar to its exit: start-up, about 0.3 s, left out), of the 2 workers together and of
  redis-server (INFO ``used_cpu_*``), both from just before the ingester starts to the moment the
  workers caught up. On a machine with few cores these shares, not one process's speed alone,
  decide the rates above. ``other_load_cores``: the CPU everything else on the machine (not these
  processes, not this one's polling) used over that span, in cores: another test run on a 2-core
  machine skews every figure, so compare runs with this near 0. Both read from ``/proc`` (Linux);
  null elsewhere.
* ``used_memory_before/after``: INFO ``used_memory`` before the run and after it, with streams
  trimmed to ``bus.maxlen`` (``BENCH_MAXLEN``, default 20,000) -- bounded memory means "after"
  does not grow with N; ``stream_lengths`` shows where the trimming left each stream.

Target (issue 5): at least 20,000 bars/s ingest with 2 strategy workers. ``BENCH_INGEST_BARS``
sets N (default 200,000). Uses a private real redis-server (no AOF) unless ``REDIS_URL`` is set.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from shared.keys import BARS, INTENTS, Keys
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.processes import cpu_seconds, free_port, spawn, stop_all, wait_for

PARTITIONS = 8
WORKERS = 2
TARGET = 20_000


def _server_seconds(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def _id_seconds(entry_id: Any) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-")[0]) / 1000


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core spent busy since boot, from ``/proc/stat`` (None where there is none)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _workers_cpu(workers: list[subprocess.Popen[bytes]]) -> float | None:
    seconds = [cpu_seconds(w.pid) for w in workers]
    return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _per_bar_us(seconds: float | None, bars: int) -> float | None:
    return None if seconds is None else round(seconds / bars * 1e6, 1)


def _caught_up(client: redis.Redis, keys: Keys) -> bool:
    for n in range(PARTITIONS):
        stream = keys.stream(keys.bar_partition(n))
        if not client.exists(stream):
            continue
        last = client.xinfo_stream(stream)["last-generated-id"]
        groups = {g["name"]: g for g in client.xinfo_groups(stream)}
        group = groups.get(b"strategy") or groups.get("strategy")
        if group is None or group["last-delivered-id"] != last or int(group["pending"]):
            return False
    return True


def bare_xadd(client: redis.Redis, prefix: str, count: int) -> float:
    """Entries/s of a bare pipelined XADD loop (256 per round trip)."""
    key = f"{prefix}:bare"
    fields = {"symbol": "AAPL", "close": "187.25", "volume": "1200"}
    started = time.perf_counter()
    for start in range(0, count, 256):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(min(256, count - start)):
                pipe.xadd(key, fields, maxlen=20_000, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
    elapsed = time.perf_counter() - started
    client.delete(key)
    return count / elapsed


def measure(url: str, bars: int, symbols: int, maxlen: int, workdir: Path) -> dict[str, Any]:
    """Run the system path and the bare baseline against ``url``; return the figures."""
    client = connect_url(url)
    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    names = ",".join(f'"S{i:03d}"' for i in range(symbols))
    env = {"REDIS_URL": url, "BASTION_KEY_PREFIX": keys.prefix, "BASTION_LOG__LEVEL": "WARNING",
           "BASTION_INGESTER__PARTITIONS": str(PARTITIONS), "BASTION_INGESTER__PACED": "false",
           "BASTION_INGESTER__SYMBOLS": f"[{names}]", "BASTION_BUS__MAXLEN": str(maxlen),
           "BASTION_STRATEGY__PLUGINS": '{"*": "sma_crossover"}'}
    workers = [spawn("services.strategy", "--instance", f"bench-w{i}", env=env, log=workdir / f"w{i}.log")
               for i in range(WORKERS)]
    procs: list[subprocess.Popen[bytes]] = list(workers)
    try:
        wait_for(lambda: len(list(client.scan_iter(match=f"{keys.prefix}:lease:*"))) == PARTITIONS,
                 timeout=60, message="the workers to hold every partition")
        memory_before = int(client.info("memory")["used_memory"])
        workers_cpu_before, redis_cpu_before = _workers_cpu(workers), _redis_cpu(client)
        busy_before, own_before = _machine_busy_seconds(), time.process_time()
        span_started = time.perf_counter()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        ingester = spawn("services.ingester", "--bars", str(bars), env=env, log=workdir / "ingester.log")
        procs.append(ingester)
        wait_for(lambda: ingester.poll() is not None or client.xlen(keys.stream(BARS)) > 0, timeout=60,
                 interval=0.005, message="the first bar")
        first_written = _server_seconds(client)
        ingester_startup = cpu_seconds(ingester.pid)
        if ingester.wait(600) != 0:
            raise RuntimeError("ingester failed:\n" + (workdir / "ingester.log").read_text()[-2000:])
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the ingester was reaped
        ingester_cpu = (None if ingester_startup is None else
                        children_after.ru_utime - children_before.ru_utime
                        + children_after.ru_stime - children_before.ru_stime - ingester_startup)
        stream = client.xinfo_stream(keys.stream(BARS))
        last_written = _id_seconds(stream["last-generated-id"])
        wait_for(lambda: _caught_up(client, keys), timeout=600, interval=0.02, message="workers caught up")
        done = _server_seconds(client)
        workers_cpu_after, redis_cpu_after = _workers_cpu(workers), _redis_cpu(client)
        busy_after, span = _machine_busy_seconds(), time.perf_counter() - span_started
        own_cpu = time.process_time() - own_before  # this process's polling
        workers_cpu = (None if workers_cpu_before is None or workers_cpu_after is None
                       else workers_cpu_after - workers_cpu_before)
        redis_cpu = redis_cpu_after - redis_cpu_before
        cpu = {"ingester": _per_bar_us(ingester_cpu, bars), "workers": _per_bar_us(workers_cpu, bars),
               "redis": _per_bar_us(redis_cpu, bars)}
        other_load = None
        if busy_before is not None and busy_after is not None and workers_cpu is not None:
            ours = (ingester_startup or 0.0) + (ingester_cpu or 0.0) + workers_cpu + redis_cpu + own_cpu
            other_load = round(max(0.0, busy_after - busy_before - ours) / span, 2)
        memory_after = int(client.info("memory")["used_memory"])
        lengths = {"bars": int(client.xlen(keys.stream(BARS))),
                   "intents": int(client.xlen(keys.stream(INTENTS))),
                   "partitions_total": sum(int(client.xlen(keys.stream(keys.bar_partition(n))))
                                           for n in range(PARTITIONS))}
        bare = bare_xadd(client, keys.prefix, bars)
    finally:
        stop_all(procs)
        for key in client.scan_iter(match=keys.pattern(), count=1000):
            client.delete(key)
        client.close()
    ingest_rate = bars / max(last_written - first_written, 1e-3)
    through = bars / max(done - first_written, 1e-3)
    return {
        "bench": "ingest", "unit": "bars/s", "bars": bars, "symbols": symbols, "partitions": PARTITIONS,
        "strategy_workers": WORKERS, "maxlen": maxlen,
        "ingest_bars_per_s": round(ingest_rate), "through_workers_bars_per_s": round(through),
        "bare_xadd_per_s": round(bare), "ingest_vs_bare": round(ingest_rate / bare, 3),
        "cpu_us_per_bar": cpu, "other_load_cores": other_load,
        "used_memory_before": memory_before, "used_memory_after": memory_after,
        "stream_lengths": lengths, "target_ingest_bars_per_s": TARGET,
    }


def main() -> None:
    """Print the benchmark's JSON line."""
    bars = int(os.environ.get("BENCH_INGEST_BARS", "200000"))
    symbols = int(os.environ.get("BENCH_INGEST_SYMBOLS", "50"))
    maxlen = int(os.environ.get("BENCH_MAXLEN", "20000"))
    with tempfile.TemporaryDirectory(prefix="bastion-bench-ingest-") as tmp:
        url = os.environ.get("REDIS_URL")
        if url:
            print(json.dumps(measure(url, bars, symbols, maxlen, Path(tmp))))
            return
        server = RedisServer(free_port(), Path(tmp) / "redis", appendonly=False)
        server.start()
        try:
            print(json.dumps(measure(server.url, bars, symbols, maxlen, Path(tmp))))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
