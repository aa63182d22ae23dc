"""Warm-up: a fresh strategy state fed recent history, never trading on it, committed once."""

from __future__ import annotations

import json
import threading
from datetime import UTC, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import requests
from alpaca.common.enums import Sort
from alpaca.common.exceptions import APIError
from alpaca.data.historical import StockHistoricalDataClient
from alpaca.data.models import BarSet
from pydantic import BaseModel
from structlog.testing import capture_logs

from services.ingester import partition_of
from services.strategy import Catalog, StoredState, Strategy, StrategyWorker, register
from services.strategy._warmup import AlpacaHistory, Need, WarmUp, problems
from shared.bus import codec
from shared.clock import SimulatedClock
from shared.config import BrokerSettings, IngesterSettings, Settings, StrategySettings
from shared.keys import INTENTS, Keys
from shared.models import Bar, Intent, Side
from tests.services.strategy.test_strategy import PARTITIONS, bar, intents, publish, worker
from tests.support.factories import T0


class NoParams(BaseModel):
    pass


class WarmState(BaseModel):
    seen: list[int] = []  # trade_count of every bar applied
    warm: list[int] = []  # ... of those applied while warming up


@register
class WarmSpy(Strategy[NoParams, WarmState]):
    """Remembers every bar (by trade_count) and emits a buy on each."""

    name = "warm_spy"
    params_model = NoParams
    state_model = WarmState

    def on_bar(self, bar: Bar) -> list[Intent]:
        seq = bar.trade_count or 0
        self.state.seen = [*self.state.seen, seq]
        if self.warming_up:
            self.state.warm = [*self.state.warm, seq]
        return [self.intent(bar, Side.BUY, Decimal(1), f"seq {seq}")]


@register
class WarmThief(WarmSpy):
    """A WarmSpy that, once armed, gives its partition's lease away on its next live bar."""

    name = "warm_thief"
    armed: ClassVar[tuple[Any, str] | None] = None  # (client, lease key)

    def on_bar(self, bar: Bar) -> list[Intent]:
        armed = type(self).armed
        if armed is not None and not self.warming_up:
            type(self).armed = None
            client, key = armed
            client.set(key, "someone-else")
        return super().on_bar(bar)


@register
class WarmBoom(WarmSpy):
    """A WarmSpy that raises on any history bar."""

    name = "warm_boom"

    def on_bar(self, bar: Bar) -> list[Intent]:
        if self.warming_up:
            raise RuntimeError("no history, thanks")
        return super().on_bar(bar)


def config(plugin: str, **strategy: Any) -> Settings:
    """``plugin`` on AAPL only (other symbols run nothing), over PARTITIONS partitions."""
    return Settings(ingester=IngesterSettings(partitions=PARTITIONS),
                    strategy=StrategySettings(plugins={"AAPL": plugin}, **strategy))


def nothing() -> Settings:
    """No strategy on any symbol: a worker with these delivers bars and applies none."""
    return Settings(ingester=IngesterSettings(partitions=PARTITIONS), strategy=StrategySettings(plugins={}))


def state(client: redis.Redis, keys: Keys, name: str = "warm_spy") -> dict[str, Any] | None:
    return StoredState.parse(client.get(keys.strategy_state(name, "AAPL"))).state


def aapl(minutes: range) -> list[Bar]:
    return [bar("AAPL", m, "100") for m in minutes]


