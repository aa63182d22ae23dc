"""``python -m services.executor``."""

import sys

from services.executor.service import main
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("executor", main))
