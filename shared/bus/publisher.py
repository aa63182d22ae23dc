"""Publishing to a stream, and trimming it without dropping work a group still needs."""

from __future__ import annotations

import redis
from redis.client import Pipeline

import shared.bus.codec as codec
from shared.config import BusSettings
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import Message
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text, script

__all__ = ["TRIM_SCRIPT", "Publisher", "publish", "trim"]

log = get_logger(component="bus")


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
        with redis_errors(f"publish to {stream!r}"):
            entry_id = publish(self.client, self.keys, stream, message)
            self._count(stream)
        return entry_id

    def queue_publish(self, pipe: Pipeline, stream: str, message: Message) -> None:
        """Queue the XADD of ``message`` on ``pipe`` (written with the caller's other changes);
        trims as :meth:`publish` does."""
        pipe.xadd(self.keys.stream(stream), codec.encode(message))  # type: ignore[arg-type]
        with redis_errors(f"trimming {stream!r}"):
            self._count(stream)

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
