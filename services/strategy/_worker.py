"""A strategy worker: serves the bar partitions it leases, every one of them in each pass.

Guarantee: each bar of a partition is applied exactly once, in stream order (each symbol's time
order), by whichever worker holds the partition's lease. A pass reads a batch from every held
partition in one round trip and commits their effects in one script (``_COMMIT_SCRIPT``): the
states, the intents (ids derived from strategy, symbol and bar), the dead letters, the
strategies' :meth:`~services.strategy.Strategy.queue_effects` and the group's acknowledgement
or move past the entries read, all or nothing. The commit is refused, writing nothing, when a
lease no longer names this worker, a state key changed since this worker read or wrote it, or
the group moved since the read; the entries are then read again. A bar not newer than the one a
symbol's state records is skipped. docs/STRATEGIES.md tells the reading protocol (pending list,
cursor) and a redelivery as a timeline.

The partition streams also carry the events of the strategies' own orders (the executor's
order events, risk's rejections, routed by :meth:`~shared.keys.Keys.strategy_feed`): each is run
through ``on_order_event`` in stream order and committed like a bar (no bar-time mark).

Each strategy sees the account as read once for the pass (:mod:`._view`); a symbol whose state
has no bar applied yet is first warmed up on recent history (:mod:`._warmup`), its intents
discarded, its state committed with the pass.

An entry that is not a bar, cannot be decoded, or whose strategy raised is dead-lettered with
the reason in the same commit. Left to the strategy: be deterministic in its state, bars and
account view (no clock, no I/O), since a refused commit runs it again on the same bars.

One thread. A stop request ends the loop after the batches in hand; the leases are released.
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
from services.strategy._view import AccountReader, AccountView
from services.strategy._warmup import Need, warm, warm_up
from shared.bus import codec, trim
from shared.clock import Clock
from shared.config import Settings
from shared.errors import CodecError, RedisCommandFailed, RedisUnavailable
from shared.heartbeat import alive_instances
from shared.keys import INTENTS, Keys
from shared.logging import bind_correlation, get_logger
from shared.models import Bar, Intent, IntentRejected, OrderEvent
from shared.redis.boundary import WaitOut, redis_errors
from shared.redis.client import reply_text, script

__all__ = ["GROUP", "SERVICE", "StoredState", "StrategyWorker", "WorkerStats", "consumer_name"]

log = get_logger(component="strategy")
Fed = Bar | OrderEvent | IntentRejected  # what a partition stream carries to a strategy
GROUP = "strategy"
SERVICE = "strategy"

# A pass's commit, checked and applied atomically.
# KEYS[1..n] = the lease keys of the partitions read; KEYS[n+1..n+m] = the state keys of their
# symbols; KEYS[n+m+1..] = the partition streams of the batches read after a cursor (c of them)
# ARGV[1] = this worker's name; ARGV[2] = n; ARGV[3] = m; ARGV[4..3+m] = each state key's value as
# this worker last read or wrote it ("" for none); then the group; then for each of the c streams
# its consumer, cursor, entry count and last entry id; then the number of commands, then each
# command as its argument count followed by its arguments (the states, intents, dead letters,
# effects, the XACKs of the pending batches)
# returns {"ok"}; or, writing nothing, {"lease", i} when lease KEYS[i] no longer names this worker,
# {"state", i} when state KEYS[i] is not what this worker last saw, {"cursor", i} when the group's
# last-delivered-id on stream KEYS[i] is not the cursor its batch was read after, {"claim", i}
# when the group, delivered the batch by XREADGROUP, got other entries (they stay pending)
# A batch read after a cursor is delivered by XGROUP SETID to its last id with ENTRIESREAD moved
# on by its size (no entry can appear between the cursor and that id, and none the group was not
# delivered is ever trimmed); where the group's entries-read is unknown (nil), by XREADGROUP,
# which lets the server count, and XACK.
_COMMIT_SCRIPT = """
local unpack = unpack or table.unpack
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
    if redis.call('GET', KEYS[i]) ~= ARGV[1] then return {'lease', i} end
end
for i = n + 1, n + m do
    if (redis.call('GET', KEYS[i]) or '') ~= ARGV[3 + i - n] then return {'state', i} end
