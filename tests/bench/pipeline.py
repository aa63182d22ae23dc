"""Benchmark: a bar through every process to the exchange's acknowledgement, beside the bare relay.

Prints one JSON line (times in milliseconds). Issue: "Bar published to order acknowledged by the
exchange, p50/p99 at 500 bars/s across all processes, beside the bare 4-hop redis-py relay
measured in the same run. Targets: p50 within 2x the bare relay, p99 under 10 ms on the paper
exchange path excluding the HTTP hop (report both)."

**What is measured.** Bars flow at ``BENCH_PIPELINE_RATE`` bars/s (default 500) through every
process that consumes bars: the strategy worker applies each one, the exchange sees each one
(risk reads the marks the publishing script writes; it consumes no bars). One bar in
``BENCH_PIPELINE_ORDER_EVERY`` (k, default 25) becomes an order: at the defaults 20 orders/s
beside 500 bars/s. The latencies are those of the bars that became orders, from the bar's
publication to the exchange's acknowledgement of its order.

**Why one order per k bars.** A real strategy orders on a small fraction of the bars it reads,
so "500 bars/s" is a bar load, not 500 orders/s. One order per bar at 500 bars/s is 500
orders/s, about nine times what the desk handles on the 2-core development machine (about
50-60 orders/s): its queues then grow for as long as the run lasts, the latencies measure the
run's length rather than the path, and in practice every percentile comes out ``null``.
``BENCH_PIPELINE_ORDER_EVERY=1`` gives back that load, every bar an order (500 orders/s at the
default rate; with a lower ``BENCH_PIPELINE_RATE``, the every-bar path at a rate the desk keeps
up with).

**Which bars become orders**, deterministically and known to the bench without reading any
stream: the source numbers the bars of the timed run 0, 1, 2, ... in publication order (its
round robin over the symbols) and writes the number in the bar's ``trade_count``, a field no
process on the desk reads but the strategy. The strategy (``every_bar`` with param ``every=k``)
emits its intent in ``on_bar``, in the worker, iff ``trade_count`` is a multiple of k; so bar i
becomes an order iff ``i % k == 0``. Nothing about the path of an order changes: the decision is
taken where any strategy takes it, on a field of the bar as any signal is, and every other bar
costs the worker its full work (decode, apply, state written back) and yields no intent. With
k a multiple of the number of symbols every order falls on one symbol; at the defaults (25, 3
symbols) the orders rotate over the symbols.

**The desk** (its mechanics are in ``tests/bench/_desk.py``). Real OS processes, started as
``make run`` starts them, with INFO logs to files: the paper exchange
(``services.paper_exchange``), one strategy worker (``services.strategy``, 8 partitions, plugin
``every_bar`` from ``tests/procs/every_bar_strategy.py`` on every symbol, ``strategy.params``
``every`` = k: one market buy of 1 share per ordering bar), ``services.risk`` and
``services.executor``. Not started, because they are not on the way from a bar to an order: the
ingester (the source below publishes through the ingester's own gate instead), the reconciler
(so the trading state stays ACTIVE), the monitor. The exchange fills a market order on the first
bar of its symbol newer than the order, so the executor applies a fill per order besides each
submit, as it would live.

**Bars.** A source process publishes ``BENCH_PIPELINE_RATE`` bars/s (default 500) for
``BENCH_PIPELINE_SECONDS`` (default 16: 300 counted orders at the defaults, so a p99 is not
just the largest of a hundred) on an absolute schedule (``_paced`` of
``tests/bench/bus.py``: no drift), round robin over ``BENCH_PIPELINE_SYMBOLS`` (default
``AAPL,MSFT,SPY``), one bar per call of :meth:`services.ingester.BarGate.admit_and_publish`: the
ingester's atomic admission script, which updates ``last-bar`` and XADDs the bar to ``bars`` and
to its partition ``bars:<n>``. Prices are flat (100.00), so equity never moves; ``trade_count``
is the bar's number (above). The source does not trim (a run stays far below ``bus.maxlen``).

**The three moments of a bar**, all read from this host's real-time clock (every process runs
here, so one clock is shared; nothing is compared across hosts):

* ``t0``: the bar's own ``time``, ``LiveClock.now()`` taken immediately before the bar is built,
  encoded and published (the envelope ``time`` field carries it).
* ``t_submit``: the score of the executor's rate-limit grant for the order's ``POST /v2/orders``:
  Redis ``TIME`` (µs) inside the limiter's acquire script, which the executor runs in the round
  trip that records the order (the adapter then sends without taking another slot; it would take
  one itself, last thing before sending, had none been free). The grants of the submit endpoint sit in their
  own bucket (``ratelimit:{alpaca}:endpoint:submit``) because the bench configures an (unbinding)
  ``submit`` endpoint limit. A grant is matched to its order as the single grant between the
  order record's ``created_at`` (stamped by the executor before that round trip) and ``t_ack``; the
  executor submits one order at a time, so these windows never overlap (a window without exactly
  one grant is counted in ``unmatched_grants`` and left out of the figures that need it).
* ``t_ack``: the ``timestamp`` of the executor's ``broker.submitted`` log line for the order's
  client_order_id: the adapter logs it as soon as the exchange's reply is parsed, before the
  executor records the status. The client_order_id is derived from the bar (``bst-`` + the
  intent id of strategy, symbol, bar id), so each ordering bar is followed without reading the
  intents.

No timing code was added to any service: the three moments are a message field, a Redis record
and a log line the system writes anyway.

**Figures** (p50 and p99 over the counted orders: the bars of the timed run past the warm-up
that became orders, ``orders_counted`` of them; the bars that made no order have no ack to time):

* ``bar_to_ack`` = ``t_ack - t0``: bar published -> strategy worker -> ``intents`` -> risk (checks,
  reservation under the portfolio lock) -> ``orders`` -> executor (record, trading state, limiter)
  -> HTTP to the exchange and back.
* ``http_hop`` = ``t_ack - t_submit``: the reply of the round trip that recorded the order and
  took its slot reaching the executor, the order's rounding, the adapter lock, alpaca-py
  building and sending the POST, the exchange accepting the order (its Redis
  transaction), the reply, its JSON parse.
* ``excl_http`` = ``bar_to_ack - http_hop`` = ``t_submit - t0``: everything but that hop (nothing
  lies between the reply and ``t_ack`` but the parse, counted in the hop).
* ``bare_relay``: the 4-hop relay of ``tests/bench/bus.py`` (``_bare_hop``: 4 processes, each
  ``XREADGROUP BLOCK`` + ``XADD`` + ``XACK`` on plain fields, the stamp ``perf_counter_ns``),
  fed by the same source process at the same rate: the source alternates one bar and one bare
  message (so it runs at twice the rate), and both paths see the same load for the same seconds,
  as in bus.py's relay comparison. ``bare_alone`` is that relay at the same rate run alone before
  the desk starts: the floor without the desk's load on these cores, for context; the targets use
  the same-run relay.

Targets (printed, never asserted): ``bar_to_ack`` p50 <= 2x ``bare_relay`` p50 (``p50_ratio``;
``p50_ratio_excl_http`` beside it), and ``excl_http`` p99 < 10 ms (``bar_to_ack`` p99 beside it).
``http_hop_p50_ratio`` is the HTTP hop's p50 alone over the relay's: every order's ``bar_to_ack``
contains its hop, so ``bar_to_ack`` p50 >= ``http_hop`` p50, and while that ratio is above 2 no
change to the desk's own stages can meet the p50 target; only a cheaper hop could.
When the machine cannot carry the desk and the relay together, the relay beside the desk queues
and its p50 grows with the run's length, so a ratio against it says nothing: if the same-run relay
p50 is more than ``SATURATED_RELAY`` (3) times ``bare_alone``'s, ``relay_saturated`` is true and
``p50_target_met`` is ``null`` (not judged), whatever the ratio.

**Warm-up.** Before the timed run, priming bars (one per symbol every 50 ms) are published until
every symbol has had an order acknowledged (a priming bar is numbered 0, so each one orders):
the risk and executor broker handles are built, the HTTP keep-alive connection is open, marks
exist. Then the first ``BENCH_PIPELINE_WARMUP_S`` (default 1) seconds of bars (and of the orders
among them) and of bare messages are not counted.

**Drain.** After the last bar the bench waits, at most ``BENCH_PIPELINE_DRAIN_S`` (default 60),
until every stage has drained (each group's last delivered id is its stream's last id and
nothing is pending, checked upstream first: each stage writes its output before its ack), and
only then stops the desk and reads the executor's log. Meanwhile it keeps the market moving: a
bar per symbol every 100 ms on ``bars`` only (not the partitions: no strategy sees it, no order
comes of it), because the exchange fills a market order only on a bar newer than the order, and
an order left open makes its later work slower. A counted order with no ack by then is
``missing`` (so is one acknowledged only while the desk was being stopped): it counts as later
than every acknowledged one, so a percentile that falls on a missing order is ``null`` (never a
figure computed over the survivors only).

**Where the time goes**: ``stages_p50_p99`` splits ``excl_http`` at the moments the path
publishes, read from stream entry ids (Redis ``TIME`` at the XADD, millisecond resolution, so
each figure is within about 1 ms and an id's floor makes a stage read up to 1 ms short or long):
``strategy`` = the intent's entry on ``intents`` - t0 (the worker's wake-up, read, state
transaction), ``risk`` = the order's entry on ``orders`` - the intent's (reads, checks,
submission count, reservation under the lock, publish), ``executor`` = t_submit - the order's
entry (the executor's wake-up and one round trip: record, trading state, the limiter's grant).
``BENCH_PIPELINE_LOGS=<dir>`` keeps the desk processes' logs there.

**Rates.** ``rate_per_s`` is the bar rate asked for, ``order_every`` is k and ``orders_per_s``
the order rate that makes (``rate_per_s / order_every``); ``published_per_s`` is the bar rate
achieved.

**Keeping up.** ``acked_per_s_while_publishing`` (acks of this run's orders logged
before the last bar was published, over the publishing time) beside ``orders_per_s``, and
``unacked_at_last_bar`` (this run's orders without an ack by then): when the desk cannot keep
up, its queues grow for as long as the run lasts and the latencies measure the run's length, not
the path; these say so. On the 2-core development machine the desk does not keep up with 500
orders/s (``BENCH_PIPELINE_ORDER_EVERY=1`` at the default rate), and with 500 bars/s flowing it
acknowledged at most about 20 orders/s (k=10, 50 orders/s, falls behind): the default k=25 sits
near that limit there, which shows in the tails.

**Counts**: ``bars_published`` (timed run), ``bars_counted`` (past the warm-up),
``orders_published`` (bars of the timed run that became orders), ``orders_counted``,
``orders_acked`` (of the counted), ``intents_emitted`` (entries on ``intents``: the priming bars
plus ``orders_published`` when the strategy ordered on exactly the bars predicted), ``missing``,
``unmatched_grants``, ``rejected`` (entries on ``rejections``; up to 5 distinct reasons in
``rejection_reasons``), ``deferred`` and
``dead_lettered``; ``drain_s`` (last bar to every stage drained, ``null`` at the deadline);
``cpu_us_per_bar``: CPU (user + system, from ``/proc``) per published bar (not per order) of each
desk process and of redis-server (which also serves the bare relay), over the timed run and the
drain.

**Configuration so that nothing throttles the orders**, even 500 orders/s at
``BENCH_PIPELINE_ORDER_EVERY=1`` (``BASTION_*`` for every desk process):
cash 1,000,000,000 in the portfolio and at the exchange; ``limits.max_open_orders`` and
``limits.max_orders_per_minute`` 1,000,000,000 (defaults 50 and 60 would refuse most orders);
the shared broker rate limit 1,000,000,000 per 3,600 s, account-wide and for ``submit`` (default
200 per 60 s would make the adapter wait); ``limits.balance_refresh_after_fills`` 1,000,000,000
and ``balance_max_age_s`` 3,600 (the default refreshes the balance from the broker every 10 fills:
an extra HTTP call on risk's path on one order in 10; here it happens once, while priming). Left
at their defaults because they cannot fire here, and still checked on every intent: the
protections (nothing is ever sold, so no exit, stop-out or loss; flat prices, so no drawdown),
pattern day trading (no sells; equity far above the threshold), position fraction and gross
exposure (well under 1% of the cash is spent), order notional (100), stale data (bars are
fresh). The exchange's market clock says open at any hour (``paper_exchange.always_open``).

Every process is a real OS process. Uses a private real redis-server (no AOF, temp dir) unless
``REDIS_URL`` is set; keys go under a fresh prefix, all deleted afterwards, and every process
started here is stopped.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from services.strategy import intent_id
from shared.bus import codec
from shared.clock import LiveClock, epoch_micros
from shared.keys import INTENTS, ORDERS, REJECTIONS, Keys
from shared.logging import configure_logging
from shared.redis.client import reply_text
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.rate_limit import Limit, RateLimiter
from tests.bench._desk import (
    PARTITIONS,
    STRATEGY,
    SUBMIT_OP,
    BarPublisher,
    Desk,
    drain,
    order_cid,
    prime,
)
from tests.bench.bus import GROUP, HOPS, Job, _bare_hop, _paced, _percentile, _plain, _run_processes
from tests.support.processes import free_port

ACK_EVENT = "broker.submitted"
P50_TARGET_RATIO = 2.0
SATURATED_RELAY = 3.0  # same-run relay p50 over the relay-alone p50 beyond which no ratio is judged
P99_TARGET_MS = 10.0


def _child_setup(url: str) -> redis.Redis:
    configure_logging("bench-pipeline", "WARNING", stream=sys.stderr)  # stdout carries the JSON line
    return connect_url(url)


def _source(url: str, desk_prefix: str, bare_prefix: str, symbols: Sequence[str], count: int, rate: float,
            ready: Any, start: Any, out: Any) -> None:
    """``count`` bars (numbered 0 to count - 1) and ``count`` bare relay messages, alternating,
    ``rate`` of each per second."""
    client = _child_setup(url)
    publisher = BarPublisher(client, Keys(desk_prefix))
    bare_key = Keys(bare_prefix).stream("relay-0")
    sent: list[tuple[str, str, int]] = []
    ready.put("source")
    start.wait()
    for i in _paced(2 * count, 2 * rate):
        if i % 2 == 0:
            sent.append(publisher.publish(symbols[(i // 2) % len(symbols)], i // 2))
        else:
            client.xadd(bare_key, _plain(time.perf_counter_ns()))  # type: ignore[arg-type]
    out.put({"role": "source", "bars": sent})
    client.close()


def _bare_source(url: str, bare_prefix: str, count: int, rate: float, ready: Any, start: Any,
                 out: Any) -> None:
    """``count`` bare relay messages at ``rate`` per second (the relay alone, before the desk)."""
    client = _child_setup(url)
    bare_key = Keys(bare_prefix).stream("relay-0")
    ready.put("source")
    start.wait()
    for _ in _paced(count, rate):
        client.xadd(bare_key, _plain(time.perf_counter_ns()))  # type: ignore[arg-type]
    out.put({"role": "source", "bars": []})
    client.close()


def _relay_jobs(client: redis.Redis, url: str, bare_prefix: str, count: int) -> list[Job]:
    """The bare relay's 4 hop processes, their consumer groups created first."""
    for i in range(HOPS):
        client.xgroup_create(Keys(bare_prefix).stream(f"relay-{i}"), GROUP, id="0", mkstream=True)
    return [(_bare_hop, (url, bare_prefix, i, count)) for i in range(HOPS)]


