"""``python -m services.monitor``."""

import sys

from services.monitor.service import main
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("monitor", main))
