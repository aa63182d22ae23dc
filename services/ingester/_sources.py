"""Where bars come from: a seeded synthetic market, a CSV replay, or Alpaca's live stream.

Every source yields *batches* of :class:`~shared.models.Bar` (a list, possibly empty when
nothing arrived, so the ingester can run its staleness check) until it is exhausted or the stop
flag is set. Prices are ``Decimal``; the synthetic market works in integers (hundredths of a
cent, rounded to cents in each bar).
"""

from __future__ import annotations

import csv
import hashlib
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from shared.clock import Clock
from shared.logging import get_logger
from shared.models import Bar
from shared.stop import Stoppable

__all__ = [
    "AlpacaSource",
    "BarSource",
    "CsvSource",
    "Stoppable",
    "SyntheticSource",
    "bar_from_alpaca",
    "bar_id",
]

log = get_logger(component="ingester")
SESSION_MINUTES = 390  # 09:30-16:00 New York
CENT = Decimal("0.01")
_UNITS_PER_CENT = 100  # the synthetic walk's price unit: a hundredth of a cent


def bar_id(symbol: str, when: datetime) -> str:
    """A bar's message id, derived from what identifies it: the same bar always has the same id."""
    return _bar_id(symbol, when.isoformat())


def _bar_id(symbol: str, iso_time: str) -> str:
    return hashlib.blake2b(f"bar:{symbol}:{iso_time}".encode(), digest_size=16).hexdigest()


class BarSource(Protocol):
    """Yields batches of bars until exhausted or stopped; ``close`` frees what it holds."""

    @property
    def eager(self) -> bool:
        """True when :meth:`batches` never waits (an unpaced replay): the ingester then sends a
        batch before reading the verdicts of the one before it."""
        ...

    def batches(self, stop: Stoppable) -> Iterator[list[Bar]]: ...

    def close(self) -> None: ...


class _Pacer:
    """Spaces ticks ``1/speed`` seconds apart on the clock's monotonic time (no drift)."""

    def __init__(self, clock: Clock, speed: float) -> None:
        self.clock = clock
        self.interval = 1.0 / speed
        self.start = clock.monotonic()
        self.ticks = 0

    def wait(self, stop: Stoppable) -> None:
        due = self.start + self.ticks * self.interval
        self.ticks += 1
        delay = due - self.clock.monotonic()
        if delay > 0:
            stop.wait(delay)


# -- synthetic ----------------------------------------------------------------------------------


@dataclass
class _Walk:
    """One symbol's random walk, in hundredths of a cent (so a move of a few basis points is never
    rounded away at a low price)."""

    rng: random.Random
    price: int
    base_volume: int


