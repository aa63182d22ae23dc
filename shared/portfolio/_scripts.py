"""The portfolio's one write script (see :mod:`shared.portfolio` for the protocol).

It runs on real Redis and on fakeredis's Lua: refusals are ``redis.error_reply`` (fakeredis drops
the connection on ``error()``), it returns one table, and it uses no cmsgpack/bit/struct. Money
arrives as decimal strings computed in Python; the script compares integers only.
"""

from __future__ import annotations

__all__ = ["CONFLICT", "FULL_READ_SCRIPT", "HELD_READ_SCRIPT", "READ_SCRIPT", "RECORD_MOVED", "STALE_FENCE",
           "WRITE_SCRIPT"]

STALE_FENCE = "STALE_FENCE"
CONFLICT = "CONFLICT"
RECORD_MOVED = "RECORD_MOVED"

# KEYS[1] = state hash         keys.portfolio(account)
# KEYS[2] = positions hash     keys.portfolio_part(account, "positions")
# KEYS[3] = reservations hash  keys.portfolio_part(account, "reservations")
# KEYS[4] = closed hash        keys.portfolio_part(account, "closed")
# KEYS[5] = fills hash         keys.portfolio_part(account, "fills")
# KEYS[6] = ledger stream      keys.ledger(account)
# KEYS[7] = fence counter      keys.fence("portfolio:{account}")
# KEYS[8] = lock key           keys.lock("portfolio:{account}")
# KEYS[9] = (optional) a record hash written with the mutation (the executor's order record)
# ARGV[1] = the writer's fencing token
# ARGV[2] = the state version the writer read ("0" for an account never written)
# ARGV[3] = the operation id, 32 hex digits (a resend of one of the last 16 operations applied --
#           a write whose reply was lost, resent after others wrote -- is answered "dup", not
#           applied again nor refused)
# ARGV[4] = the writer's lock owner token: once written, the lock is released if still its own
# ARGV[5], ARGV[6] = a field of KEYS[9] and the value it must hold ("" for absent) for the write to
#             go ahead ("" and "" without KEYS[9]); ARGV[7] = r, then r field/value pairs to HSET
#             on KEYS[9]
# ARGV[8 + 2r..] = for each of KEYS[1..5] in turn: n, then n field/value pairs to HSET, m, then m
#             fields to HDEL; then k, then k field/value pairs of the ledger entry
# returns {"ok", new version, ledger entry id, released} once written, or {"dup", version, "",
#         released} when this operation id is one of the last 16 applied (recent_ops) (released:
#         1 if the lock was still the writer's and is now free, 0 if its lease had expired); refuses, changing
#         nothing, with {"STALE_FENCE", token, newest} (token below the newest accepted or the
#         fence counter), {"CONFLICT", expected, actual} (the version moved since the read) or
#         {"RECORD_MOVED", expected, actual} (KEYS[9]'s field ARGV[5] moved since the read).
#         A refusal is a plain reply, not an error reply, so that commands pipelined behind the
#         write still get theirs (fakeredis's TCP server drops the connection after an error reply
#         that has more commands behind it).
WRITE_SCRIPT = """
local RECENT_OPS_CHARS = 16 * 33 - 1
local unpack = unpack or table.unpack
local state = KEYS[1]
local version = tonumber(redis.call('hget', state, 'version') or '0')
local function release()
    if redis.call('get', KEYS[8]) == ARGV[4] then
        redis.call('del', KEYS[8])
        return 1
    end
    return 0
end
local recent = redis.call('hget', state, 'recent_ops') or ''
if string.find(' ' .. recent .. ' ', ' ' .. ARGV[3] .. ' ', 1, true) then
    return {'dup', version, '', release()}
end
local token = tonumber(ARGV[1])
local newest = math.max(tonumber(redis.call('hget', state, 'fence') or '0'),
                        tonumber(redis.call('get', KEYS[7]) or '0'))
if token < newest then
    return {'STALE_FENCE', ARGV[1], tostring(newest)}
end
if version ~= tonumber(ARGV[2]) then
    return {'CONFLICT', ARGV[2], tostring(version)}
end
if ARGV[5] ~= '' then
    local found = redis.call('hget', KEYS[9], ARGV[5]) or ''
    if found ~= ARGV[6] then return {'RECORD_MOVED', ARGV[6], found} end
end
local record = tonumber(ARGV[7])
local i = 8 + 2 * record
local function take(count)
    local out = {}
    for j = 1, count do out[j] = ARGV[i + j - 1] end
    i = i + count
    return out
end
for k = 1, 5 do
    local n = tonumber(ARGV[i]); i = i + 1
    if n > 0 then redis.call('hset', KEYS[k], unpack(take(2 * n))) end
    local m = tonumber(ARGV[i]); i = i + 1
    if m > 0 then redis.call('hdel', KEYS[k], unpack(take(m))) end
end
if record > 0 then redis.call('hset', KEYS[9], unpack(ARGV, 8, 7 + 2 * record)) end
local n = tonumber(ARGV[i]); i = i + 1
local id = redis.call('xadd', KEYS[6], '*', unpack(take(2 * n)))
recent = string.sub(ARGV[3] .. ' ' .. recent, 1, RECENT_OPS_CHARS)
redis.call('hset', state, 'version', version + 1, 'fence', ARGV[1], 'recent_ops', recent)
return {'ok', version + 1, id, release()}
"""

# The read a mutation makes, run by the lock's ACQUIRE_THEN_READ_SCRIPT right after the lock is taken.
# KEYS[1..5] = state, positions, reservations, closed and fills hashes (as for WRITE_SCRIPT)
# ARGV[1] = a reservation id ("" for none), ARGV[2] = a fill id ("" for none)
# returns {state as a flat HGETALL, positions as a flat HGETALL, the reservation's value,
#          the reservation's close reason, the fill's reservation id} ("" where absent)
READ_SCRIPT = """
local function field(key, name)
    if name == '' then return '' end
    return redis.call('hget', key, name) or ''
end
return {redis.call('hgetall', KEYS[1]), redis.call('hgetall', KEYS[2]), field(KEYS[3], ARGV[1]),
        field(KEYS[4], ARGV[1]), field(KEYS[5], ARGV[2])}
"""

# A consistent read of the whole account (snapshot, verify), one reply (no MULTI pipeline).
# KEYS[1..5] = state, positions, reservations, closed and fills hashes (as for WRITE_SCRIPT)
# ARGV[1] = "1" to return the closed and fills hashes too, "0" for their sizes only
# returns {state, positions, reservations, closed or its HLEN, fills or its HLEN} (flat HGETALLs)
FULL_READ_SCRIPT = """
local function part(key)
    if ARGV[1] == '1' then return redis.call('hgetall', key) end
    return redis.call('hlen', key)
end
return {redis.call('hgetall', KEYS[1]), redis.call('hgetall', KEYS[2]), redis.call('hgetall', KEYS[3]),
        part(KEYS[4]), part(KEYS[5])}
"""

# The read of a decision that tries to take the lock in its batched reads (a LockedRead body for
# the lock's TRY_THEN_READ_SCRIPT: it runs whether or not the lock was taken).
# KEYS[1..4] = state, positions, reservations and closed hashes; ARGV[1] = the id of the
# reservation the decision may make
# returns {state, positions, reservations (flat HGETALLs), that reservation's close reason or ""}
HELD_READ_SCRIPT = """
return {redis.call('hgetall', KEYS[1]), redis.call('hgetall', KEYS[2]), redis.call('hgetall', KEYS[3]),
        redis.call('hget', KEYS[4], ARGV[1]) or ''}
"""