def _relay_latencies(results: list[dict[str, Any]], count: int) -> list[int]:
    found = [r["latencies"] for r in results if r.get("hop") == HOPS - 1]
    if len(found) != 1 or len(found[0]) != count:
        raise RuntimeError(f"bare relay: {[len(f) for f in found]} of {count} messages arrived")
    return list(found[0])


# -- the results read back from the desk ------------------------------------------------------


def _acks(log_path: Path) -> dict[str, int]:
    """client_order_id -> µs of the first ``broker.submitted`` line the executor logged for it."""
    acks: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if ACK_EVENT not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        cid = record.get("client_order_id")
        if record.get("event") == ACK_EVENT and cid and cid not in acks:
            acks[cid] = epoch_micros(datetime.fromisoformat(record["timestamp"]))
    return acks


def _submit_grants(client: redis.Redis, keys: Keys) -> list[int]:
    """Every grant of the submit endpoint's rate-limit bucket (µs of Redis TIME), in order."""
    key = RateLimiter(client, keys, account=Limit(1, 1.0)).bucket_key(f"endpoint:{SUBMIT_OP}")
    entries: Any = client.zrange(key, 0, -1, withscores=True)
    return sorted(int(score) for _, score in entries)


def _published_ms(client: redis.Redis, stream_key: str, id_field: str) -> dict[str, int]:
    """``id_field`` of each message on a stream -> its entry id's time (ms of Redis ``TIME`` at XADD)."""
    found: dict[str, int] = {}
    entries: Any = client.xrange(stream_key, "-", "+")
    for entry_id, fields in entries:
        message = codec.decode(fields)
        found.setdefault(str(getattr(message, id_field)), int(reply_text(entry_id).split("-")[0]))
    return found


