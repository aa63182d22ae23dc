"""Reading a stream as one consumer of a group: handle, then acknowledge; dead-letter what cannot be."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

import shared.bus.codec as codec
from shared.clock import Clock
from shared.config import BusSettings
from shared.errors import CodecError, HandlerRejected, RedisUnavailable, Unavailable
from shared.keys import Keys
from shared.logging import bind_correlation, get_logger
from shared.models import Message, model_fields_for_log
from shared.redis.boundary import WaitOut, unavailable
from shared.redis.client import reply_text
from shared.stop import Stoppable

__all__ = ["Consumer", "Delivery", "Handler"]

log = get_logger(component="bus")


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a handler: the decoded message and where it came from."""

    stream: str
    entry_id: str
    message: Message
    deliveries: int


Handler = Callable[[Delivery], None]


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

    def run(self, stop: Stoppable | None = None, *, max_messages: int | None = None,
            burst: bool = False) -> int:
        """Consume until ``stop`` is set, ``max_messages`` were handled, or (``burst``) none are left.

        Returns the number of entries handled (acknowledged or dead-lettered).
        """
        stop = stop or threading.Event()
        start_count = self.processed
        self._ensure_group()
        drained = False
        next_claim = self.clock.monotonic()
        backoff = 0.0  # while the server returns at once from a blocking read
        outage = WaitOut()
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
                outage.reset()
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
                    event = "bus.redis_unavailable" if unavailable(exc) else "bus.dependency_unavailable"
                    outage.wait(stop, self._log, event, exc, in_hand=len(self._in_hand))
                    continue
                if "NOGROUP" in str(exc):  # Redis restarted without its data
                    self._log.warning("bus.group_missing", error=str(exc))
                    self._ensure_group()
                    continue
                outage.wait(stop, self._log, "bus.redis_error", exc)
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

    def _drain_own_pending(self, stop: Stoppable) -> None:
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

        A handler that finds Redis unavailable (:func:`~shared.redis.boundary.unavailable`), or that
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


def _id_tuple(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = reply_text(entry_id).partition("-")
    return int(ms), int(seq or 0)
