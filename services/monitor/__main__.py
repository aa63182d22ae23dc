"""``python -m services.monitor``."""

import sys

from services.monitor.service import main
from shared.service import run_service

sys.exit(run_service("monitor", main))
