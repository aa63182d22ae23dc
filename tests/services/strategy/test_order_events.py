"""Strategies hear what became of their intents: ``entry_ended``, the shipped strategies' ``holding``,
the worker feeding order events and rejections to ``on_order_event``, and risk's and the executor's
routing of them to the strategy's bar partition (``Keys.strategy_feed``)."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from services.ingester import partition_of
from services.risk.service import RiskService
from services.strategy import (
    GROUP,
    Catalog,
    SmaCrossover,
    SmaParams,
    SmaState,
    StoredState,
    Strategy,
    StrategyWorker,
    VwapParams,
    VwapReversion,
    VwapState,
    consumer_name,
    intent_id,
    register,
)
from services.strategy._builtin import (
    DonchianBreakout,
    DonchianParams,
    DonchianState,
    HoldingState,
    entry_ended,
)
from shared.bus import codec
from shared.clock import SimulatedClock
from shared.config import Settings, StrategySettings
from shared.keys import DEAD_LETTER, ORDER_EVENTS, REJECTIONS, Keys
from shared.models import Bar, Intent, IntentRejected, Message, OrderEvent, OrderStatus, Side
from tests.services.executor.test_executor import KEYS as EXECUTOR_KEYS
from tests.services.executor.test_executor import World
from tests.services.executor.test_protection import Desk as StopDesk
from tests.services.risk.test_risk import KEYS as RISK_KEYS
from tests.services.risk.test_risk import Desk as RiskDesk
from tests.services.risk.test_risk import intent as risk_intent
from tests.services.strategy.test_strategy import PARTITIONS, bar, intents, publish, settings, worker
from tests.support.factories import T0

D = Decimal
ENTRY = "entry-1"


def order_event(side: Side, status: OrderStatus, filled: str = "0", intent: str | None = ENTRY,
                symbol: str = "AAPL", cid: str = "bst-entry-1") -> OrderEvent:
    """The executor's event of order ``cid`` (of intent ``intent``): ``status``, ``filled`` shares done."""
    return OrderEvent(time=T0, client_order_id=cid, intent_id=intent, symbol=symbol, side=side, status=status,
                      filled_quantity=D(filled), filled_avg_price=D(100) if D(filled) else None)


def rejected(intent: str = ENTRY, symbol: str = "AAPL") -> IntentRejected:
    """Risk's refusal of ``intent``."""
    return IntentRejected(time=T0, intent_id=intent, symbol=symbol, reason="insufficient AAPL")


def feed_of(keys: Keys, source: str, symbol: str = "AAPL", partitions: int = PARTITIONS) -> str:
    """The strategy feed of ``source`` on ``symbol``; an assertion that there is one."""
    feed = keys.strategy_feed(source, symbol, partitions)
    assert feed is not None
    return feed


