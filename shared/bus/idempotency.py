"""Applying a Redis-side effect, or a publish, at most once per message id."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from shared.keys import Keys
from shared.redis.boundary import redis_errors
from shared.redis.client import script

__all__ = ["PUBLISH_ONCE_SCRIPT", "Idempotency"]


# KEYS[1] = the marker applied:<scope>:<id>; KEYS[2] = the stream; KEYS[3..2+c] = c more streams
# the same entry goes to, untrimmed (their owners trim them; c = ARGV[4]); KEYS[3+c] (optional) =
# a hash
# ARGV[1] = the marker's ttl (s); ARGV[2] = KEYS[2]'s approximate maxlen; ARGV[3] = the field
# the hash must hold ("" without it); ARGV[4] = c; ARGV[5..] = field, value, ...
# returns the new entry id on KEYS[2]; false when the marker was set already; -1 when the hash
# lacks the field ARGV[3] (nothing added or marked in either case)
PUBLISH_ONCE_SCRIPT = """
local unpack = unpack or table.unpack
local copies = tonumber(ARGV[4])
if #KEYS > 2 + copies and redis.call('HEXISTS', KEYS[3 + copies], ARGV[3]) == 0 then return -1 end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    for i = 3, 2 + copies do redis.call('XADD', KEYS[i], '*', unpack(ARGV, 5)) end
    return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 5))
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
                     maxlen: int, *, copies: Sequence[str] = ()) -> bool:
        """XADD ``fields`` to ``stream_key`` (trimmed to about ``maxlen``) and to each stream of
        ``copies`` (untrimmed: their owners trim them) and set the marker, in one script: one round
        trip; False (nothing added) if ``message_id`` was already applied."""
        flat = [x for pair in fields.items() for x in pair]
        run = script(self.client, PUBLISH_ONCE_SCRIPT)
        with redis_errors(f"publish_once({message_id!r})"):
            added = run(keys=[self.keys.applied(self.scope, message_id), stream_key, *copies],
                        args=[self.ttl_s, maxlen, "", len(copies), *flat], client=self.client)
        return bool(added)

    def queue_publish_once(self, pipe: Pipeline, message_id: str, stream_key: str,
                           fields: Mapping[str, str | bytes], maxlen: int, *,
                           provided: tuple[str, str] | None = None, copies: Sequence[str] = ()) -> None:
        """Queue on ``pipe`` :meth:`publish_once`'s script (for a caller batching its round trips),
        with ``provided`` applied only while the hash ``provided[0]`` has the field ``provided[1]``
        (for a publish sent behind the write that creates that field, in the same round trip);
        read its reply with :meth:`published`."""
        flat = [x for pair in fields.items() for x in pair]
        keys = [self.keys.applied(self.scope, message_id), stream_key, *copies]
        hash_field = ""
        if provided is not None:
            keys.append(provided[0])
            hash_field = provided[1]
        pipe.eval(PUBLISH_ONCE_SCRIPT, len(keys), *keys, self.ttl_s, maxlen, hash_field, len(copies), *flat)

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
        with redis_errors(f"apply_once({message_id!r})"), self.client.pipeline(transaction=True) as pipe:
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