def _created_at(client: redis.Redis, keys: Keys, cids: Sequence[str]) -> list[int | None]:
    """µs of each order record's ``created_at`` (None for an order never recorded)."""
    with client.pipeline(transaction=False) as pipe:
        for cid in cids:
            pipe.hget(keys.order(cid), "created_at")
        raw: list[Any] = pipe.execute()
    return [None if value is None else epoch_micros(datetime.fromisoformat(reply_text(value)))
            for value in raw]


# -- the figures ---------------------------------------------------------------------------------

MISSING_NS = sys.maxsize  # a bar never acknowledged: later than any that was


def _late_ms(values_us: Sequence[int], missing: int, fraction: float) -> float | None:
    """A percentile in ms of µs latencies, each missing bar counted as later than every acked one
    (None when the percentile falls on a missing bar)."""
    if not values_us and not missing:
        return None
    value = _percentile([v * 1000 for v in values_us] + [MISSING_NS] * missing, fraction)  # -> µs
    return None if value * 1000 >= MISSING_NS else round(value / 1000, 3)


def _ns_ms(values_ns: Sequence[int], fraction: float) -> float:
    return round(_percentile(values_ns, fraction) / 1000, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def _cpu_per_bar(before: dict[str, float | None], after: dict[str, float | None], bars: int
                 ) -> dict[str, float | None]:
    """µs of CPU per bar of each process between two samples (None where /proc is missing)."""
    result: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        result[name] = None if start is None or end is None else round((end - start) / bars * 1e6, 1)
    return result


class _Followed:
    """Each counted bar followed to its ack: latency lists in µs and what could not be followed."""

    def __init__(self, t0s: Sequence[int], acks: Sequence[int | None], created: Sequence[int | None],
                 grants: Sequence[int], published: Sequence[tuple[int | None, int | None]]) -> None:
        self.to_ack: list[int] = []
        self.excl_http: list[int] = []
        self.http_hop: list[int] = []
        self.stages: dict[str, list[int]] = {"strategy": [], "risk": [], "executor": []}
        self.missing = 0
        self.unmatched = 0
        for t0, t_ack, lower, (intent_ms, order_ms) in zip(t0s, acks, created, published, strict=True):
            if t_ack is None:
                self.missing += 1
                continue
            self.to_ack.append(t_ack - t0)
            # the executor submits one order at a time: exactly one grant lies in [created_at, t_ack]
            lo = bisect.bisect_left(grants, lower) if lower is not None else len(grants)
            hi = bisect.bisect_right(grants, t_ack)
            if hi - lo != 1:
                self.unmatched += 1
                continue
            self.excl_http.append(grants[lo] - t0)
            self.http_hop.append(t_ack - grants[lo])
            if intent_ms is not None and order_ms is not None:
                self.stages["strategy"].append(intent_ms * 1000 - t0)
                self.stages["risk"].append((order_ms - intent_ms) * 1000)
                self.stages["executor"].append(grants[lo] - order_ms * 1000)


def measure(url: str, rate: float, order_every: int, seconds: float, warmup_s: float,
            symbols: Sequence[str], drain_timeout: float, workdir: Path) -> dict[str, Any]:
    """The bare relay alone, then the desk beside the bare relay, against ``url``; the figures.

    ``rate`` bars/s, of which bar i of the timed run becomes an order iff ``i % order_every == 0``.
    """
    if order_every < 1:
        raise ValueError(f"order_every must be at least 1, not {order_every}")
    base = f"bench-{uuid.uuid4().hex[:8]}"
    keys = Keys(f"{base}-desk")
    count = max(int(rate * seconds), 2)
    skip = min(int(rate * warmup_s), count - 1)
    client = connect_url(url)
    desk = Desk(url, keys, workdir, symbols, order_every)
    try:
        alone_prefix = f"{base}-alone"
        alone_jobs = [*_relay_jobs(client, url, alone_prefix, count),
                      (_bare_source, (url, alone_prefix, count, rate))]
        alone = _relay_latencies(_run_processes(alone_jobs), count)[skip:]

        desk.start(client)
        primed = prime(client, keys, symbols)
        bare_prefix = f"{base}-bare"
        jobs = _relay_jobs(client, url, bare_prefix, count)
        jobs.append((_source, (url, keys.prefix, bare_prefix, list(symbols), count, rate)))
        cpu_before = desk.cpu_sample(client)
        results = _run_processes(jobs)
        drain_s, keepalive = drain(client, keys, symbols, drain_timeout)
        cutoff = epoch_micros(LiveClock().now())  # an ack logged later (while stopping) is missing
        cpu = _cpu_per_bar(cpu_before, desk.cpu_sample(client), count)
        bare = _relay_latencies(results, count)[skip:]
        sent: list[tuple[str, str, int]] = next(r["bars"] for r in results if r.get("role") == "source")
        orders = range(0, len(sent), order_every)  # the numbers of the bars that became orders
        counted = [i for i in orders if i >= skip]
        cids = {i: order_cid(sent[i][0], sent[i][1]) for i in orders}
        created = _created_at(client, keys, [cids[i] for i in counted])
        grants = _submit_grants(client, keys)
        intent_ms = _published_ms(client, keys.stream(INTENTS), "id")
        order_ms = _published_ms(client, keys.stream(ORDERS), "client_order_id")
        published = [(intent_ms.get(intent_id(STRATEGY, sent[i][1], sent[i][0], 0)), order_ms.get(cids[i]))
                     for i in counted]
        intents = int(client.xlen(keys.stream(INTENTS)))
        rejected = int(client.xlen(keys.stream(REJECTIONS)))
        reasons = sorted(_published_ms(client, keys.stream(REJECTIONS), "reason"))[:5]
        deferred = int(client.hlen(keys.deferred))
        dead = int(client.xlen(keys.dead_letter))
        desk.stop()  # before reading the executor's log: every line it will write is written
        ack_times = _acks(workdir / "executor.log")
    finally:
        desk.stop()
        for key in client.scan_iter(match=f"{base}*", count=1000):
            client.delete(key)
        client.close()

    acks: dict[int, int | None] = {}
    for i, cid in cids.items():
        t_ack = ack_times.get(cid)
        acks[i] = t_ack if t_ack is not None and t_ack <= cutoff else None
    followed = _Followed([sent[i][2] for i in counted], [acks[i] for i in counted], created, grants,
                         published)
    first_t0, last_t0 = sent[0][2], sent[-1][2]
    publish_span_s = max((last_t0 - first_t0) / 1e6, 1e-6)
    acked_while_publishing = sum(1 for t in acks.values() if t is not None and t <= last_t0)
    p50 = _late_ms(followed.to_ack, followed.missing, 0.50)
    p99 = _late_ms(followed.to_ack, followed.missing, 0.99)
    p50_excl = _late_ms(followed.excl_http, followed.missing, 0.50)
    p99_excl = _late_ms(followed.excl_http, followed.missing, 0.99)
    bare_p50, alone_p50 = _ns_ms(bare, 0.50), _ns_ms(alone, 0.50)
    saturated = bare_p50 > SATURATED_RELAY * alone_p50
    hop_p50 = _late_ms(followed.http_hop, 0, 0.50)
    return {
        "bench": "pipeline",
        "unit": "ms",
        "rate_per_s": rate,
        "order_every": order_every,
        "orders_per_s": round(rate / order_every, 3),
        "seconds": seconds,
        "warmup_s": warmup_s,
        "symbols": list(symbols),
        "strategy_workers": 1,
        "partitions": PARTITIONS,
        "bar_to_ack_p50": p50,
        "bar_to_ack_p99": p99,
        "excl_http_p50": p50_excl,
        "excl_http_p99": p99_excl,
        "http_hop_p50": hop_p50,
        "http_hop_p99": _late_ms(followed.http_hop, 0, 0.99),
        "stages_p50_p99": {name: [_late_ms(values, 0, 0.50), _late_ms(values, 0, 0.99)]
                           for name, values in followed.stages.items()},
        "bare_relay_hops": HOPS,
        "bare_relay_p50": bare_p50,
        "bare_relay_p99": _ns_ms(bare, 0.99),
        "bare_alone_p50": alone_p50,
        "bare_alone_p99": _ns_ms(alone, 0.99),
        "p50_ratio": _ratio(p50, bare_p50),
        "p50_ratio_excl_http": _ratio(p50_excl, bare_p50),
        "p50_ratio_vs_bare_alone": _ratio(p50, alone_p50),
        "http_hop_p50_ratio": _ratio(hop_p50, bare_p50),
        "p50_target_ratio": P50_TARGET_RATIO,
        "relay_saturated": saturated,
        "p50_target_met": None if saturated else p50 is not None and p50 <= P50_TARGET_RATIO * bare_p50,
        "p99_excl_http_target_ms": P99_TARGET_MS,
        "p99_excl_http_target_met": p99_excl is not None and p99_excl < P99_TARGET_MS,
        "published_per_s": round((len(sent) - 1) / publish_span_s, 1),
        "acked_per_s_while_publishing": round(acked_while_publishing / publish_span_s, 1),
        "unacked_at_last_bar": len(orders) - acked_while_publishing,
        "drain_s": None if drain_s is None else round(drain_s, 3),
        "priming_bars": primed,
        "keepalive_bars": keepalive,
        "bars_published": len(sent),
        "bars_counted": len(sent) - skip,
        "orders_published": len(orders),
        "orders_counted": len(counted),
        "orders_acked": len(followed.to_ack),
        "intents_emitted": intents,
        "missing": followed.missing,
        "unmatched_grants": followed.unmatched,
        "rejected": rejected,
        "rejection_reasons": reasons,
        "deferred": deferred,
        "dead_lettered": dead,
        "bare_messages_counted": len(bare),
        "cpu_us_per_bar": cpu,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    """Print the benchmark's JSON line."""
    rate = float(os.environ.get("BENCH_PIPELINE_RATE", "500"))
    order_every = int(os.environ.get("BENCH_PIPELINE_ORDER_EVERY", "25"))
    seconds = float(os.environ.get("BENCH_PIPELINE_SECONDS", "16"))
    warmup_s = float(os.environ.get("BENCH_PIPELINE_WARMUP_S", "1"))
    drain_timeout = float(os.environ.get("BENCH_PIPELINE_DRAIN_S", "60"))
    names = os.environ.get("BENCH_PIPELINE_SYMBOLS", "AAPL,MSFT,SPY")
    symbols = [s.strip() for s in names.split(",") if s.strip()]
    keep = os.environ.get("BENCH_PIPELINE_LOGS")  # a directory to keep the desk's logs in
    workdir = Path(keep) if keep else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-pipeline-") as tmp:
        url = os.environ.get("REDIS_URL")
        if url:
            print(json.dumps(measure(url, rate, order_every, seconds, warmup_s, symbols, drain_timeout,
                                     workdir or Path(tmp))), flush=True)
            return
        server = RedisServer(free_port(), Path(tmp) / "redis", appendonly=False)
        server.start()
        try:
            print(json.dumps(measure(server.url, rate, order_every, seconds, warmup_s, symbols,
                                     drain_timeout, workdir or Path(tmp))), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