end
local group = ARGV[4 + m]
local claims = {}
local at = 5 + m
for i = n + m + 1, #KEYS do
    claims[#claims + 1] = {i, ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3]}
    at = at + 4
end
for _, claim in ipairs(claims) do
    local found = nil
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[claim[1]])) do
        local fields = {}
        for j = 1, #info, 2 do fields[info[j]] = info[j + 1] end
        if fields['name'] == group then found = fields end
    end
    if found == nil or found['last-delivered-id'] ~= claim[3] then return {'cursor', claim[1]} end
    claim[6] = tonumber(found['entries-read'])
end
-- deliver: where the group's read count is unknown, by reading (the server counts), checked to
-- be exactly the batch (else stop: what was delivered stays pending); then, where it is known,
-- by moving the cursor and the count (nothing can be refused after that)
for _, claim in ipairs(claims) do
    if claim[6] == nil then
        local got = redis.call('XREADGROUP', 'GROUP', group, claim[2], 'COUNT', claim[4],
                               'STREAMS', KEYS[claim[1]], '>')
        local entries = {}
        if got and #got > 0 then  -- {{stream, entries}}; fakeredis: {stream, entries}, or {} for none
            entries = type(got[1]) == 'table' and got[1][2] or got[2]
        end
        if #entries ~= claim[4] or entries[#entries][1] ~= claim[5] then return {'claim', claim[1]} end
        claim[7] = entries
    end
