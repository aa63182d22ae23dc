"""The ingester's process: read a source, admit bars through the gate, publish, watch staleness.

Concurrency model: one thread (plus alpaca-py's own thread for the live source). The loop takes
a batch from the source and runs it through :class:`~services.ingester._gate.BarGate`: one
atomic script admits each bar and publishes every accepted one twice -- to ``bars`` for
everyone and to ``bars:<n>`` (``n = crc32(symbol) % partitions``) for strategy workers -- and
stamps each symbol with a bar accepted with the batch's arrival time (``bar-arrival``: this
process's ``clock.now()`` as the batch is sent; risk's stale-data rule reads it), then counts
the verdicts, trims and checks staleness. From an eager source (an unpaced replay) the
script's reply is read one batch late, after the next batch was encoded and sent on the same
connection (:class:`~services.ingester._gate.AdmissionLane`), so Redis and the ingester work at
once. A stop request ends the loop after the batch in hand (and the one in flight).

Redis outages: the loop waits them out (a warning per try, waits doubling from 0.1 to 2 s) with
the batches in flight still queued, and sends them again when Redis is back (the gate drops the
bars that had gone out as duplicates); a failed trim is tried again with the next bars, and a
stale-data alert that cannot be published is logged. The source is not read meanwhile: a paced
one catches up after, the live source's bars wait in its queue.

Guarantees: per symbol, the bars published are strictly increasing in time, across any number
of ingester instances (the gate is atomic). A bar reaches both streams and is marked seen, or,
if the process dies in the middle, none of that (one script). Streams are trimmed to
about ``bus.maxlen`` every ``bus.trim_every`` bars, never past an entry a group still needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import redis

from services.ingester._gate import BarGate, Verdict
from services.ingester._sources import AlpacaSource, BarSource, CsvSource, SyntheticSource
from shared.bus import publish, trim
from shared.clock import Clock
from shared.config import BusSettings, IngesterSettings, Settings
from shared.errors import RedisUnavailable
from shared.keys import ALERTS, BARS, Keys, partition_of
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity, Bar
from shared.redis.boundary import WaitOut, redis_errors
from shared.service import ServiceContext
from shared.stop import Stoppable

__all__ = ["Counts", "Ingester", "main", "make_source", "partition_of"]

log = get_logger(component="ingester")
T = TypeVar("T")


@dataclass
class Counts:
    """What the ingester did with the bars it read."""

    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    out_of_order: int = 0


@dataclass
class _Watch:
    last_arrival: float  # clock.monotonic() of the last accepted bar (or of the start)
    last_bar: datetime | None = None
    stale: bool = False


@dataclass
class Ingester:
    """Admits, publishes and watches bars; drive it with :meth:`run` or :meth:`offer`."""

    client: redis.Redis
    keys: Keys
    settings: IngesterSettings
    bus: BusSettings
    clock: Clock
    watch: Sequence[str] = ()
    counts: Counts = field(default_factory=Counts)
    _watches: dict[str, _Watch] = field(default_factory=dict, init=False)
    _since_trim: dict[str, int] = field(default_factory=dict, init=False)
    _partitions: dict[str, int] = field(default_factory=dict, init=False)  # symbol -> partition_of()
    _next_stale_check: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.gate = BarGate(self.client, self.keys)
        self._bars_key = self.keys.stream(BARS)
        self._partition_keys = [self.keys.stream(self.keys.bar_partition(n))
                                for n in range(self.settings.partitions)]
        now = self.clock.monotonic()
        for symbol in self.watch:
            self._watches[symbol] = _Watch(now)

    def offer(self, bars: Sequence[Bar]) -> list[Verdict]:
        """Admit ``bars`` (in arrival order) and publish the accepted ones; one verdict per bar."""
        partitions = self._partitions_of(bars)
        verdicts = self.gate.admit_and_publish(bars, self._bars_key, self._partition_keys, partitions,
                                               arrived=self.clock.now())
        self._settle(bars, partitions, verdicts)
        return verdicts

    def _partitions_of(self, bars: Sequence[Bar]) -> list[int]:
        known = self._partitions
        return [known[b.symbol] if b.symbol in known else self._partition(b.symbol) for b in bars]

    def _settle(self, bars: Sequence[Bar], partitions: Sequence[int], verdicts: Sequence[Verdict]) -> None:
        """Count, log and watch what the gate decided about ``bars``; trim what grew."""
        accepted = 0
        now = self.clock.monotonic()
        touched: dict[str, int] = {}
        for bar, verdict, partition in zip(bars, verdicts, partitions, strict=True):
            if verdict is Verdict.ACCEPTED:
                accepted += 1
                key = self._partition_keys[partition]
                touched[key] = touched.get(key, 0) + 1
                self._arrived(bar, now)
            elif verdict is Verdict.DUPLICATE:
                self.counts.duplicates += 1
                log.debug("ingester.bar_duplicate", symbol=bar.symbol, bar_time=bar.time.isoformat())
            else:
                self.counts.out_of_order += 1
                log.warning("ingester.bar_out_of_order", symbol=bar.symbol, bar_time=bar.time.isoformat())
        self.counts.read += len(bars)
        self.counts.accepted += accepted
        if accepted:
            touched[self._bars_key] = accepted
            self._trim(touched)

    def _partition(self, symbol: str) -> int:
        partition = self._partitions[symbol] = partition_of(symbol, self.settings.partitions)
        return partition

    def _trim(self, touched: dict[str, int]) -> None:
        """Every ``bus.trim_every`` bars added to a stream, trim it (never past what a group needs);
        a trim that fails is logged and tried again with the stream's next bars."""
        for key, count in touched.items():
            since = self._since_trim.get(key, 0) + count
            if since >= self.bus.trim_every:
                try:
                    with redis_errors(f"trimming {key}"):
                        trim(self.client, key, self.bus.maxlen)
                    since = 0
                except RedisUnavailable as exc:
                    log.warning("ingester.trim_failed", stream=key, error=str(exc))
            self._since_trim[key] = since

    def _arrived(self, bar: Bar, now: float) -> None:
        watch = self._watches.get(bar.symbol)
        if watch is None:
            self._watches[bar.symbol] = _Watch(now, bar.time)
            return
        watch.last_arrival = now
        watch.last_bar = bar.time
        if watch.stale:
            watch.stale = False
            log.info("ingester.symbol_fresh", symbol=bar.symbol, bar_time=bar.time.isoformat())
            self._alert(AlertSeverity.INFO, "data_resumed", bar.symbol, f"bars for {bar.symbol} resumed",
                        watch)

    def check_stale(self) -> list[str]:
        """Mark (log + alert) every symbol with no bar for ``stale_after_s``; return those newly stale."""
        now = self.clock.monotonic()
        newly: list[str] = []
        for symbol, watch in self._watches.items():
            age = now - watch.last_arrival
            if watch.stale or age < self.settings.stale_after_s:
                continue
            watch.stale = True
            newly.append(symbol)
            log.warning("ingester.symbol_stale", symbol=symbol, seconds_without_bar=round(age, 3),
                        stale_after_s=self.settings.stale_after_s,
                        last_bar=watch.last_bar.isoformat() if watch.last_bar else None)
            self._alert(AlertSeverity.WARNING, "stale_data", symbol,
                        f"no bar for {symbol} in {age:.0f}s (stale after {self.settings.stale_after_s:g}s)",
                        watch)
        return newly

    @property
    def stale_symbols(self) -> list[str]:
        """Symbols currently marked stale."""
        return sorted(symbol for symbol, watch in self._watches.items() if watch.stale)

    def _alert(self, severity: AlertSeverity, kind: str, symbol: str, text: str, watch: _Watch) -> None:
        details = {"symbol": symbol, "stale_after_s": f"{self.settings.stale_after_s:g}",
                   "last_bar": watch.last_bar.isoformat() if watch.last_bar else ""}
        alert = Alert(time=self.clock.now(), severity=severity, source="ingester", kind=kind, text=text,
                      details=details)
        try:
            with redis_errors("publishing an alert"):
                publish(self.client, self.keys, ALERTS, alert)
        except RedisUnavailable as exc:
            log.warning("ingester.alert_failed", kind=kind, symbol=symbol, error=str(exc))  # logged above

    def run(self, source: BarSource, stop: Stoppable, max_bars: int = 0) -> Counts:
        """Feed ``source`` through the gate until it ends, ``stop`` is set, or ``max_bars`` were read.

        From an eager source (an unpaced replay) a batch is sent before the verdicts of the one
        before it are read: Redis runs one batch while the next is encoded. From any other
        source each batch's verdicts are read before waiting for the next, so a bar is counted
        and watched as soon as it is published.
        """
        ahead = 1 if source.eager else 0  # batches sent whose verdicts may wait
        in_flight: deque[tuple[list[Bar], list[int]]] = deque()
        sent = 0
        try:
            with self.gate.lane(self._bars_key, self._partition_keys) as lane:
                for batch in source.batches(stop):
                    if max_bars:
                        batch = batch[:max_bars - sent]
                    if batch:
                        partitions = self._partitions_of(batch)
                        lane.queue(batch, partitions, arrived=self.clock.now())
                        in_flight.append((batch, partitions))
                        sent += len(batch)
                        self._until_up(stop, lane.flush)
                    while len(in_flight) > ahead:
                        self._settle(*in_flight.popleft(), self._until_up(stop, lane.receive))
                    now = self.clock.monotonic()
                    if now >= self._next_stale_check:
                        self._next_stale_check = now + min(1.0, self.settings.stale_after_s / 4)
                        self.check_stale()
                    if (max_bars and sent >= max_bars) or stop.is_set():
                        break
                while in_flight:
                    self._settle(*in_flight.popleft(), self._until_up(stop, lane.receive))
        finally:
            source.close()
        return self.counts

    def _until_up(self, stop: Stoppable, do: Callable[[], T]) -> T:
        """``do()``, tried again while Redis is unavailable (:class:`~shared.redis.boundary.WaitOut`);
        the RedisUnavailable is raised once ``stop`` is set."""
        outage = WaitOut()
        while True:
            try:
                return do()
            except RedisUnavailable as exc:
                if stop.is_set():
                    raise
                outage.wait(stop, log, "ingester.redis_unavailable", exc)