def entries(client: redis.Redis, stream_key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of ``stream_key`` (id, fields), in stream order."""
    reply: Any = client.xrange(stream_key)
    return list(reply)


def messages(client: redis.Redis, stream_key: str) -> list[Message]:
    """Every message on ``stream_key``, decoded, in stream order."""
    return [codec.decode(fields) for _, fields in entries(client, stream_key)]


def partition_entries(client: redis.Redis, keys: Keys, partitions: int) -> int:
    """How many entries all the bar partitions hold."""
    return sum(client.xlen(keys.stream(keys.bar_partition(n))) for n in range(partitions))


# -- test strategies ----------------------------------------------------------------------------


class EchoParams(BaseModel):
    """Nothing to set."""


class EchoState(BaseModel):
    """What the strategy saw, in order."""

    seen: list[str] = []


def label(message: Bar | OrderEvent | IntentRejected) -> str:
    """A short name of what a strategy was given."""
    if isinstance(message, Bar):
        return f"bar {message.close}"
    if isinstance(message, IntentRejected):
        return f"rejected {message.intent_id}"
    return f"{message.status.value} {message.filled_quantity}"


@register
class Echo(Strategy[EchoParams, EchoState]):
    """Records every bar and event; answers each fill (through the default ``on_order_event``) with
    a sell of the shares filled, its id derived from the event."""

    name = "test_order_events_echo"
    params_model = EchoParams
    state_model = EchoState

    def on_bar(self, bar: Bar) -> list[Intent]:
        self.state.seen = [*self.state.seen, label(bar)]
        return []

    def on_order_event(self, event: OrderEvent | IntentRejected) -> list[Intent]:
        self.state.seen = [*self.state.seen, label(event)]
        return super().on_order_event(event)

    def on_fill(self, event: OrderEvent) -> list[Intent]:
        return [self.intent(event, Side.SELL, event.filled_quantity, f"answer {event.client_order_id}")]


@register
class EventBoom(Strategy[EchoParams, EchoState]):
    """Buys 1 on every bar; records an event, then raises on it."""

    name = "test_order_events_boom"
    params_model = EchoParams
    state_model = EchoState

    def on_bar(self, bar: Bar) -> list[Intent]:
        self.state.seen = [*self.state.seen, label(bar)]
        return [self.intent(bar, Side.BUY, D(1), f"bar {bar.close}")]

    def on_order_event(self, event: OrderEvent | IntentRejected) -> list[Intent]:
        self.state.seen = [*self.state.seen, label(event)]
        raise RuntimeError(f"boom on {event.TYPE}")


ECHO_SOURCE = f"strategy:{Echo.name}"


# -- entry_ended --------------------------------------------------------------------------------


class TestEntryEnded:
    @pytest.mark.parametrize(
        ("event", "entry", "ended"),
        [
            pytest.param(rejected(), ENTRY, True, id="entry-rejected"),
            pytest.param(rejected("other"), ENTRY, False, id="other-intent-rejected"),
            pytest.param(order_event(Side.BUY, OrderStatus.CANCELED), ENTRY, True, id="buy-canceled"),
            pytest.param(order_event(Side.BUY, OrderStatus.EXPIRED), ENTRY, True, id="buy-expired"),
            pytest.param(order_event(Side.BUY, OrderStatus.REJECTED), ENTRY, True, id="buy-rejected"),
            pytest.param(order_event(Side.BUY, OrderStatus.CANCELED, "4"), ENTRY, False,
                         id="buy-canceled-partially-filled"),
            pytest.param(order_event(Side.BUY, OrderStatus.NEW), ENTRY, False, id="buy-new"),
            pytest.param(order_event(Side.BUY, OrderStatus.FILLED, "10"), ENTRY, False, id="buy-filled"),
            pytest.param(order_event(Side.BUY, OrderStatus.CANCELED, intent="other"), ENTRY, False,
                         id="other-buy-canceled-unfilled"),
            pytest.param(order_event(Side.SELL, OrderStatus.FILLED, "10", cid="bst-entry-1-sl1"), ENTRY, True,
                         id="stop-filled"),
            pytest.param(order_event(Side.SELL, OrderStatus.PARTIALLY_FILLED, "4", cid="bst-entry-1-sl1"),
                         ENTRY, False, id="stop-partially-filled"),
            pytest.param(order_event(Side.SELL, OrderStatus.CANCELED, cid="bst-entry-1-sl1"), ENTRY, False,
                         id="stop-canceled"),
            pytest.param(order_event(Side.SELL, OrderStatus.FILLED, "10", intent="other"), ENTRY, False,
                         id="other-sell-filled"),
            pytest.param(rejected(""), "", False, id="no-entry-rejection-without-id"),
            pytest.param(order_event(Side.BUY, OrderStatus.CANCELED, intent=None), "", False,
                         id="no-entry-buy-without-id"),
            pytest.param(rejected(), "", False, id="no-entry-rejection"),
        ],
    )
    def test_truth_table(self, event: OrderEvent | IntentRejected, entry: str, ended: bool) -> None:
        """The entry ended only when risk refused it, the broker ended its buy with nothing filled, or
        an exit carrying its intent id filled completely; never without an entry."""
        assert entry_ended(event, entry) is ended


# -- the shipped strategies' holding ------------------------------------------------------------

CROSS_UP = ["10", "10", "10", "9", "8", "9", "11"]  # fast=2/slow=4: buys on the last bar (close 11)
CROSS_DOWN = ["12", "12", "9", "8"]  # then sells on the third (minute 9)
CROSS_UP_AGAIN = ["8", "10", "12"]  # then buys again on the third (minute 12)


def sma() -> SmaCrossover:
    return SmaCrossover("AAPL", SmaParams(fast=2, slow=4), SmaState())


def feed_bars(strategy: Strategy[Any, Any], closes: list[str], start: int) -> list[tuple[int, Intent]]:
    """Run closes from minute ``start`` through ``on_bar``: (minute, intent) of each intent."""
    return [(start + n, intent) for n, close in enumerate(closes)
            for intent in strategy.on_bar(bar(strategy.symbol, start + n, close))]


def entered(strategy: SmaCrossover) -> Intent:
    """Drive ``strategy`` to its cross up; its entry."""
    [(minute, entry)] = feed_bars(strategy, CROSS_UP, 0)
    assert minute == 6 and entry.side is Side.BUY
    assert (strategy.state.holding, strategy.state.entry) == (True, entry.id)
    return entry


class TestHolding:
    def test_a_filled_stop_clears_holding_and_the_cross_down_sells_nothing(self) -> None:
        """The entry's protective stop filled (a sell with the entry's intent id): holding is cleared
        and the next cross down emits no sell of shares the stop already sold."""
        strategy = sma()
        entry = entered(strategy)
        stop = order_event(Side.SELL, OrderStatus.FILLED, "10", intent=entry.id, cid="bst-x-sl1")
        assert strategy.on_order_event(stop) == []
        assert (strategy.state.holding, strategy.state.entry) == (False, "")
        assert feed_bars(strategy, CROSS_DOWN, 7) == []

    def test_a_partly_filled_stop_or_another_intents_fill_keeps_holding(self) -> None:
        """A stop only partly filled, or a sell of another intent, leaves the entry held: the cross
        down sells."""
        strategy = sma()
        entry = entered(strategy)
        strategy.on_order_event(order_event(Side.SELL, OrderStatus.PARTIALLY_FILLED, "4", intent=entry.id))
        strategy.on_order_event(order_event(Side.SELL, OrderStatus.FILLED, "10", intent="another"))
        assert (strategy.state.holding, strategy.state.entry) == (True, entry.id)
        assert [(m, i.side) for m, i in feed_bars(strategy, CROSS_DOWN, 7)] == [(9, Side.SELL)]

    def test_the_rejection_of_the_entry_clears_holding_and_it_enters_again(self) -> None:
        """Risk refused the entry: holding is cleared, the cross down sells nothing, and the next
        cross up buys again (a new entry)."""
        strategy = sma()
        entry = entered(strategy)
        strategy.on_order_event(rejected(entry.id))
        assert (strategy.state.holding, strategy.state.entry) == (False, "")
        assert feed_bars(strategy, CROSS_DOWN, 7) == []
        [(minute, again)] = feed_bars(strategy, CROSS_UP_AGAIN, 11)
        assert minute == 12 and again.side is Side.BUY and again.id != entry.id
        assert (strategy.state.holding, strategy.state.entry) == (True, again.id)

    def test_the_entry_carries_the_default_stop(self) -> None:
        """With no stop_bps set, the entry's stop-loss is 200 bps under the close."""
        assert entered(sma()).stop_loss == D(11) * D("0.98")
        strategy = VwapReversion("SPY", VwapParams(min_bars=3), VwapState())
        out = [i for n, close in enumerate(["100", "100", "100", "99"])
               for i in strategy.on_bar(bar("SPY", n, close, vwap="100"))]
        assert [(i.side, i.stop_loss) for i in out] == [(Side.BUY, D(99) * D("0.98"))]

    @pytest.mark.parametrize(
        ("strategy", "state"),
        [
            (SmaCrossover("AAPL", SmaParams(), SmaState(holding=True, entry=ENTRY)), SmaState),
            (VwapReversion("AAPL", VwapParams(), VwapState(holding=True, entry=ENTRY)), VwapState),
            (DonchianBreakout("AAPL", DonchianParams(), DonchianState(holding=True, entry=ENTRY, stop=D(90),
                                                                        target=D(120))), DonchianState),
        ],
        ids=["sma", "vwap", "donchian"],
    )
    def test_every_shipped_strategy_forgets_an_ended_entry(self, strategy: Strategy[Any, HoldingState],
                                                           state: type[HoldingState]) -> None:
        """Each shipped strategy keeps holding on the events that do not end its entry and forgets
        it (the breakout its stop and target too) on one that does; it answers no event with an
        intent; the entry survives the state's JSON round trip."""
        assert state.model_validate_json(strategy.state.model_dump_json()).entry == ENTRY
        for event in (rejected("other"), order_event(Side.BUY, OrderStatus.FILLED, "10")):
            assert strategy.on_order_event(event) == []
            assert strategy.state.holding and strategy.state.entry == ENTRY
        assert strategy.on_order_event(order_event(Side.BUY, OrderStatus.CANCELED)) == []
        assert (strategy.state.holding, strategy.state.entry) == (False, "")
        if isinstance(strategy.state, DonchianState):
            assert (strategy.state.stop, strategy.state.target) == (None, None)