end
for _, claim in ipairs(claims) do
    if claim[6] ~= nil then
        redis.call('XGROUP', 'SETID', KEYS[claim[1]], group, claim[5], 'ENTRIESREAD', claim[6] + claim[4])
    else
        local ids = {}
        for j, entry in ipairs(claim[7]) do ids[j] = entry[1] end
        for start = 1, #ids, 1000 do  -- unpack has a stack limit
            redis.call('XACK', KEYS[claim[1]], group, unpack(ids, start, math.min(start + 999, #ids)))
        end
    end
end
local commands = tonumber(ARGV[at]); at = at + 1
for _ = 1, commands do
    local count = tonumber(ARGV[at]); at = at + 1
    redis.call(unpack(ARGV, at, at + count - 1))
    at = at + count
end
return {'ok'}
"""


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
    events: int = 0  # order events and rejections run through a strategy
    warmed: int = 0  # history bars run through a fresh strategy before its first live bar
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
    account: AccountView
    strategy: Strategy[Any, Any]
    applied: list[tuple[int, Fed]] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return bool(self.applied)


@dataclass
class _Batch:
    """Entries of one partition read in one pass: from its pending list, or after its cursor."""

    partition: int
    entries: list[tuple[Any, Any]]
    drains: bool = True  # once it commits, the partition's pending list is empty
    cursor: str | None = None  # read after this cursor (delivered by the commit); None: pending

    @property
    def last_id(self) -> str:
        return reply_text(self.entries[-1][0])


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
        self.accounts = AccountReader(client, keys, settings, clock)
        self.warmup = warm_up(settings, client, clock)
        self._intents_key = keys.stream(INTENTS)
        self._groups: set[int] = set()
        self._cursors: dict[int, str] = {}  # partition -> the group's last-delivered-id, as last known
        self._drained: set[int] = set()  # partitions whose pending list is known to be empty
        self._waited: list[_Batch] | None = None  # what the idle wait read (None: no wait since)
        self._more = False  # the last pass may have left entries to read (a full batch, a pending list)
        self._intents_since_trim = 0
        self._states: dict[str, bytes | None] = {}  # state key -> its value as last read or committed
        self._next_upkeep = 0.0
        self._backoff = 0.0  # while the server returns at once from a blocking read

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: Any, *, burst: bool = False) -> WorkerStats:
        """Serve partitions until ``stop`` is set (``burst``: until a pass finds nothing)."""
        outage = WaitOut()
        try:
            while not stop.is_set():
                try:
                    with redis_errors("strategy pass"):
                        if self.clock.monotonic() >= self._next_upkeep:
                            self.upkeep()
                        progressed = self.step()
                    if progressed:
                        self._backoff = 0.0
                        outage.reset()
                        if self._more or burst:
                            continue
                    elif burst:
                        break
                    with redis_errors("strategy idle wait"):
                        self._idle(stop)
                except RedisUnavailable as exc:  # down, or refusing writes (a refused commit wrote nothing)
                    self._forget()  # a commit whose reply was lost may or may not have been applied
                    outage.wait(stop, log, "strategy.redis_unavailable", exc)
                    continue
                except RedisCommandFailed as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("strategy.group_missing", error=str(exc))  # Redis restarted empty
                    self._groups.clear()
                    self._forget()
        finally:
            try:
                with redis_errors("releasing leases"):
                    self.leases.release_all()
            except (RedisUnavailable, RedisCommandFailed) as exc:
                log.warning("strategy.release_failed", error=str(exc))
        return self.stats

    def upkeep(self) -> None:
        """Renew leases and rebalance to a fair share of the partitions."""
        live = len(alive_instances(self.client, self.keys, SERVICE))
        gained, lost = self.leases.upkeep(live)
        self._drained.difference_update(gained + lost)
        for partition in gained + lost:
            self._cursors.pop(partition, None)
        if gained or lost:
            self._states.clear()  # another holder may have written states meanwhile
            self._waited = None
        self._next_upkeep = self.clock.monotonic() + self.config.lease_ms / 3000
        self.status["partitions"] = sorted(self.leases.held)
        self.status["applied"] = self.stats.applied

    def _forget(self) -> None:
        """Drop what this worker knows of the server (after an error): re-read it before using it."""
        self._drained.clear()
        self._cursors.clear()
        self._states.clear()
        self._waited = None

    def _idle(self, stop: Any) -> None:
        """Wait for a new entry on any held partition, at most until the next upkeep; what the wait
        read is the next pass's batches."""
        wait_s = min(self.config.idle_wait_ms / 1000, max(0.001, self._next_upkeep - self.clock.monotonic()))
        held = [n for n in self.leases.held if n in self._cursors]
        if not held or len(held) < len(self.leases.held):
            stop.wait(wait_s)
            return
        started = self.clock.monotonic()
        self._waited = self._read_after_cursors(held, block_ms=max(1, int(wait_s * 1000)))
        if not self._waited and self.clock.monotonic() - started < wait_s / 2:
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
            names = {reply_text(g["name"]) for g in self.client.xinfo_groups(stream_key)}
        if GROUP not in names:
            try:
                self.client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups.add(partition)

    def step(self) -> int:
        """One pass: a batch of every held partition, read in one round trip, applied in one commit.

        Returns the number of entries the pass had in hand: applied, or (commit refused) left to
        be read again by the next pass. After an idle wait the batches are what the wait read.
        """
        held = list(self.leases.held)
        waited, self._waited = self._waited, None
        for partition in held:
            self._ensure_group(partition)
        unknown = [n for n in held if n not in self._drained or n not in self._cursors]
        batches = self._read_pending(unknown) if unknown else []
        if waited is not None and not unknown:
            batches += [b for b in waited if b.partition in self.leases.held
                        and self._cursors.get(b.partition) == b.cursor]
        elif not batches:
            batches = self._read_after_cursors([n for n in held if n in self._cursors], block_ms=None)
        count = self._apply(batches) if batches else 0
        self._more = any(len(b.entries) >= self.config.batch for b in batches) or any(
            n not in self._drained or n not in self._cursors for n in self.leases.held)
        return count

    def _read_pending(self, partitions: Sequence[int]) -> list[_Batch]:
        """Each partition's pending entries, from the start, and its cursor; a partition with none
        pending is marked drained."""
        with self.client.pipeline(transaction=False) as pipe:
            for partition in partitions:
                stream_key = self._stream_key(partition)
                pipe.xreadgroup(GROUP, consumer_name(partition), {stream_key: "0"}, count=self.config.batch)
                pipe.xinfo_groups(stream_key)
            replies = pipe.execute()
        batches = []
        for index, partition in enumerate(partitions):
            entries = _entries(replies[2 * index])
            for group in replies[2 * index + 1]:
                if reply_text(group["name"]) == GROUP:
                    self._cursors[partition] = reply_text(group["last-delivered-id"])
            if entries:
                # shorter than a full batch: that was the whole pending list
                batches.append(_Batch(partition, entries, drains=len(entries) < self.config.batch))
            else:
                self._drained.add(partition)
        return batches

    def _read_after_cursors(self, partitions: Sequence[int], *, block_ms: int | None) -> list[_Batch]:
        """The next entries after each partition's cursor, in one XREAD (``block_ms``: waiting up
        to that long for the first); nothing changes on the server."""
        if not partitions:
            return []
        streams: Any = {self._stream_key(n): self._cursors[n] for n in partitions}
        reply = self.client.xread(streams, count=self.config.batch, block=block_ms)
        by_key = {self._stream_key(n): n for n in partitions}
        # RESP3 replies {stream: [entries]}, RESP2 [[stream, entries], ...]
        pairs: Any = [(k, v[0]) for k, v in reply.items()] if isinstance(reply, dict) else reply or []
        batches = []
        for key, entries in pairs:
            partition = by_key.get(reply_text(key))
            if partition is not None and entries:
                batches.append(_Batch(partition, list(entries), cursor=self._cursors[partition]))
        return batches

    def _apply(self, batches: Sequence[_Batch]) -> int:
        decoded = [(batch.partition, *_decode(reply_text(raw_id), fields))
                   for batch in batches for raw_id, fields in batch.entries]
        bindings: dict[str, Binding] = {}
        for _, _, message, _, _ in decoded:
            if message is not None and message.symbol not in bindings:
                binding = self.catalog.binding(message.symbol)
                if binding is not None:
                    bindings[message.symbol] = binding
        state_keys = {symbol: self.keys.strategy_state(b.cls.name, symbol) for symbol, b in bindings.items()}
        views = self._read_states_and_views(state_keys) if state_keys else {}
        now = self.clock.now()
        slots = {symbol: self._slot(symbol, bindings[symbol], key, self._states[key], views[symbol], now)
                 for symbol, key in state_keys.items()}
        if not self._warm_up(decoded, slots, now):
            return len(decoded)  # fetching history took long: renew the leases, then run the pass again
        intents, dead = self._run_bars(decoded, slots, now)
        if not self._commit(batches, slots, intents, dead):
            return len(decoded)
        if self.warmup is not None:
            self.warmup.forget()
        for batch in batches:
            if batch.drains:
                self._drained.add(batch.partition)
            if batch.cursor is not None:
                self._cursors[batch.partition] = batch.last_id
        self.stats.batches += len(batches)
        self.stats.intents += len(intents)
        self.stats.dead_lettered += len(dead)
        for partition, entry_id, _, reason in dead:
            log.error("strategy.dead_lettered", partition=partition, entry_id=entry_id, reason=reason)
        for intent in intents:
            log.info("strategy.intent", intent_id=intent.id, symbol=intent.symbol, side=str(intent.side),
                     quantity=str(intent.quantity), source=intent.source, reason=intent.reason)
        self._intents_since_trim += len(intents)
        if self._intents_since_trim >= self.settings.bus.trim_every:
            trim(self.client, self._intents_key, self.settings.bus.maxlen)
            self._intents_since_trim = 0
        return len(decoded)

    def _read_states_and_views(self, state_keys: Mapping[str, str]) -> dict[str, AccountView]:
        """Read the states not known yet and the account, in one round trip (and the portfolio and
        open orders after it, :class:`AccountReader`); each symbol's view."""
        unknown = [key for key in state_keys.values() if key not in self._states]
        with self.client.pipeline(transaction=False) as pipe:
            if unknown:
                pipe.mget(unknown)
            self.accounts.queue(pipe)
            replies = pipe.execute()
        if unknown:
            self._states.update(zip(unknown, replies[0], strict=True))
        return self.accounts.views(replies[-3:], set(state_keys))

    def _warm_up(self, decoded: Sequence[tuple[int, str, Fed | None, Any, str]], slots: Mapping[str, _Slot],
                 now: datetime) -> bool:
        """Start each fresh state (no bar applied yet) from its warm-up on history older than its
        first live bar; False, warming nothing, when fetching that history took over a third of
        the lease (it is kept; the pass is run again after the lease upkeep)."""
        if self.warmup is None:
            return True
        needs: dict[str, Need] = {}
        for partition, entry_id, bar, _, _ in decoded:
            if (isinstance(bar, Bar) and bar.symbol in slots and bar.symbol not in needs
                    and slots[bar.symbol].stored.bar_time is None):
                needs[bar.symbol] = Need(bar.symbol, self._stream_key(partition), entry_id, bar.time)
        if not needs:
            return True
        history = self.warmup.history(needs.values())
        if history is None:
            self._next_upkeep = 0.0
            return False
        for symbol, bars in history.items():
            slot = slots[symbol]
            state = warm(slot.binding, symbol, bars, slot.account, now) if bars else None
            if state is not None:
                slot.stored.state = state  # what a failing bar's replay starts from, and what is stored
                slot.strategy = slot.binding.build(symbol, state, now, slot.account)
                self.stats.warmed += len(bars)
        return True

    def _commit(self, batches: Sequence[_Batch], slots: Mapping[str, _Slot], intents: Sequence[Intent],
                dead: Sequence[tuple[int, str, Any, str]]) -> bool:
        """Write the pass in one script, provided every lease is still this worker's and every
        state is what it last saw: the states, the intents, the dead letters, the strategies'
        effects and the XACK of every batch, all or nothing. False (nothing written) if refused."""
        states = {slot.key: slot.stored.dump() for slot in slots.values() if slot.dirty}
        with self.client.pipeline(transaction=False) as recorder:  # never sent: it collects the commands
            if states:
                recorder.mset(states)
            for slot in slots.values():
                slot.strategy.queue_effects(recorder, self.keys)
            for intent in intents:
                recorder.xadd(self._intents_key, codec.encode(intent))  # type: ignore[arg-type]
            for partition, entry_id, fields, reason in dead:
                recorder.xadd(self.keys.dead_letter, self._dead_record(partition, entry_id, fields, reason))
            for batch in batches:
                if batch.cursor is None:  # pending; one read after a cursor is acknowledged by its delivery
                    ids = [raw_id for raw_id, _ in batch.entries]
                    recorder.xack(self._stream_key(batch.partition), GROUP, *ids)
            commands = [command for command, _ in recorder.command_stack]
        lease_keys = [self.leases.key(batch.partition) for batch in batches]
        state_keys = [slot.key for slot in slots.values()]
        claimed = [batch for batch in batches if batch.cursor is not None]
        args: list[Any] = [self.instance, len(lease_keys), len(state_keys),
                           *(self._states[k] or "" for k in state_keys), GROUP]
        for batch in claimed:
            args += [consumer_name(batch.partition), batch.cursor, len(batch.entries), batch.last_id]
        args.append(len(commands))
        for command in commands:
            args += [len(command), *command]
        keys = [*lease_keys, *state_keys, *(self._stream_key(batch.partition) for batch in claimed)]
        verdict = script(self.client, _COMMIT_SCRIPT)(keys=keys, args=args, client=self.client)
        if reply_text(verdict[0]) != "ok":
            self._refused(batches, reply_text(verdict[0]), keys[int(verdict[1]) - 1], lease_keys)
            return False
        self._states.update((key, value.encode()) for key, value in states.items())
        return True

    def _refused(self, batches: Sequence[_Batch], check: str, key: str, lease_keys: Sequence[str]) -> None:
        """A commit the script refused (``check`` failed on ``key``: a lease, a state, a group's
        cursor or what the group delivered): nothing was written, no batch was acknowledged;
        forget the states seen and each partition's pending list and cursor, drop those lost."""
        self.stats.refused_commits += 1
        self._states.clear()
        read = [batch.partition for batch in batches]
        owners = self.client.mget(lease_keys)
        log.warning("strategy.commit_refused", partitions=read, check=check, changed=key,
                    lease_owners=[reply_text(o) if o is not None else None for o in owners])
        self._lost(read, owners)

    def _lost(self, partitions: Sequence[int], owners: Sequence[Any]) -> None:
        """A pass did not commit: read its partitions afresh; drop those no longer ours."""
        self._drained.difference_update(partitions)
        for partition in partitions:
            self._cursors.pop(partition, None)
        for partition, owner in zip(partitions, owners, strict=True):
            if owner is None or reply_text(owner) != self.instance:
                self.leases.drop(partition)

    def _slot(self, symbol: str, binding: Binding, key: str, raw: Any, account: AccountView,
              now: datetime) -> _Slot:
        stored = StoredState.parse(raw)
        return _Slot(binding, key, stored, account, binding.build(symbol, stored.state, now, account))

    def _run_bars(self, decoded: Sequence[tuple[int, str, Fed | None, Any, str]], slots: Mapping[str, _Slot],
                  now: datetime) -> tuple[list[Intent], list[tuple[int, str, Any, str]]]:
        """Run each bar (not applied yet) and order event through its symbol's strategy, in stream
        order: the intents, and the dead letters (undecodable entries, a strategy that raised)."""
        tagged: list[tuple[int, str, Intent]] = []
        dead: list[tuple[int, str, Any, str]] = []
        for seq, (partition, entry_id, message, fields, reason) in enumerate(decoded):
            if message is None:
                dead.append((partition, entry_id, fields, reason))
                continue
            slot = slots.get(message.symbol)
            if slot is None:
                self.stats.unrouted += 1
                continue
            mark = slot.stored.bar_time
            if isinstance(message, Bar) and mark is not None and message.time <= mark:
                self.stats.skipped += 1
                log.info("strategy.bar_already_applied", symbol=message.symbol, entry_id=entry_id,
                         bar_time=message.time.isoformat(), applied_through=mark.isoformat())
                continue
            with bind_correlation(symbol=message.symbol, entry_id=entry_id, message_id=message.id):
                try:
                    out = _feed(slot.strategy, message)
                except Exception as exc:
                    log.exception("strategy.callback_failed", strategy=slot.binding.cls.name,
                                  message_type=message.TYPE)
                    dead.append((partition, entry_id, fields,
                                 f"strategy {slot.binding.cls.name} failed: {type(exc).__name__}: {exc}"))
                    tagged = [t for t in tagged if t[1] != message.symbol]
                    tagged.extend(self._replay(slot, now))
                    continue
            slot.applied.append((seq, message))
            slot.stored.entry = entry_id
            if isinstance(message, Bar):
                slot.stored.bar_time = message.time
                self.stats.applied += 1
            else:
                self.stats.events += 1
            if out:
                tagged.extend((seq, message.symbol, intent) for intent in out)
        for slot in slots.values():
            if slot.dirty:
                slot.stored.state = slot.strategy.state.model_dump(mode="json")
        tagged.sort(key=lambda t: t[0])
        return [intent for _, _, intent in tagged], dead

    def _replay(self, slot: _Slot, now: datetime) -> list[tuple[int, str, Intent]]:
        """Rebuild a failed strategy from its committed state and re-apply the batch's earlier entries."""
        slot.strategy = slot.binding.build(slot.strategy.symbol, slot.stored.state, now, slot.account)
        out: list[tuple[int, str, Intent]] = []
        for seq, message in slot.applied:
            out.extend((seq, message.symbol, intent) for intent in _feed(slot.strategy, message))
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


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of a one-stream XREADGROUP reply (RESP2 or RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return list(next(iter(reply.values()))[0])
    return list(reply[0][1])


def _decode(entry_id: str, fields: Any) -> tuple[str, Fed | None, Any, str]:
    """(entry id, bar or order event or None, fields, reason it is neither)."""
    if not fields:
        return entry_id, None, {}, "entry has no fields (trimmed while pending)"
    try:
        message = codec.decode(fields)
    except CodecError as exc:
        return entry_id, None, fields, f"undecodable: {exc.reason}"
    if not isinstance(message, (Bar, OrderEvent, IntentRejected)):
        return entry_id, None, fields, f"not a bar or an order event: {message.TYPE}"
    return entry_id, message, fields, ""


def _feed(strategy: Strategy[Any, Any], message: Fed) -> list[Intent]:
    """``message`` to the strategy's callback: a bar to ``on_bar``, an event to ``on_order_event``."""
    if isinstance(message, Bar):
        return strategy.on_bar(message)
    return strategy.on_order_event(message)
