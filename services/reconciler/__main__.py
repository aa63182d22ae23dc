"""``python -m services.reconciler``."""

import sys

from services.reconciler.service import main
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("reconciler", main))