# -- the Strategy API ---------------------------------------------------------------------------


class TestStrategyApi:
    def test_the_default_on_order_event_passes_only_fills_to_on_fill(self) -> None:
        """New, canceled and rejections are ignored; partial and full fills reach on_fill, whose
        intents take their ids from the event (index 0, then 1 for a second one)."""
        batch_time = T0 + timedelta(minutes=1)
        strategy = Echo("AAPL", EchoParams(), EchoState(), batch_time)
        quiet: list[OrderEvent | IntentRejected] = [
            order_event(Side.BUY, OrderStatus.NEW), order_event(Side.BUY, OrderStatus.CANCELED, "4"),
            rejected()]
        assert [i for event in quiet for i in strategy.on_order_event(event)] == []
        partial = order_event(Side.BUY, OrderStatus.PARTIALLY_FILLED, "4")
        full = order_event(Side.BUY, OrderStatus.FILLED, "10")
        out = [i for event in (partial, full) for i in strategy.on_order_event(event)]
        assert [(i.id, i.side, i.quantity) for i in out] == [
            (intent_id(Echo.name, "AAPL", partial.id, 0), Side.SELL, D(4)),
            (intent_id(Echo.name, "AAPL", full.id, 0), Side.SELL, D(10))]
        second = strategy.intent(full, Side.SELL, D(1), "again")
        assert second.id == intent_id(Echo.name, "AAPL", full.id, 1)
        assert (second.source, second.time) == (ECHO_SOURCE, batch_time)  # the batch's time, not the event's

    def test_an_intent_answering_an_event_without_a_clock_takes_the_events_time(self) -> None:
        """Outside a worker (no batch time) an intent built from an event is stamped with its time."""
        later = T0 + timedelta(hours=5)
        event = order_event(Side.BUY, OrderStatus.FILLED, "10").model_copy(update={"time": later})
        [answer] = Echo("AAPL", EchoParams(), EchoState()).on_order_event(event)
        assert answer.time == event.time


