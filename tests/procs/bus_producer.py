"""A bus producer process for multi-process tests: publishes ``--count`` bars for ``--symbol``.

Bar ``trade_count`` carries the sequence number 0..count-1, so consumers' effects can be checked
for loss, duplication and order.
"""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal

from shared.bus import Publisher
from shared.clock import LiveClock
from shared.config import settings_or_exit
from shared.keys import BARS, Keys
from shared.models import Bar
from shared.redis.client import connect


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbol", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    settings = settings_or_exit()
    client = connect(settings)
    publisher = Publisher(client, Keys(settings.key_prefix), settings.bus)
    clock = LiveClock()
    price = Decimal("100.00")
    for seq in range(args.count):
        bar = Bar(time=clock.now(), symbol=args.symbol, open=price, high=price, low=price, close=price,
                  volume=Decimal(seq), trade_count=seq)
        publisher.publish(BARS, bar)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
