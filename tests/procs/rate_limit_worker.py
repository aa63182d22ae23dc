"""A rate-limited client in its own OS process, for tests/system/test_rate_limit_processes.py.

``python -m tests.procs.rate_limit_worker --url U --prefix P --limit L --period S --mode M [...]``

Every worker counts itself on ``P:test:ready``, then waits for a token on ``P:test:go``.

Modes:

* ``count``  take a ticket (INCR ``P:test:tickets``) while tickets <= ``--total``, and for each
  acquire one grant of endpoint ``orders``; RPUSH ``"<pid> <grant Redis time µs>"`` on
  ``P:test:grants``. The processes together make exactly ``--total`` requests.
* ``until-stop``  acquire and record grants the same way until ``P:test:stop`` exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from shared.clock import LiveClock
from shared.keys import Keys
from shared.redis.connection import connect_url
from shared.safety.rate_limit import Limit, RateLimiter


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--period", type=float, required=True)
    parser.add_argument("--mode", choices=["count", "until-stop"], required=True)
    parser.add_argument("--total", type=int, default=0)
    args = parser.parse_args()
    client = connect_url(args.url)
    keys = Keys(args.prefix)
    limiter = RateLimiter(client, keys, account=Limit(args.limit, args.period), group="test",
                          clock=LiveClock())
    base = f"{args.prefix}:test"
    pid = os.getpid()
    client.incr(f"{base}:ready")
    if client.blpop([f"{base}:go"], timeout=60) is None:  # start together: the burst is one burst
        return 2
    while True:
        if args.mode == "count":
            if int(client.incr(f"{base}:tickets")) > args.total:
                break
        elif client.exists(f"{base}:stop"):
            break
        grant = limiter.acquire("orders", timeout=120)
        client.rpush(f"{base}:grants", f"{pid} {grant.at_us}")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
