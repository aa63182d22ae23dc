"""The admission check every bar passes: new for its symbol, or dropped/refused.

One hash, ``<prefix>:last-bar`` (symbol -> time of the newest accepted bar), and one Lua script
that compares and writes it for a whole batch in a single atomic step, so two ingester instances
fed the same data cannot both accept a bar:

* a bar newer than the symbol's newest is **accepted** and becomes the newest;
* a bar with the same time as the newest is a **duplicate** (dropped quietly, counted);
* an older bar is **out of order** (refused, with a log line from the caller).

Times are written in one fixed-width ISO-8601 form (``2026-01-02T14:30:00.000000+00:00``), so
the script compares them as strings and ``datetime.fromisoformat`` reads them back.

What is left to the caller: the gate marks a bar seen *before* it is published. An ingester
killed between the two loses that batch (at most ``ingester.batch`` bars); a restarted replay
refuses them as already seen. Live market data cannot be re-requested anyway; a CSV replay can
be re-run under a fresh key prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import IntEnum
from typing import Any

import redis

from shared.clock import utc
from shared.errors import RedisUnavailable
from shared.keys import Keys
from shared.models import Bar

__all__ = ["BarGate", "Verdict", "format_time"]

# KEYS[1] = the last-bar hash (symbol -> fixed-width ISO time of its newest accepted bar)
# ARGV    = symbol1, time1, symbol2, time2, ... in arrival order
# returns   one integer per pair: 1 accepted (hash updated), 0 duplicate, -1 out of order
# Never errors (fakeredis's TCP server drops the connection on a Lua error).
ADMIT = """
local out = {}
for i = 1, #ARGV, 2 do
  local symbol, t = ARGV[i], ARGV[i + 1]
  local last = redis.call('HGET', KEYS[1], symbol)
  if (not last) or t > last then
    redis.call('HSET', KEYS[1], symbol, t)
    out[#out + 1] = 1
  elseif t == last then
    out[#out + 1] = 0
  else
    out[#out + 1] = -1
  end
end
return out
"""


class Verdict(IntEnum):
    """What the gate decided about one bar."""

    OUT_OF_ORDER = -1
    DUPLICATE = 0
    ACCEPTED = 1


def format_time(when: datetime) -> str:
    """``when`` in the fixed-width UTC ISO form the last-bar hash holds."""
    return utc(when).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


class BarGate:
    """Runs the admission script for batches of bars."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.last_bar
        self._script = client.register_script(ADMIT)

    def admit(self, bars: Sequence[Bar]) -> list[Verdict]:
        """One verdict per bar, in order; the hash is updated for every accepted bar."""
        if not bars:
            return []
        args: list[str] = []
        for bar in bars:
            args.append(bar.symbol)
            args.append(format_time(bar.time))
        try:
            reply: Any = self._script(keys=[self.key], args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(f"bar admission failed: {exc}") from exc
        return [Verdict(int(code)) for code in reply]

    def newest(self) -> dict[str, datetime]:
        """Every symbol's newest accepted bar time."""
        raw: Any = self.client.hgetall(self.key)
        return {_text(k): datetime.fromisoformat(_text(v)) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
