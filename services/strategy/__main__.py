"""``python -m services.strategy``: run one strategy worker (run several to scale)."""

import sys

from services.strategy.service import main
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("strategy", main))
