"""A strategy worker: serves the bar partitions it leases, one batch per partition in turn.

Concurrency model: one thread. The loop (1) every ``lease_ms/3`` renews its leases and takes or
gives up partitions to hold its fair share (:mod:`._leases`); (2) for each held partition reads
one batch of at most ``strategy.batch`` entries and applies it in one transaction; (3) when no
partition had anything, blocks in one ``XREAD`` over every held partition for at most
``strategy.idle_wait_ms`` (never past the next lease upkeep). A stop request ends the loop after
the batch in hand; ``finally`` releases the leases.

Each partition stream is read in consumer group ``strategy`` under the consumer name
``partition-<n>`` -- the partition's name, not the process's -- so whoever holds the lease sees
the entries a previous holder read and never acknowledged. Every batch first reads that pending
list (``XREADGROUP ... 0``) and only when it is empty reads new entries (``>``): entries are
applied in stream order, which is each symbol's time order.

Exactly-once effect, per batch, in one MULTI/EXEC under WATCH of the lease key and of the state
keys of the batch's symbols:

* the lease still names this worker (checked after WATCH, so a holder that stalled past its
  lease can never commit: the new holder's ``SET NX`` changed the key);
* every symbol's state document records the stream entry and the bar time last applied; a bar
  not newer than that is skipped (a redelivery, or a duplicate XADD from a retried publish);
* the states, the intents (``XADD intents``, ids derived from strategy, symbol and bar), any
  dead letters, and the ``XACK`` of every entry of the batch commit together or not at all.

A redelivery, as a timeline::

    time 0   worker A reads entries 7-0..9-0 of partition 2 (pending for "partition-2")
    time 1   A is SIGKILLed before EXEC: no state, no intent, no ack was written
    time 6   A's lease expires; worker B's upkeep takes partition 2
    time 6   B reads partition-2's pending list from 0: 7-0..9-0 again, applies them in order

An entry that is not a bar, cannot be decoded, or whose strategy raised is dead-lettered (with
the reason) in the same transaction; a failing strategy's state is rebuilt from the committed
state plus the batch's earlier bars, so the failure leaves no half-applied state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from services.strategy._api import Binding, Catalog, Strategy
from services.strategy._leases import PartitionLeases
from shared import codec
from shared.bus import trim
from shared.clock import Clock
from shared.config import Settings
from shared.errors import CodecError, RedisUnavailable
from shared.heartbeat import alive_instances
from shared.keys import INTENTS, Keys
from shared.logging import bind_correlation, get_logger
from shared.models import Bar, Intent

__all__ = ["GROUP", "SERVICE", "StoredState", "StrategyWorker", "WorkerStats", "consumer_name"]

log = get_logger(component="strategy")
GROUP = "strategy"
SERVICE = "strategy"
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


def consumer_name(partition: int) -> str:
    """The fixed consumer name of a partition in group ``strategy``."""
    return f"partition-{partition}"


@dataclass
class StoredState:
    """What ``<prefix>:strategy:<name>:<SYMBOL>`` holds (JSON): the strategy's state and its mark."""

    state: dict[str, Any] | None = None
    entry: str | None = None  # partition stream entry last applied
    bar_time: datetime | None = None  # time of the bar last applied

    @classmethod
    def parse(cls, raw: bytes | str | None) -> StoredState:
        """Read the stored JSON (None: nothing stored yet)."""
        if raw is None:
            return cls()
        doc = json.loads(raw)
        when = doc.get("bar_time")
        return cls(doc.get("state"), doc.get("entry"), datetime.fromisoformat(when) if when else None)

    def dump(self) -> str:
        """The JSON to store."""
        when = self.bar_time.isoformat() if self.bar_time else None
        return json.dumps({"entry": self.entry, "bar_time": when, "state": self.state}, separators=(",", ":"))


