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

import shared.bus.codec as codec
from shared.bus.consumer import Consumer, Delivery, Handler
from shared.bus.idempotency import Idempotency
from shared.bus.publisher import Publisher, publish, trim

__all__ = ["Consumer", "Delivery", "Handler", "Idempotency", "Publisher", "codec", "publish", "trim"]
