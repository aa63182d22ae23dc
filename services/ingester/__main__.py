"""``python -m services.ingester [--bars N]``: run the ingester (``--bars``: read N bars, then exit)."""

import argparse
import functools
import sys

from services.ingester.service import main
from shared.service import run_service

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bars", type=int, default=None, help="read N bars from the source, then exit")
    known, rest = parser.parse_known_args()
    sys.exit(run_service("ingester", functools.partial(main, max_bars=known.bars), rest))
