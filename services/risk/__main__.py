"""``python -m services.risk``."""

import sys

from services.risk.service import main
from shared.service import run_service

sys.exit(run_service("risk", main))
