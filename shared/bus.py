"""Redis streams read through consumer groups: at-least-once delivery, acknowledged after effect.

What the bus guarantees:

* **At least once.** An entry is acknowledged (XACK) only after its handler returned; a batch's
  XACK is pipelined with the next XREADGROUP (one round trip instead of two), and sent on its own
  before the consumer inspects its pending list or stops. A consumer that dies leaves its
  entries pending; another consumer of the group (or itself, restarted) claims them once they
  have been idle ``claim_idle_ms`` (XAUTOCLAIM) and runs them again.
* **An outage is not the message's fault.** A handler that meets Redis or the broker away
  (:class:`~shared.errors.Unavailable`) keeps its entry in hand, with a short back-off and a
  warning per try; the delivery does not count towards the dead-letter stream.
* **Nothing silently lost.** An entry that cannot be decoded, that a handler rejects
  (:class:`~shared.errors.HandlerRejected`), or whose handler failed ``max_deliveries`` times goes
  to the dead-letter stream with the reason, the delivery count and every original field, and
  is acknowledged in the same MULTI: processing continues with the next entry.
* **Bounded streams that never drop pending work.** :class:`Publisher` trims a stream to about
  ``maxlen`` entries, but never past the oldest entry some group has not yet acknowledged or
  been delivered (see :func:`trim`). Durable streams (the ledger) are never trimmed.
* **Ordering.** One consumer in a group sees entries in publish order, and handles them in that
  order unless one fails (a failed entry is retried after ``claim_idle_ms``, behind later ones).
  Several consumers in a group share the entries with no order between them; a service that
  needs per-symbol order partitions its stream so each partition has one consumer at a time.

What is left to the caller: **handlers must be idempotent**, because a redelivered entry (after a
crash, a lost reply, a failure) runs again. The message ``id`` in the envelope is the key to
deduplicate on (a retried XADD repeats it under a new stream id); :class:`Idempotency` applies a
Redis-side effect exactly once per id. A side effect outside Redis (a broker order) needs its own
key (a client_order_id) that the far side deduplicates on.

A redelivery, as a timeline::

    time 0   consumer A reads entry 5-0 (pending for A, delivery count 1)
    time 1   A's handler writes its effect and marks id "ab12" applied
    time 2   A is SIGKILLed before XACK: 5-0 stays pending for A
    time 12  consumer B's XAUTOCLAIM finds 5-0 idle > claim_idle_ms, claims it (count 2)
    time 12  B's handler sees "ab12" already applied: no second effect; B acknowledges 5-0

Server quirks survived here: a reply lost after XREADGROUP moved entries into our pending list
(a dropped connection; fakeredis's TCP server does it routinely) is recovered by reading our own
pending entries when idle; XAUTOCLAIM replies have 2 elements on Redis 6.2 and 3 on 7+; an
entry trimmed while pending comes back with no fields and is dead-lettered as lost; fakeredis
returns at once from a blocking read with COUNT, so an instant empty reply backs off briefly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis
from redis.client import Pipeline

from shared import codec
from shared.clock import Clock
from shared.config import BusSettings
from shared.errors import CodecError, HandlerRejected, RedisUnavailable, Unavailable
from shared.keys import Keys
from shared.logging import bind_correlation, get_logger
from shared.models import Message, model_fields_for_log
from shared.redis_client import reply_text, script, unavailable

__all__ = [
    "Consumer",
    "Delivery",
    "Handler",
    "Idempotency",
    "Publisher",
    "StopSignal",
    "publish",
    "trim",
]

log = get_logger(component="bus")
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a handler: the decoded message and where it came from."""

    stream: str
    entry_id: str
    message: Message
    deliveries: int


Handler = Callable[[Delivery], None]


def publish(client: redis.Redis, keys: Keys, stream: str, message: Message) -> str:
    """XADD ``message`` to ``stream`` (no trimming: for low-volume publishers); return its entry id."""
    entry_id = client.xadd(keys.stream(stream), codec.encode(message))  # type: ignore[arg-type]
    return reply_text(entry_id)