def make_source(settings: Settings, client: redis.Redis, keys: Keys, clock: Clock) -> BarSource:
    """The source the settings name (synthetic, csv or alpaca)."""
    ingest = settings.ingester
    if ingest.source == "csv":
        if ingest.csv_path is None:
            raise SystemExit("bastion: ingester.source is 'csv' but ingester.csv_path is not set")
        default = ingest.symbols[0] if len(ingest.symbols) == 1 else None
        return CsvSource(ingest.csv_path, clock, speed=ingest.speed, paced=ingest.paced, batch=ingest.batch,
                         default_symbol=default)
    if ingest.source == "alpaca":
        broker = settings.broker
        if broker.kind != "alpaca" or broker.api_key is None or broker.secret_key is None:
            raise SystemExit("bastion: ingester.source is 'alpaca' but broker.kind is not 'alpaca' "
                             "with api_key and secret_key set")
        return AlpacaSource.from_keys(broker.api_key.get_secret_value(), broker.secret_key.get_secret_value(),
                                      ingest.alpaca_feed, ingest.symbols, batch=ingest.batch)
    return SyntheticSource(ingest.symbols, ingest.seed, synthetic_start(client, keys, clock, ingest.symbols),
                           clock, speed=ingest.speed, paced=ingest.paced, batch=ingest.batch)


