"""The ingester: sources, the per-symbol gate, publishing to bars and partitions, staleness."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from statistics import mean
from typing import Any

import fakeredis
import pytest
import redis
from alpaca.data.models import Bar as AlpacaBar
from structlog.testing import capture_logs

from services.ingester import (
    AlpacaSource,
    BarGate,
    CsvSource,
    Ingester,
    SyntheticSource,
    Verdict,
    bar_from_alpaca,
    bar_id,
    format_time,
    partition_of,
)
from services.ingester._sources import _nearest
from shared.bus import codec
from shared.clock import LiveClock, SimulatedClock
from shared.config import BusSettings, IngesterSettings, LimitSettings
from shared.errors import RedisCommandFailed
from shared.keys import ALERTS, BARS, Keys
from shared.models import Alert, Bar
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from shared.safety.limits import check_stale_data, read_bar_arrivals
from tests.conftest import delete_keys
from tests.support import factories
from tests.support.factories import T0
from tests.support.processes import free_port, wait_for

SYMBOLS = ["AAPL", "MSFT", "SPY"]


def stream_bars(client: redis.Redis, key: str) -> list[Bar]:
    """Every bar on a stream, decoded, in order."""
    out = []
    for _, fields in client.xrange(key):
        message = codec.decode(fields)
        assert isinstance(message, Bar)
        out.append(message)
    return out


def publish_through(gate: BarGate, keys: Keys, bars: list[Bar], partitions: int = 4,
                    arrived: datetime = T0) -> list[Verdict]:
    """``bars`` offered to ``gate`` as the ingester offers them: admitted and published in one
    script, arriving at ``arrived``."""
    partition_keys = [keys.stream(keys.bar_partition(n)) for n in range(partitions)]
    return gate.admit_and_publish(bars, keys.stream(BARS), partition_keys,
                                  [partition_of(bar.symbol, partitions) for bar in bars], arrived=arrived)


def take(source: SyntheticSource, count: int) -> list[Bar]:
    """The first ``count`` bars of a synthetic source."""
    return list(itertools.islice(source.bars(), count))


@pytest.fixture
def fake() -> Iterator[redis.Redis]:
    """An in-process fakeredis client."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7, 4)))
    yield client
    client.close()


class TestSyntheticSource:
    def test_same_seed_same_bars(self) -> None:
        """Two sources with the same seed, symbols and start produce identical bars, ids included."""
        first = SyntheticSource(SYMBOLS, 11, T0, LiveClock(), paced=False)
        second = SyntheticSource(list(reversed(SYMBOLS)), 11, T0, LiveClock(), paced=False)
        a, b = take(first, 300), take(second, 300)
        assert sorted(a, key=lambda x: (x.time, x.symbol)) == sorted(b, key=lambda x: (x.time, x.symbol))

    def test_other_seed_other_walk(self) -> None:
        """A different seed gives a different price path."""
        a = [b.close for b in take(SyntheticSource(["AAPL"], 1, T0, LiveClock()), 50)]
        b = [b.close for b in take(SyntheticSource(["AAPL"], 2, T0, LiveClock()), 50)]
        assert a != b

    def test_bars_are_cent_priced_one_minute_apart(self) -> None:
        """Prices are Decimals in whole cents, OHLC consistent, one bar per symbol per minute."""
        bars = take(SyntheticSource(SYMBOLS, 3, T0, LiveClock()), 3 * 100)
        for bar in bars:
            for price in (bar.open, bar.high, bar.low, bar.close, bar.vwap):
                assert isinstance(price, Decimal) and price == price.quantize(Decimal("0.01"))
            assert bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high
        aapl = [bar.time for bar in bars if bar.symbol == "AAPL"]
        assert aapl == [T0 + timedelta(minutes=i) for i in range(100)]

    def test_the_walk_does_not_drift(self) -> None:
        """Over 55,000 minutes (15 minutes of ``make run``) the default seed's SPY stays within a
        factor of 2 of where it started (rounding every move down took it to $0.01 by minute 51,205)."""
        source = SyntheticSource(["SPY"], 7, T0, LiveClock(), paced=False)
        closes = [bars[0].close for bars in map(source.tick, range(55_000))]
        assert closes[0] / 2 < min(closes) and max(closes) < closes[0] * 2

    def test_a_move_rounds_the_same_up_as_down(self) -> None:
        """A rise and a fall of the same basis points move a price by the same amount."""
        for price in (1, 99, 100, 12_345, 4_541_600):
            for bps in (1, 3, 5, 6, 17, 50):
                assert _nearest(price * bps, 10_000) == -_nearest(-price * bps, 10_000)
        assert [_nearest(n, 10) for n in (4, 5, 6, -4, -5, -6)] == [0, 1, 1, 0, -1, -1]

    def test_volume_is_u_shaped_over_a_session(self) -> None:
        """Volume at the open and the close of a session is well above midday volume."""
        source = SyntheticSource(["SPY"], 5, T0, LiveClock())
        volumes = [b.volume for b in take(source, 390)]
        edges = mean([*volumes[:30], *volumes[-30:]])
        midday = mean(volumes[180:210])
        assert edges > 2 * midday

    def test_ids_are_those_of_bar_id(self) -> None:
        """A synthetic bar's id is ``bar_id(symbol, time)``, the id any other source gives the same bar."""
        bars = take(SyntheticSource(SYMBOLS, 3, T0, LiveClock()), 3 * 5)
        assert [b.id for b in bars] == [bar_id(b.symbol, b.time) for b in bars]
        assert len({b.id for b in bars}) == len(bars)

    def test_unpaced_batches_hold_whole_ticks(self) -> None:
        """Unpaced, batches carry whole ticks (one bar per symbol) of about ``batch`` bars."""
        source = SyntheticSource(SYMBOLS, 3, T0, LiveClock(), paced=False, batch=30)
        batch = next(source.batches(threading.Event()))
        assert len(batch) == 30
        assert [b.symbol for b in batch[:3]] == SYMBOLS