@dataclass
class WorkerStats:
    """Counters of one worker's life."""

    applied: int = 0  # bars run through a strategy
    skipped: int = 0  # bars already applied (redelivered or duplicated)
    unrouted: int = 0  # bars of symbols that run no strategy
    intents: int = 0
    dead_lettered: int = 0
    batches: int = 0
    refused_commits: int = 0  # transactions aborted because the lease or a state changed


@dataclass
class _Slot:
    """One symbol's strategy during one batch."""

    binding: Binding
    key: str
    stored: StoredState
    strategy: Strategy[Any, Any]
    applied: list[tuple[int, Bar]] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return bool(self.applied)


class StrategyWorker:
    """Holds partition leases and applies their bars; :meth:`run` is the service loop."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, clock: Clock, instance: str,
                 catalog: Catalog, status: MutableMapping[str, Any] | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.config = settings.strategy
        self.clock = clock
        self.instance = instance
        self.catalog = catalog
        self.status = status if status is not None else {}
        self.partitions = settings.ingester.partitions
        self.leases = PartitionLeases(client, keys, instance, self.partitions, self.config.lease_ms)
        self.stats = WorkerStats()
        self._intents_key = keys.stream(INTENTS)
        self._groups: set[int] = set()
        self._last_seen: dict[int, str] = {}
        self._intents_since_trim = 0
        self._next_upkeep = 0.0
        self._backoff = 0.0

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: Any, *, burst: bool = False) -> WorkerStats:
        """Serve partitions until ``stop`` is set (``burst``: until a full pass finds nothing)."""
        try:
            while not stop.is_set():
                try:
                    if self.clock.monotonic() >= self._next_upkeep:
                        self.upkeep()
                    handled = 0
                    for partition in list(self.leases.held):
                        handled += self.step(partition)
                        if stop.is_set():
                            break
                    if handled:
                        self._backoff = 0.0
                        continue
                    if burst:
                        break
                    self._idle(stop)
                except (RedisUnavailable, *_REDIS_DOWN) as exc:
                    self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
                    log.warning("strategy.redis_unavailable", error=str(exc), retry_in_s=self._backoff)
                    stop.wait(self._backoff)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("strategy.group_missing", error=str(exc))  # Redis restarted empty
                    self._groups.clear()
        finally:
            try:
                self.leases.release_all()
            except redis.RedisError as exc:
                log.warning("strategy.release_failed", error=str(exc))
        return self.stats

    def upkeep(self) -> None:
        """Renew leases and rebalance to a fair share of the partitions."""
        live = len(alive_instances(self.client, self.keys, SERVICE))
        gained, _ = self.leases.upkeep(live)
        for partition in gained:
            self._last_seen.pop(partition, None)
        self._next_upkeep = self.clock.monotonic() + self.config.lease_ms / 3000
        self.status["partitions"] = sorted(self.leases.held)
        self.status["applied"] = self.stats.applied

    def _idle(self, stop: Any) -> None:
        """Wait for a new entry on any held partition, at most until the next upkeep."""
        wait_s = min(self.config.idle_wait_ms / 1000, max(0.001, self._next_upkeep - self.clock.monotonic()))
        held = list(self.leases.held)
        if not held or any(n not in self._last_seen for n in held):
            stop.wait(wait_s)
            return
        started = self.clock.monotonic()
        streams: Any = {self._stream_key(n): self._last_seen[n] for n in held}
        reply = self.client.xread(streams, count=1, block=max(1, int(wait_s * 1000)))
        if not reply and self.clock.monotonic() - started < wait_s / 2:
            self._backoff = min(max(self._backoff * 2, 0.002), 0.05)  # the server did not block
            stop.wait(self._backoff)

    # -- one batch ----------------------------------------------------------------------------

    def _stream_key(self, partition: int) -> str:
        return self.keys.stream(self.keys.bar_partition(partition))

    def _ensure_group(self, partition: int) -> None:
        if partition in self._groups:
            return
        stream_key = self._stream_key(partition)
        names: set[str] = set()
        if self.client.exists(stream_key):  # avoid the BUSYGROUP error reply in the common case
            names = {_text(g["name"]) for g in self.client.xinfo_groups(stream_key)}
        if GROUP not in names:
            try:
                self.client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups.add(partition)

    def _read(self, partition: int, start: str) -> list[tuple[Any, Any]]:
        streams: Any = {self._stream_key(partition): start}
        reply: Any = self.client.xreadgroup(GROUP, consumer_name(partition), streams, count=self.config.batch)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return list(next(iter(reply.values()))[0])
        return list(reply[0][1])

    def step(self, partition: int) -> int:
        """Apply one batch of ``partition`` (pending entries first); the number of entries handled."""
        self._ensure_group(partition)
        entries = self._read(partition, "0")
        fresh = not entries
        if fresh:
            entries = self._read(partition, ">")
            if not entries:
                if partition not in self._last_seen:
                    last: Any = self.client.xrevrange(self._stream_key(partition), "+", "-", count=1)
                    self._last_seen[partition] = _text(last[0][0]) if last else "0-0"
                return 0
            self._last_seen[partition] = _text(entries[-1][0])
        return self._apply(partition, entries, fresh=fresh)

    def _apply(self, partition: int, entries: Sequence[tuple[Any, Any]], *, fresh: bool) -> int:
        stream_key = self._stream_key(partition)
        decoded = [_decode(_text(raw_id), fields) for raw_id, fields in entries]
        bindings: dict[str, Binding] = {}
        for _, bar, _, _ in decoded:
            if bar is not None and bar.symbol not in bindings:
                binding = self.catalog.binding(bar.symbol)
                if binding is not None:
                    bindings[bar.symbol] = binding
        state_keys = {symbol: self.keys.strategy_state(b.cls.name, symbol) for symbol, b in bindings.items()}
        lease_key = self.leases.key(partition)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(lease_key, *state_keys.values())  # type: ignore[no-untyped-call]
                values: Any = pipe.mget([lease_key, *state_keys.values()])
                if values[0] is None or _text(values[0]) != self.instance:
                    self.leases.drop(partition)
                    return 0
                if fresh and int(pipe.xpending(stream_key, GROUP)["pending"]) > len(entries):
                    # a reply was lost after the server moved entries to our pending list: read
                    # the pending list (in order) on the next step instead of skipping past them
                    log.warning("strategy.lost_reply", partition=partition)
                    return 0
                now = self.clock.now()
                slots = {symbol: self._slot(symbol, bindings[symbol], state_keys[symbol], raw, now)
                         for symbol, raw in zip(state_keys, values[1:], strict=True)}
                intents, dead = self._run_bars(decoded, slots, now)
                pipe.multi()
                for slot in slots.values():
                    if slot.dirty:
                        pipe.set(slot.key, slot.stored.dump())
                    slot.strategy.queue_effects(pipe, self.keys)
                for intent in intents:
                    pipe.xadd(self._intents_key, codec.encode(intent))  # type: ignore[arg-type]
                for entry_id, fields, reason in dead:
                    pipe.xadd(self.keys.dead_letter, self._dead_record(partition, entry_id, fields, reason))
                pipe.xack(stream_key, GROUP, *[_text(raw_id) for raw_id, _ in entries])
                pipe.execute()
            except redis.WatchError:
                self.stats.refused_commits += 1
                owner = self.client.get(lease_key)
                log.warning("strategy.commit_refused", partition=partition,
                            lease_owner=_text(owner) if owner is not None else None)
                if owner is None or _text(owner) != self.instance:
                    self.leases.drop(partition)
                return 0
        self.stats.batches += 1
        self.stats.intents += len(intents)
        self.stats.dead_lettered += len(dead)
        for entry_id, _, reason in dead:
            log.error("strategy.dead_lettered", partition=partition, entry_id=entry_id, reason=reason)
        for intent in intents:
            log.info("strategy.intent", intent_id=intent.id, symbol=intent.symbol, side=str(intent.side),
                     quantity=str(intent.quantity), source=intent.source, reason=intent.reason)
        self._intents_since_trim += len(intents)
        if self._intents_since_trim >= self.settings.bus.trim_every:
            trim(self.client, self._intents_key, self.settings.bus.maxlen)
            self._intents_since_trim = 0
        return len(entries)

    def _slot(self, symbol: str, binding: Binding, key: str, raw: Any, now: datetime) -> _Slot:
        stored = StoredState.parse(raw)
        return _Slot(binding, key, stored, binding.build(symbol, stored.state, now))

    def _run_bars(self, decoded: Sequence[tuple[str, Bar | None, Any, str]], slots: Mapping[str, _Slot],
                  now: datetime) -> tuple[list[Intent], list[tuple[str, Any, str]]]:
        tagged: list[tuple[int, str, Intent]] = []
        dead: list[tuple[str, Any, str]] = []
        for seq, (entry_id, bar, fields, reason) in enumerate(decoded):
            if bar is None:
                dead.append((entry_id, fields, reason))
                continue
            slot = slots.get(bar.symbol)
            if slot is None:
                self.stats.unrouted += 1
                continue
            mark = slot.stored.bar_time
            if mark is not None and bar.time <= mark:
                self.stats.skipped += 1
                log.info("strategy.bar_already_applied", symbol=bar.symbol, entry_id=entry_id,
                         bar_time=bar.time.isoformat(), applied_through=mark.isoformat())
                continue
            with bind_correlation(symbol=bar.symbol, entry_id=entry_id, message_id=bar.id):
                try:
                    out = slot.strategy.on_bar(bar)
                except Exception as exc:
                    log.exception("strategy.on_bar_failed", strategy=slot.binding.cls.name)
                    dead.append((entry_id, fields,
                                 f"strategy {slot.binding.cls.name} failed: {type(exc).__name__}: {exc}"))
                    tagged = [t for t in tagged if t[1] != bar.symbol]
                    tagged.extend(self._replay(slot, now))
                    continue
            slot.applied.append((seq, bar))
            slot.stored.entry, slot.stored.bar_time = entry_id, bar.time
            tagged.extend((seq, bar.symbol, intent) for intent in out)
            self.stats.applied += 1
        for slot in slots.values():
            if slot.dirty:
                slot.stored.state = slot.strategy.state.model_dump(mode="json")
        tagged.sort(key=lambda t: t[0])
        return [intent for _, _, intent in tagged], dead

    def _replay(self, slot: _Slot, now: datetime) -> list[tuple[int, str, Intent]]:
        """Rebuild a failed strategy from its committed state and re-apply the batch's earlier bars."""
        slot.strategy = slot.binding.build(slot.strategy.symbol, slot.stored.state, now)
        out: list[tuple[int, str, Intent]] = []
        for seq, bar in slot.applied:
            out.extend((seq, bar.symbol, intent) for intent in slot.strategy.on_bar(bar))
        return out

    def _dead_record(self, partition: int, entry_id: str, fields: Any, reason: str) -> Any:
        record: dict[str | bytes, str | bytes] = {
            "source_stream": self._stream_key(partition),
            "group": GROUP,
            "consumer": consumer_name(partition),
            "entry_id": entry_id,
            "reason": reason,
            "deliveries": "1",
            "failed_at": self.clock.now().isoformat(),
        }
        for key, value in (fields or {}).items():
            record[b"original." + (key if isinstance(key, bytes) else str(key).encode())] = value
        return record


def _decode(entry_id: str, fields: Any) -> tuple[str, Bar | None, Any, str]:
    """(entry id, bar or None, fields, reason it is not a bar)."""
    if not fields:
        return entry_id, None, {}, "entry has no fields (trimmed while pending)"
    try:
        message = codec.decode(fields)
    except CodecError as exc:
        return entry_id, None, fields, f"undecodable: {exc.reason}"
    if not isinstance(message, Bar):
        return entry_id, None, fields, f"not a bar: {message.TYPE}"
    return entry_id, message, fields, ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
