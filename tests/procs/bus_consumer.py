"""A bus consumer process for multi-process tests.

Each message's effect is one RPUSH of ``<symbol>:<trade_count>`` to ``<prefix>:effects``, applied
once per message id through Idempotency. Settings (Redis URL, key prefix, bus timings) come
from the environment like a real service's. ``--delay-ms`` slows each message down so a test can
signal the process while it is mid-message; ``--handled-key`` records each acknowledged entry.
"""

from __future__ import annotations

import argparse
import sys
import time

from redis.client import Pipeline

from shared.bus import Consumer, Delivery, Idempotency
from shared.clock import LiveClock
from shared.config import settings_or_exit
from shared.keys import BARS, Keys
from shared.logging import configure_logging
from shared.models import Bar
from shared.redis.client import connect
from shared.stop import StopSignal


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--group", default="effects")
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    settings = settings_or_exit()
    configure_logging(f"test-consumer-{args.name}", settings.log.level)
    client = connect(settings)
    keys = Keys(settings.key_prefix)
    effects = f"{keys.prefix}:effects"
    started = f"{keys.prefix}:started:{args.name}"
    once = Idempotency(client, keys, args.group, settings.bus.idempotency_ttl_s)

    def handle(delivery: Delivery) -> None:
        bar = delivery.message
        assert isinstance(bar, Bar)
        client.incr(started)
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000)

        def effect(pipe: Pipeline) -> None:
            pipe.rpush(effects, f"{bar.symbol}:{bar.trade_count}")

        once.apply_once(bar.id, effect)

    stop = StopSignal()
    stop.install(settings.bus.grace_seconds)
    consumer = Consumer(client, keys, stream=BARS, group=args.group, handler=handle,
                        settings=settings.bus, clock=LiveClock(), name=args.name)
    consumer.run(stop)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
