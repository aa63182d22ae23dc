"""The ingester: market data into the ``bars`` stream and its per-partition copies.

Consumes: a bar source (``ingester.source``: a seeded synthetic market, the default; a CSV
replay; Alpaca's live stream); no stream group. Produces: each bar once, in order, on ``bars``
and on ``bars:<crc32(symbol) % partitions>``, with its close in ``<prefix>:last-price`` and its
arrival in ``<prefix>:bar-arrival``, all in
one script per batch (:mod:`._gate`: duplicates dropped, out-of-order bars refused); alerts on
``alerts`` for a symbol with no bar for ``ingester.stale_after_s``. Acknowledges nothing.
Run it with ``python -m services.ingester [--bars N]``.
"""

from services.ingester._gate import BarGate, Verdict, format_time
from services.ingester._sources import (
    AlpacaSource,
    BarSource,
    CsvSource,
    SyntheticSource,
    bar_from_alpaca,
    bar_id,
)
from services.ingester.service import Counts, Ingester, main, make_source, partition_of

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
