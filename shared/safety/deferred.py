"""Deferred intents: an intent that cannot go now waits, one per symbol and side, until revalidated.

An intent is deferred when it cannot be executed yet (market closed, cash held by pending
orders). The queue is the hash ``Keys.deferred``: field ``<SYMBOL>:<side>``, value
``"<intent time µs> <json>"`` (``redis-cli HGETALL bastion:deferred`` shows it).

Guarantees:

* **One entry per symbol and side.** A newer intent (by its ``time``) replaces the older in one
  script; an older one arriving late (a redelivery) never replaces a newer one.
* **Stale entries expire**: an entry older than ``max_age_s`` (from when it was deferred, by the
  Clock) is never handed out, and is swept when seen.
* **Revalidated before execution.** :meth:`DeferredQueue.drain` claims each live entry (deleting
  it only if it is still the same entry: a replacement made meanwhile stays queued) and then asks
  the caller's ``revalidate`` hook; a hook that returns a reason (a dropped score, a downgraded
  signal) cancels the entry, None lets it through. So each entry is handed out at most once.

Left to the caller: the hook itself (re-reading the strategy's current score or signal), running
a drained intent through every risk check again, and deferring it again if it still cannot go.
A process that dies between the claim and the execution loses that one intent (at most once, by
design: a stale intent executed twice is worse than one not executed); the strategy's next
signal is the recovery.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from redis.client import Pipeline

from shared.clock import Clock, LiveClock, epoch_micros
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Intent, Side
from shared.redis.boundary import redis_errors
from shared.redis.client import HDEL_IF_UNCHANGED_SCRIPT, HSET_IF_NEWER_SCRIPT, reply_text, script

__all__ = ["DeferredIntent", "DeferredQueue", "Revalidate"]

log = get_logger(module="deferred")




@dataclass(frozen=True)
class DeferredIntent:
    """An intent waiting in the queue, with why it waits and when it expires."""

    intent: Intent
    reason: str
    deferred_at: datetime
    expires_at: datetime
    score: Decimal | None = None

    @property
    def field(self) -> str:
        """Its field in the hash: ``<SYMBOL>:<side>``."""
        return f"{self.intent.symbol}:{self.intent.side.value}"

    def encode(self) -> str:
        return json.dumps({"intent": self.intent.model_dump(mode="json"), "reason": self.reason,
                           "deferred_at": self.deferred_at.isoformat(),
                           "expires_at": self.expires_at.isoformat(),
                           "score": None if self.score is None else str(self.score)})

    @classmethod
    def decode(cls, value: str) -> DeferredIntent:
        data = json.loads(value.split(" ", 1)[1])
        score = data.get("score")
        return cls(Intent.model_validate(data["intent"]), data["reason"],
                   datetime.fromisoformat(data["deferred_at"]), datetime.fromisoformat(data["expires_at"]),
                   None if score is None else Decimal(score))


Revalidate = Callable[[DeferredIntent], "str | None"]


class DeferredQueue:
    """The deferred-intent queue of one installation (one key prefix)."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock | None = None, max_age_s: float = 900.0,
                 on_dropped: Callable[[DeferredIntent, str], None] | None = None) -> None:
        """``on_dropped`` is told, with why, of each entry that leaves the queue unexecuted: swept as
        expired (once: by the sweep that removes it) or replaced by a newer intent (by the write
        that replaced it), so its intent can be reported."""
        if not max_age_s > 0:
            raise ValueError("max_age_s must be positive")
        self.client = client
        self.keys = keys
        self.clock = clock or LiveClock()
        self.max_age = timedelta(seconds=max_age_s)
        self.on_dropped = on_dropped

    def defer(self, intent: Intent, reason: str, *, score: Decimal | None = None) -> bool:
        """Queue ``intent`` (replacing an older one for its symbol and side); False if a newer one
        is already queued and was kept."""
        now = self.clock.now()
        return self.put(DeferredIntent(intent, reason, now, now + self.max_age, score))

    def put(self, entry: DeferredIntent) -> bool:
        """Store ``entry`` unless a newer intent for its symbol and side is queued (False: that one
        was kept). The same intent time replaces: a redelivery stores its own entry again."""
        intent = entry.intent
        args = [entry.field, epoch_micros(intent.time), entry.encode(), "1"]
        replaced = self._run(HSET_IF_NEWER_SCRIPT, args)
        log.info("deferred.queued" if replaced else "deferred.kept_newer", symbol=intent.symbol,
                 side=intent.side.value, intent_id=intent.id, reason=entry.reason)
        if isinstance(replaced, bytes | str) and self.on_dropped is not None:
            older = DeferredIntent.decode(reply_text(replaced))
            if older.intent.id != intent.id:  # not a redelivery storing its own entry again
                self.on_dropped(older, f"replaced while deferred by the newer intent {intent.id}")
        return bool(replaced)

    def entries(self) -> list[DeferredIntent]:
        """Live entries, oldest deferral first (``bastion status``); expired ones are swept."""
        return [entry for _, _, entry in self._live()]

    def get(self, symbol: str, side: Side | str, raw: Any = None) -> DeferredIntent | None:
        """The live entry for ``symbol`` and ``side``, if any (from ``raw``, a reply of the read
        :meth:`queue_read` queues, when the caller read it already)."""
        field = f"{symbol}:{Side(side).value}"
        return next((entry for name, _, entry in self._live(raw) if name == field), None)

    def count(self) -> int:
        """How many entries there are (live or not yet swept): one HLEN."""
        with redis_errors("deferred intents"):
            return int(self.client.hlen(self.keys.deferred))

    def queue_read(self, pipe: Pipeline) -> None:
        """Queue on ``pipe`` the read of the whole queue (for a caller batching reads)."""
        pipe.hgetall(self.keys.deferred)

    def cancel(self, symbol: str, side: Side | str) -> bool:
        """Drop the entry for ``symbol`` and ``side``; True if there was one."""
        field = f"{symbol}:{Side(side).value}"
        with redis_errors("deferred intents"):
            return bool(self.client.hdel(self.keys.deferred, field))

    def drain(self, revalidate: Revalidate) -> list[DeferredIntent]:
        """Claim every live entry and keep those ``revalidate`` lets through (it returns None);
        a returned reason cancels the entry. Each entry is handed out at most once."""
        ready = []
        for field, value, entry in self._live():
            if not self._run(HDEL_IF_UNCHANGED_SCRIPT, [field, value]):
                continue  # replaced or taken by another process meanwhile
            why = revalidate(entry)
            if why is None:
                ready.append(entry)
            else:
                log.info("deferred.cancelled", symbol=entry.intent.symbol, side=entry.intent.side.value,
                         intent_id=entry.intent.id, reason=why)
        return ready

    def _live(self, raw: Any = None) -> list[tuple[str, str, DeferredIntent]]:
        now = self.clock.now()
        if raw is None:
            with redis_errors("deferred intents"):
                raw = self.client.hgetall(self.keys.deferred)
        live = []
        for name, value in raw.items():
            field = name.decode() if isinstance(name, bytes) else str(name)
            text = value.decode() if isinstance(value, bytes) else str(value)
            entry = DeferredIntent.decode(text)
            if now < entry.expires_at:
                live.append((field, text, entry))
            elif self._run(HDEL_IF_UNCHANGED_SCRIPT, [field, text]):
                log.info("deferred.expired", symbol=entry.intent.symbol, side=entry.intent.side.value,
                         intent_id=entry.intent.id)
                if self.on_dropped is not None:
                    self.on_dropped(entry, f"deferred since {entry.deferred_at.isoformat()} and expired: "
                                           f"{entry.reason}")
        return sorted(live, key=lambda item: item[2].deferred_at)

    def _run(self, text: str, args: list[Any]) -> Any:
        run = script(self.client, text)
        with redis_errors("deferred intents"):
            return run(keys=[self.keys.deferred], args=args, client=self.client)