def synthetic_start(client: redis.Redis, keys: Keys, clock: Clock, symbols: Sequence[str]) -> datetime:
    """Where a synthetic market starts: this minute, or after the newest bar already accepted.

    Simulated time runs ``speed`` times faster than the wall, so a restarted synthetic ingester
    continues after its last bar instead of having every bar refused as out of order.
    """
    start = clock.now().replace(second=0, microsecond=0)
    newest = BarGate(client, keys).newest()
    for symbol in symbols:
        if symbol in newest:
            start = max(start, newest[symbol].replace(second=0, microsecond=0) + timedelta(minutes=1))
    return start


def main(ctx: ServiceContext, max_bars: int | None = None) -> None:
    """The ingester service: ``max_bars`` (``--bars``) overrides ``ingester.max_bars``."""
    ingest = ctx.settings.ingester
    limit = ingest.max_bars if max_bars is None else max_bars
    source = make_source(ctx.settings, ctx.redis, ctx.keys, ctx.clock)
    watch = [] if ingest.source == "csv" else list(ingest.symbols)
    ingester = Ingester(ctx.redis, ctx.keys, ingest, ctx.settings.bus, ctx.clock, watch=watch)
    ctx.log.info("ingester.started", source=ingest.source, symbols=ingest.symbols if watch else None,
                 partitions=ingest.partitions, paced=ingest.paced, max_bars=limit or None)
    counts = ingester.run(source, ctx.stop, limit)
    ctx.log.info("ingester.finished", read=counts.read, accepted=counts.accepted,
                 duplicates=counts.duplicates, out_of_order=counts.out_of_order)
