"""run_service, the wrapper every service process runs in."""

from __future__ import annotations

import subprocess
import sys

from shared.keys import Keys
from tests.conftest import delete_keys
from tests.support.processes import REPO_ROOT

_PROBE = """
import gc
from shared.service import run_service
seen = []
status = run_service("probe", lambda ctx: seen.append(gc.get_freeze_count()), argv=["--instance", "p1"])
print(status, seen[0])
"""


def test_a_service_runs_with_its_start_up_objects_frozen(real_redis_url: str, keys: Keys) -> None:
    """By the time a service's main runs, what start-up made is frozen out of garbage collection
    (so no full collection walks it on the message path), and the service exits 0."""
    env = {"REDIS_URL": real_redis_url, "BASTION_KEY_PREFIX": keys.prefix, "PATH": ""}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    finally:
        delete_keys(real_redis_url, keys)
    assert done.returncode == 0, done.stderr
    status, frozen = done.stdout.split()[-2:]
    assert status == "0" and int(frozen) > 1000
