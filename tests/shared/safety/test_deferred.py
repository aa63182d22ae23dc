"""Tests for shared.safety.deferred: one entry per symbol and side, newer replaces older, expiry,
revalidation.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import redis

from shared.clock import SimulatedClock
from shared.keys import Keys
from shared.models import Side
from shared.safety.deferred import DeferredIntent, DeferredQueue
from tests.support.factories import intent


class TestDeferredQueue:
    def test_one_entry_per_symbol_and_side_newer_replaces_older(self, redis_client: redis.Redis,
                                                               keys: Keys) -> None:
        """A newer AAPL buy replaces the older; an AAPL sell and an MSFT buy each get their own entry."""
        clock = SimulatedClock()
        queue = DeferredQueue(redis_client, keys, clock)
        assert queue.defer(intent(quantity=D("10"), time=clock.now()), "market closed", score=D("0.8"))
        clock.advance(timedelta(seconds=1))
        newer = intent(quantity=D("20"), time=clock.now())
        assert queue.defer(newer, "market closed", score=D("0.9"))
        queue.defer(intent(Side.SELL, time=clock.now()), "cash reserved")
        queue.defer(intent(symbol="MSFT", time=clock.now()), "market closed")
        assert redis_client.hlen(keys.deferred) == 3
        entry = queue.get("AAPL", Side.BUY)
        assert entry is not None and entry.intent == newer and entry.score == D("0.9")

    def test_a_replaced_entry_is_reported_dropped_and_a_redelivery_is_not(self, redis_client: redis.Redis,
                                                                         keys: Keys) -> None:
        """``on_dropped`` hears of the older entry a newer intent replaced, with why; the same intent
        stored again (a redelivery) and a late older intent (refused) report nothing."""
        clock = SimulatedClock()
        dropped: list[tuple[str, str]] = []
        queue = DeferredQueue(redis_client, keys, clock,
                              on_dropped=lambda entry, why: dropped.append((entry.intent.id, why)))
        old = intent(quantity=D("10"), time=clock.now())
        queue.defer(old, "closed")
        queue.defer(old, "closed")
        assert dropped == []
        clock.advance(timedelta(seconds=1))
        new = intent(quantity=D("20"), time=clock.now())
        assert queue.defer(new, "closed")
        assert not queue.defer(old, "closed")
        assert dropped == [(old.id, f"replaced while deferred by the newer intent {new.id}")]

    def test_an_older_intent_arriving_late_never_replaces_a_newer(self, redis_client: redis.Redis,
                                                                  keys: Keys) -> None:
        """A redelivered older intent is refused and the newer one stays queued."""
        clock = SimulatedClock()
        queue = DeferredQueue(redis_client, keys, clock)
        old = intent(quantity=D("10"), time=clock.now())
        clock.advance(timedelta(seconds=5))
        new = intent(quantity=D("20"), time=clock.now())
        queue.defer(new, "closed")
        assert not queue.defer(old, "closed")
        entry = queue.get("AAPL", "buy")
        assert entry is not None and entry.intent.id == new.id

    def test_stale_entries_expire_on_time(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An entry is listed until its max age and is gone (swept from Redis) at it."""
        clock = SimulatedClock()
        queue = DeferredQueue(redis_client, keys, clock, max_age_s=60)
        queue.defer(intent(time=clock.now()), "closed")
        clock.advance(timedelta(seconds=60) - timedelta(microseconds=1))
        assert len(queue.entries()) == 1
        clock.advance(timedelta(microseconds=1))
        assert queue.entries() == []
        assert queue.drain(lambda entry: None) == []
        assert not redis_client.exists(keys.deferred)

    def test_drain_revalidates_and_a_dropped_score_cancels(self, redis_client: redis.Redis,
                                                          keys: Keys) -> None:
        """The hook passes a still-strong signal and cancels one whose score dropped; both leave the queue."""
        clock = SimulatedClock()
        queue = DeferredQueue(redis_client, keys, clock)
        queue.defer(intent(symbol="AAPL", time=clock.now()), "closed", score=D("0.9"))
        queue.defer(intent(symbol="MSFT", time=clock.now()), "closed", score=D("0.9"))
        current = {"AAPL": D("0.85"), "MSFT": D("0.2")}

        def revalidate(entry: DeferredIntent) -> str | None:
            now = current[entry.intent.symbol]
            return f"score dropped from {entry.score} to {now}" if now < D("0.5") else None

        ready = queue.drain(revalidate)
        assert [entry.intent.symbol for entry in ready] == ["AAPL"]
        assert queue.entries() == []

    def test_each_entry_is_handed_out_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Two drains (two risk processes) never both get the same entry."""
        clock = SimulatedClock()
        queue = DeferredQueue(redis_client, keys, clock)
        queue.defer(intent(time=clock.now()), "closed")
        other = DeferredQueue(redis_client, keys, clock)
        assert len(queue.drain(lambda entry: None)) == 1
        assert other.drain(lambda entry: None) == []

    def test_survives_a_restart_and_cancel(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A new queue object over the same Redis lists the entry; cancel removes it."""
        clock = SimulatedClock()
        DeferredQueue(redis_client, keys, clock).defer(intent(time=clock.now()), "closed")
        fresh = DeferredQueue(redis_client, keys, clock)
        [entry] = fresh.entries()
        assert entry.reason == "closed" and entry.intent.quantity == D(10)
        assert fresh.cancel("AAPL", Side.BUY) and fresh.entries() == []
