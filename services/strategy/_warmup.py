"""Warm-up: recent history run through a fresh strategy so it can act on its first live bar.

When a pass meets a symbol whose state has no bar applied yet (a new desk, a new strategy or
symbol, a deleted state; whichever worker holds the partition), the worker asks the
``strategy.warmup`` source for at most ``strategy.warmup_bars`` bars of that symbol strictly
older than its first live bar (:class:`Need`), runs them through ``on_bar`` of a separate
instance with ``warming_up`` set, discards every intent and everything but the state, and
starts the live instance from that state (:func:`warm`). The state is committed with the pass's
live bars, by the normal commit, so a warm-up is applied once; a pass whose commit is refused
starts again from nothing and warms up again.

Sources: ``stream``, the symbol's newest bars on its partition stream before the first live
entry (what the ingester already published: no network, nothing to configure); ``csv``, a file
of Alpaca's bar columns read by the ingester's own CSV reader; ``alpaca``, alpaca-py's
``StockHistoricalDataClient`` (minute bars of the ingester's feed, the newest of the week before).

Left to the caller: a source that fails (a missing file, Alpaca down) is logged and the symbol
starts cold, as without warm-up. Fetching can be slow, so the history is kept until a pass
commits: a fetch that outlasts ``budget_s`` is reported (:meth:`WarmUp.history` returns None) for
the worker to renew its leases and run the pass again, from the history kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import redis

from services.ingester import CsvSource, bar_from_alpaca
from services.strategy._api import Binding
from services.strategy._view import AccountView
from shared.bus import codec
from shared.clock import Clock
from shared.config import Settings
from shared.errors import CodecError
from shared.logging import get_logger
from shared.models import Bar
from shared.redis.client import reply_text

__all__ = ["AlpacaHistory", "CsvHistory", "History", "Need", "StreamHistory", "WarmUp", "problems", "warm",
           "warm_up"]

log = get_logger(component="strategy")
STREAM_CHUNK = 500  # partition entries read back per round trip
ALPACA_LOOKBACK = timedelta(days=7)  # covers a weekend and a holiday


@dataclass(frozen=True)
class Need:
    """A fresh symbol's first live bar: its history must be strictly older."""

    symbol: str
    stream: str  # the partition stream the bar came from
    entry_id: str  # its entry there
    before: datetime  # its time


class History(Protocol):
    """Where warm-up bars come from: ``bars`` gives at most ``count`` of them, oldest first, each
    strictly older than ``need.before``; ``errors`` are what its far side may raise."""

    name: str
    errors: tuple[type[Exception], ...]

    def bars(self, need: Need, count: int) -> list[Bar]: ...


class StreamHistory:
    """The newest bars of the symbol on its partition stream, read back from its first live entry."""

    name = "stream"
    errors: tuple[type[Exception], ...] = ()  # Redis errors are the worker's to wait out

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def bars(self, need: Need, count: int) -> list[Bar]:
        found: list[Bar] = []  # newest first
        end = f"({need.entry_id}"
        while len(found) < count:
            chunk: Any = self.client.xrevrange(need.stream, max=end, min="-", count=STREAM_CHUNK)
            for _, fields in chunk:
                try:
                    message = codec.decode(fields)
                except CodecError:
                    continue  # the live pass dead-letters what it reads; history just skips it
                if (isinstance(message, Bar) and message.symbol == need.symbol and message.time < need.before
                        and (not found or message.time < found[-1].time)):  # a duplicated XADD: once
                    found.append(message)
                    if len(found) == count:
                        break
            if len(chunk) < STREAM_CHUNK:
                break
            end = "(" + reply_text(chunk[-1][0])
        return found[::-1]


class CsvHistory:
    """The symbol's newest rows of a CSV in the ingester's format, read with the ingester's reader
    (rows in time order, as the ingester replays them: a row not newer than the last is skipped)."""

    name = "csv"
    errors: tuple[type[Exception], ...] = (OSError, ValueError)

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock

    def bars(self, need: Need, count: int) -> list[Bar]:
        kept: deque[Bar] = deque(maxlen=count)
        for bar in CsvSource(self.path, self.clock, paced=False).rows():
            newer = not kept or bar.time > kept[-1].time
            if bar.symbol == need.symbol and bar.time < need.before and newer:
                kept.append(bar)
        return list(kept)