def write_csv(path: Path, rows: list[str]) -> Path:
    """A CSV of Alpaca's bar columns plus symbol."""
    path.write_text("symbol,timestamp,open,high,low,close,volume,trade_count,vwap\n" + "\n".join(rows) + "\n")
    return path


class TestCsvSource:
    def test_replays_rows_as_exact_decimal_bars(self, tmp_path: Path) -> None:
        """Every row becomes a Bar with exact Decimal prices; trade_count and vwap may be empty."""
        path = write_csv(tmp_path / "bars.csv", [
            "AAPL,2024-01-02 14:30:00+00:00,187.15,188.44,187.10,188.05,1200,31,187.9",
            "MSFT,2024-01-02 14:30:00+00:00,370.00,370.50,369.80,370.20,900,,",
            "AAPL,2024-01-02T14:31:00Z,188.05,188.10,187.95,188.00,700,12,188.01",
        ])
        bars = list(CsvSource(path, LiveClock()).rows())
        assert [(b.symbol, b.close) for b in bars] == [
            ("AAPL", Decimal("188.05")), ("MSFT", Decimal("370.20")), ("AAPL", Decimal("188.00"))]
        assert bars[1].trade_count is None and bars[1].vwap is None
        assert bars[2].time == datetime(2024, 1, 2, 14, 31, tzinfo=UTC)

    def test_bad_row_is_logged_and_skipped(self, tmp_path: Path) -> None:
        """A row that cannot be a bar is logged with its line number and skipped."""
        path = write_csv(tmp_path / "bars.csv", [
            "AAPL,2024-01-02 14:30:00+00:00,187.15,188.44,187.10,188.05,1200,31,187.9",
            "AAPL,2024-01-02 14:31:00+00:00,187.15,180.00,187.10,188.05,1200,31,187.9",
            "AAPL,not-a-time,1,1,1,1,1,1,1",
            "AAPL,2024-01-02 14:33:00+00:00,188.00,188.00,188.00,188.00,10,1,188",
        ])
        source = CsvSource(path, LiveClock())
        with capture_logs() as logs:
            bars = list(source.rows())
        assert len(bars) == 2 and source.bad_rows == 2
        assert [e["line"] for e in logs if e["event"] == "ingester.csv_bad_row"] == [3, 4]

    def test_paced_replay_emits_one_timestamp_per_tick(self, tmp_path: Path) -> None:
        """Paced, rows sharing a timestamp are emitted together, one tick at a time."""
        path = write_csv(tmp_path / "bars.csv", [
            f"{s},2024-01-02 14:3{m}:00+00:00,10,10,10,10,1,1,10" for m in range(3) for s in ("A", "B")
        ])
        ticks = list(CsvSource(path, LiveClock(), speed=1000.0).batches(threading.Event()))
        assert [[b.symbol for b in t] for t in ticks] == [["A", "B"]] * 3
        assert len({b.time for b in ticks[1]}) == 1

    def test_missing_column_is_an_error(self, tmp_path: Path) -> None:
        """A CSV without the required columns is refused, naming them."""
        path = tmp_path / "bad.csv"
        path.write_text("symbol,timestamp,close\nAAPL,2024-01-02 14:30:00+00:00,1\n")
        with pytest.raises(ValueError, match="open, high, low, volume"):
            list(CsvSource(path, LiveClock()).rows())


