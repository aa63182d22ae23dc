"""``python -m services.risk``."""

import sys

from services.risk.service import main
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("risk", main))
