"""``python -m services.executor``."""

import sys

from services.executor.service import main
from shared.service import run_service

sys.exit(run_service("executor", main))