class TestGate:
    def test_accepts_new_drops_duplicates_refuses_older(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Per symbol: newer bars accepted, the same time again a duplicate, older out of order."""
        gate = BarGate(redis_client, keys)
        offered = [factories.bar("AAPL", 1), factories.bar("MSFT", 0), factories.bar("AAPL", 1),
                   factories.bar("AAPL", 0), factories.bar("AAPL", 2), factories.bar("MSFT", 0)]
        verdicts = publish_through(gate, keys, offered)
        assert verdicts == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.OUT_OF_ORDER,
                            Verdict.ACCEPTED, Verdict.DUPLICATE]
        assert gate.newest() == {"AAPL": T0 + timedelta(minutes=2), "MSFT": T0}
        published = [(b.symbol, b.time) for b in stream_bars(redis_client, keys.stream(BARS))]
        minute = timedelta(minutes=1)
        assert published == [("AAPL", T0 + minute), ("MSFT", T0), ("AAPL", T0 + 2 * minute)]

    def test_each_symbol_is_judged_against_its_own_newest_bar_within_a_batch(self, redis_client: redis.Redis,
                                                                              keys: Keys) -> None:
        """In one publishing batch, each bar is compared with its symbol's newest, earlier bars included."""
        ing = ingester(redis_client, keys)
        ing.offer([factories.bar("MSFT", 2)])
        batch = [("AAPL", 1), ("MSFT", 1), ("AAPL", 1), ("SPY", 0),
                 ("MSFT", 3), ("AAPL", 0), ("MSFT", 3), ("AAPL", 2)]
        verdicts = ing.offer([factories.bar(symbol, minute) for symbol, minute in batch])
        accepted, duplicate, older = Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.OUT_OF_ORDER
        assert verdicts == [accepted, older, duplicate, accepted, accepted, older, duplicate, accepted]
        minute = timedelta(minutes=1)
        assert ing.gate.newest() == {"AAPL": T0 + 2 * minute, "MSFT": T0 + 3 * minute, "SPY": T0}
        published = [(b.symbol, b.time) for b in stream_bars(redis_client, keys.stream(BARS))]
        assert published == [("MSFT", T0 + 2 * minute), ("AAPL", T0 + minute), ("SPY", T0),
                             ("MSFT", T0 + 3 * minute), ("AAPL", T0 + 2 * minute)]

    def test_the_newest_accepted_close_of_each_symbol_is_its_last_price(self, redis_client: redis.Redis,
                                                                        keys: Keys) -> None:
        """last-price holds each symbol's newest accepted close; a duplicate or older bar changes nothing."""
        ing = ingester(redis_client, keys)
        ing.offer([factories.bar("AAPL", 1, "101.50"), factories.bar("MSFT", 0, "300"),
                   factories.bar("AAPL", 2, "102.25")])
        ing.offer([factories.bar("AAPL", 2, "999"), factories.bar("AAPL", 0, "1"),
                   factories.bar("MSFT", 1, "301.10")])
        assert redis_client.hgetall(keys.last_price) == {b"AAPL": b"102.25", b"MSFT": b"301.10"}

    def test_a_batch_stopped_by_a_server_error_marks_no_unpublished_bar(self, client: redis.Redis,
                                                                        keys: Keys) -> None:
        """An XADD failing mid-batch leaves its bars published and unmarked (offered again, they go out)."""
        ing = ingester(client, keys)
        broken = keys.stream(keys.bar_partition(partition_of("AAPL", 4)))
        assert partition_of("MSFT", 4) != partition_of("AAPL", 4)
        client.set(broken, "not a stream")
        with pytest.raises(RedisCommandFailed):
            ing.offer([factories.bar("MSFT", 0), factories.bar("AAPL", 0)])
        assert ing.gate.newest() == {}
        assert read_bar_arrivals(client, keys) == {}
        assert [b.symbol for b in stream_bars(client, keys.stream(BARS))] == ["MSFT", "AAPL"]
        client.delete(broken)
        assert ing.offer([factories.bar("MSFT", 0), factories.bar("AAPL", 0)]) == [
            Verdict.ACCEPTED, Verdict.ACCEPTED]
        assert [b.symbol for b in stream_bars(client, broken)] == ["AAPL"]

    def test_two_instances_accept_each_bar_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Two gates fed the same bars concurrently accept and publish each bar exactly once between them."""
        bars = [factories.bar(s, m) for m in range(60) for s in ("AAPL", "MSFT")]
        results: list[list[Verdict]] = [[], []]

        def feed(index: int) -> None:
            gate = BarGate(redis_client, keys)
            for start in range(0, len(bars), 8):
                results[index].extend(publish_through(gate, keys, bars[start:start + 8]))

        threads = [threading.Thread(target=feed, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        accepted = [a is Verdict.ACCEPTED or b is Verdict.ACCEPTED for a, b in zip(*results, strict=True)]
        assert all(accepted)
        assert sum(v is Verdict.ACCEPTED for r in results for v in r) == len(bars)
        assert [b.id for b in stream_bars(redis_client, keys.stream(BARS))] == [b.id for b in bars]


def ingester(client: redis.Redis, keys: Keys, clock: Any = None, **settings: Any) -> Ingester:
    """An Ingester with small partitions and frequent trimming."""
    config = IngesterSettings(**{"partitions": 4, **settings})
    return Ingester(client, keys, config, BusSettings(), clock or SimulatedClock(T0),
                    watch=settings.get("symbols", ()))


class TestIngester:
    def test_accepted_bars_reach_bars_and_their_partition(self, fake: redis.Redis, keys: Keys) -> None:
        """Each accepted bar is on ``bars`` and on ``bars:<crc32(symbol) % partitions>``, in order."""
        ing = ingester(fake, keys)
        bars = [factories.bar(s, m) for m in range(5) for s in SYMBOLS]
        ing.offer(bars)
        assert stream_bars(fake, keys.stream(BARS)) == bars
        for n in range(4):
            expected = [b for b in bars if partition_of(b.symbol, 4) == n]
            assert stream_bars(fake, keys.stream(keys.bar_partition(n))) == expected

    def test_duplicate_dropped_and_out_of_order_refused_with_a_log_line(self, fake: redis.Redis,
                                                                      keys: Keys) -> None:
        """A repeated bar is dropped; an older one is refused and logged; neither is published."""
        ing = ingester(fake, keys)
        ing.offer([factories.bar("AAPL", 5)])
        with capture_logs() as logs:
            verdicts = ing.offer([factories.bar("AAPL", 5), factories.bar("AAPL", 3),
                                  factories.bar("AAPL", 6)])
        assert verdicts == [Verdict.DUPLICATE, Verdict.OUT_OF_ORDER, Verdict.ACCEPTED]
        refused = [e for e in logs if e["event"] == "ingester.bar_out_of_order"]
        assert [(e["symbol"], e["bar_time"]) for e in refused] == [
            ("AAPL", (T0 + timedelta(minutes=3)).isoformat())]
        published = [b.time for b in stream_bars(fake, keys.stream(BARS))]
        assert published == [T0 + timedelta(minutes=m) for m in (5, 6)]
        assert (ing.counts.accepted, ing.counts.duplicates, ing.counts.out_of_order) == (2, 1, 1)

    def test_stale_symbol_logged_and_alerted_once_then_fresh(self, fake: redis.Redis, keys: Keys) -> None:
        """No bar for stale_after_s marks the symbol stale once (log + alert); a bar clears it."""
        clock = SimulatedClock(T0)
        ing = ingester(fake, keys, clock, symbols=["AAPL", "MSFT"], stale_after_s=60)
        ing.offer([factories.bar("AAPL", 0), factories.bar("MSFT", 0)])
        clock.advance(timedelta(seconds=30))
        ing.offer([factories.bar("AAPL", 1)])
        assert ing.check_stale() == []
        clock.advance(timedelta(seconds=31))
        with capture_logs() as logs:
            assert ing.check_stale() == ["MSFT"]
            assert ing.check_stale() == []
        assert [e["symbol"] for e in logs if e["event"] == "ingester.symbol_stale"] == ["MSFT"]
        alerts = [codec.decode(f) for _, f in fake.xrange(keys.stream(ALERTS))]
        assert len(alerts) == 1 and isinstance(alerts[0], Alert)
        assert (alerts[0].kind, alerts[0].details["symbol"]) == ("stale_data", "MSFT")
        ing.offer([factories.bar("MSFT", 2)])
        assert ing.stale_symbols == []
        assert codec.decode(fake.xrange(keys.stream(ALERTS))[-1][1]).kind == "data_resumed"  # type: ignore[attr-defined]

    def test_a_symbol_that_never_arrives_goes_stale(self, fake: redis.Redis, keys: Keys) -> None:
        """A configured symbol with no bar at all since start is stale after stale_after_s."""
        clock = SimulatedClock(T0)
        ing = ingester(fake, keys, clock, symbols=["AAPL"], stale_after_s=10)
        clock.advance(timedelta(seconds=11))
        assert ing.check_stale() == ["AAPL"]

    def test_run_reads_max_bars_from_a_csv_and_stops(self, fake: redis.Redis, keys: Keys,
                                                     tmp_path: Path) -> None:
        """run() with max_bars replays exactly that many rows of a CSV, then returns."""
        path = write_csv(tmp_path / "bars.csv", [
            f"{s},2024-01-02 14:{30 + m}:00+00:00,10,10,10,10,1,{m},10" for m in range(10) for s in ("A", "B")
        ])
        ing = ingester(fake, keys)
        counts = ing.run(CsvSource(path, LiveClock(), paced=False, batch=7), threading.Event(), max_bars=15)
        assert (counts.read, counts.accepted) == (15, 15)
        assert fake.xlen(keys.stream(BARS)) == 15

    @pytest.mark.parametrize(("eager", "read_when_asked_again"), [(True, 0), (False, 2)])
    def test_only_an_eager_source_has_its_next_batch_sent_before_the_verdicts_are_read(
            self, redis_client: redis.Redis, keys: Keys, eager: bool, read_when_asked_again: int) -> None:
        """From an eager source a batch is still in flight when the next is asked for; otherwise settled."""
        ing = ingester(redis_client, keys)
        seen: list[int] = []

        def recording() -> Iterator[list[Bar]]:
            yield [factories.bar("AAPL", 0), factories.bar("MSFT", 0)]
            seen.append(ing.counts.read)
            yield [factories.bar("AAPL", 1)]

        counts = ing.run(ListSource(recording(), eager), threading.Event())
        assert seen == [read_when_asked_again]
        assert (counts.read, counts.accepted) == (3, 3)
        assert [(b.symbol, b.time) for b in stream_bars(redis_client, keys.stream(BARS))] == [
            ("AAPL", T0), ("MSFT", T0), ("AAPL", T0 + timedelta(minutes=1))]

    def test_batches_in_flight_are_judged_in_order(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Duplicates and older bars spread over batches in flight get the verdicts one by one would."""
        batches = [[factories.bar("AAPL", 1), factories.bar("MSFT", 0)],
                   [factories.bar("AAPL", 1), factories.bar("AAPL", 2)],
                   [factories.bar("AAPL", 0), factories.bar("MSFT", 1)],
                   [factories.bar("MSFT", 1), factories.bar("AAPL", 3)]]
        ing = ingester(redis_client, keys)
        counts = ing.run(ListSource(iter(batches), eager=True), threading.Event())
        assert (counts.read, counts.accepted, counts.duplicates, counts.out_of_order) == (8, 5, 2, 1)
        published = [(b.symbol, b.time) for b in stream_bars(redis_client, keys.stream(BARS))]
        minute = timedelta(minutes=1)
        assert published == [("AAPL", T0 + minute), ("MSFT", T0), ("AAPL", T0 + 2 * minute),
                             ("MSFT", T0 + minute), ("AAPL", T0 + 3 * minute)]

    def test_a_connection_dropped_with_a_batch_in_flight_is_reconnected_and_nothing_doubles(
            self, real_redis_url: str, keys: Keys) -> None:
        """Redis killing the ingester's connection mid-run: the batches in flight go again, each bar once."""
        client, admin = connect_url(real_redis_url), connect_url(real_redis_url)
        ing = ingester(client, keys)
        killed: list[int] = []

        def dropping() -> Iterator[list[Bar]]:
            yield [factories.bar("AAPL", 0), factories.bar("MSFT", 0)]
            for entry in admin.client_list():  # the lane's connection: its last command was the EVAL
                if entry["cmd"] == "eval" and int(entry["id"]) != admin.client_id():
                    killed.append(admin.client_kill_filter(_id=entry["id"]))
            yield [factories.bar("AAPL", 1)]

        try:
            counts = ing.run(ListSource(dropping(), eager=True), threading.Event())
            published = [(b.symbol, b.time) for b in stream_bars(client, keys.stream(BARS))]
        finally:
            delete_keys(real_redis_url, keys)
            client.close()
            admin.close()
        assert killed == [1]
        assert published == [("AAPL", T0), ("MSFT", T0), ("AAPL", T0 + timedelta(minutes=1))]
        assert (counts.read, counts.accepted + counts.duplicates, counts.out_of_order) == (3, 3, 0)

    @pytest.mark.parametrize("fault", ["stopped", "full"])
    @pytest.mark.parametrize("eager", [True, False], ids=["eager", "paced"])
    def test_a_redis_outage_is_waited_out_and_each_bar_published_once(self, tmp_path: Path, keys: Keys,
                                                                       eager: bool, fault: str) -> None:
        """Redis mid-run stopped past the client's retries (then started again from its AOF), or
        refusing writes with its memory full (maxmemory 1, then 0): the ingester waits, sends again
        what was in flight, and publishes every bar exactly once."""
        server = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
        server.start()
        client = connect_url(server.url)
        ing = ingester(client, keys)
        batches = [[factories.bar("AAPL", 0), factories.bar("MSFT", 0)], [factories.bar("AAPL", 1)],
                   [factories.bar("MSFT", 1)]]

        def with_an_outage() -> Iterator[list[Bar]]:
            yield batches[0]
            if fault == "stopped":
                server.stop()
            else:
                client.config_set("maxmemory", 1)
            yield from batches[1:]

        def recover_once_waiting() -> None:
            try:
                wait_for(lambda: any(e["event"] == "ingester.redis_unavailable" for e in logs), timeout=60,
                         message="the ingester waiting for Redis")
            finally:
                if fault == "stopped":
                    server.start()
                else:
                    client.config_set("maxmemory", 0)

        try:
            with capture_logs() as logs:
                recovery = threading.Thread(target=recover_once_waiting, daemon=True)
                recovery.start()
                counts = ing.run(ListSource(with_an_outage(), eager=eager), threading.Event())
                recovery.join(60)
            published = [b.id for b in stream_bars(client, keys.stream(BARS))]
        finally:
            client.close()
            server.stop()
        assert any(e["event"] == "ingester.redis_unavailable" for e in logs)
        assert published == [b.id for batch in batches for b in batch]
        assert (counts.read, counts.accepted + counts.duplicates, counts.out_of_order) == (4, 4, 0)

    def test_a_run_that_fails_with_a_batch_in_flight_leaves_no_stray_reply(self, redis_client: redis.Redis,
                                                                           keys: Keys) -> None:
        """An error with a reply unread closes that connection: the next command gets its own reply."""
        ing = ingester(redis_client, keys)

        def failing() -> Iterator[list[Bar]]:
            yield [factories.bar("AAPL", 0)]
            raise RuntimeError("source broke")

        redis_client.set(keys.prefix + ":probe", "answer")
        with pytest.raises(RuntimeError, match="source broke"):
            ing.run(ListSource(failing(), eager=True), threading.Event())
        assert redis_client.get(keys.prefix + ":probe") == b"answer"
        assert ing.gate.newest() == {"AAPL": T0}

    def test_trims_streams_as_it_goes(self, fake: redis.Redis, keys: Keys) -> None:
        """With no consumer group, bars and partition streams stay near bus.maxlen."""
        ing = Ingester(fake, keys, IngesterSettings(partitions=2), BusSettings(maxlen=50, trim_every=20),
                       SimulatedClock(T0))
        for minute in range(100):
            ing.offer([factories.bar(s, minute) for s in SYMBOLS])
        assert fake.xlen(keys.stream(BARS)) <= 50 + 20 + 3
        assert all(fake.xlen(keys.stream(keys.bar_partition(n))) <= 50 + 20 + 3 for n in range(2))


class TestArrival:
    """``bar-arrival``: when the ingester accepted each symbol's newest bar, on its clock, which is
    what risk's stale-data rule measures (not the bar's own time)."""

    LIMITS = LimitSettings()  # stale_data_after_s 120

    def stale(self, client: redis.Redis, keys: Keys, symbol: str, now: datetime) -> str | None:
        """Risk's stale-data refusal of an entry in ``symbol`` at ``now``, from what the ingester wrote."""
        refusal = check_stale_data(symbol, read_bar_arrivals(client, keys).get(symbol), now, self.LIMITS)
        return None if refusal is None else refusal.reason

    def test_a_synthetic_market_hours_ahead_of_the_clock_goes_stale_when_bars_stop(self, fake: redis.Redis,
                                                                                    keys: Keys) -> None:
        """A synthetic market (a minute of market time per tick, here 60 ticks a second) runs
        hours ahead of the clock; once no bar is accepted for more than 120 s it is stale all the same."""
        clock = SimulatedClock(T0)
        ing = ingester(fake, keys, clock)
        ing.run(SyntheticSource(["AAPL"], 7, clock.now(), clock), ClockStop(clock), max_bars=300)
        assert ing.gate.newest()["AAPL"] - clock.now() > timedelta(hours=4)
        arrived = read_bar_arrivals(fake, keys)["AAPL"]
        assert T0 < arrived <= clock.now()
        clock.set(arrived + timedelta(seconds=120))
        assert self.stale(fake, keys, "AAPL", clock.now()) is None
        clock.advance(timedelta(seconds=10))
        assert self.stale(fake, keys, "AAPL", clock.now()) == (
            "no bar for AAPL accepted for 130s, the limit is 120s")
        ing.offer([factories.bar("AAPL", 300)])
        assert self.stale(fake, keys, "AAPL", clock.now()) is None

    def test_a_replayed_bar_from_years_ago_is_fresh_when_just_accepted(self, fake: redis.Redis, keys: Keys,
                                                                       tmp_path: Path) -> None:
        """A CSV replay of 2019 bars on a 2026 clock: a bar just accepted is not stale (its time is
        seven years old), and goes stale 120 s after the replay stops."""
        path = write_csv(tmp_path / "bars.csv", [
            f"AAPL,2019-01-02 14:{30 + m}:00+00:00,10,10,10,10,1,{m},10" for m in range(3)])
        clock = SimulatedClock(T0)
        ing = ingester(fake, keys, clock)
        counts = ing.run(CsvSource(path, clock, paced=False), threading.Event())
        assert counts.accepted == 3
        assert ing.gate.newest() == {"AAPL": datetime(2019, 1, 2, 14, 32, tzinfo=UTC)}
        assert read_bar_arrivals(fake, keys) == {"AAPL": T0}
        assert self.stale(fake, keys, "AAPL", clock.now()) is None
        clock.advance(timedelta(seconds=121))
        assert self.stale(fake, keys, "AAPL", clock.now()) == (
            "no bar for AAPL accepted for 121s, the limit is 120s")

    def test_a_duplicate_or_older_bar_does_not_refresh_the_arrival(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """Only an accepted bar stamps its symbol's arrival (fixed-width, the clock's time of the
        batch); a repeat or an older bar leaves it, so a feed replaying old bars still goes stale."""
        clock = SimulatedClock(T0)
        ing = ingester(redis_client, keys, clock)
        ing.offer([factories.bar("AAPL", 5), factories.bar("MSFT", 5)])
        clock.advance(timedelta(seconds=100))
        verdicts = ing.offer([factories.bar("AAPL", 5), factories.bar("AAPL", 3), factories.bar("MSFT", 6)])
        assert verdicts == [Verdict.DUPLICATE, Verdict.OUT_OF_ORDER, Verdict.ACCEPTED]
        assert redis_client.hgetall(keys.bar_arrival) == {
            b"AAPL": format_time(T0).encode(), b"MSFT": format_time(clock.now()).encode()}
        clock.advance(timedelta(seconds=21))
        assert self.stale(redis_client, keys, "AAPL", clock.now()) == (
            "no bar for AAPL accepted for 121s, the limit is 120s")
        assert self.stale(redis_client, keys, "MSFT", clock.now()) is None

    def test_batches_in_flight_carry_the_time_each_was_sent(self, redis_client: redis.Redis,
                                                             keys: Keys) -> None:
        """From an eager source, each batch's arrival is the clock's time when it was queued, not when
        its verdicts were read."""
        clock = SimulatedClock(T0)
        ing = ingester(redis_client, keys, clock)

        def ticking() -> Iterator[list[Bar]]:
            yield [factories.bar("AAPL", 0), factories.bar("MSFT", 0)]
            clock.advance(timedelta(seconds=10))
            yield [factories.bar("AAPL", 1), factories.bar("MSFT", 0)]
            clock.advance(timedelta(seconds=10))

        ing.run(ListSource(ticking(), eager=True), threading.Event())
        assert read_bar_arrivals(redis_client, keys) == {"AAPL": T0 + timedelta(seconds=10), "MSFT": T0}


class ClockStop:
    """A stop flag never set whose waits move a simulated clock: a paced source runs at once, its
    ticks ``1/speed`` apart on the clock."""

    def __init__(self, clock: SimulatedClock) -> None:
        self.clock = clock

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        self.clock.sleep(seconds)
        return False


class ListSource:
    """A source that yields the given batches; ``eager`` as a replay's."""

    def __init__(self, batches: Iterator[list[Bar]], eager: bool) -> None:
        self._batches = batches
        self.eager = eager

    def batches(self, stop: Any) -> Iterator[list[Bar]]:
        return self._batches

    def close(self) -> None:
        return None


class FakeStockDataStream:
    """Stands in for alpaca-py's StockDataStream: replays raw bars through the subscribed handler."""

    def __init__(self, raw: list[dict[str, Any]]) -> None:
        self.raw = raw
        self.subscribed: tuple[str, ...] = ()
        self.stopped = threading.Event()

    def subscribe_bars(self, handler: Any, *symbols: str) -> None:
        self.handler = handler
        self.subscribed = symbols

    def run(self) -> None:
        import asyncio

        async def go() -> None:
            for item in self.raw:
                await self.handler(AlpacaBar(item["S"], item))
            await asyncio.get_running_loop().run_in_executor(None, self.stopped.wait)

        asyncio.run(go())

    def stop(self) -> None:
        self.stopped.set()


class TestAlpacaSource:
    def test_live_bars_flow_through_the_gate(self, fake: redis.Redis, keys: Keys) -> None:
        """Bars from the (fake) Alpaca stream are converted exactly and published; a repeat is dropped."""
        raw = [{"S": "AAPL", "t": "2024-01-02T14:30:00Z", "o": 187.15, "h": 188.44, "l": 187.1, "c": 188.05,
                "v": 1200, "n": 31, "vw": 187.9},
               {"S": "AAPL", "t": "2024-01-02T14:30:00Z", "o": 187.15, "h": 188.44, "l": 187.1, "c": 188.05,
                "v": 1200, "n": 31, "vw": 187.9},
               {"S": "MSFT", "t": "2024-01-02T14:30:00Z", "o": 370.0, "h": 370.5, "l": 369.8, "c": 370.2,
                "v": 900, "n": 12, "vw": 370.1}]
        stream = FakeStockDataStream(raw)
        source = AlpacaSource(["AAPL", "MSFT"], lambda: stream, poll_s=0.05)
        stop = threading.Event()
        ing = ingester(fake, keys)

        def runner() -> None:
            ing.run(source, stop)

        thread = threading.Thread(target=runner)
        thread.start()
        try:
            wait_for(lambda: ing.counts.read >= 3, timeout=30, message="3 bars read")
        finally:
            stop.set()
            thread.join(30)
        assert stream.subscribed == ("AAPL", "MSFT")
        assert stream.stopped.is_set()
        bars = stream_bars(fake, keys.stream(BARS))
        assert [(b.symbol, b.close, b.high) for b in bars] == [("AAPL", Decimal("188.05"), Decimal("188.44")),
                                                               ("MSFT", Decimal("370.2"), Decimal("370.5"))]
        assert ing.counts.duplicates == 1

    def test_conversion_keeps_the_printed_value(self) -> None:
        """alpaca-py's float prices become the Decimal of their shortest repr (0.1 stays 0.1)."""
        raw = AlpacaBar("X", {"t": "2024-01-02T14:30:00Z", "o": 0.1, "h": 0.3, "l": 0.1, "c": 0.2, "v": 5.0,
                              "n": 1, "vw": 0.15})
        bar = bar_from_alpaca(raw)
        assert (bar.open, bar.high, bar.close, bar.vwap) == (Decimal("0.1"), Decimal("0.3"), Decimal("0.2"),
                                                             Decimal("0.15"))
