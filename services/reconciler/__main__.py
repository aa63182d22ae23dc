"""``python -m services.reconciler``."""

import sys

from services.reconciler.service import main
from shared.service import run_service

sys.exit(run_service("reconciler", main))
