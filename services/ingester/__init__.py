"""The ingester: market data into the ``bars`` stream and its per-partition copies.

Run it with ``python -m services.ingester [--bars N]``. Sources (``ingester.source``): a seeded
synthetic market (the default), a CSV replay of the user's own bars, or Alpaca's live stream.
Every bar passes an atomic per-symbol gate (duplicates dropped, out-of-order bars refused with a
log line) and is published to ``bars`` and to ``bars:<crc32(symbol) % partitions>``; a symbol
with no bar for ``ingester.stale_after_s`` is logged and alerted on the ``alerts`` stream.
"""

from services.ingester._gate import BarGate, Verdict, format_time
from services.ingester._service import Counts, Ingester, main, make_source, partition_of
from services.ingester._sources import (
    AlpacaSource,
    BarSource,
    CsvSource,
    SyntheticSource,
    bar_from_alpaca,
    bar_id,
)

__all__ = [
    "AlpacaSource",
    "BarGate",
    "BarSource",
    "Counts",
    "CsvSource",
    "Ingester",
    "SyntheticSource",
    "Verdict",
    "bar_from_alpaca",
    "bar_id",
    "format_time",
    "main",
    "make_source",
    "partition_of",
]