@dataclass
class SyntheticSource:
    """A seeded random walk per symbol with a U-shaped intraday volume profile.

    Each tick is one minute of simulated market time and carries one bar per symbol; ``paced``
    emits ``speed`` ticks per second, otherwise ticks are grouped into batches of about
    ``batch`` bars and emitted as fast as they are taken. The same seed, symbols and start give
    the same bars, whatever the order of ``symbols`` (each symbol has its own generator).
    """

    symbols: Sequence[str]
    seed: int
    start: datetime
    clock: Clock
    speed: float = 60.0
    paced: bool = True
    batch: int = 256
    _walks: dict[str, _Walk] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for symbol in self.symbols:
            rng = random.Random(f"{self.seed}:{symbol}")
            self._walks[symbol] = _Walk(rng, rng.randint(2_000, 50_000) * _UNITS_PER_CENT,
                                        rng.randint(20_000, 200_000))

    @property
    def eager(self) -> bool:
        """Unpaced, a batch is ready as soon as it is taken."""
        return not self.paced

    def bars(self) -> Iterator[Bar]:
        """Every bar of the walk, tick by tick, forever."""
        minute = 0
        while True:
            yield from self.tick(minute)
            minute += 1

    def tick(self, minute: int) -> list[Bar]:
        """The bars of tick ``minute`` (call in increasing order of ``minute``)."""
        when = self.start + timedelta(minutes=minute)
        x = ((minute % SESSION_MINUTES) - (SESSION_MINUTES - 1) / 2) / ((SESSION_MINUTES - 1) / 2)
        u_shape = 0.5 + 1.5 * x * x  # 2.0 at the open and the close, 0.5 at midday
        iso_time, sigma_bps = when.isoformat(), 6.0 * math.sqrt(u_shape)  # the same for every symbol
        return [self._bar(symbol, when, iso_time, u_shape, sigma_bps) for symbol in self.symbols]

    def _bar(self, symbol: str, when: datetime, iso_time: str, u_shape: float, sigma_bps: float) -> Bar:
        walk = self._walks[symbol]
        rng = walk.rng
        open_ = walk.price
        step_bps = round(rng.gauss(0.0, sigma_bps))
        close = max(_UNITS_PER_CENT, open_ + _nearest(open_ * step_bps, 10_000))
        wick = max(1, open_ // 2_000)
        high = max(open_, close) + rng.randint(0, wick)
        low = max(_UNITS_PER_CENT, min(open_, close) - rng.randint(0, wick))
        volume = max(1, int(walk.base_volume * u_shape * rng.uniform(0.7, 1.3)) // 100 * 100)
        trades = max(1, volume // rng.randint(80, 200))
        walk.price = close
        return Bar(id=_bar_id(symbol, iso_time), time=when, symbol=symbol, open=_cents(open_),
                   high=_cents(high), low=_cents(low), close=_cents(close), volume=Decimal(volume),
                   vwap=_cents((high + low + close) // 3), trade_count=trades)

    def batches(self, stop: Stoppable) -> Iterator[list[Bar]]:
        minute = 0
        if self.paced:
            pacer = _Pacer(self.clock, self.speed)
            while not stop.is_set():
                pacer.wait(stop)
                if stop.is_set():
                    return
                yield self.tick(minute)
                minute += 1
            return
        per_batch = max(1, self.batch // max(1, len(self.symbols)))
        while not stop.is_set():
            out: list[Bar] = []
            for _ in range(per_batch):
                out.extend(self.tick(minute))
                minute += 1
            yield out

    def close(self) -> None:
        return None


def _nearest(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to the nearest integer, halves away from zero: the same
    size up as down (floor division rounds every fall down a unit and every rise down too, and a
    walk built on it drifts to its floor: every symbol at $0.01 within 30 minutes of ``make run``)."""
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return quotient if numerator >= 0 else -quotient


def _cents(units: int) -> Decimal:
    """A walk price (hundredths of a cent) as dollars in whole cents."""
    return Decimal(_nearest(units, _UNITS_PER_CENT)).scaleb(-2)


# -- CSV replay ---------------------------------------------------------------------------------

CSV_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume", "trade_count", "vwap")


@dataclass
class CsvSource:
    """Replays a CSV of the user's own bars: Alpaca's bar columns plus ``symbol``.

    Columns: ``symbol,timestamp,open,high,low,close,volume,trade_count,vwap`` (any order, as
    alpaca-py's ``BarSet.df.to_csv()`` writes them; ``trade_count`` and ``vwap`` may be empty).
    Timestamps are ISO-8601 with a UTC offset. Rows sharing a timestamp form one tick; ``paced``
    emits ``speed`` ticks per second, otherwise batches of ``batch`` rows as fast as they are
    taken. A row that cannot be a bar is logged (``ingester.csv_bad_row``, with its line) and
    skipped. ``default_symbol`` fills a missing symbol column.
    """

    path: Path
    clock: Clock
    speed: float = 60.0
    paced: bool = True
    batch: int = 256
    default_symbol: str | None = None
    bad_rows: int = 0

    @property
    def eager(self) -> bool:
        """Unpaced, a batch is ready as soon as it is read."""
        return not self.paced

    def rows(self) -> Iterator[Bar]:
        """Every valid bar of the file, in file order."""
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("timestamp", "open", "high", "low", "close", "volume")
                       if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{self.path}: missing column(s) {', '.join(missing)}")
            for row in reader:
                try:
                    yield self._bar(row)
                except (ValueError, InvalidOperation, ValidationError) as exc:
                    self.bad_rows += 1
                    log.warning("ingester.csv_bad_row", path=str(self.path), line=reader.line_num,
                                error=str(exc).splitlines()[0])

    def _bar(self, row: dict[str, str]) -> Bar:
        symbol = (row.get("symbol") or self.default_symbol or "").strip()
        if not symbol:
            raise ValueError("no symbol")
        when = datetime.fromisoformat(row["timestamp"].strip())
        trades = (row.get("trade_count") or "").strip()
        vwap = (row.get("vwap") or "").strip()
        return Bar(id=bar_id(symbol, when), time=when, symbol=symbol, open=Decimal(row["open"]),
                   high=Decimal(row["high"]), low=Decimal(row["low"]), close=Decimal(row["close"]),
                   volume=Decimal(row["volume"]),
                   trade_count=int(Decimal(trades)) if trades else None,
                   vwap=Decimal(vwap) if vwap else None)

    def batches(self, stop: Stoppable) -> Iterator[list[Bar]]:
        if not self.paced:
            out: list[Bar] = []
            for bar in self.rows():
                out.append(bar)
                if len(out) >= self.batch:
                    yield out
                    out = []
                    if stop.is_set():
                        return
            if out:
                yield out
            return
        pacer = _Pacer(self.clock, self.speed)
        tick: list[Bar] = []
        for bar in self.rows():
            if tick and bar.time != tick[0].time:
                pacer.wait(stop)
                if stop.is_set():
                    return
                yield tick
                tick = []
            tick.append(bar)
        if tick and not stop.is_set():
            pacer.wait(stop)
            yield tick

    def close(self) -> None:
        return None


# -- Alpaca live data ---------------------------------------------------------------------------


def bar_from_alpaca(raw: Any) -> Bar:
    """Our Bar from an alpaca-py ``Bar`` (floats on its side: converted through their repr)."""

    def dec(value: Any) -> Decimal:
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))

    trades = getattr(raw, "trade_count", None)
    vwap = getattr(raw, "vwap", None)
    return Bar(id=bar_id(raw.symbol, raw.timestamp), time=raw.timestamp, symbol=raw.symbol,
               open=dec(raw.open), high=dec(raw.high), low=dec(raw.low), close=dec(raw.close),
               volume=dec(raw.volume),
               trade_count=int(trades) if trades is not None else None,
               vwap=dec(vwap) if vwap is not None else None)


StreamFactory = Callable[[], Any]


class AlpacaSource:
    """Alpaca's live minute bars through alpaca-py's ``StockDataStream``.

    Concurrency: the stream runs its own asyncio loop in a daemon thread (``stream.run()``);
    its handler converts each bar and puts it on a queue that :meth:`batches` drains, yielding
    an empty batch every ``poll_s`` when nothing came. alpaca-py reconnects by itself; if its
    ``run()`` returns or raises, the source ends and the service exits for its supervisor to
    restart it. ``stream_factory`` builds the stream (a fake in tests).
    """

    eager = False  # a batch comes when the market sends it

    def __init__(self, symbols: Sequence[str], stream_factory: StreamFactory, *, batch: int = 256,
                 poll_s: float = 0.5) -> None:
        self.symbols = list(symbols)
        self.factory = stream_factory
        self.batch = batch
        self.poll_s = poll_s
        self.bad_bars = 0
        self._queue: queue.Queue[Bar] = queue.Queue()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._ended = threading.Event()

    @classmethod
    def from_keys(cls, api_key: str, secret_key: str, feed: str, symbols: Sequence[str],
                  batch: int = 256) -> AlpacaSource:
        """A source on Alpaca's real data stream."""
        from alpaca.data.enums import DataFeed
        from alpaca.data.live import StockDataStream

        return cls(symbols, lambda: StockDataStream(api_key, secret_key, feed=DataFeed(feed)), batch=batch)

    async def _on_bar(self, raw: Any) -> None:
        try:
            self._queue.put(bar_from_alpaca(raw))
        except (ValueError, InvalidOperation, ValidationError, AttributeError) as exc:
            self.bad_bars += 1
            log.warning("ingester.alpaca_bad_bar", symbol=getattr(raw, "symbol", None),
                        error=str(exc).splitlines()[0])

    def _run(self) -> None:
        try:
            self._stream.run()
        except Exception:
            log.exception("ingester.alpaca_stream_failed")
        finally:
            self._ended.set()

    def batches(self, stop: Stoppable) -> Iterator[list[Bar]]:
        self._stream = self.factory()
        self._stream.subscribe_bars(self._on_bar, *self.symbols)
        self._thread = threading.Thread(target=self._run, name="alpaca-data", daemon=True)
        self._thread.start()
        log.info("ingester.alpaca_subscribed", symbols=self.symbols)
        while not stop.is_set():
            out: list[Bar] = []
            try:
                out.append(self._queue.get(timeout=self.poll_s))
                while len(out) < self.batch:
                    out.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if out or not self._ended.is_set():
                yield out
                continue
            log.error("ingester.alpaca_stream_ended")
            return

    def close(self) -> None:
        if self._stream is not None and not self._ended.is_set():
            try:
                self._stream.stop()
            except Exception as exc:  # a stream that never connected has no loop to stop
                log.warning("ingester.alpaca_stop_failed", error=str(exc))
        if self._thread is not None:
            self._thread.join(5)
