"""The admission check every bar passes: new for its symbol, or dropped/refused.

One hash, ``<prefix>:last-bar`` (symbol -> market time of the newest accepted bar), and one Lua
script that compares and writes it for a whole batch in a single atomic step, so two ingester
instances fed the same data cannot both accept a bar:

* a bar newer than the symbol's newest is **accepted** and becomes the newest;
* a bar with the same time as the newest is a **duplicate** (dropped quietly, counted);
* an older bar is **out of order** (refused, with a log line from the caller).

Times are written in one fixed-width ISO-8601 form (``2026-01-02T14:30:00.000000+00:00``), so
the script compares them as strings and ``datetime.fromisoformat`` reads them back.

The same script records, in ``<prefix>:bar-arrival``, *when* each symbol's newest bar was
accepted, on the ingester's clock (the caller passes one time per batch: its ``clock.now()`` as
it publishes). That, not the bar's own time, is what risk's stale-data rule reads: a synthetic
market's bar times run far ahead of the clock and a replay's lie years behind it, but either
feed is stale when nothing new has arrived for a while. A duplicate or an out-of-order bar
leaves the arrival time alone (it brings nothing new). A batch sent again after a dropped
connection carries the time it was first queued with: an arrival can only look older than it
was, never newer (the safe side for the rule).

:meth:`BarGate.admit_and_publish` does the check, the hash update and the XADDs of every
accepted bar to ``bars`` and to its partition stream in the same script, and writes each
symbol's newest close to ``<prefix>:last-price`` (the marks risk sizes orders with and equity is
valued at: a symbol is priced before any strategy can see its bar), and its arrival: a bar is
marked seen if and only if it was published (one round trip per batch, too: this is what makes
20,000 bars/s possible from one Python process, where two pipelined XADDs per bar managed about
12,000).
:class:`AdmissionLane` sends the same script on a connection of its own and reads the reply
later, so Redis runs one batch while the ingester encodes the next (on the 2-core development
machine, with 2 strategy workers: 0.21-0.23 of the same run's bare XADD rate, against 0.19-0.20
reading each reply before encoding the next batch).

What is left to the caller: trimming the streams (the script never trims, so it can never cut an
entry a group still needs), and, on a Redis Cluster, putting ``last-bar``, ``last-price``,
``bar-arrival``, ``bars`` and the partition streams in one hash slot (a shared hash tag in the
key prefix's scheme) -- the script touches all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import IntEnum
from typing import Any

import redis

from shared.bus import codec
from shared.clock import utc
from shared.errors import RedisUnavailable
from shared.keys import Keys
from shared.models import Bar
from shared.redis.boundary import redis_errors, refusing_writes
from shared.redis.client import reply_text

__all__ = ["AdmissionLane", "BarGate", "Verdict", "format_time"]

# KEYS[1] = the last-bar hash; KEYS[2] = the last-price hash; KEYS[3] = the bar-arrival hash;
# KEYS[4] = the bars stream; KEYS[5..] = partition streams 0..P-1
# ARGV[1] = the arrival time of the whole batch (fixed-width ISO, the ingester's clock)
# ARGV[2] = N, the number of envelope fields; ARGV[3..N+2] = their names (the same for every bar)
# then per bar: symbol, fixed-width ISO time, partition number (0-based), close (a decimal
# string), and the N field values
# returns   one integer per bar: 1 accepted (XADDed to KEYS[4] and its partition), 0 duplicate (the
#           symbol's newest time again), -1 out of order (older than that)
# Each symbol's newest time is read once (HGET) and written once (HSET, with its close and the
# arrival time: three HSETs per symbol accepted, none for one whose bars were all dropped), after
# the bars' XADDs: a script stopped part-way by a server error (out of memory) can leave a bar
# published and not marked -- published again if offered again: at least once, like every
# stream -- but never a bar marked and not published.
# Never errors (fakeredis's TCP server drops the connection on a Lua error).
ADMIT_AND_PUBLISH_SCRIPT = """
local arrived = ARGV[1]
local n = tonumber(ARGV[2])
local fields = {}
for j = 1, n do fields[2 * j - 1] = ARGV[2 + j] end
local newest, close = {}, {}
local touched, order = {}, {}
local out = {}
local i = n + 3
while i <= #ARGV do
  local symbol, t, partition = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local last = newest[symbol]
  if last == nil then
    last = redis.call('HGET', KEYS[1], symbol)
    newest[symbol] = last
  end
  if (not last) or t > last then
    for j = 1, n do fields[2 * j] = ARGV[i + 3 + j] end
    redis.call('XADD', KEYS[4], '*', unpack(fields))
    redis.call('XADD', KEYS[5 + partition], '*', unpack(fields))
    if not touched[symbol] then
      touched[symbol] = true
      order[#order + 1] = symbol
    end
    newest[symbol] = t
    close[symbol] = ARGV[i + 3]
    out[#out + 1] = 1
  elseif t == last then
    out[#out + 1] = 0
  else
    out[#out + 1] = -1
  end
  i = i + 4 + n
end
for k = 1, #order do
  redis.call('HSET', KEYS[1], order[k], newest[order[k]])
  redis.call('HSET', KEYS[2], order[k], close[order[k]])
  redis.call('HSET', KEYS[3], order[k], arrived)
end
return out
"""


class Verdict(IntEnum):
    """What the gate decided about one bar."""

    OUT_OF_ORDER = -1
    DUPLICATE = 0
    ACCEPTED = 1


_VERDICTS = {int(verdict): verdict for verdict in Verdict}


def format_time(when: datetime) -> str:
    """``when`` in the fixed-width UTC ISO form the last-bar and bar-arrival hashes hold."""
    return utc(when).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


class BarGate:
    """Runs the admission script for batches of bars."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.last_bar
        self.price_key = keys.last_price
        self.arrival_key = keys.bar_arrival
        self._publish = client.register_script(ADMIT_AND_PUBLISH_SCRIPT)

    def admit_and_publish(self, bars: Sequence[Bar], bars_key: str, partition_keys: Sequence[str],
                          partitions: Sequence[int], *, arrived: datetime) -> list[Verdict]:
        """Admit ``bars`` and XADD each accepted one to ``bars_key`` and its partition, atomically.

        ``partitions[i]`` is the index in ``partition_keys`` of ``bars[i]``'s partition; ``arrived``
        (the caller's ``clock.now()``) becomes the arrival time of each symbol with a bar accepted.
        """
        if not bars:
            return []
        with redis_errors("bar admission"):
            reply: Any = self._publish(keys=self.script_keys(bars_key, partition_keys),
                                       args=self.publish_args(bars, partitions, arrived=arrived))
        return _verdicts_of(reply)

    def script_keys(self, bars_key: str, partition_keys: Sequence[str]) -> list[str]:
        """The KEYS of :data:`ADMIT_AND_PUBLISH_SCRIPT`."""
        return [self.key, self.price_key, self.arrival_key, bars_key, *partition_keys]

    def publish_args(self, bars: Sequence[Bar], partitions: Sequence[int], *, arrived: datetime) -> list[Any]:
        """The ARGV of :data:`ADMIT_AND_PUBLISH_SCRIPT` for ``bars`` (non-empty), their partitions
        and the time they arrived."""
        names: list[str] | None = None
        args: list[Any] = []
        arrival = format_time(arrived)
        times: dict[datetime, str] = {}  # a batch holds few distinct times (a tick's bars share one)
        for bar, partition in zip(bars, partitions, strict=True):
            fields = codec.encode(bar)
            if names is None:
                names = list(fields)
                args = [arrival, len(names), *names]
            elif list(fields) != names:  # every Bar has the same envelope; refuse to guess otherwise
                raise ValueError(f"bar {bar.id} has envelope fields {list(fields)}, expected {names}")
            when = times.get(bar.time)
            if when is None:
                when = times[bar.time] = format_time(bar.time)
            args += [bar.symbol, when, partition, str(bar.close), *fields.values()]
        return args

    def lane(self, bars_key: str, partition_keys: Sequence[str]) -> AdmissionLane:
        """A connection of its own for :meth:`admit_and_publish` with the reply read later."""
        return AdmissionLane(self, bars_key, partition_keys)

    def newest(self) -> dict[str, datetime]:
        """Every symbol's newest accepted bar time."""
        raw: Any = self.client.hgetall(self.key)
        return {reply_text(k): datetime.fromisoformat(reply_text(v)) for k, v in raw.items()}


def _verdicts_of(reply: Any) -> list[Verdict]:
    """The script's reply as verdicts."""
    return [_VERDICTS[int(code)] for code in reply]


class AdmissionLane:
    """One connection on which a batch's admission is sent before the previous batch's reply is
    read, so Redis runs batch N while the ingester encodes batch N+1 (Redis answers in order).

    Batches queued (:meth:`queue`) and :meth:`receive` pair up first in, first out. The script
    goes as EVAL with its body (Redis hashes it, ~1.5 KB, once per batch: no NOSCRIPT to recover
    from after a Redis restart). A dropped connection is handled as the client's own commands are (its
    ``Retry``: a few tries with back-off): reconnect, send every batch still in flight again
    (their replies are lost; the gate drops as duplicates the bars that had gone out) and go on;
    when the tries run out, :class:`RedisUnavailable`, with every batch still queued: calling
    :meth:`flush` or :meth:`receive` again later sends them again. Use as a context manager: the connection
    goes back to the pool, or is closed if a reply may still be on its way.
    """

    def __init__(self, gate: BarGate, bars_key: str, partition_keys: Sequence[str]) -> None:
        self._gate = gate
        self._keys = gate.script_keys(bars_key, partition_keys)
        self._connection: Any = gate.client.connection_pool.get_connection()
        self._in_flight: deque[list[Any]] = deque()  # the ARGV of each batch sent, oldest first
        self._sent = 0  # how many of them went out on the current connection

    def __enter__(self) -> AdmissionLane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._in_flight:
            self._connection.disconnect()
        self._gate.client.connection_pool.release(self._connection)

    def queue(self, bars: Sequence[Bar], partitions: Sequence[int], *, arrived: datetime) -> None:
        """Queue the admission of ``bars`` (non-empty), which arrived at ``arrived``: the next
        :meth:`flush` or :meth:`receive` sends it; its verdicts come from a later :meth:`receive`."""
        self._in_flight.append(self._gate.publish_args(bars, partitions, arrived=arrived))

    def flush(self) -> None:
        """Send every queued batch not sent yet; one that fails to go stays queued."""
        self._retrying(self._send_unsent)

    def receive(self) -> list[Verdict]:
        """The verdicts of the oldest batch sent and not yet received."""
        def read() -> Any:
            self._send_unsent()
            try:
                return self._connection.read_response()
            except redis.ResponseError as exc:
                if not refusing_writes(exc):
                    raise
                # refused before its first write: start over on a new connection, every batch
                # still in flight sent again (the gate drops what had gone out as duplicates)
                self._connection.disconnect()
                self._sent = 0
                raise RedisUnavailable(f"bar admission refused: {exc}") from exc

        reply = self._retrying(read)
        self._in_flight.popleft()
        self._sent -= 1
        return _verdicts_of(reply)

    def _send_unsent(self) -> None:
        while self._sent < len(self._in_flight):
            self._connection.send_command("EVAL", ADMIT_AND_PUBLISH_SCRIPT, len(self._keys), *self._keys,
                                          *self._in_flight[self._sent])
            self._sent += 1

    def _retrying(self, do: Callable[[], Any]) -> Any:
        def dropped(_: Exception) -> None:
            self._connection.disconnect()
            self._sent = 0

        with redis_errors("bar admission"):
            return self._connection.retry.call_with_retry(do, dropped)