class AlpacaHistory:
    """The symbol's newest minute bars of the week before, from Alpaca's market data API."""

    name = "alpaca"

    def __init__(self, client: Any, feed: str, errors: tuple[type[Exception], ...]) -> None:
        self.client = client  # a StockHistoricalDataClient
        self.feed = feed
        self.errors = errors

    @classmethod
    def from_keys(cls, api_key: str, secret_key: str, feed: str, timeout_s: float) -> AlpacaHistory:
        """A source on Alpaca's real data API; every request times out after ``timeout_s``."""
        from alpaca.common.exceptions import APIError
        from alpaca.data.historical import StockHistoricalDataClient

        class _Timed(StockHistoricalDataClient):  # alpaca-py sets no request timeout
            def _one_request(self, method: str, url: str, opts: dict[str, Any], retry: int) -> Any:
                return super()._one_request(method, url, {**opts, "timeout": timeout_s}, retry)

        return cls(_Timed(api_key, secret_key), feed, (APIError, OSError, ValueError))

    def bars(self, need: Need, count: int) -> list[Bar]:
        from alpaca.common.enums import Sort
        from alpaca.data.enums import DataFeed
        from alpaca.data.requests import StockBarsRequest
        from alpaca.data.timeframe import TimeFrame

        request = StockBarsRequest(symbol_or_symbols=need.symbol, timeframe=TimeFrame.Minute,
                                   start=need.before - ALPACA_LOOKBACK,
                                   end=need.before - timedelta(microseconds=1), limit=count, sort=Sort.DESC,
                                   feed=DataFeed(self.feed))
        raw = self.client.get_stock_bars(request).data.get(need.symbol, [])
        bars = sorted((bar_from_alpaca(b) for b in raw), key=lambda b: b.time)
        return [b for b in bars if b.time < need.before][-count:]


class WarmUp:
    """One worker's warm-up source, with the history it fetched kept until a pass commits."""

    def __init__(self, source: History, count: int, clock: Clock, budget_s: float) -> None:
        self.source = source
        self.count = count
        self.clock = clock
        self.budget_s = budget_s
        self._kept: dict[Need, list[Bar]] = {}

    def history(self, needs: Iterable[Need]) -> dict[str, list[Bar]] | None:
        """Each need's bars by symbol (none for a source that failed: logged); None if fetching
        what was not kept took longer than ``budget_s`` (it is kept: ask again)."""
        started = self.clock.monotonic()
        wanted = list(needs)
        for need in wanted:
            if need not in self._kept:
                self._kept[need] = self._fetch(need)
        if self.clock.monotonic() - started > self.budget_s:
            log.info("strategy.warmup_deferred", symbols=[n.symbol for n in wanted],
                     took_s=round(self.clock.monotonic() - started, 3))
            return None
        return {need.symbol: self._kept[need] for need in wanted}

    def forget(self) -> None:
        """A pass committed: what it warmed up is stored; drop the history kept."""
        self._kept.clear()

    def _fetch(self, need: Need) -> list[Bar]:
        try:
            return self.source.bars(need, self.count)
        except self.source.errors as exc:
            log.warning("strategy.warmup_failed", symbol=need.symbol, source=self.source.name,
                        error=repr(exc))
            return []


def warm(binding: Binding, symbol: str, bars: Sequence[Bar], account: AccountView,
         now: datetime) -> dict[str, Any] | None:
    """The state a fresh strategy is left in by ``bars`` (intents discarded), as stored JSON;
    None if it raised (logged: the symbol starts cold)."""
    strategy = binding.build(symbol, None, now, account)
    strategy.warming_up = True
    try:
        for bar in bars:
            strategy.on_bar(bar)
    except Exception:
        log.exception("strategy.warmup_failed", symbol=symbol, strategy=binding.cls.name)
        return None
    log.info("strategy.warmed_up", symbol=symbol, strategy=binding.cls.name, bars=len(bars),
             first=bars[0].time.isoformat(), last=bars[-1].time.isoformat())
    state: dict[str, Any] = strategy.state.model_dump(mode="json")
    return state


def warm_up(settings: Settings, client: redis.Redis, clock: Clock) -> WarmUp | None:
    """The warm-up ``strategy.warmup`` names (None for ``none``); its fetches may take a third of
    a lease."""
    config, broker = settings.strategy, settings.broker
    source: History
    if config.warmup == "none":
        return None
    if config.warmup == "stream":
        source = StreamHistory(client)
    elif config.warmup == "csv" and config.warmup_csv_path is not None:
        source = CsvHistory(config.warmup_csv_path, clock)
    elif config.warmup == "alpaca" and broker.api_key is not None and broker.secret_key is not None:
        source = AlpacaHistory.from_keys(broker.api_key.get_secret_value(),
                                         broker.secret_key.get_secret_value(), settings.ingester.alpaca_feed,
                                         broker.timeout_s)
    else:
        raise ValueError("; ".join(problems(settings)))
    return WarmUp(source, config.warmup_bars, clock, config.lease_ms / 3000)


def problems(settings: Settings) -> list[str]:
    """What stops ``strategy.warmup`` from working, as text (checked at start-up)."""
    config, broker = settings.strategy, settings.broker
    path = config.warmup_csv_path
    if config.warmup == "csv" and (path is None or not path.is_file()):
        return [f"strategy.warmup is 'csv' but strategy.warmup_csv_path is not a file: {path}"]
    if config.warmup == "alpaca" and (broker.api_key is None or broker.secret_key is None):
        return ["strategy.warmup is 'alpaca' but broker.api_key and broker.secret_key are not both set"]
    return []