class TestStreamWarmUp:
    def test_a_fresh_state_is_warmed_on_older_bars_of_the_stream_and_never_trades(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """A strategy new to a symbol starts from its newest bars strictly older than its first
        live bar (a later or equal copy XADDed before it is not history), their intents discarded;
        its state is stored with the live bars, and a later pass warms up nothing."""
        publish(redis_client, keys, aapl(range(10)))
        stream = keys.stream(keys.bar_partition(partition_of("AAPL", PARTITIONS)))
        for copy in aapl(range(10, 12)):
            redis_client.xadd(stream, codec.encode(copy))  # type: ignore[arg-type]
        worker(redis_client, keys, nothing()).run(threading.Event(), burst=True)
        publish(redis_client, keys, aapl(range(10, 13)))
        spy = config("warm_spy", warmup_bars=4)
        stats = worker(redis_client, keys, spy).run(threading.Event(), burst=True)
        assert stats.warmed == 4
        assert state(redis_client, keys) == {"seen": [6, 7, 8, 9, 10, 11, 12], "warm": [6, 7, 8, 9]}
        assert [i.reason for i in intents(redis_client, keys)] == ["seq 10", "seq 11", "seq 12"]
        publish(redis_client, keys, aapl(range(13, 14)))
        again = worker(redis_client, keys, spy).run(threading.Event(), burst=True)
        assert again.warmed == 0
        assert state(redis_client, keys) == {"seen": [6, 7, 8, 9, 10, 11, 12, 13], "warm": [6, 7, 8, 9]}

    def test_a_warm_up_whose_commit_is_refused_is_applied_once(self, redis_client: redis.Redis,
                                                               keys: Keys) -> None:
        """A pass that warmed up and lost its lease writes nothing; the pass that commits warms up
        from nothing again, so the history is in the state once."""
        publish(redis_client, keys, aapl(range(6)))
        worker(redis_client, keys, nothing()).run(threading.Event(), burst=True)
        publish(redis_client, keys, aapl(range(6, 8)))
        victim = worker(redis_client, keys, config("warm_thief", warmup_bars=3))
        victim.upkeep()
        lease_key = victim.leases.key(partition_of("AAPL", PARTITIONS))
        WarmThief.armed = (redis_client, lease_key)
        assert victim.step() == 2
        assert victim.stats.refused_commits == 1 and state(redis_client, keys, "warm_thief") is None
        assert redis_client.xlen(keys.stream(INTENTS)) == 0
        redis_client.delete(lease_key)
        victim.upkeep()
        victim.run(threading.Event(), burst=True)
        assert state(redis_client, keys, "warm_thief") == {"seen": [3, 4, 5, 6, 7], "warm": [3, 4, 5]}
        assert [i.reason for i in intents(redis_client, keys)] == ["seq 6", "seq 7"]

    def test_a_strategy_failing_on_history_starts_cold(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A strategy that raises on a history bar is logged and starts from a fresh state; its live
        bars are applied as without warm-up."""
        publish(redis_client, keys, aapl(range(3)))
        worker(redis_client, keys, nothing()).run(threading.Event(), burst=True)
        publish(redis_client, keys, aapl(range(3, 5)))
        with capture_logs() as logs:
            stats = worker(redis_client, keys, config("warm_boom")).run(threading.Event(), burst=True)
        assert (stats.warmed, stats.dead_lettered) == (0, 0)
        assert state(redis_client, keys, "warm_boom") == {"seen": [3, 4], "warm": []}
        assert [e["log_level"] for e in logs if e["event"] == "strategy.warmup_failed"] == ["error"]

    def test_no_warm_up_when_it_is_off(self, redis_client: redis.Redis, keys: Keys) -> None:
        """``warmup = "none"``: a fresh state starts from nothing whatever the stream holds."""
        publish(redis_client, keys, aapl(range(3)))
        worker(redis_client, keys, nothing()).run(threading.Event(), burst=True)
        publish(redis_client, keys, aapl(range(3, 4)))
        worker(redis_client, keys, config("warm_spy", warmup="none")).run(threading.Event(), burst=True)
        assert state(redis_client, keys) == {"seen": [3], "warm": []}


class SlowHistory:
    """A source that takes ``took`` seconds of the simulated clock per fetch, and counts them."""

    name = "slow"
    errors: tuple[type[Exception], ...] = ()

    def __init__(self, clock: SimulatedClock, took: float) -> None:
        self.clock = clock
        self.took = took
        self.calls = 0

    def bars(self, need: Need, count: int) -> list[Bar]:
        self.calls += 1
        self.clock.advance(timedelta(seconds=self.took))
        return [bar(need.symbol, -n, "100", trade_count=100 + n) for n in range(count, 0, -1)]


class TestDeferredWarmUp:
    def test_a_slow_fetch_defers_the_pass_until_the_leases_are_renewed(self, redis_client: redis.Redis,
                                                                        keys: Keys) -> None:
        """History that took longer than a third of the lease is kept and nothing is run or
        written; the leases are renewed first, then the pass runs on the history kept (fetched once)."""
        clock = SimulatedClock(T0)
        settings = config("warm_spy", lease_ms=30_000)  # upkeep every 10 s: not due after the fetch
        slow = SlowHistory(clock, took=1.5)
        victim = StrategyWorker(redis_client, keys, settings, clock, "w1", Catalog(settings.strategy))
        victim.warmup = WarmUp(slow, 2, clock, budget_s=1.0)
        victim.upkeep()
        publish(redis_client, keys, aapl(range(2)))
        with capture_logs() as logs:
            assert victim.step() == 2
        assert [e["event"] for e in logs if "warm" in e["event"]] == ["strategy.warmup_deferred"]
        assert state(redis_client, keys) is None and victim.stats.applied == 0
        renewed: list[int] = []
        real_upkeep = victim.upkeep

        def upkeep() -> None:
            renewed.append(1)
            real_upkeep()

        victim.upkeep = upkeep  # type: ignore[method-assign]
        victim.run(threading.Event(), burst=True)
        assert renewed == [1] and slow.calls == 1
        assert state(redis_client, keys) == {"seen": [102, 101, 0, 1], "warm": [102, 101]}


def write_csv(path: Path, rows: list[tuple[str, int, str]]) -> Path:
    """A CSV in the ingester's format: one row per (symbol, minute after T0, close)."""
    lines = ["symbol,timestamp,open,high,low,close,volume,trade_count,vwap"]
    for symbol, minute, close in rows:
        when = (T0 + timedelta(minutes=minute)).isoformat()
        lines.append(f"{symbol},{when},{close},{close},{close},{close},1000,{minute},")
    path.write_text("\n".join(lines) + "\n")
    return path


class TestCsvWarmUp:
    def test_the_newest_rows_of_the_symbol_strictly_before_the_first_live_bar(
            self, redis_client: redis.Redis, keys: Keys, tmp_path: Path) -> None:
        """From a CSV of several symbols: the symbol's newest rows older than its first live bar,
        a repeated row once; rows at or after the live bar are not history."""
        rows = [("AAPL", m, "100.5") for m in range(6)] + [("MSFT", m, "50") for m in range(6)]
        rows += [("AAPL", 5, "100.5"), ("AAPL", 10, "1"), ("AAPL", 11, "1")]
        path = write_csv(tmp_path / "history.csv", rows)
        publish(redis_client, keys, aapl(range(10, 12)))
        settings = config("warm_spy", warmup="csv", warmup_csv_path=path, warmup_bars=3)
        assert problems(settings) == []
        stats = worker(redis_client, keys, settings).run(threading.Event(), burst=True)
        assert stats.warmed == 3
        assert state(redis_client, keys) == {"seen": [3, 4, 5, 10, 11], "warm": [3, 4, 5]}


def raw_bar(minute: int, close: float) -> dict[str, Any]:
    """A bar as Alpaca's data API returns it (floats, ISO time)."""
    when = (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")
    return {"t": when, "o": close, "h": close, "l": close, "c": close, "v": 1500, "n": minute, "vw": close}


class TestAlpacaWarmUp:
    def test_the_newest_minute_bars_before_the_first_live_bar(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """One request (minute bars of the feed, the week before, newest first, at most N) for
        the symbol; converted to exact Decimals, oldest first, none at or after the live bar."""
        asked: list[Any] = []

        def get_stock_bars(client: Any, request: Any) -> BarSet:
            asked.append(request)
            return BarSet({"AAPL": [raw_bar(10, 1.0), raw_bar(9, 100.1), raw_bar(8, 99.95)]})

        monkeypatch.setattr(StockHistoricalDataClient, "get_stock_bars", get_stock_bars)
        source = AlpacaHistory.from_keys("key", "secret", "iex", timeout_s=3.0)
        before = T0 + timedelta(minutes=10)
        got = source.bars(Need("AAPL", "unused", "0-0", before), 3)
        assert [(b.trade_count, b.close) for b in got] == [(8, Decimal("99.95")), (9, Decimal("100.1"))]
        [request] = asked
        assert (request.symbol_or_symbols, request.limit, request.sort, request.feed.value) == (
            "AAPL", 3, Sort.DESC, "iex")
        assert str(request.timeframe) == "1Min"
        end, start = (t.replace(tzinfo=UTC) for t in (request.end, request.start))  # alpaca-py: naive UTC
        assert before - timedelta(seconds=1) < end < before and before - start == timedelta(days=7)

    def test_every_request_has_a_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """alpaca-py sets no request timeout; the warm-up's client sends ``broker.timeout_s``."""
        sent: list[dict[str, Any]] = []

        def request(session: Any, method: str, url: str, **options: Any) -> requests.Response:
            sent.append(options)
            reply = requests.Response()
            reply.status_code = 200
            body = {"bars": {"AAPL": [raw_bar(1, 100.0)]}, "next_page_token": None}
            reply._content = json.dumps(body).encode()
            return reply

        monkeypatch.setattr(requests.Session, "request", request)
        source = AlpacaHistory.from_keys("key", "secret", "iex", timeout_s=3.0)
        got = source.bars(Need("AAPL", "unused", "0-0", T0 + timedelta(minutes=2)), 5)
        assert [b.close for b in got] == [Decimal("100.0")]
        assert [options["timeout"] for options in sent] == [3.0]

    def test_a_worker_warms_up_from_alpaca_and_starts_cold_when_it_fails(
            self, redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        """With broker keys set, ``warmup = "alpaca"`` feeds Alpaca's bars; an API error is logged
        and the symbol starts cold."""
        def get_stock_bars(client: Any, request: Any) -> BarSet:
            if request.symbol_or_symbols == "MSFT":
                raise APIError("too many requests")  # type: ignore[no-untyped-call]
            return BarSet({"AAPL": [raw_bar(4, 100.0), raw_bar(3, 99.0)]})

        monkeypatch.setattr(StockHistoricalDataClient, "get_stock_bars", get_stock_bars)
        settings = Settings(ingester=IngesterSettings(partitions=PARTITIONS),
                            broker=BrokerSettings(api_key="key", secret_key="secret"),
                            strategy=StrategySettings(plugins={"*": "warm_spy"}, warmup="alpaca"))
        assert problems(settings) == []
        publish(redis_client, keys, [bar("AAPL", 5, "100"), bar("MSFT", 5, "50")])
        with capture_logs() as logs:
            worker(redis_client, keys, settings).run(threading.Event(), burst=True)
        assert state(redis_client, keys) == {"seen": [3, 4, 5], "warm": [3, 4]}
        assert StoredState.parse(redis_client.get(keys.strategy_state("warm_spy", "MSFT"))).state == {
            "seen": [5], "warm": []}
        assert [(e["source"], e["log_level"]) for e in logs if e["event"] == "strategy.warmup_failed"] == [
            ("alpaca", "warning")]


class TestSettings:
    def test_a_source_that_cannot_work_is_named_at_start_up(self, tmp_path: Path) -> None:
        """A CSV warm-up without a file, or an Alpaca one without keys, is a start-up problem; the
        default, ``stream``, needs nothing."""
        assert StrategySettings().warmup == "stream" and problems(Settings()) == []
        assert "warmup_csv_path" in problems(config("warm_spy", warmup="csv"))[0]
        missing = config("warm_spy", warmup="csv", warmup_csv_path=tmp_path / "nope.csv")
        assert "nope.csv" in problems(missing)[0]
        assert "api_key" in problems(config("warm_spy", warmup="alpaca"))[0]