# -- the worker -----------------------------------------------------------------------------------


def echo_settings(plugin: str = Echo.name) -> Settings:
    """Settings of a worker running ``plugin`` on every symbol, with no warm-up."""
    return settings(plugin, warmup="none")


def pending(client: redis.Redis, stream_key: str) -> int:
    return int(client.xpending(stream_key, GROUP)["pending"])


def stored(client: redis.Redis, keys: Keys, name: str, symbol: str = "AAPL") -> StoredState:
    return StoredState.parse(client.get(keys.strategy_state(name, symbol)))


class TestWorkerEvents:
    def setup_feed(self, client: redis.Redis, keys: Keys) -> tuple[str, OrderEvent, IntentRejected]:
        """A bar, then a fill of a strategy order and a rejection of a strategy intent, on AAPL's
        partition: (the stream, the fill, the rejection)."""
        publish(client, keys, [bar("AAPL", 0, "100")])
        feed = feed_of(keys, ECHO_SOURCE)
        assert feed == keys.stream(keys.bar_partition(partition_of("AAPL", PARTITIONS)))
        fill = order_event(Side.BUY, OrderStatus.FILLED, "5", intent="e1", cid="bst-e1")
        refusal = rejected("e2")
        for message in (fill, refusal):
            client.xadd(feed, codec.encode(message))  # type: ignore[arg-type]
        return feed, fill, refusal

    def test_events_reach_on_order_event_in_order_and_commit_once(self, redis_client: redis.Redis,
                                                                  keys: Keys) -> None:
        """The bar, the fill and the rejection reach the strategy in stream order; the fill's answer
        is published with its event-derived id, the state committed, nothing left pending; a second
        worker after the commit applies nothing again."""
        feed, fill, refusal = self.setup_feed(redis_client, keys)
        seen = {"seen": ["bar 100", "filled 5", f"rejected {refusal.intent_id}"]}
        stats = worker(redis_client, keys, echo_settings()).run(threading.Event(), burst=True)
        assert (stats.applied, stats.events, stats.dead_lettered, stats.intents) == (1, 2, 0, 1)
        assert stored(redis_client, keys, Echo.name).state == seen
        [answer] = intents(redis_client, keys)
        assert answer.id == intent_id(Echo.name, "AAPL", fill.id, 0)
        assert (answer.side, answer.quantity, answer.source, answer.reason) == (
            Side.SELL, D(5), ECHO_SOURCE, "answer bst-e1")
        assert pending(redis_client, feed) == 0
        again = worker(redis_client, keys, echo_settings(), "w2").run(threading.Event(), burst=True)
        assert (again.applied, again.events, again.intents) == (0, 0, 0)
        assert len(intents(redis_client, keys)) == 1
        assert stored(redis_client, keys, Echo.name).state == seen

    def test_events_a_dead_holder_read_are_applied_once_by_the_next(self, redis_client: redis.Redis,
                                                                    keys: Keys) -> None:
        """Entries a killed holder read but never committed (bar and events) are applied once, in
        order, by the next worker: one answer to the fill, not two."""
        feed, fill, _ = self.setup_feed(redis_client, keys)
        partition = partition_of("AAPL", PARTITIONS)
        redis_client.xgroup_create(feed, GROUP, id="0")
        redis_client.xreadgroup(GROUP, consumer_name(partition), {feed: ">"}, count=2)  # then "dies"
        stats = worker(redis_client, keys, echo_settings()).run(threading.Event(), burst=True)
        assert (stats.applied, stats.events) == (1, 2)
        assert [i.id for i in intents(redis_client, keys)] == [intent_id(Echo.name, "AAPL", fill.id, 0)]
        assert stored(redis_client, keys, Echo.name).state == {"seen": ["bar 100", "filled 5", "rejected e2"]}
        assert pending(redis_client, feed) == 0

    def test_a_strategy_raising_on_an_event_dead_letters_it_and_the_bars_commit(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """An event whose on_order_event raises is dead-lettered with the reason, its state change
        undone; the bars around it in the same batch commit, with their intents."""
        publish(redis_client, keys, [bar("AAPL", 0, "100")])
        feed = feed_of(keys, f"strategy:{EventBoom.name}")
        fill = order_event(Side.BUY, OrderStatus.FILLED, "1", intent="e1")
        entry_id = redis_client.xadd(feed, codec.encode(fill))  # type: ignore[arg-type]
        publish(redis_client, keys, [bar("AAPL", 1, "101")])
        stats = worker(redis_client, keys, echo_settings(EventBoom.name)).run(threading.Event(), burst=True)
        assert (stats.applied, stats.events, stats.dead_lettered, stats.batches) == (2, 0, 1, 1)
        assert stored(redis_client, keys, EventBoom.name).state == {"seen": ["bar 100", "bar 101"]}
        assert [i.reason for i in intents(redis_client, keys)] == ["bar 100", "bar 101"]
        [(_, dead)] = entries(redis_client, keys.stream(DEAD_LETTER))
        reason = f"strategy {EventBoom.name} failed: RuntimeError: boom on order_event"
        assert dead[b"reason"] == reason.encode()
        assert dead[b"entry_id"] == entry_id and dead[b"source_stream"] == feed.encode()
        assert dead[b"original.id"] == fill.id.encode()
        assert pending(redis_client, feed) == 0

    def test_a_message_neither_bar_nor_event_is_dead_lettered(self, redis_client: redis.Redis,
                                                              keys: Keys) -> None:
        """An intent on a partition stream is dead-lettered as not a bar or an order event; the bar
        after it is applied."""
        feed = feed_of(keys, ECHO_SOURCE)
        stray = Intent(time=T0, source=ECHO_SOURCE, symbol="AAPL", side=Side.BUY, quantity=D(1))
        redis_client.xadd(feed, codec.encode(stray))  # type: ignore[arg-type]
        publish(redis_client, keys, [bar("AAPL", 0, "100")])
        stats = worker(redis_client, keys, echo_settings()).run(threading.Event(), burst=True)
        assert (stats.applied, stats.events, stats.dead_lettered) == (1, 0, 1)
        reasons = [f[b"reason"] for _, f in entries(redis_client, keys.stream(DEAD_LETTER))]
        assert reasons == [b"not a bar or an order event: intent"]
        assert stored(redis_client, keys, Echo.name).state == {"seen": ["bar 100"]}


# -- risk's routing -----------------------------------------------------------------------------

STRATEGY = "strategy:sma_crossover"


def risk_feed(desk: RiskDesk, source: str = STRATEGY, symbol: str = "AAPL") -> str:
    return feed_of(RISK_KEYS, source, symbol, desk.settings.ingester.partitions)


class TestRiskRoutes:
    def test_a_refused_strategy_intent_reaches_its_feed_once(self, desk: RiskDesk) -> None:
        """A strategy sell with no position is refused: one rejection on the rejections stream and
        the same one on the strategy's feed, nowhere else; the intent again adds nothing."""
        wish = risk_intent(Side.SELL, source=STRATEGY)
        for _ in range(2):
            desk.send(wish)
        [published] = desk.stream(REJECTIONS)
        assert isinstance(published, IntentRejected) and published.intent_id == wish.id
        assert "insufficient AAPL" in published.reason
        assert messages(desk.client, risk_feed(desk)) == [published]
        assert partition_entries(desk.client, RISK_KEYS, desk.settings.ingester.partitions) == 1

    def test_an_approved_intent_becomes_an_order_naming_its_source(self, desk: RiskDesk) -> None:
        """Risk copies the intent's source onto its order (what the executor routes by); an approval
        itself puts nothing on a feed."""
        desk.send(risk_intent(quantity=D(1), source=STRATEGY))
        desk.send(risk_intent(quantity=D(1)))
        assert [o.source for o in desk.orders()] == [STRATEGY, "manual"]
        assert partition_entries(desk.client, RISK_KEYS, desk.settings.ingester.partitions) == 0

    def test_a_refused_manual_intent_reaches_no_feed(self, desk: RiskDesk) -> None:
        """A manual intent refused the same way is published on the rejections stream only."""
        wish = risk_intent(Side.SELL)
        assert wish.source == "manual"
        desk.send(wish)
        desk.send(wish)
        assert [r.intent_id for r in desk.stream(REJECTIONS)] == [wish.id]
        assert partition_entries(desk.client, RISK_KEYS, desk.settings.ingester.partitions) == 0

    def test_a_deferred_entry_cancelled_by_its_strategy_reaches_the_feed_once(self, desk: RiskDesk) -> None:
        """A deferred strategy buy cancelled by the same strategy's sell: its rejection (and the sell's
        own refusal) go to the feed in the order they were published; the sell again adds nothing."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, D(40), D(150))
        buy = risk_intent(quantity=D(40), source=STRATEGY)
        desk.send(buy)
        assert desk.stream(REJECTIONS) == [] and len(desk.risk.deferred.entries()) == 1
        sell = risk_intent(Side.SELL, quantity=D(1), source=STRATEGY)
        desk.send(sell)
        desk.send(sell)
        published = desk.stream(REJECTIONS)
        assert [r.intent_id for r in published] == [buy.id, sell.id]
        assert "now signals sell" in published[0].reason
        assert messages(desk.client, risk_feed(desk)) == published

    def test_an_expired_deferred_entry_reaches_the_feed_once(self, desk: RiskDesk) -> None:
        """A deferred strategy buy that expires is rejected once, on the rejections stream and its feed
        (else the strategy holds an entry that never was)."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, D(40), D(150))
        buy = risk_intent(quantity=D(40), source=STRATEGY)
        desk.send(buy)
        assert len(desk.risk.deferred.entries()) == 1
        desk.clock.advance(timedelta(seconds=901))
        desk.bar("AAPL", "150")
        desk.bar("AAPL", "150")
        assert desk.risk.deferred.entries() == [] and desk.orders() == []
        [published] = desk.stream(REJECTIONS)
        assert published.intent_id == buy.id and "expired" in published.reason
        assert messages(desk.client, risk_feed(desk)) == [published]

    def test_a_deferred_entry_replaced_by_a_newer_one_reaches_the_feed_once(self, desk: RiskDesk) -> None:
        """A deferred strategy buy replaced by the strategy's newer buy is rejected once, naming the
        newer one; an older buy arriving after the newer is rejected too (never queued); the newer
        one waits."""
        desk.risk.portfolio.reserve("p1", "AAPL", Side.BUY, D(40), D(150))
        late = risk_intent(quantity=D(40), source=STRATEGY, time=T0 - timedelta(seconds=2))
        first = risk_intent(quantity=D(40), source=STRATEGY, time=T0 - timedelta(seconds=1))
        newer = risk_intent(quantity=D(41), source=STRATEGY)
        for wish in (first, newer, newer, late):
            desk.send(wish)
        published = desk.stream(REJECTIONS)
        assert [r.intent_id for r in published] == [first.id, late.id]
        assert f"replaced while deferred by the newer intent {newer.id}" in published[0].reason
        assert "a newer buy AAPL intent is deferred" in published[1].reason
        assert [e.intent.id for e in desk.risk.deferred.entries()] == [newer.id]
        assert messages(desk.client, risk_feed(desk)) == published

    def test_a_rejection_copy_never_trims_bars_the_strategy_group_has_not_read(self, desk: RiskDesk) -> None:
        """Copying a rejection to a partition keeps every entry the strategy group still needs (as the
        ingester's trim does): with bus.maxlen 5 and 300 undelivered entries, all 301 remain."""
        config = Settings(portfolio={"starting_cash": "10000"}, limits={"max_position_fraction": "1"},
                          bus={"maxlen": 5})
        desk.risk = RiskService(desk.client, RISK_KEYS, config, desk.clock, broker=desk.broker)
        feed = risk_feed(desk)
        desk.client.xgroup_create(feed, GROUP, id="0", mkstream=True)
        for minute in range(300):
            desk.client.xadd(feed, codec.encode(bar("AAPL", minute, "150")))  # type: ignore[arg-type]
        desk.send(risk_intent(Side.SELL, source=STRATEGY))
        assert len(desk.stream(REJECTIONS)) == 1
        assert desk.client.xlen(feed) == 301


@pytest.fixture
def desk() -> RiskDesk:
    """A fresh risk desk (test_risk's)."""
    return RiskDesk()


# -- the executor's routing -----------------------------------------------------------------------


def executor_feed(world: World | StopDesk, source: str) -> str:
    return feed_of(EXECUTOR_KEYS, source, "AAPL", world.executor.settings.ingester.partitions)


class TestExecutorRoutes:
    def test_events_of_a_strategy_order_reach_its_feed(self) -> None:
        """Each event the executor publishes for an order whose record names a strategy is also
        added to that strategy's feed, the same message, in the same order; nowhere else."""
        world = World()
        world.order = world.order.model_copy(update={"source": "strategy:x"})
        world.deliver()
        assert world.client.hget(EXECUTOR_KEYS.order("bst-i1"), "source") == b"strategy:x"
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        world.executor.apply_event(world.event(OrderStatus.PARTIALLY_FILLED, "4", "150", ("x1", "4", "150")))
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x2", "6", "150")))
        published = world.stream(ORDER_EVENTS)
        assert [(e.status, e.intent_id) for e in published] == [  # type: ignore[attr-defined]
            (OrderStatus.NEW, "i1"), (OrderStatus.PARTIALLY_FILLED, "i1"), (OrderStatus.FILLED, "i1")]
        assert messages(world.client, executor_feed(world, "strategy:x")) == published
        partitions = world.executor.settings.ingester.partitions
        assert partition_entries(world.client, EXECUTOR_KEYS, partitions) == len(published)

    @pytest.mark.parametrize("source", ["manual", ""])
    def test_events_of_a_manual_order_reach_no_feed(self, source: str) -> None:
        """An order from a manual intent (or with no source) has its events on order-events only."""
        world = World()
        world.order = world.order.model_copy(update={"source": source})
        world.deliver()
        world.executor.apply_event(world.event(OrderStatus.FILLED, "10", "150", ("x1", "10", "150")))
        assert len(world.stream(ORDER_EVENTS)) == 2
        partitions = world.executor.settings.ingester.partitions
        assert partition_entries(world.client, EXECUTOR_KEYS, partitions) == 0

    def test_a_protective_stop_fill_reaches_the_entrys_feed_with_its_intent_id(self) -> None:
        """The stop of a strategy's entry is recorded with the entry's source; its fill reaches the
        feed as a sell carrying the entry's intent id, which ends the entry."""
        desk = StopDesk()
        desk.entry = desk.entry.model_copy(update={"source": "strategy:x"})
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        assert desk.record("bst-i1-sl1")["source"] == "strategy:x"
        desk.report("bst-i1-sl1", Side.SELL, OrderStatus.FILLED, "10", price="140")
        fed = messages(desk.client, executor_feed(desk, "strategy:x"))
        assert fed == messages(desk.client, EXECUTOR_KEYS.stream(ORDER_EVENTS))
        last = fed[-1]
        assert isinstance(last, OrderEvent)
        assert (last.client_order_id, last.side, last.status, last.intent_id) == (
            "bst-i1-sl1", Side.SELL, OrderStatus.FILLED, "i1")
        assert entry_ended(last, "i1")

    def test_a_flatten_of_a_strategy_entry_carries_its_source(self) -> None:
        """The market flatten placed when no stop could be, carries the entry's source and intent id
        to the feed."""
        desk = StopDesk()
        desk.entry = desk.entry.model_copy(update={"source": "strategy:x"})
        desk.refuse_stops = 99
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        for wait in (1.0, 2.0):
            desk.clock.advance(timedelta(seconds=wait))
            desk.executor.protect_pending()
        assert desk.record("bst-i1-flat3")["source"] == "strategy:x"
        desk.report("bst-i1-flat3", Side.SELL, OrderStatus.FILLED, "10", price="145")
        last = messages(desk.client, executor_feed(desk, "strategy:x"))[-1]
        assert isinstance(last, OrderEvent)
        assert (last.client_order_id, last.side, last.status, last.intent_id) == (
            "bst-i1-flat3", Side.SELL, OrderStatus.FILLED, "i1")
        assert entry_ended(last, "i1")

    def test_a_stop_fill_routed_by_the_executor_clears_the_strategys_holding(self) -> None:
        """End to end: the executor routes a filled stop of an SMA entry to the feed, and a strategy
        worker on the same settings runs it through the strategy: holding is cleared."""
        desk = StopDesk()
        desk.entry = desk.entry.model_copy(update={"source": STRATEGY})
        state_key = EXECUTOR_KEYS.strategy_state(SmaCrossover.name, "AAPL")
        held = SmaState(holding=True, entry="i1", closes=[D(150)] * 3, fast_above=True)
        desk.client.set(state_key, StoredState(held.model_dump(mode="json"), None, T0).dump())
        desk.submit_entry()
        desk.report("bst-i1", Side.BUY, OrderStatus.FILLED, "10")
        desk.report("bst-i1-sl1", Side.SELL, OrderStatus.FILLED, "10", price="140")
        config = Settings(strategy=StrategySettings(plugins={"*": SmaCrossover.name}, warmup="none"))
        assert config.ingester.partitions == desk.settings.ingester.partitions
        runner = StrategyWorker(desk.client, EXECUTOR_KEYS, config, SimulatedClock(T0), "w1",
                                Catalog(config.strategy))
        stats = runner.run(threading.Event(), burst=True)
        # the entry's new and filled, the stop's new and filled
        assert (stats.events, stats.dead_lettered, stats.intents) == (4, 0, 0)
        state = StoredState.parse(desk.client.get(state_key)).state
        assert state is not None and (state["holding"], state["entry"]) == (False, "")