class Publisher:
    """Publishes messages and keeps each stream near ``maxlen`` without dropping pending work."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: BusSettings,
                 durable: frozenset[str] = frozenset()) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.durable = durable
        self._since_trim: dict[str, int] = {}

    def publish(self, stream: str, message: Message) -> str:
        """XADD ``message``; every ``trim_every`` publishes, trim the stream safely."""
        try:
            entry_id = publish(self.client, self.keys, stream, message)
            self._count(stream)
            return entry_id
        except _REDIS_DOWN as exc:
            raise RedisUnavailable(f"publish to {stream!r} failed: {exc}") from exc

    def queue_publish(self, pipe: Pipeline, stream: str, message: Message) -> None:
        """Queue the XADD of ``message`` on ``pipe`` (written with the caller's other changes);
        trims as :meth:`publish` does."""
        pipe.xadd(self.keys.stream(stream), codec.encode(message))  # type: ignore[arg-type]
        try:
            self._count(stream)
        except _REDIS_DOWN as exc:
            raise RedisUnavailable(f"trimming {stream!r} failed: {exc}") from exc

    def _count(self, stream: str) -> None:
        """Count one publish to ``stream``; every ``trim_every``, trim it."""
        count = self._since_trim.get(stream, 0) + 1
        if count >= self.settings.trim_every and stream not in self.durable:
            trim(self.client, self.keys.stream(stream), self.settings.maxlen)
            count = 0
        self._since_trim[stream] = count


# Trim one stream in one round trip, never past the oldest entry a group still needs.
# KEYS[1] = the stream; ARGV[1] = maxlen
# returns {removed, floor}: floor = the oldest id some group needs ("" when none does) when it held
# the cut back, else ""
# The floor of a group is the entry after its last delivered one, or its oldest pending entry if
# older. Exact ids go to XDEL, not XTRIM MINID: exact under concurrent XADDs, and fakeredis's
# XTRIM MINID removes nothing. At most 1,000 ids per XDEL call (Lua's unpack limit).
TRIM_SCRIPT = """
local unpack = unpack or table.unpack
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return {0, ''} end
local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return {tonumber(ms), tonumber(seq)}
end
local function older(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local floor = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local next_id = parse(info['last-delivered-id'])
    next_id[2] = next_id[2] + 1
    if floor == nil or older(next_id, floor) then floor = next_id end
    if tonumber(info['pending']) > 0 then
        local oldest = parse(redis.call('XPENDING', KEYS[1], info['name'])[2])
        if older(oldest, floor) then floor = oldest end
    end
end
local doomed, held = {}, ''
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)) do
    if floor ~= nil and not older(parse(entry[1]), floor) then
        held = floor[1] .. '-' .. floor[2]
        break
    end
    doomed[#doomed + 1] = entry[1]
end
local removed = 0
for start = 1, #doomed, 1000 do
    removed = removed + redis.call('XDEL', KEYS[1], unpack(doomed, start, math.min(start + 999, #doomed)))
end
return {removed, held}
"""


def trim(client: redis.Redis, stream_key: str, maxlen: int) -> int:
    """Trim ``stream_key`` to about ``maxlen`` entries, keeping every entry a group still needs.

    An entry is still needed while it is pending (delivered, not acknowledged) in any group or
    not yet delivered to some group. The cut is the later of "keep the newest ``maxlen``" and
    never past that floor; returns how many entries were removed. Groups created after a trim
    start from what is left. One script, one round trip (:data:`TRIM_SCRIPT`).
    """
    removed, held = script(client, TRIM_SCRIPT)(keys=[stream_key], args=[maxlen], client=client)
    if held:
        log.warning("bus.trim_held_back", stream=stream_key, maxlen=maxlen, oldest_needed=reply_text(held))
    return int(removed)


class StopSignal:
    """A stop flag a service loop checks between messages; SIGTERM/SIGINT set it.

    The first signal asks the loop to finish the message in hand (acknowledge it) and exit 0;
    if that takes more than ``grace_seconds``, or a second signal arrives, the process exits now
    (exit status 1; the entry in hand stays pending and is claimed by another consumer).

    The handlers take no lock: a signal runs its handler in the main thread between two
    bytecodes, possibly while that thread holds the log writer's lock or an Event's, and a
    handler that logged or set an Event there would wait for itself forever (the process then
    hung until SIGKILL). The handler only notes the signal, arms the grace timer and writes a
    byte to a pipe; a watcher thread logs ``stop.requested`` and sets the flag. The two exits
    write their line straight to stdout with ``os.write``.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._signal = 0  # the first signal received (set by the handler: a plain attribute)

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self.event.is_set()

    def set(self) -> None:
        """Request a stop."""
        self.event.set()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a stop request; True if one came."""
        return self.event.wait(seconds)

    def install(self, grace_seconds: float) -> None:
        """Route SIGTERM and SIGINT here (call from the main thread)."""
        wake_read, wake_write = os.pipe()

        def on_signal(signum: int, _: FrameType | None) -> None:
            if self._signal:
                _write_line("stop.forced", "warning", signal=signum)
                raise SystemExit(1)
            self._signal = signum
            signal.setitimer(signal.ITIMER_REAL, grace_seconds)
            os.write(wake_write, b"!")

        def on_grace_expired(signum: int, _: FrameType | None) -> None:
            _write_line("stop.grace_expired", "warning", grace_seconds=grace_seconds)
            raise SystemExit(1)

        def watch() -> None:
            os.read(wake_read, 1)
            log.info("stop.requested", signal=self._signal, grace_seconds=grace_seconds)
            self.event.set()

        threading.Thread(target=watch, name="stop-signal", daemon=True).start()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGALRM, on_grace_expired)


def _write_line(event: str, level: str, **fields: Any) -> None:
    """One JSON log line written to stdout without structlog or any lock (for signal handlers)."""
    line = json.dumps({**fields, "event": event, "pid": os.getpid(), "level": level}) + "\n"
    os.write(1, line.encode())


class Consumer:
    """Runs ``handler`` on every entry of one stream, as one consumer of one group.

    Concurrency model: one thread, one entry at a time. Scale by running more processes with
    the same group and different names. When asked to stop, it finishes the entries the server
    already delivered to it (at most ``batch``, plus any whose reply was lost), acknowledges
    them and returns, so a clean stop leaves nothing pending; ``batch=1`` makes that one entry.

    For a consumer off the latency path that gains from handling entries together (marks,
    market data for a simulator), ``linger_ms`` waits that long after a read that returned less
    than a full batch, so the next read takes what arrived meanwhile; ``flush`` runs after each
    batch's handlers and before the batch is acknowledged (a handler can leave its writes to it).
    A failing ``flush`` leaves the whole batch unacknowledged: it is delivered again.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, stream: str, group: str, handler: Handler,
                 settings: BusSettings, clock: Clock, name: str | None = None, linger_ms: int = 0,
                 flush: Callable[[], None] | None = None) -> None:
        self.client = client
        self.keys = keys
        self.stream = stream
        self.stream_key = keys.stream(stream)
        self.group = group
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.handler = handler
        self.linger_ms = linger_ms
        self.flush = flush
        self.settings = settings
        self.clock = clock
        self.processed = 0
        self.dead_lettered = 0
        self._failed: set[str] = set()  # entries whose handler failed here: retried via XAUTOCLAIM
        self._in_hand: list[tuple[Any, Any]] = []  # entries to handle again once Redis serves
        self._in_hand_counts: dict[str, int] = {}  # their delivery counts
        self._unacked: list[str] = []  # handled entries whose XACK goes out with the next read
        self._log = log.bind(stream=stream, group=group, consumer=self.name)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: StopSignal | threading.Event | None = None, *, max_messages: int | None = None,
            burst: bool = False) -> int:
        """Consume until ``stop`` is set, ``max_messages`` were handled, or (``burst``) none are left.

        Returns the number of entries handled (acknowledged or dead-lettered).
        """
        stop = stop or threading.Event()
        start_count = self.processed
        self._ensure_group()
        drained = False
        next_claim = self.clock.monotonic()
        backoff = 0.0
        while not stop.is_set():
            if max_messages is not None and self.processed - start_count >= max_messages:
                break
            try:
                if self._in_hand:  # left by a handler that found Redis unavailable: theirs first
                    self._handle_in_hand()
                    continue
                if not drained:
                    self._drain_own_pending(stop)
                    drained = True
                if self.clock.monotonic() >= next_claim:
                    next_claim = self.clock.monotonic() + self.settings.claim_interval_ms / 1000
                    if self._claim_idle():
                        continue
                limit = self.settings.batch
                if max_messages is not None:
                    limit = min(limit, max_messages - (self.processed - start_count))
                started = self.clock.monotonic()
                entries = self._read_new(limit, block=not burst)
                if entries:
                    backoff = 0.0
                    self._handle_all(entries, fresh=True)
                    if self.linger_ms and len(entries) < limit:
                        self._flush_acks()  # nothing handled stays pending while we wait
                        stop.wait(self.linger_ms / 1000)
                    continue
                if self._recover_lost_replies():
                    continue
                if burst:
                    break
                if self.clock.monotonic() - started < self.settings.block_ms / 2000:
                    backoff = min(max(backoff * 2, 0.005), 0.05)  # the server did not block
                    stop.wait(backoff)
            except (redis.RedisError, Unavailable) as exc:
                if unavailable(exc) or isinstance(exc, Unavailable):
                    backoff = min(max(backoff * 2, 0.1), 2.0)
                    event = "bus.redis_unavailable" if unavailable(exc) else "bus.dependency_unavailable"
                    self._log.warning(event, error=str(exc), retry_in_s=backoff, in_hand=len(self._in_hand))
                    stop.wait(backoff)
                    continue
                if "NOGROUP" in str(exc):  # Redis restarted without its data
                    self._log.warning("bus.group_missing", error=str(exc))
                    self._ensure_group()
                    continue
                backoff = min(max(backoff * 2, 0.1), 2.0)
                self._log.error("bus.redis_error", error=str(exc), retry_in_s=backoff)
                stop.wait(backoff)
        if stop.is_set():
            self._finish_in_hand()
        try:
            self._flush_acks()
        except redis.RedisError as exc:  # the entries stay pending and are redelivered
            self._log.warning("bus.stop_with_pending", error=str(exc), unacked=len(self._unacked))
        return self.processed - start_count

    def _finish_in_hand(self) -> None:
        """On stop, handle what the server already delivered to us, so nothing is left pending."""
        try:
            while self._recover_lost_replies():
                pass
        except (redis.RedisError, RedisUnavailable) as exc:
            self._log.warning("bus.stop_with_pending", error=str(exc))

    # -- reading ------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        if self.client.exists(self.stream_key):  # avoid the BUSYGROUP error reply in the common case
            names = {reply_text(group["name"]) for group in self.client.xinfo_groups(self.stream_key)}
            if self.group in names:
                return
        try:
            self.client.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
            self._log.info("bus.group_created")
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, count: int, block: int | None) -> list[tuple[Any, Any]]:
        """XREADGROUP, preceded in the same round trip by the XACK of the entries handled last."""
        streams: dict[Any, Any] = {self.stream_key: start}
        reply: Any
        if self._unacked:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream_key, self.group, *self._unacked)
                pipe.xreadgroup(self.group, self.name, streams, count=count, block=block)
                _, reply = pipe.execute()
            self._unacked.clear()
        else:
            reply = self.client.xreadgroup(self.group, self.name, streams, count=count, block=block)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return list(next(iter(reply.values()))[0]) if reply else []
        return list(reply[0][1])

    def _read_new(self, count: int, *, block: bool) -> list[tuple[Any, Any]]:
        return self._read(">", count, self.settings.block_ms if block else None)

    def _drain_own_pending(self, stop: threading.Event | StopSignal) -> None:
        """Re-run entries left pending under this consumer's name (a restart with the same name)."""
        while not stop.is_set():
            own = self._read("0", self.settings.batch, None)
            entries = [e for e in own if reply_text(e[0]) not in self._failed]
            if not entries:
                return
            self._handle_all(entries, fresh=False)

    def _recover_lost_replies(self) -> bool:
        """Handle entries in our pending list that we never received (the reply was lost)."""
        self._flush_acks()
        pending = self.client.xpending_range(self.stream_key, self.group, "-", "+", self.settings.batch,
                                             consumername=self.name)
        ids = (reply_text(row["message_id"]) for row in pending)
        lost: list[Any] = [entry_id for entry_id in ids if entry_id not in self._failed]
        if not lost:
            return False
        self._log.info("bus.lost_reply_recovered", count=len(lost))
        entries = self.client.xclaim(self.stream_key, self.group, self.name, 0, lost)
        self._handle_or_lose(lost, entries)
        return True

    def _claim_idle(self) -> bool:
        """XAUTOCLAIM entries idle past ``claim_idle_ms`` (a dead or failing consumer's)."""
        self._flush_acks()
        reply = self.client.xautoclaim(self.stream_key, self.group, self.name,
                                       self.settings.claim_idle_ms, "0-0", count=self.settings.batch)
        claimed = list(reply[1])
        entries = [e for e in claimed if e and e[0] is not None]
        deleted = [reply_text(i) for i in reply[2]] if len(reply) > 2 else []  # Redis 7+: trimmed ids
        if not claimed and not deleted:
            return False
        self._log.info("bus.claimed", count=len(entries), deleted=len(deleted))
        for entry_id in deleted:
            self._dead_letter(entry_id, {}, "entry was trimmed or deleted while pending", 0)
        self._failed.difference_update(reply_text(e[0]) for e in entries)
        self._handle_or_lose([reply_text(e[0]) for e in entries], entries)
        if len(entries) < len(claimed):  # Redis 6.2: a deleted entry comes back as nil, id unknown
            self._recover_lost_replies()
        return True

    def _handle_or_lose(self, ids: Sequence[str], entries: Sequence[Any]) -> None:
        by_id = {reply_text(e[0]): e for e in entries if e and e[0] is not None}
        present = [by_id[i] for i in ids if i in by_id]
        for entry_id in ids:
            if entry_id not in by_id:  # XCLAIM drops ids whose entry no longer exists
                self._dead_letter(entry_id, {}, "entry was trimmed or deleted while pending", 0)
        self._handle_all(present, fresh=False)

    # -- handling -----------------------------------------------------------------------------

    def _handle_all(self, entries: Sequence[tuple[Any, Any]], *, fresh: bool,
                    counts: dict[str, int] | None = None) -> None:
        """Handle every entry (even after a stop request: they are in hand); queue their XACK.

        The batch is acknowledged together, after each handler returned, in the same round trip
        as the next read (:meth:`_read`) or by :meth:`_flush_acks` before anything that looks at
        the pending list. That keeps at-least-once: a crash before the XACK redelivers at most
        this batch, which idempotent handlers absorb.

        A handler that finds Redis unavailable (:func:`~shared.redis_client.unavailable`), or that
        raises another :class:`~shared.errors.Unavailable` (the broker down or rate limiting), is
        not the message's fault: that entry and the ones after it stay in hand with their
        delivery counts, the error goes up to the loop's back-off, and they are handled again
        first (:meth:`_handle_in_hand`) -- never counted towards the dead-letter stream for it.
        """
        if counts is None:
            counts = {} if fresh else self._delivery_counts([reply_text(e[0]) for e in entries])
        handled: list[str] = []
        for index, (raw_id, fields) in enumerate(entries):
            entry_id = reply_text(raw_id)
            try:
                done = self._handle(entry_id, fields or {}, counts.get(entry_id, 1))
            except Unavailable:
                self._in_hand = list(entries[index:])
                self._in_hand_counts = counts
                self._settle(handled)
                raise
            if done:
                handled.append(entry_id)
        self._settle(handled)

    def _handle_in_hand(self) -> None:
        """Handle again the entries a handler left when Redis was unavailable."""
        entries, counts = self._in_hand, self._in_hand_counts
        self._in_hand, self._in_hand_counts = [], {}
        self._handle_all(entries, fresh=False, counts=counts)

    def _settle(self, handled: list[str]) -> None:
        """Run ``flush`` after the handled entries, then queue their XACK (none if it failed)."""
        if self.flush is not None and handled:
            try:
                self.flush()
            except Exception:
                self._failed.update(handled)  # delivered again once idle (XAUTOCLAIM)
                self.processed -= len(handled)
                self._log.exception("bus.flush_failed", entries=len(handled))
                return
        self._unacked.extend(handled)

    def _flush_acks(self) -> None:
        """XACK the handled entries still waiting for the next read."""
        if self._unacked:
            self.client.xack(self.stream_key, self.group, *self._unacked)
            self._unacked.clear()

    def _delivery_counts(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        self._flush_acks()
        lo, hi = min(ids, key=_id_tuple), max(ids, key=_id_tuple)
        rows = self.client.xpending_range(self.stream_key, self.group, lo, hi, len(ids) + 16,
                                          consumername=self.name)
        return {reply_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _handle(self, entry_id: str, fields: Mapping[bytes, bytes], deliveries: int) -> bool:
        """Run the handler on one entry; True when it succeeded and the entry is to be acknowledged."""
        if not fields:
            self._dead_letter(entry_id, fields, "entry has no fields (trimmed while pending)", deliveries)
            return False
        try:
            message = codec.decode(fields)
        except CodecError as exc:
            self._dead_letter(entry_id, fields, f"undecodable: {exc.reason}", deliveries)
            return False
        if deliveries > self.settings.max_deliveries:
            self._dead_letter(entry_id, fields, f"delivered {deliveries} times without success", deliveries)
            return False
        with bind_correlation(lambda: {"entry_id": entry_id, **model_fields_for_log(message)}):
            try:
                self.handler(Delivery(self.stream, entry_id, message, deliveries))
            except HandlerRejected as exc:
                self._dead_letter(entry_id, fields, f"rejected by handler: {exc.reason}", deliveries)
                return False
            except Exception as exc:
                if unavailable(exc):
                    raise RedisUnavailable(f"handling {entry_id}: {type(exc).__name__}: {exc}") from exc
                if isinstance(exc, Unavailable):
                    raise
                self._failed.add(entry_id)
                self._log.exception("bus.handler_failed", entry_id=entry_id, deliveries=deliveries)
                if deliveries >= self.settings.max_deliveries:
                    reason = f"handler failed {deliveries} times; last error: {type(exc).__name__}: {exc}"
                    self._dead_letter(entry_id, fields, reason, deliveries)
                return False
        self._failed.discard(entry_id)
        self.processed += 1
        return True

    def _dead_letter(self, entry_id: str, fields: Mapping[bytes, bytes], reason: str,
                     deliveries: int) -> None:
        """Copy the entry to the dead-letter stream with ``reason`` and acknowledge it, atomically."""
        record: dict[str | bytes, str | bytes] = {
            "source_stream": self.stream_key,
            "group": self.group,
            "consumer": self.name,
            "entry_id": entry_id,
            "reason": reason,
            "deliveries": str(deliveries),
            "failed_at": self.clock.now().isoformat(),
        }
        for key, value in fields.items():
            record[b"original." + (key if isinstance(key, bytes) else str(key).encode())] = value
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letter, record, maxlen=self.settings.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.xack(self.stream_key, self.group, entry_id)
            pipe.execute()
        self._failed.discard(entry_id)
        self.dead_lettered += 1
        self.processed += 1
        self._log.error("bus.dead_lettered", entry_id=entry_id, reason=reason, deliveries=deliveries)


# KEYS[1] = the marker applied:<scope>:<id>; KEYS[2] = the stream; KEYS[3] (optional) = a hash
# ARGV[1] = the marker's ttl (s); ARGV[2] = the stream's approximate maxlen; ARGV[3] = the field
# KEYS[3] must hold ("" without KEYS[3]); ARGV[4..] = field, value, ...
# returns the new entry id; false when the marker was set already; -1 when KEYS[3] lacks the
# field ARGV[3] (nothing added or marked in either case)
_PUBLISH_ONCE = """
local unpack = unpack or table.unpack
if #KEYS > 2 and redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return -1 end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
end
return false
"""


class Idempotency:
    """Applies a Redis-side effect at most once per message id, even across restarts.

    ``apply_once`` runs ``effect`` inside a MULTI together with setting the marker
    ``applied:<scope>:<id>`` (kept ``ttl_s``), under WATCH of that marker: two consumers racing on
    the same redelivered message cannot both apply it, and a crash leaves either both the effect
    and the marker or neither.
    """

    def __init__(self, client: redis.Redis, keys: Keys, scope: str, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.scope = scope
        self.ttl_s = ttl_s

    def seen(self, message_id: str) -> bool:
        """True if ``message_id`` was already applied in this scope."""
        return bool(self.client.exists(self.keys.applied(self.scope, message_id)))

    def queue_seen(self, pipe: Pipeline, message_id: str) -> None:
        """Queue on ``pipe`` the read :meth:`seen` makes (its reply is truthy when applied)."""
        pipe.exists(self.keys.applied(self.scope, message_id))

    def publish_once(self, message_id: str, stream_key: str, fields: Mapping[str, str | bytes],
                     maxlen: int) -> bool:
        """XADD ``fields`` to ``stream_key`` (trimmed to about ``maxlen``) and set the marker, in one
        script: one round trip; False (nothing added) if ``message_id`` was already applied."""
        flat = [x for pair in fields.items() for x in pair]
        run = script(self.client, _PUBLISH_ONCE)
        try:
            added = run(keys=[self.keys.applied(self.scope, message_id), stream_key],
                        args=[self.ttl_s, maxlen, "", *flat], client=self.client)
        except _REDIS_DOWN as exc:
            raise RedisUnavailable(f"publish_once({message_id!r}) failed: {exc}") from exc
        return bool(added)

    def queue_publish_once(self, pipe: Pipeline, message_id: str, stream_key: str,
                           fields: Mapping[str, str | bytes], maxlen: int, *,
                           provided: tuple[str, str] | None = None) -> None:
        """Queue on ``pipe`` :meth:`publish_once`'s script (for a caller batching its round trips),
        with ``provided`` applied only while the hash ``provided[0]`` has the field ``provided[1]``
        (for a publish sent behind the write that creates that field, in the same round trip);
        read its reply with :meth:`published`."""
        flat = [x for pair in fields.items() for x in pair]
        keys = [self.keys.applied(self.scope, message_id), stream_key]
        hash_field = ""
        if provided is not None:
            keys.append(provided[0])
            hash_field = provided[1]
        pipe.eval(_PUBLISH_ONCE, len(keys), *keys, self.ttl_s, maxlen, hash_field, *flat)

    @staticmethod
    def published(reply: Any) -> bool | None:
        """A queued publish's reply: True (added), False (already applied), None (the field was
        missing: nothing added)."""
        if isinstance(reply, Exception):
            raise reply
        if reply == -1:
            return None
        return bool(reply)

    def apply_once(self, message_id: str, effect: Callable[[Pipeline], None]) -> bool:
        """Queue ``effect``'s writes and the marker in one transaction; False if already applied."""
        marker = self.keys.applied(self.scope, message_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(marker)  # type: ignore[no-untyped-call]
                    if pipe.exists(marker):
                        return False
                    pipe.multi()
                    effect(pipe)
                    pipe.set(marker, b"1", ex=self.ttl_s)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
                except _REDIS_DOWN as exc:
                    raise RedisUnavailable(f"apply_once({message_id!r}) failed: {exc}") from exc



def _id_tuple(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = reply_text(entry_id).partition("-")
    return int(ms), int(seq or 0)
